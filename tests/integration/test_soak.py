"""The fault and soak suite (benchmarks/soak.py) at a small size: every request answered exactly
once, nothing left in flight, the documented exit statuses, resident memory flat after warm-up.
The full-size figures are in benchmarks/RESULTS.md; nothing here is timed (the suite's time
limits are hang guards)."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
from benchmarks.soak import (
    ANSWERED,
    REFUSED,
    Outcome,
    PhaseReport,
    Reply,
    SoakConfig,
    Violations,
    account,
    mixed_kinds,
    phase_engine_kill,
    phase_mixed,
    phase_sigterm,
    phase_storm,
    print_phase,
    transport_kinds,
)

from rexomni_server.serve import EXIT_FATAL

ROOT = Path(__file__).resolve().parents[2]
SMALL = SoakConfig(requests=500, concurrency=16, storm_streams=40, storm_rounds=1, fault_load_s=1.0, seconds=120)
# Generous: the full-size run measures a few MiB (benchmarks/RESULTS.md); the leak this guards
# against grew by hundreds of MiB over a few thousand requests.
MEMORY_BOUND_MIB = 50


def small(tmp_path: Path) -> SoakConfig:
    return dataclasses.replace(SMALL, work_dir=tmp_path)


def show(report: PhaseReport) -> None:
    print_phase(report)  # the figures, in the output of a failing test (or with -s)


@pytest.mark.slow
async def test_mixed_load_is_answered_exactly_once_and_memory_stays_flat(tmp_path: Path) -> None:
    report = await phase_mixed(small(tmp_path))
    show(report)
    figures = report.figures
    assert report.violations == []
    assert figures["requests"] == SMALL.requests
    assert set(report.kinds) == {kind.name for kind in mixed_kinds()}  # every good and hostile kind was sent
    assert figures["answered_logged_once"] == figures["answered"] > 0
    assert figures["logged_twice_or_more"] == figures["hung"] == figures["server_errors"] == 0
    assert figures["in_flight_end"] == figures["queue_depth_end"] == 0
    assert figures["exit_status"] == 0
    print(f"resident memory growth after warm-up: {figures['rss_growth_mib']} MiB")
    assert figures["rss_growth_mib"] < MEMORY_BOUND_MIB, figures["rss_by_measured_requests"]


@pytest.mark.slow
async def test_disconnect_storm_leaves_nothing_in_flight(tmp_path: Path) -> None:
    report = await phase_storm(small(tmp_path))
    show(report)
    assert report.violations == []  # in flight back to 0 and a good request served after each storm
    assert report.figures["dropped_mid_stream"] > 0  # streams were cut during their generation
    assert report.figures["answered_logged_once"] == report.figures["answered"]
    assert report.figures["hung"] == 0


@pytest.mark.slow
async def test_sigterm_under_load_drains_and_exits_0(tmp_path: Path) -> None:
    report = await phase_sigterm(small(tmp_path))
    show(report)
    assert report.violations == []
    assert report.figures["exit_status"] == 0
    assert report.figures["in_flight_at_signal"] > 0  # it was under load when signalled
    assert report.figures["answered_logged_once"] == report.figures["answered"]


@pytest.mark.slow
async def test_engine_killed_under_load_answers_engine_dead_and_exits_1(tmp_path: Path) -> None:
    report = await phase_engine_kill(small(tmp_path))
    show(report)
    figures = report.figures
    assert report.violations == []
    assert figures["exit_status"] == EXIT_FATAL
    assert figures["in_flight_end"] == figures["queue_depth_end"] == 0
    assert figures["outcomes"].get("ok", 0) > 0 and figures["outcomes"].get("engine_dead", 0) > 0
    assert figures["answered_logged_once"] == figures["answered"]


def test_the_accounting_catches_lost_doubled_and_misreported_requests() -> None:
    """The checks the phases rely on can fail: a lost, a doubled, a misreported request, a
    refused one that was logged, and a log line nobody sent are each named."""
    kind = transport_kinds(1)[0]

    def outcome(request_id: str, reply: Reply) -> Outcome:
        return Outcome(request_id, kind, 0.0, reply, 0.0)

    ok = Reply(ANSWERED, "ok", True, 200, detections=1)
    outcomes = [
        outcome("fine", ok),
        outcome("lost", ok),
        outcome("doubled", ok),
        outcome("misreported", Reply(ANSWERED, "invalid_image", True, 400)),
        outcome("refused", Reply(REFUSED, "refused")),
    ]

    def line(request_id: str, status: str = "ok") -> dict[str, object]:
        return {"logger": "rexomni.requests", "msg": "request", "request_id": request_id, "status": status}

    entries = [line("fine"), line("doubled"), line("doubled"), line("misreported", "invalid_request")]
    entries += [line("refused", "invalid_request"), line("stranger")]
    violations = Violations()
    figures = account(outcomes, entries, violations)
    named = {request_id for ids in violations.found.values() for request_id in ids}
    assert named == {"lost", "doubled", "misreported", "refused", "stranger"}
    assert figures["answered"] == 4 and figures["answered_logged_once"] == 2 and figures["logged_twice_or_more"] == 1


@pytest.mark.slow
def test_the_command_runs_a_phase_and_writes_its_figures(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "benchmarks.soak", "--phases", "engine_kill", "--concurrency", "8"]
    proc = subprocess.run([*cmd, "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    figures = json.loads((tmp_path / "soak.json").read_text())
    assert figures["phases"]["engine_kill"]["passed"] and figures["phases"]["engine_kill"]["exit_status"] == EXIT_FATAL
    assert "== summary ==" in proc.stdout
