"""Reload, crash-loop and power-cut selftest cases against a real strongSwan client.

The capture parser (`esp_pairs`, `pair_report`) is tested on pcap files built
here; the three cases run through ``espgate selftest`` with short loops
(``ESPGATE_SELFTEST_CYCLES``, 5 by default here) and their details are
asserted: cycles run, packets checked, no repeated (SPI, seq), a gap per
resume, traffic resumed each time and no replay failure at the client.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from control.selftest_reload import esp_pairs, pair_report

ESPGATE = str(Path(sys.executable).with_name("espgate"))
LAB = os.environ.get("ESPGATE_LAB_PREFIX", f"egtrl{os.getpid() % 100000}")
CYCLES = os.environ.get("ESPGATE_SELFTEST_CYCLES", "5")
HUB = "198.18.1.1"
CLIENT = "198.18.1.2"


# -- pcap files built by hand -------------------------------------------------------


def _frame(src: str, payload: bytes, sport: int = 4500) -> bytes:
    udp = struct.pack("!HHHH", sport, 4500, 8 + len(payload), 0) + payload
    ip = struct.pack(
        "!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0, 64, 17, 0,
        bytes(int(x) for x in src.split(".")), bytes(int(x) for x in CLIENT.split(".")),
    )  # fmt: skip
    return b"\x02" * 6 + b"\x04" * 6 + b"\x08\x00" + ip + udp


def _esp(spi: int, seq: int, size: int = 40) -> bytes:
    return struct.pack("!II", spi, seq) + bytes((seq + i) & 0xFF for i in range(size))


def _pcap(path: Path, frames: list[bytes]) -> Path:
    out = [struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1)]
    for n, frame in enumerate(frames):
        out.append(struct.pack("<IIII", n, 0, len(frame), len(frame)) + frame)
    path.write_bytes(b"".join(out))
    return path


def test_esp_pairs_gso_super_datagram_cut(tmp_path: Path) -> None:
    spi = 0xC0FFEE01
    gso = b"".join(_esp(spi, seq) for seq in (7, 8, 9)) + _esp(spi, 10, 12)
    frames = [
        _frame(HUB, _esp(spi, 6)),
        _frame(HUB, gso),
        _frame(HUB, b"\x00\x00\x00\x00" + b"ike"),  # non-ESP marker: IKE
        _frame(HUB, b"\xff"),  # NAT-T keepalive
        _frame(CLIENT, _esp(0x11111111, 1)),  # the other direction
    ]
    pairs = esp_pairs(_pcap(tmp_path / "a.pcap", frames), HUB)
    assert pairs == [(spi, 6), (spi, 7), (spi, 8), (spi, 9), (spi, 10)]


def test_esp_pairs_raw_esp_read(tmp_path: Path) -> None:
    frame = bytearray(_frame(HUB, b""))
    ip = bytes(frame[14:34])
    raw = ip[:9] + b"\x32" + ip[10:] + _esp(0x0D0E0F10, 42)
    pairs = esp_pairs(_pcap(tmp_path / "r.pcap", [bytes(frame[:14]) + raw]), HUB)
    assert pairs == [(0x0D0E0F10, 42)]


def test_pair_report_repeat_counted(tmp_path: Path) -> None:
    spi = 0x0A0B0C0D
    frames = [_frame(HUB, _esp(spi, seq)) for seq in (1, 2, 3, 2, 500, 501)]
    report = pair_report(esp_pairs(_pcap(tmp_path / "b.pcap", frames), HUB))
    assert report["packets_checked"] == 6
    assert report["repeated_pairs"] == 1
    assert report["gaps"] == 1
    assert report["numbers_skipped"] == 496


def test_pair_report_clean_resume_no_repeat(tmp_path: Path) -> None:
    spi = 0x0A0B0C0E
    frames = [_frame(HUB, _esp(spi, seq)) for seq in (1, 2, 3, 131075, 131076)]
    report = pair_report(esp_pairs(_pcap(tmp_path / "c.pcap", frames), HUB))
    assert report["repeated_pairs"] == 0
    assert report["spis"][f"{spi:08x}"]["largest_gap"] == 131072


# -- the selftest cases -------------------------------------------------------------


@pytest.fixture(scope="module")
def verdicts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    if os.geteuid() != 0:
        pytest.skip("needs root for namespaces")
    out = tmp_path_factory.mktemp("selftest") / "selftest.json"
    cases = "reload-dataplane,reload-crash-loop,power-cut-store"
    env = dict(os.environ, ESPGATE_LAB_PREFIX=LAB, ESPGATE_SELFTEST_CYCLES=CYCLES)
    proc = subprocess.run(
        [ESPGATE, "selftest", "--cases", cases, "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    print(proc.stdout, proc.stderr[-4000:])
    return {r["case"]: r for r in json.loads(out.read_text())}


def _common(r: dict[str, Any]) -> dict[str, Any]:
    d = r["detail"]
    assert r["passed"], d["failures"]
    assert d["cycles_run"] == int(CYCLES)
    assert d["packets_checked"] >= 100
    assert d["repeated_pairs"] == 0
    assert d["traffic_resumed_every_cycle"] is True
    assert d["client_replay_failures"] == 0
    assert d["transfers_matched"] >= 1
    return d


@pytest.mark.interop
def test_reload_dataplane_no_repeated_pair(verdicts: dict[str, Any]) -> None:
    d = _common(verdicts["reload-dataplane"])
    # one SPI, resumed once per reload above everything sent
    assert d["client_reconnects"] == 0
    assert d["gaps"] >= int(CYCLES)


@pytest.mark.interop
def test_reload_crash_loop_no_repeated_pair(verdicts: dict[str, Any]) -> None:
    d = _common(verdicts["reload-crash-loop"])
    assert d["cycles_by_kind"].get("kill-dataplane", 0) >= 1
    assert d["cycles_by_kind"].get("kill-daemon", 0) >= 1
    # the whole daemon restarted and the session resumed without a handshake
    assert d["client_reconnects"] == 0
    assert d["daemon_restarts_resumed"] == d["cycles_by_kind"]["kill-daemon"]
    assert d["child_rekey_after_resume"]


@pytest.mark.interop
def test_power_cut_store_no_repeated_pair(verdicts: dict[str, Any]) -> None:
    d = _common(verdicts["power-cut-store"])
    by = d["cycles_by_kind"]
    assert by.get("power-cut-in-flight", 0) + by.get("power-cut-idle", 0) == int(CYCLES)
    assert d["gaps"] >= int(CYCLES)
