"""Several GPUs of one machine behind one endpoint (compose profile multi-gpu): one server per GPU,
each the single-GPU service's own definition pinned to its own GPU and publishing nothing, behind
an nginx proxy that publishes the server's ports on loopback and balances over every replica;
`docker compose up` alone still runs the single server, and neither way clashes on a port."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from rexomni_server.settings import Settings
from rexomni_server.vocabulary import MAX_MESSAGE_BYTES

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
COMPOSE = DEPLOY / "compose.yaml"
NGINX = DEPLOY / "nginx" / "nginx.conf"
UPSTREAMS = DEPLOY / "nginx" / "upstreams.conf"
SERVER = Settings()
PROFILE = "multi-gpu"
REPLICA = re.compile(r"rexomni-gpu(\d+)")
LOOPBACK = {"127.0.0.1", "::1", "localhost"}
# ${NAME:-default} / ${NAME-default}: what compose substitutes when NAME is unset.
INTERPOLATION = re.compile(r"\$\{(\w+):?-([^}]*)\}")
SIZE = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}


def services() -> dict[str, Any]:
    found: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())["services"]
    return found


def replicas() -> dict[str, Any]:
    return {name: service for name, service in services().items() if REPLICA.fullmatch(name)}


def published(service: dict[str, Any]) -> set[tuple[str, int, int]]:
    """(host address, host port, container port) of each published port, variables at their defaults."""
    ports = set()
    for spec in service.get("ports", []):
        address, _, container = INTERPOLATION.sub(lambda m: m.group(2), spec).rpartition(":")
        address, _, host = address.rpartition(":")
        ports.add((address.strip("[]"), int(host), int(container.split("/")[0])))
    return ports


def nginx_text(path: Path) -> str:
    """The config without comments."""
    return re.sub(r"#[^\n]*", "", path.read_text())


def upstream_servers() -> dict[str, list[str]]:
    """Each upstream block's server addresses."""
    blocks = re.findall(r"upstream\s+(\w+)\s*\{(.*?)\}", nginx_text(UPSTREAMS), re.DOTALL)
    return {name: re.findall(r"^\s*server\s+(\S+?)[\s;]", body, re.MULTILINE) for name, body in blocks}


def directive(text: str, name: str) -> list[str]:
    return re.findall(rf"^\s*{name}\s+([^;]*);", text, re.MULTILINE)


def seconds(value: str) -> float:
    number, unit = re.fullmatch(r"(\d+)(ms|s|m|h)?", value).groups()  # type: ignore[union-attr]
    return float(number) * {"ms": 0.001, "s": 1, None: 1, "m": 60, "h": 3600}[unit]


def test_every_replica_is_the_single_gpu_server_in_the_multi_gpu_profile() -> None:
    single = services()["rexomni"]
    found = replicas()
    assert len(found) >= 2
    for name, replica in found.items():
        assert replica["profiles"] == [PROFILE], name
        # The same image, environment, volumes, user, read-only root, capabilities, restart...:
        # everything but the published ports and the GPU reservation.
        shared = {key: value for key, value in single.items() if key not in ("ports", "deploy")}
        assert {key: replica.get(key) for key in shared} == shared, name
        assert set(replica) == set(shared) | {"profiles", "deploy"}, name
        # The container sees only its GPU, as device 0: a host index here would hide it.
        assert "CUDA_VISIBLE_DEVICES" not in replica["environment"], name
    assert "profiles" not in single  # `docker compose up` runs the single server, as before


def test_each_replica_pins_a_gpu_of_its_own_and_publishes_nothing() -> None:
    pinned = {}
    for name, replica in replicas().items():
        assert "ports" not in replica and "expose" not in replica, name
        (device,) = replica["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"], name
        assert "count" not in device, name  # a count would let Docker pick any GPU
        (gpu,) = device["device_ids"]
        assert gpu == REPLICA.fullmatch(name).group(1), name  # type: ignore[union-attr]
        pinned[name] = gpu
    assert len(set(pinned.values())) == len(pinned), pinned


def test_the_proxy_publishes_the_servers_ports_on_loopback_with_least_privilege() -> None:
    proxy = services()["proxy"]
    assert proxy["profiles"] == [PROFILE]
    single = published(services()["rexomni"])
    assert published(proxy) == single  # clients reach the same endpoint either way
    assert {(host, container) for _, host, container in single} == {
        (SERVER.port, SERVER.port),
        (SERVER.grpc_port, SERVER.grpc_port),
    }
    assert {address for address, _, _ in published(proxy)} <= LOOPBACK
    assert {m.group(1) for spec in proxy["ports"] for m in INTERPOLATION.finditer(spec)} == {"PUBLISH_ADDRESS"}
    assert str(proxy["user"]).split(":")[0] not in ("0", "root")
    assert proxy["read_only"] is True
    assert proxy["cap_drop"] == ["ALL"] and not proxy.get("cap_add")
    assert "no-new-privileges:true" in proxy["security_opt"]
    assert set(proxy["depends_on"]) == set(replicas())
    # nginx writes only under its prefix, a tmpfs; its config is the repository's, read-only.
    command = proxy["entrypoint"]
    prefix = command[command.index("-p") + 1]
    assert prefix.rstrip("/") in {entry.split(":")[0] for entry in proxy["tmpfs"]}
    mounts = {target: source for source, target, mode in (v.split(":") for v in proxy["volumes"]) if mode == "ro"}
    config = command[command.index("-c") + 1]
    assert Path(config).parent / "upstreams.conf" == Path(next(t for t in mounts if t.endswith("upstreams.conf")))
    assert DEPLOY / mounts[config] == NGINX
    assert {DEPLOY / source for source in mounts.values()} == {NGINX, UPSTREAMS}


def test_neither_way_of_running_clashes_on_a_published_port() -> None:
    """`docker compose up` (no profile) and the documented multi-gpu command publish each host
    port once, and run either the single server or the replicas, never both."""
    header = "".join(line for line in COMPOSE.read_text().splitlines(keepends=True) if line.startswith("#"))
    command = re.search(rf"docker compose -f deploy/compose.yaml --profile {PROFILE} up( --scale \S+=0)*", header)
    assert command, "the header documents how to run the multi-gpu profile"
    scaled_to_zero = set(re.findall(r"--scale (\S+)=0", command.group(0)))
    runs = {
        "default": {name for name, s in services().items() if not s.get("profiles")},
        PROFILE: {name for name, s in services().items() if PROFILE in s.get("profiles", [PROFILE])} - scaled_to_zero,
    }
    for way, running in runs.items():
        ports = [(address, host) for name in running for address, host, _ in published(services()[name])]
        assert len(ports) == len(set(ports)), (way, sorted(ports))
    assert "rexomni" in runs["default"] and not set(replicas()) & runs["default"]
    assert "rexomni" not in runs[PROFILE] and set(replicas()) | {"proxy"} <= runs[PROFILE]


def test_the_proxy_balances_over_every_replica_on_both_ports() -> None:
    upstreams = upstream_servers()
    names = sorted(replicas())
    assert sorted(upstreams["rexomni_http"]) == [f"{name}:{SERVER.port}" for name in names]
    assert sorted(upstreams["rexomni_grpc"]) == [f"{name}:{SERVER.grpc_port}" for name in names]
    text = nginx_text(UPSTREAMS)
    assert text.count("least_conn;") == 2  # the replica with the fewest open requests, on both
    main = nginx_text(NGINX)
    assert directive(main, "include") == ["upstreams.conf"]
    assert directive(main, "listen") == [str(SERVER.port), f"{SERVER.grpc_port} http2"]
    assert set(directive(main, "proxy_pass")) == {"http://rexomni_http"}
    assert directive(main, "grpc_pass") == ["grpc://rexomni_grpc"]
    # Every Prometheus target of the job: each replica, never the proxy.
    prometheus = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    (job,) = [job for job in prometheus["scrape_configs"] if job["job_name"] == "rexomni"]
    scraped = {name for sd in job["dns_sd_configs"] for name in sd["names"]}
    assert scraped == set(names) | {"rexomni"}


def test_the_proxy_waits_out_long_requests_streams_unbuffered_and_takes_whole_images() -> None:
    main = nginx_text(NGINX)
    for name in ("proxy_read_timeout", "grpc_read_timeout"):
        (value,) = directive(main, name)
        assert seconds(value) > SERVER.request_timeout_s, name  # the server times a request out first
    # Server-sent events: a location for both stream paths, unbuffered.
    (stream,) = re.findall(r"location\s+~\s+(\S+)\s*\{([^}]*)\}", main)
    pattern, body = stream
    assert all(re.search(pattern, path) for path in ("/v1/detect/stream", "/detect/stream"))
    assert not re.search(pattern, "/v1/detect")
    assert "proxy_buffering off;" in body
    (limit,) = directive(main, "client_max_body_size")
    number, unit = re.fullmatch(r"(\d+)([kmg]?)", limit.lower()).groups()  # type: ignore[union-attr]
    assert int(number) * SIZE[unit] >= max(MAX_MESSAGE_BYTES, SERVER.max_image_bytes * 4 // 3)
    # Idle upstream connections: the proxy drops them before the server does (a request on one
    # the server just closed would fail).
    (keepalive,) = directive(nginx_text(UPSTREAMS), "keepalive_timeout")
    assert seconds(keepalive) < SERVER.http_keep_alive_timeout_s
    # A stop lets open streams finish before Docker kills the proxy.
    (shutdown,) = directive(main, "worker_shutdown_timeout")
    assert seconds(shutdown) < seconds(services()["proxy"]["stop_grace_period"])
