"""KernelEngine against a real kernel: Debian's stock kernel booted under qemu.

The host tests below boot the guest once (module fixture) and run this same file
inside it with ``--inner``; the inner run builds two namespaces joined by a veth
pair, drives the ``check_*`` steps in order and prints one JSON line with each
step's outcome, which the host tests then assert one by one.

    egt-xg-a  198.18.0.1 (veth) + 198.19.1.1 (lo)  <- ESP tunnel ->
    egt-xg-b  198.18.0.2 (veth) + 198.19.2.1 (lo)

The host tests skip only when qemu, busybox or the kernel package cannot be had.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import threading
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
MARKER = "GUEST-RESULT "
NS_A, NS_B = "egt-xg-a", "egt-xg-b"
OUTER_A, OUTER_B = "198.18.0.1", "198.18.0.2"
INNER_A, INNER_B = "198.19.1.1", "198.19.2.1"
SPI_AB, SPI_BA = 0xC0DE0001, 0xC0DE0002
RAW_AB, RAW_BA = 0xC0DE0101, 0xC0DE0102
KEY_AB, SALT_AB = bytes(range(32)), b"\x01\x02\x03\x04"
KEY_BA, SALT_BA = bytes(range(32, 64)), b"\x05\x06\x07\x08"
SESSION_A, SESSION_B = 7, 8
STEPS = (
    "probe",
    "ping",
    "tcp",
    "counters",
    "seq_move",
    "replay_state",
    "raw_esp",
    "ipv6",
    "cleanup",
)
OUTER6_A, OUTER6_B = "2001:db8::1", "2001:db8::2"
INNER6_A, INNER6_B = "2001:db8:1::1", "2001:db8:2::1"
V6_AB, V6_BA = 0xC0DE0201, 0xC0DE0202


# -- inside the guest -------------------------------------------------------------


def _sh(*argv: str, ns: str | None = None) -> str:
    cmd = ["ip", "netns", "exec", ns, *argv] if ns else list(argv)
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout


def _xfrm_listing(ns: str) -> tuple[str, str]:
    return _sh("ip", "xfrm", "state", ns=ns), _sh("ip", "xfrm", "policy", ns=ns)


class Lab:
    """Two namespaces, one KernelEngine in each, SAs in both directions."""

    def __init__(self) -> None:
        from fastpath.kernel import KernelEngine

        for ns in (NS_A, NS_B):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
            _sh("ip", "netns", "add", ns)
            _sh("ip", "link", "set", "lo", "up", ns=ns)
        _sh("ip", "link", "add", "egt-xg-va", "netns", NS_A, "type", "veth",
            "peer", "name", "egt-xg-vb", "netns", NS_B)  # fmt: skip
        for ns, dev, outer, inner, peer_outer, peer_inner in (
            (NS_A, "egt-xg-va", OUTER_A, INNER_A, OUTER_B, INNER_B),
            (NS_B, "egt-xg-vb", OUTER_B, INNER_B, OUTER_A, INNER_A),
        ):
            _sh("ip", "addr", "add", f"{outer}/24", "dev", dev, ns=ns)
            _sh("ip", "link", "set", dev, "up", ns=ns)
            _sh("ip", "addr", "add", f"{inner}/32", "dev", "lo", ns=ns)
            _sh("ip", "route", "add", f"{peer_inner}/32", "via", peer_outer,
                "src", inner, ns=ns)  # fmt: skip
        for ns, dev, outer, inner, peer_outer, peer_inner in (
            (NS_A, "egt-xg-va", OUTER6_A, INNER6_A, OUTER6_B, INNER6_B),
            (NS_B, "egt-xg-vb", OUTER6_B, INNER6_B, OUTER6_A, INNER6_A),
        ):
            _sh("ip", "addr", "add", f"{outer}/64", "dev", dev, "nodad", ns=ns)
            _sh("ip", "addr", "add", f"{inner}/128", "dev", "lo", ns=ns)
            _sh("ip", "route", "add", f"{peer_inner}/128", "via", peer_outer,
                "src", inner, ns=ns)  # fmt: skip

        # a foreign SA and policy (reqid 7) that clean-up must leave alone
        _sh("ip", "xfrm", "state", "add", "src", "198.18.9.1", "dst", "198.18.9.2",
            "proto", "esp", "spi", "0x777", "reqid", "7", "mode", "tunnel",
            "aead", "rfc4106(gcm(aes))", "0x" + "11" * 20, "128", ns=NS_A)  # fmt: skip
        _sh("ip", "xfrm", "policy", "add", "src", "198.19.9.0/24", "dst",
            "198.19.8.0/24", "dir", "out", "tmpl", "src", "198.18.9.1", "dst",
            "198.18.9.2", "proto", "esp", "reqid", "7", "mode", "tunnel",
            ns=NS_A)  # fmt: skip
        self.before = {ns: _xfrm_listing(ns) for ns in (NS_A, NS_B)}
        self.a = KernelEngine(netns=NS_A)
        self.b = KernelEngine(netns=NS_B)

    def install(
        self, udp_encap: bool, spis: tuple[int, int], esn: bool, v6: bool = False
    ) -> None:
        from fastpath import SAParams

        port = 4500 if udp_encap else 500
        ab, ba = spis
        oa, ob = (OUTER6_A, OUTER6_B) if v6 else (OUTER_A, OUTER_B)
        for eng, session, local, peer, out_spi, in_spi, kout, kin in (
            (self.a, SESSION_A, oa, ob, ab, ba,
             (KEY_AB, SALT_AB), (KEY_BA, SALT_BA)),
            (self.b, SESSION_B, ob, oa, ba, ab,
             (KEY_BA, SALT_BA), (KEY_AB, SALT_AB)),
        ):  # fmt: skip
            common: dict[str, Any] = {
                "session": session,
                "peer": (peer, port),
                "local": (local, port),
                "esn": esn,
            }
            eng.install_sa(
                SAParams(spi=in_spi, inbound=True, key=kin[0], salt=kin[1], **common),
                udp_encap=udp_encap,
            )
            eng.install_sa(
                SAParams(
                    spi=out_spi, inbound=False, key=kout[0], salt=kout[1], **common
                ),
                udp_encap=udp_encap,
            )

    def policies(self) -> None:
        self.a.install_policies(
            SESSION_A, local=OUTER_A, peer=OUTER_B,
            local_ts=(f"{INNER_A}/32",), remote_ts=(f"{INNER_B}/32",),
        )  # fmt: skip
        self.b.install_policies(
            SESSION_B, local=OUTER_B, peer=OUTER_A,
            local_ts=(f"{INNER_B}/32",), remote_ts=(f"{INNER_A}/32",),
        )  # fmt: skip

    def ping(self, count: int = 3) -> None:
        _sh("ping", "-q", "-c", str(count), "-i", "0.2", "-W", "3", "-I", INNER_A,
            INNER_B, ns=NS_A)  # fmt: skip

    def close(self) -> None:
        for eng in (self.a, self.b):
            eng.cleanup()
            eng.close()
        for ns in (NS_A, NS_B):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def _in_ns(ns: str, fn: Callable[[], Any]) -> Any:
    from fastpath.kernel import in_netns

    with in_netns(ns):
        return fn()


def check_probe(lab: Lab) -> None:
    from fastpath.kernel import probe_kernel

    ok, reason = probe_kernel()
    assert ok, reason


def check_ping(lab: Lab) -> None:
    lab.install(udp_encap=True, spis=(SPI_AB, SPI_BA), esn=True)
    lab.policies()
    lab.ping()


def check_tcp(lab: Lab) -> None:
    payload = os.urandom(512 * 1024)
    want = hashlib.sha256(payload).hexdigest()
    server = _in_ns(NS_B, lambda: socket.create_server((INNER_B, 5201)))
    got: list[str] = []

    def serve() -> None:
        conn, _ = server.accept()
        digest = hashlib.sha256()
        with conn:
            while chunk := conn.recv(65536):
                digest.update(chunk)
        got.append(digest.hexdigest())

    worker = threading.Thread(target=serve)
    worker.start()
    client = _in_ns(NS_A, lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM))
    client.settimeout(60)
    client.bind((INNER_A, 0))
    client.connect((INNER_B, 5201))
    client.sendall(payload)
    client.close()
    worker.join(60)
    server.close()
    assert got == [want], f"sha256 mismatch: {got} != {want}"


def check_counters(lab: Lab) -> None:
    out = lab.a.sa_counters(SPI_AB, False)
    inn = lab.b.sa_counters(SPI_AB, True)
    assert out["packets"] >= 3 and inn["packets"] >= 3, (out, inn)  # type: ignore
    assert inn["packets"] <= out["packets"], (out, inn)  # type: ignore
    assert out["next_seq"] == out["packets"] + 1, out  # type: ignore
    assert inn["highest_seq"] == out["next_seq"] - 1, (out, inn)  # type: ignore
    assert out["bytes"] > 512 * 1024 and out["add_time"] > 0, out  # type: ignore
    assert inn["drops"] == {"replay": 0, "auth": 0, "replay_window": 0}, inn


def check_seq_move(lab: Lab) -> None:
    # the outbound counter jumps forward (a migration's safety margin) and the
    # peer accepts the next packets above it
    state = lab.a.sa_state(SPI_AB, False)
    assert state.oseq + 1 == lab.a.sa_counters(SPI_AB, False)["next_seq"]
    state.oseq += 10_000
    lab.a.set_sa_state(SPI_AB, False, state)
    assert lab.a.sa_state(SPI_AB, False).oseq == state.oseq
    lab.ping(2)
    inn = lab.b.sa_counters(SPI_AB, True)
    assert inn["highest_seq"] > state.oseq, (inn, state)  # type: ignore
    assert lab.a.sa_counters(SPI_AB, False)["next_seq"] == inn["highest_seq"] + 1


def check_replay_state(lab: Lab) -> None:
    from fastpath.xfrm import ReplayState

    # an inbound window installed by NEWAE reads back unchanged and still
    # accepts numbers above it
    top = lab.b.sa_counters(SPI_AB, True)["highest_seq"]
    assert isinstance(top, int)
    closed = ReplayState.closed_below(top + 50, 1024)
    lab.b.set_sa_state(SPI_AB, True, closed)
    back = lab.b.sa_state(SPI_AB, True)
    assert (back.seq, back.bitmap) == (closed.seq, closed.bitmap), back
    assert back.seen(top + 1) and not back.seen(top + 51)
    state = lab.a.sa_state(SPI_AB, False)
    state.oseq = top + 100
    lab.a.set_sa_state(SPI_AB, False, state)
    lab.ping(2)
    assert lab.b.sa_counters(SPI_AB, True)["drops"]["replay"] == 0  # type: ignore


def check_raw_esp(lab: Lab) -> None:
    # make before break: a raw-ESP pair with the same reqid takes over
    lab.install(udp_encap=False, spis=(RAW_AB, RAW_BA), esn=False)
    for eng, spis in ((lab.a, (SPI_AB, SPI_BA)), (lab.b, (SPI_BA, SPI_AB))):
        eng.remove_sa(spis[0], False)
        eng.remove_sa(spis[1], True)
    lab.ping(2)
    assert lab.a.sa_counters(RAW_AB, False)["packets"] >= 2
    assert lab.b.sa_counters(RAW_AB, True)["packets"] >= 2


def check_ipv6(lab: Lab) -> None:
    # IPv6 outer and inner addresses, ESP-in-UDP over IPv6
    lab.install(udp_encap=True, spis=(V6_AB, V6_BA), esn=True, v6=True)
    lab.a.install_policies(
        SESSION_A, local=OUTER6_A, peer=OUTER6_B,
        local_ts=(f"{INNER6_A}/128",), remote_ts=(f"{INNER6_B}/128",),
    )  # fmt: skip
    lab.b.install_policies(
        SESSION_B, local=OUTER6_B, peer=OUTER6_A,
        local_ts=(f"{INNER6_B}/128",), remote_ts=(f"{INNER6_A}/128",),
    )  # fmt: skip
    _sh("ping", "-6", "-q", "-c", "2", "-i", "0.2", "-W", "3", "-I", INNER6_A,
        INNER6_B, ns=NS_A)  # fmt: skip
    assert lab.b.sa_counters(V6_AB, True)["packets"] >= 2
    assert lab.a.sa_counters(V6_BA, True)["packets"] >= 2


def check_cleanup(lab: Lab) -> None:
    sas, pols = lab.a.cleanup()
    assert (sas, pols) == (4, 6), (sas, pols)
    lab.b.cleanup()
    for ns in (NS_A, NS_B):
        assert _xfrm_listing(ns) == lab.before[ns], ns


def inner_main() -> int:
    """Run every check in order inside the guest; print one JSON result line."""
    results: dict[str, str] = {}
    lab: Lab | None = None
    try:
        lab = Lab()
        for step in STEPS:
            try:
                globals()[f"check_{step}"](lab)
                results[step] = "ok"
            except Exception:
                results[step] = traceback.format_exc()
    except Exception:
        results["setup"] = traceback.format_exc()
    finally:
        if lab is not None:
            lab.close()
    print(MARKER + json.dumps(results), flush=True)
    return 0


# -- on the host --------------------------------------------------------------------


@pytest.fixture(scope="module")
def guest_results() -> dict[str, str]:
    from control.guest import GuestUnavailable, run_in_guest

    try:
        rc, out, err = run_in_guest(
            [sys.executable, "tests/test_guest.py", "--inner"], 280, cwd=str(ROOT)
        )
    except GuestUnavailable as exc:
        pytest.skip(f"no qemu guest here: {exc}")
    lines = [ln for ln in out.splitlines() if ln.startswith(MARKER)]
    assert rc == 0 and lines, f"guest run failed rc={rc}\n{out[-2000:]}\n{err[-3000:]}"
    return dict(json.loads(lines[-1][len(MARKER) :]))


def _assert_step(results: dict[str, str], step: str) -> None:
    assert "setup" not in results, results["setup"]
    assert results.get(step) == "ok", results.get(step, "step did not run")


@pytest.mark.guest
def test_probe_kernel_in_guest_reports_ok(guest_results: dict[str, str]) -> None:
    _assert_step(guest_results, "probe")


@pytest.mark.guest
def test_ping_esp_in_udp_passes(guest_results: dict[str, str]) -> None:
    _assert_step(guest_results, "ping")


@pytest.mark.guest
def test_tcp_transfer_sha256_matches(guest_results: dict[str, str]) -> None:
    _assert_step(guest_results, "tcp")


@pytest.mark.guest
def test_sa_counters_read_back_from_kernel(guest_results: dict[str, str]) -> None:
    _assert_step(guest_results, "counters")


@pytest.mark.guest
def test_newae_moves_outbound_sequence(guest_results: dict[str, str]) -> None:
    _assert_step(guest_results, "seq_move")


@pytest.mark.guest
def test_newae_sets_inbound_replay_window(guest_results: dict[str, str]) -> None:
    _assert_step(guest_results, "replay_state")


@pytest.mark.guest
def test_rekey_to_raw_esp_make_before_break(guest_results: dict[str, str]) -> None:
    _assert_step(guest_results, "raw_esp")


@pytest.mark.guest
def test_ipv6_esp_in_udp_passes(guest_results: dict[str, str]) -> None:
    _assert_step(guest_results, "ipv6")


@pytest.mark.guest
def test_cleanup_leaves_foreign_state_only(guest_results: dict[str, str]) -> None:
    _assert_step(guest_results, "cleanup")


if __name__ == "__main__" and sys.argv[1:] == ["--inner"]:
    sys.exit(inner_main())
