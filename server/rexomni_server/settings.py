"""Server settings: one class, read once in the composition root (env prefix ``REXOMNI_``)."""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from rexomni_server.vocabulary import PATCH_SIDE, PIXEL_UNIT

DEFAULT_MODEL = "IDEA-Research/Rex-Omni"
TINY_MODEL = "tiny"  # special value: generate and serve the tiny random checkpoint

EngineName = Literal["auto", "vllm", "transformers", "scripted"]


ENV_PREFIX = "REXOMNI_"
# Read by the client CLI (``rexomni``), not by the server: never an unknown server setting.
CLIENT_ENV = frozenset({"REXOMNI_API_KEY", "REXOMNI_URL"})


def default_tiny_dir() -> Path:
    return Path.home() / ".cache" / "rexomni" / "tiny-random"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore")

    # -- model and engine --
    model: str = Field(
        default=DEFAULT_MODEL,
        description="Checkpoint path or hub id; 'tiny' serves a generated random-weight model.",
    )
    engine: EngineName = "auto"
    fallback_to_tiny: bool = Field(
        default=False,
        description="If the model cannot be loaded (offline, no weights), serve the tiny "
        "random-weight model instead, loudly labelled. For demos, never for production.",
    )
    tiny_model_dir: Path = Field(default_factory=default_tiny_dir)
    device: str = Field(
        default="auto",
        description="transformers engine: 'auto' (cuda when present), 'cpu', 'cuda', 'cuda:1'; vLLM: "
        "CUDA_VISIBLE_DEVICES instead",
    )
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        default="auto", description="'auto': bfloat16 on GPU, float32 on CPU."
    )
    max_concurrency: int = Field(default=4, ge=1, description="Generations the transformers engine runs at once.")
    fast_decode: Literal["auto", "on", "off"] = Field(
        default="auto",
        description="transformers engine: static KV cache + compiled decode (auto: on CUDA). "
        "Runs one generation at a time.",
    )

    # -- vLLM engine --
    gpu_memory_utilization: float = Field(default=0.9, gt=0.0, le=1.0)
    tensor_parallel_size: int = Field(default=1, ge=1)
    quantization: str | None = Field(
        default=None, description="e.g. 'awq' for IDEA-Research/Rex-Omni-AWQ; None = from the checkpoint."
    )
    max_num_seqs: int = Field(default=256, ge=1, description="Sequences vLLM batches at most.")
    vllm_scheduling_policy: Literal["fcfs", "priority"] = Field(
        default="fcfs",
        description="vLLM: 'priority' serves waiting requests by options.priority (lower first) "
        "and may preempt running ones for a more urgent request; 'fcfs' in arrival order.",
    )
    enforce_eager: bool = Field(default=False, description="No CUDA graphs / compilation (faster start).")
    vllm_tokenizer_mode: str = Field(
        default="auto",
        description="The reference asks for 'slow'; current vLLM and transformers 5 have no slow "
        "Qwen tokenizer, and the fast one tokenises our prompts identically.",
    )

    # -- decoding defaults of the reference implementation --
    max_new_tokens: int = Field(default=4096, ge=1)
    max_new_tokens_limit: int = Field(default=8192, ge=1)
    temperature: float = Field(default=0.0, ge=0.0)
    top_p: float = Field(default=0.8, gt=0.0, le=1.0)
    top_k: int = Field(default=1, ge=0)
    repetition_penalty: float = Field(default=1.05, gt=0.0)
    # The prompt (image tokens: 2560 at the default max_pixels, plus the text) and the
    # answer (max_new_tokens, up to its 8192 ceiling) must both fit, or vLLM ends answers early.
    max_model_len: int = Field(default=12288, ge=256)
    repetition_limit: int = Field(default=3, ge=1, description="Duplicate detections in a row that stop a generation.")

    # -- images --
    min_pixels: int = Field(default=16 * PIXEL_UNIT, ge=PIXEL_UNIT)
    max_pixels: int = Field(default=2560 * PIXEL_UNIT, ge=PIXEL_UNIT)
    max_pixels_limit: int = Field(default=16384 * PIXEL_UNIT, description="Ceiling for a request's max_pixels option.")
    max_image_bytes: int = Field(default=20 * 1024 * 1024, ge=1)
    max_image_side: int = Field(default=16384, ge=PATCH_SIDE)
    max_decoded_pixels: int = Field(default=100_000_000, description="Decompression-bomb guard on the decoded image.")
    max_tiles: int = Field(
        default=32,
        ge=1,
        description="Grid tiles a tiled request may use (the whole-image pass not counted); a plan "
        "needing more is refused with a hint (larger tiles, or a smaller image).",
    )
    decode_workers: int = Field(
        default=2, ge=1, description="Threads that decode and resize images (each holds one decoded image)."
    )
    decode_queue: int = Field(
        default=16,
        ge=1,
        description="Images being decoded or waiting for a decode thread at once; past it requests get "
        "429 at once (bounds the memory and wait that decoding adds to a request).",
    )

    # -- serving --
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535, description="HTTP port.")
    grpc_port: int = Field(default=50051, ge=0, le=65535)
    http_enabled: bool = True
    grpc_enabled: bool = True
    max_queue: int = Field(
        default=256,
        ge=1,
        description="Engine requests admitted at once (running + waiting; a request fanned out over N "
        "categories takes N); 429 past it.",
    )
    request_timeout_s: float = Field(
        default=600.0, gt=0, description="Time budget of a request from arrival, also when its client stops reading."
    )
    engine_failure_exit_s: float = Field(
        default=5.0,
        ge=0,
        description="When the engine dies or the model cannot be loaded: seconds the server goes on "
        "answering (503, not ready) so probes and load balancers see why, before it exits non-zero.",
    )
    http_max_connections: int = Field(
        default=1024, ge=1, description="HTTP connections (and requests) at once; past it new requests get 503."
    )
    http_header_timeout_s: float = Field(
        default=10.0, gt=0, description="A connection must send a request's headers within this (slow clients)."
    )
    http_body_timeout_s: float = Field(
        default=60.0, gt=0, description="A request must send its whole body within this; else 408."
    )
    http_keep_alive_timeout_s: int = Field(default=5, ge=1, description="Idle keep-alive connections close after this.")
    grpc_max_concurrent_rpcs: int = Field(
        default=1024, ge=1, description="gRPC calls at once (health checks included); past it RESOURCE_EXHAUSTED."
    )
    grpc_keepalive_s: float = Field(
        default=60.0, gt=0, description="gRPC pings idle connections this often and drops those that do not answer."
    )
    grpc_min_ping_interval_s: float = Field(
        default=10.0,
        gt=0,
        description="gRPC clients may ping at most this often; a client pinging faster is disconnected.",
    )
    grpc_max_connection_age_s: float = Field(
        default=300.0,
        gt=0,
        description="gRPC connections are asked to reconnect after about this long (streams in flight finish "
        "first), so clients balancing over several replicas pick up new ones.",
    )
    drain_timeout_s: float = Field(
        default=30.0,
        ge=0,
        description="On SIGTERM/SIGINT: seconds in-flight requests get to finish before they are cut "
        "(new connections are refused at once).",
    )
    scripted_token_delay_s: float = Field(
        default=0.0,
        ge=0,
        description="engine=scripted (no model): seconds per replayed token, to simulate decode time in load tests.",
    )
    allow_forced_output: bool = Field(
        default=False, description="Accept options.forced_output (tests and benchmarks only)."
    )
    log_level: str = "INFO"

    # -- access --
    api_keys: SecretStr = Field(
        default=SecretStr(""),
        description="Comma-separated API keys. When any is set, requests must carry one "
        "('Authorization: Bearer KEY' or 'x-api-key: KEY'; gRPC metadata alike), except health, "
        "readiness, metrics and the API description (probes and scrapers).",
    )
    api_keys_file: Path | None = Field(
        default=None, description="A file of API keys, one per line (e.g. a mounted secret); adds to api_keys."
    )
    require_api_keys: bool = Field(
        default=False,
        description="Refuse to start without at least one API key (deployments set it, so a missing or "
        "empty key secret stops the server instead of serving an open endpoint).",
    )
    tls_cert_file: Path | None = Field(
        default=None, description="PEM certificate (chain): HTTPS and gRPC over TLS on the same ports."
    )
    tls_key_file: Path | None = Field(default=None, description="PEM private key of tls_cert_file.")

    # -- Label Studio ML backend (/label-studio) --
    label_studio_url: str = Field(
        default="",
        pattern=r"^(https?://\S+)?$",
        description="Label Studio's base URL as this server reaches it (e.g. http://label-studio:8080), for "
        "images Label Studio stores itself (/data/upload/..., /data/local-files/..., cloud storage). "
        "Empty: the hostname Label Studio sends when it connects.",
    )
    label_studio_api_key: SecretStr = Field(
        default=SecretStr(""),
        description="A Label Studio access token to fetch those images with: a legacy token (sent as "
        "'Authorization: Token ...') or a personal access token (exchanged for a short-lived access token). "
        "Empty: the token of the project's owner that Label Studio sends when it connects.",
    )

    @model_validator(mode="after")
    def _check_limits(self) -> Settings:
        if self.min_pixels > self.max_pixels:
            raise ValueError("min_pixels must not exceed max_pixels")
        if self.max_pixels > self.max_pixels_limit:
            raise ValueError("max_pixels must not exceed max_pixels_limit")
        if not (self.http_enabled or self.grpc_enabled):
            raise ValueError("enable at least one of HTTP and gRPC")
        if self.max_new_tokens > self.max_new_tokens_limit:
            raise ValueError("max_new_tokens must not exceed max_new_tokens_limit")
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("TLS needs both tls_cert_file and tls_key_file")
        for path in (self.tls_cert_file, self.tls_key_file):
            if path is not None and not path.is_file():
                raise ValueError(f"TLS file {path} does not exist")
        return self

    @property
    def tls(self) -> bool:
        return self.tls_cert_file is not None


def unknown_env_settings(environ: Mapping[str, str]) -> list[str]:
    """``REXOMNI_*`` variables that name no setting, each with the closest setting when one is
    close. pydantic-settings reads only the variables it knows, so a misspelt one would
    otherwise be ignored without a word and the server would run on the default."""
    known = sorted(name.upper() for name in Settings.model_fields)
    unknown = []
    for key in sorted(environ):
        name = key.upper()
        if name.startswith(ENV_PREFIX) and name.removeprefix(ENV_PREFIX) not in known and name not in CLIENT_ENV:
            close = difflib.get_close_matches(name.removeprefix(ENV_PREFIX), known, n=1)
            unknown.append(f"{key} (did you mean {ENV_PREFIX}{close[0]}?)" if close else key)
    return unknown
