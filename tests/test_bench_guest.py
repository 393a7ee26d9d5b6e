"""`espgate bench packets --guest --quick` in one qemu boot: kernel mode for real.

The module fixture runs the benchmark once in the emulated guest (modes plain,
espgate and kernel, TCP with one stream, 3-second runs; about two minutes under
TCG) and each test checks one property of the document it wrote.  The kernel
mode must be measured through XFRM: a point marked unavailable, or kernel SA
counters that carried nothing, fail the tests rather than skip them.  Skipped
only where no guest can be had (not root, no qemu, no kernel package).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from bench.cli import main

MODES = ("plain", "espgate", "kernel")
pytestmark = pytest.mark.guest


@pytest.fixture(scope="module")
def guest_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path]:
    from control.guest import guest_available

    if os.geteuid() != 0:
        pytest.skip("needs root")
    ok, why = guest_available(fetch=True)
    if not ok:
        pytest.skip(f"no qemu guest here: {why}")
    out = tmp_path_factory.mktemp("bench-guest") / "packets-guest.json"
    argv = ["packets", "--guest", "--quick", "--no-progress", "--modes", *MODES]
    argv += ["--traffic", "tcp-1", "--duration", "3", "--json", str(out)]
    assert main(argv) == 0
    return json.loads(out.read_text()), out


def _points(doc: dict[str, Any], mode: str) -> list[dict[str, Any]]:
    return [p for p in doc["points"] if p["mode"] == mode]


def test_bench_guest_kernel_mode_measured_not_unavailable(guest_run) -> None:
    doc, _ = guest_run
    (point,) = _points(doc, "kernel")
    assert point["available"] is True, point["reason"]
    assert point["traffic"] == "tcp-1" and point["gbit_per_s"] > 0
    assert doc["kernel_probe"] == "ok"


def test_bench_guest_kernel_traffic_went_through_xfrm_sas(guest_run) -> None:
    # a silent fallback to plain routing would leave the kernel SAs idle
    peers = guest_run[0]["peers"]
    cli, hub = peers["kernel-cli"], peers["kernel-hub"]
    assert cli["sa_out"]["packets"] > 100 and hub["sa_in"]["packets"] > 100
    assert hub["sa_out"]["packets"] > 0 and cli["sa_in"]["packets"] > 0
    assert hub["sa_in"]["packets"] <= cli["sa_out"]["packets"]
    for sa in (cli["sa_in"], hub["sa_in"]):
        assert sa["drops"] == {"replay": 0, "auth": 0, "replay_window": 0}


def test_bench_guest_kernel_cleanup_leaves_xfrm_empty(guest_run) -> None:
    cleanup = guest_run[0]["peers"]["kernel-cleanup"]
    assert len(cleanup) == 2
    for listing in cleanup.values():
        assert listing == {"state": "", "policy": ""}


def test_bench_guest_every_point_emulated(guest_run) -> None:
    doc, _ = guest_run
    assert doc["emulated"] is True
    assert {p["mode"] for p in doc["points"]} == set(MODES)
    assert all(p["emulated"] is True for p in doc["points"])


def test_bench_guest_espgate_points_present(guest_run) -> None:
    doc, _ = guest_run
    (point,) = _points(doc, "espgate")
    assert point["available"] is True and point["gbit_per_s"] > 0
    assert doc["peers"]["espgate-hub"]["sa_in"]["drops"]["auth"] == 0
    assert doc["peers"]["espgate-cli"]["sa_out"]["packets"] > 0


def test_bench_guest_files_say_emulated(guest_run) -> None:
    doc, out = guest_run
    md = out.with_suffix(".md").read_text()
    assert "EMULATED" in md.splitlines()[0]
    assert doc["guest"]["run_seconds"] > 0 and doc["host_machine"]["cores"] >= 1
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
