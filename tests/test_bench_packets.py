"""`bench packets` without a lab: emulated marking, output paths, guest plumbing.

No namespaces, no guest: the documents here are built by hand, and the guest
runner is replaced by a stub returning what a guest would print.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import pytest

from bench import packets
from bench.common import RESULTS_DIR
from bench.packets import (
    GUEST_JSON,
    GUEST_MODES,
    NATIVE_JSON,
    RESULT_MARKER,
    TRAFFIC,
    config_from_args,
    guest_argv,
    markdown,
    output_path,
)

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    packets.add_arguments(parser)
    return parser.parse_args(list(argv))


def _point(mode: str, traffic: str, emulated: bool) -> dict[str, Any]:
    return {
        "mode": mode, "traffic": traffic, "gbit_per_s": 0.05, "pps": None,
        "loss_pct": None, "cpu_s_per_gb": 30.0, "host_cpu_s_per_gb": 40.0,
        "available": True, "reason": None, "emulated": emulated,
        "spread_pct": 0.0, "gbit_min": 0.05, "gbit_max": 0.05, "repeats": 1,
    }  # fmt: skip


def _doc(emulated: bool) -> dict[str, Any]:
    points = [_point(m, "tcp-1", emulated) for m in GUEST_MODES]
    return {
        "command": "espgate bench packets --guest --quick",
        "started": "2026-01-01 00:00:00 UTC",
        "emulated": emulated,
        "machine": {"cpu_model": "QEMU", "cores": 2, "kernel": "6.1.0-57-amd64"},
        "config": {"duration": 3.0, "repeat": 1},
        "points": points,
        "peers": {},
        "kernel_probe": "ok",
    }


def test_markdown_emulated_marks_title_and_every_table() -> None:
    md = markdown(_doc(emulated=True))
    first = md.splitlines()[0]
    assert first.startswith("# ") and "EMULATED" in first
    assert "not how fast it is" in md
    headings = [ln for ln in md.splitlines() if ln.startswith("## ")]
    assert headings and all(h.startswith("## Emulated: ") for h in headings)


def test_markdown_native_no_emulated_mark() -> None:
    md = markdown(_doc(emulated=False))
    assert "emulated" not in md.lower()


def test_markdown_emulated_when_only_points_say_so() -> None:
    doc = _doc(emulated=True)
    doc.pop("emulated")
    assert "EMULATED" in markdown(doc).splitlines()[0]


def test_output_path_guest_default_is_packets_guest() -> None:
    assert output_path(_args("--guest")) == GUEST_JSON
    assert output_path(_args()) == NATIVE_JSON
    assert GUEST_JSON != NATIVE_JSON
    # full runs write the committed results, wherever they are started from
    assert GUEST_JSON.parent == NATIVE_JSON.parent == RESULTS_DIR


def test_output_path_explicit_json_wins() -> None:
    args = _args("--guest", "--quick", "--json", "/tmp/x.json")
    assert output_path(args) == Path("/tmp/x.json")


@pytest.mark.parametrize(
    ("argv", "name"),
    [(["--quick"], "packets"), (["--guest", "--quick"], "packets-guest")],
)
def test_output_path_quick_is_a_new_scratch_directory(
    argv: list[str], name: str, tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    path = output_path(_args(*argv))
    assert path.name == f"{name}.json" and path.parent.parent == tmp_path
    assert path.parent.is_dir() and path.parent.name.startswith(f"espgate-bench-{name}")
    # a second quick run does not overwrite the first
    assert output_path(_args(*argv)).parent != path.parent


def test_config_quick_honours_explicit_duration_and_repeat() -> None:
    cfg = config_from_args(_args("--quick", "--duration", "4", "--repeat", "2"))
    assert (cfg.duration, cfg.repeat, cfg.search) == (4.0, 2, False)
    argv = guest_argv(config_from_args(_args("--guest", "--quick", "--repeat", "2")))
    assert argv[argv.index("--repeat") + 1] == "2"
    assert argv[argv.index("--duration") + 1] == "3"


def test_config_guest_quick_defaults_few_points() -> None:
    cfg = config_from_args(_args("--guest", "--quick"))
    assert cfg.modes == GUEST_MODES == ("plain", "espgate", "kernel")
    assert cfg.traffic == ("tcp-1", "udp-1400")
    assert (cfg.duration, cfg.repeat, cfg.search) == (3.0, 1, False)


def test_config_native_defaults_all_modes_not_emulated(monkeypatch) -> None:
    monkeypatch.setattr(packets, "IN_GUEST", False)
    cfg = config_from_args(_args())
    assert cfg.modes == packets.MODES and cfg.traffic == TRAFFIC
    assert cfg.emulated is False and cfg.repeat == 3


def test_config_guest_inner_marks_emulated(monkeypatch) -> None:
    monkeypatch.setattr(packets, "IN_GUEST", False)
    assert config_from_args(_args("--guest-inner")).emulated is True
    # the host side of --guest measures nothing itself
    assert config_from_args(_args("--guest")).emulated is False


def test_unavailable_point_carries_emulated() -> None:
    point = packets._unavailable("kernel", "tcp-1", "no ESP", emulated=True)
    assert point["emulated"] is True and point["available"] is False


def test_guest_argv_spells_out_config_with_inner_flag() -> None:
    cfg = config_from_args(_args("--guest", "--quick", "--traffic", "tcp-1"))
    argv = guest_argv(cfg)
    assert "--guest-inner" in argv and "--guest" not in argv
    assert argv[argv.index("--modes") + 1 : argv.index("--traffic")] == list(
        GUEST_MODES
    )
    assert argv[argv.index("--traffic") + 1] == "tcp-1"
    assert argv[argv.index("--duration") + 1] == "3"
    assert "--quick" in argv and "--json" not in argv


def _fake_guest(out: str, rc: int = 0):
    def run(argv: list[str], timeout: float, **kw: Any) -> tuple[int, str, str]:
        assert "--guest-inner" in argv and timeout > 60
        return rc, out, "guest stderr tail"

    return run


def test_run_guest_parses_marked_document(monkeypatch) -> None:
    import control.guest

    doc = _doc(emulated=True)
    out = "noise\n" + RESULT_MARKER + json.dumps(doc) + "\n"
    monkeypatch.setattr(control.guest, "run_in_guest", _fake_guest(out))
    cfg = config_from_args(_args("--guest", "--quick"))
    got, seconds = packets.run_guest(cfg)
    assert got["points"] == doc["points"] and seconds >= 0
    assert got["guest"]["accel"] in ("tcg", "kvm")


def test_run_guest_no_document_fails(monkeypatch) -> None:
    import control.guest
    from control.guest import GuestError

    monkeypatch.setattr(control.guest, "run_in_guest", _fake_guest("Traceback", 1))
    cfg = config_from_args(_args("--guest", "--quick"))
    with pytest.raises(GuestError, match="rc 1"):
        packets.run_guest(cfg)


@needs_root
def test_command_guest_quick_writes_guest_files_to_scratch(
    monkeypatch, tmp_path: Path
) -> None:
    doc = _doc(emulated=True)
    monkeypatch.setattr(packets, "run_guest", lambda cfg, timeout: (doc, 12.0))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    committed = {p.name: p.stat().st_mtime_ns for p in RESULTS_DIR.iterdir()}
    argv = ["--guest", "--quick", "--no-progress"]
    assert packets.command(_args(*argv), argv) == 0
    (scratch,) = tmp_path.iterdir()
    out = scratch / "packets-guest.json"
    written = json.loads(out.read_text())
    assert written["command"] == "espgate bench packets --guest --quick --no-progress"
    assert all(p["emulated"] is True for p in written["points"])
    assert written["host_machine"]["cores"] >= 1
    assert "EMULATED" in out.with_suffix(".md").read_text()
    assert sorted(p.name for p in scratch.iterdir()) == [
        "packets-guest.json", "packets-guest.md", "packets-guest.png",
    ]  # fmt: skip
    assert {p.name: p.stat().st_mtime_ns for p in RESULTS_DIR.iterdir()} == committed


def test_markdown_udp_heading_no_search_says_unlimited() -> None:
    doc = _doc(emulated=True)
    doc["points"].append({**_point("plain", "udp-1400", True), "pps": 10.0,
                          "loss_pct": 0.0})  # fmt: skip
    doc["config"]["udp_rate_search"] = False
    assert "offered without a limit" in markdown(doc)
    doc["config"]["udp_rate_search"] = True
    assert "highest offered rate" in markdown(doc)


def _ratio_doc(available: dict[str, bool]) -> dict[str, Any]:
    doc = _doc(emulated=False)
    doc["points"] = [
        _point(m, "tcp-1", False) if ok else packets._unavailable(m, "tcp-1", "no")
        for m, ok in available.items()
    ]
    return doc


def test_markdown_ratio_rows_only_for_modes_that_ran() -> None:
    # `--modes plain espgate kernel` on a kernel without ESP: kernel n/a,
    # strongswan and espgate-persist never asked for
    md = markdown(_ratio_doc({"plain": True, "espgate": True, "kernel": False}))
    assert "| **espgate / plain** | 1.00x |" in md
    assert "espgate / strongswan" not in md
    assert "espgate / kernel" not in md
    assert "espgate-persist / espgate" not in md


def test_markdown_ratio_rows_present_when_reference_ran() -> None:
    md = markdown(
        _ratio_doc(
            {"espgate": True, "strongswan": True, "kernel": True,
             "espgate-persist": True}
        )
    )  # fmt: skip
    for row in ("espgate / strongswan", "espgate / kernel", "espgate-persist / "):
        assert f"| **{row}" in md


def test_markdown_persist_ratio_dropped_when_persist_failed() -> None:
    md = markdown(_ratio_doc({"espgate": True, "espgate-persist": False}))
    assert "espgate-persist / espgate" not in md
