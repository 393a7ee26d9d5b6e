"""Engine modes and kernel offload through ``espgate selftest``.

Unit tests cover the config keys, ``sa move`` errors, the sessions table and the
capture helpers.  The host case ``auto-fallback`` runs in namespaces here; the
four guest cases run in one qemu boot (module fixture) through ``espgate
selftest`` inside the guest, and each test asserts one case's verdict and the
details that make it mean something.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import Any

import pytest

from control import config
from control.cli import format_sessions
from control.config import ConfigError

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")

PROFILE = """\
[engine]
mode = "{mode}"

[[profiles]]
name = "a"
local_identity = "fqdn:vpn.example.net"
psk = "a-long-enough-secret"
{extra}
"""


# -- config -------------------------------------------------------------------------


def test_parse_engine_mode_and_profile_engine():
    cfg = config.parse(PROFILE.format(mode="auto", extra='engine = "kernel"'), "t")
    assert cfg.engine.mode == "auto"
    assert cfg.profiles[0].engine == "kernel"


def test_parse_engine_defaults_userspace_profile_inherits():
    cfg = config.parse(PROFILE.format(mode="userspace", extra=""), "t")
    assert cfg.engine.mode == "userspace" and cfg.profiles[0].engine is None


def test_parse_engine_mode_bad_names_file_line_field():
    with pytest.raises(ConfigError) as err:
        config.parse(PROFILE.format(mode="xfrm", extra=""), "e.toml")
    assert str(err.value).startswith("e.toml:2: engine.mode: 'xfrm' is not one of")


def test_parse_profile_engine_bad_names_file_line_field():
    with pytest.raises(ConfigError) as err:
        config.parse(PROFILE.format(mode="auto", extra='engine = "both"'), "e.toml")
    assert str(err.value).startswith("e.toml:8: profiles[0].engine: 'both'")


# -- daemon and command line -----------------------------------------------------


def test_control_sa_move_unknown_spi_error():
    from control.daemon import Headend

    headend = Headend(config.load())
    answer = headend.control("sa-move", {"spi": "c0de0001", "to": "kernel"})
    assert "no CHILD SA with SPI c0de0001" in answer["error"]


def test_control_sa_move_bad_engine_error():
    from control.daemon import Headend

    answer = Headend(config.load()).control("sa-move", {"spi": "1", "to": "gpu"})
    assert "unknown engine 'gpu'" in answer["error"]


def test_format_sessions_shows_engine_per_child():
    sessions = [{
        "identity": "a@example.net", "outside": "198.18.1.2:4500",
        "inside": "198.18.128.10",
        "children": [{"spi_in": "c0000001", "spi_out": "00abcdef", "packets_in": 3,
                      "packets_out": 4, "bytes_in": 300, "bytes_out": 400,
                      "engine": "kernel"}],
    }]  # fmt: skip
    header, row = format_sessions(sessions).splitlines()[:2]
    assert "engine" in header.split()
    assert row.split()[6] == "kernel"


# -- capture helpers --------------------------------------------------------------


def _pcap(packets: list[bytes]) -> bytes:
    # classic pcap, link type 228 (raw IPv4)
    out = struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 228)
    for p in packets:
        out += struct.pack("<IIII", 0, 0, len(p), len(p)) + p
    return out


def _esp_in_udp(src: str, spi: int, seq: int) -> bytes:
    payload = struct.pack("!II", spi, seq) + bytes(24)
    udp = struct.pack("!HHHH", 4500, 4500, 8 + len(payload), 0) + payload
    addr = bytes(map(int, src.split(".")))
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0, 64, 17, 0,
                     addr, bytes([198, 18, 1, 2]))  # fmt: skip
    return ip + udp


def test_esp_sequence_repeats_found(tmp_path: Path):
    from control.selftest_kernel import esp_sequence_repeats

    path = tmp_path / "c.pcap"
    pkts = [_esp_in_udp("198.18.1.1", 0xC0DE0001, s) for s in (1, 2, 3, 2)]
    path.write_bytes(_pcap(pkts))
    total, repeats, examples = esp_sequence_repeats(path)
    assert (total, repeats) == (4, 1)
    assert examples == ["198.18.1.1 c0de0001/2"]


def test_esp_sequence_repeats_none_when_spis_differ(tmp_path: Path):
    from control.selftest_kernel import esp_sequence_repeats

    path = tmp_path / "c.pcap"
    pkts = [_esp_in_udp("198.18.1.1", spi, 7) for spi in (0x1001, 0x1002)]
    path.write_bytes(_pcap(pkts))
    assert esp_sequence_repeats(path)[:2] == (2, 0)


# -- the self-test: host case ----------------------------------------------------


def _run_cases(names: list[str], tmp_path: Path) -> dict[str, dict[str, Any]]:
    from control import selftest

    results = selftest.run(names, tmp_path / "st.json")
    return {r["case"]: r for r in results}


@needs_root
@pytest.mark.interop
def test_selftest_auto_fallback_host_userspace_reason_logged(tmp_path: Path):
    from fastpath.kernel import probe_kernel

    ok, reason = probe_kernel()
    if ok:
        pytest.skip("this kernel has ESP and GCM: auto does not fall back here")
    result = _run_cases(["auto-fallback"], tmp_path)["auto-fallback"]
    detail = result["detail"]
    assert result["passed"], detail["failures"]
    assert detail["engines"]["profiles"] == {"lab": "userspace"}
    (line,) = detail["log_lines"]
    assert "userspace" in line and reason in line
    assert detail["sa_engines"] == ["userspace"]
    assert detail["ping"]["loss_pct"] == 0 and detail["transfer"]["match"]


# -- the self-test: guest cases, one boot ---------------------------------------


@pytest.fixture(scope="module")
def guest_cases() -> dict[str, dict[str, Any]]:
    from control.guest import guest_available
    from control.selftest_kernel import GUEST_CASES, run_guest

    if os.geteuid() != 0:
        pytest.skip("needs root")
    ok, why = guest_available(fetch=True)
    if not ok:
        pytest.skip(f"no qemu guest here: {why}")
    return run_guest(list(GUEST_CASES))


def _detail(results: dict[str, dict[str, Any]], name: str) -> dict[str, Any]:
    result = results[name]
    assert result["passed"], result["detail"].get("failures")
    return dict(result["detail"])


@pytest.mark.guest
def test_selftest_kernel_mode_auto_picks_kernel_traffic_flows(guest_cases):
    d = _detail(guest_cases, "kernel-mode")
    assert d["engines"]["profiles"] == {"lab": "kernel"}
    assert d["ping"]["loss_pct"] == 0 and d["transfer"]["match"]
    child = d["sessions"][0]["children"][0]
    assert child["engine"] == "kernel" and child["packets_in"] > 100
    assert d["capture"]["leaks"] == 0 and d["capture"]["from_client_esp"] >= 100
    assert d["xfrm_ours_up"] == [2, 3] and d["xfrm_ours_down"] == [0, 0]


@pytest.mark.guest
def test_selftest_kernel_rekey_new_spi_stays_in_kernel(guest_cases):
    d = _detail(guest_cases, "kernel-rekey")
    (child,) = d["children_after"]
    assert child["spi_in"] != d["spi_before"] and child["engine"] == "kernel"
    assert d["ping"]["loss_pct"] == 0
    assert d["xfrm_ours"] == [2, 3]


@pytest.mark.guest
def test_selftest_xfrm_cleanup_identical_after_stop_and_crash(guest_cases):
    d = _detail(guest_cases, "xfrm-cleanup")
    assert d["foreign_before"]
    assert d["identical_after_stop"] and d["identical_after_recovery"]
    assert d["ours_after_kill"] != [0, 0]


@pytest.mark.guest
def test_selftest_sa_move_under_traffic_no_replay_no_repeat(guest_cases):
    d = _detail(guest_cases, "sa-move-under-traffic")
    to_kernel, _, to_user, _ = d["moves"]
    assert to_kernel["engine"] == "kernel" and to_user["engine"] == "userspace"
    for move in (to_kernel, to_user):
        assert move["dest_next_seq"] > move["source_next_seq"]
    assert d["client_replay"] == {"replay_window": 0, "replay": 0, "failed": 0}
    assert d["capture"]["repeated"] == 0 and d["capture"]["esp_packets"] >= 100
    assert d["transfer"]["match"]
    assert len(d["ping"]["lost_near_a_move"]) <= 2 and d["ping"]["sent"] > 0
    # the default process dataplane, its move back in reserved before sending
    assert d["dataplane"] == "process"
    assert to_user["seq_reserved"] > to_user["dest_next_seq"]


PING_OUT = """\
[100.20] 64 bytes from 198.19.1.2: icmp_seq=1 ttl=63 time=3.0 ms
[100.30] no answer yet for icmp_seq=2
[100.35] 64 bytes from 198.19.1.2: icmp_seq=2 ttl=63 time=150 ms
[100.40] no answer yet for icmp_seq=3
[105.40] no answer yet for icmp_seq=50
"""


def test_pings_lost_near_counts_only_unanswered_next_to_a_move():
    from control.selftest_kernel import _pings_lost_near

    assert _pings_lost_near(PING_OUT, [100.0, 100.5], interval=0.1) == [3]


def test_pings_lost_near_empty_when_loss_far_from_moves():
    from control.selftest_kernel import _pings_lost_near

    assert _pings_lost_near(PING_OUT, [110.0, 110.5], interval=0.1) == []


# -- the guest cases on the host: one boot, their own times ---------------------


def test_guest_cases_one_boot_for_noted_cases_own_seconds(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from control import selftest, selftest_kernel

    boots: list[list[str]] = []

    def fake_run_guest(names: list[str]) -> dict[str, dict[str, Any]]:
        boots.append(list(names))
        return {
            n: {"case": n, "passed": True,
                "detail": {"failures": [], "seconds": 10.0 + i}}
            for i, n in enumerate(names)
        }  # fmt: skip

    def no_lab(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a guest case built a host lab")

    monkeypatch.setattr(selftest_kernel, "run_guest", fake_run_guest)
    monkeypatch.setattr(selftest_kernel, "_wanted", [])
    monkeypatch.setattr(selftest_kernel, "_booted", set())
    monkeypatch.setattr(selftest_kernel, "_guest_results", {})
    monkeypatch.setattr(selftest, "HeadendLab", no_lab)
    names = ["kernel-mode", "xfrm-cleanup"]
    selftest_kernel.prefetch(names)
    assert boots == []  # noted only: the boot happens inside selftest.run
    results = selftest.run(names, tmp_path / "st.json")
    assert boots == [names]
    assert [r["detail"]["seconds"] for r in results] == [10.0, 11.0]
    lines = capsys.readouterr().out.splitlines()
    assert sum(ln.startswith("guest: one qemu boot for 2 case(s)") for ln in lines) == 1
    assert "PASS kernel-mode (10.0 s in the guest)" in lines
    assert "PASS xfrm-cleanup (11.0 s in the guest)" in lines


def test_guest_case_not_noted_boots_alone(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from control import selftest, selftest_kernel

    boots: list[list[str]] = []

    def fake_run_guest(names: list[str]) -> dict[str, dict[str, Any]]:
        boots.append(list(names))
        return {n: {"case": n, "passed": False,
                    "detail": {"failures": ["no verdict from the guest"]}}
                for n in names}  # fmt: skip

    monkeypatch.setattr(selftest_kernel, "run_guest", fake_run_guest)
    monkeypatch.setattr(selftest_kernel, "_wanted", [])
    monkeypatch.setattr(selftest_kernel, "_booted", set())
    monkeypatch.setattr(selftest_kernel, "_guest_results", {})
    (result,) = selftest.run(["kernel-rekey"], tmp_path / "st.json")
    assert boots == [["kernel-rekey"]]
    assert result["detail"]["failures"] == ["no verdict from the guest"]
    assert "logs" not in result["detail"]
