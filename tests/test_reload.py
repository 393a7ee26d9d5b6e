"""Crash loop at the engine level: kill -9 the dataplane, and the whole process.

A helper process (``python tests/test_reload.py helper CONFIG``) plays the
daemon: it owns a UDP socket and a SOCK_SEQPACKET pair standing in for the
TUN, runs a :class:`control.dataplane.DataplaneProxy` with a SeqStore, and
writes IPv4 packets into the "TUN" without pause.  The test receives every ESP
packet on a loopback socket and records (SPI, sequence number).  Each cycle
either kills the dataplane child (the supervisor restarts it) or kills the
whole helper group and starts a new helper that resumes the SA from the store.
No pair may ever arrive twice: that is the AES-GCM nonce never repeating.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

SPI_OUT = 0x0E0F0001
SPI_IN = 0x0E0F0002
KEY = bytes(range(16))
SALT = b"\x01\x02\x03\x04"
CYCLES = int(os.environ.get("ESPGATE_RELOAD_CYCLES", "6"))


def _ipv4(ident: int) -> bytes:
    src, dst = socket.inet_aton("198.19.9.1"), socket.inet_aton("198.19.8.1")
    head = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 28, ident & 0xFFFF, 0, 64, 17, 0,
                       src, dst)  # fmt: skip
    return head + struct.pack("!HHHH", 1000, 2000, 8, 0)


# ---------------------------------------------------------------- helper side


def helper(cfg: dict[str, Any]) -> None:
    """Run a proxy, an outbound SA and traffic until killed; print child pids."""
    from control.dataplane import DataplaneProxy
    from control.seqstore import SeqStore
    from fastpath import SAParams

    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    udp.setblocking(False)
    tun_engine, tun_app = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    tun_engine.setblocking(False)
    tun_app.setblocking(False)
    proxy = DataplaneProxy(
        udp.fileno(), crypto="openssl", batch=16, store=SeqStore(cfg["store"])
    )
    proxy.start(lambda data, addr: None)
    proxy.add_session(1, tun_engine.fileno(), vnet_hdr=False)
    peer = (cfg["peer_host"], cfg["peer_port"])
    common: dict[str, Any] = {"key": KEY, "salt": SALT, "session": 1, "peer": peer}
    proxy.install_sa(SAParams(spi=SPI_IN, inbound=True, **common))
    proxy.install_sa(
        SAParams(spi=SPI_OUT, inbound=False, **common), resume=cfg["resume"]
    )

    # report the dataplane pid on every restart, on stdout, one per line
    def report() -> None:
        seen = None
        while True:
            pid = proxy.dataplane_pid()
            if pid is not None and pid != seen:
                seen = pid
                print(json.dumps({"dataplane": pid}), flush=True)
            time.sleep(0.01)

    threading.Thread(target=report, daemon=True).start()
    i = 0
    while True:
        try:
            tun_app.send(_ipv4(i))
            i += 1
        except BlockingIOError:
            time.sleep(0.0005)


# ---------------------------------------------------------------- test side


class Capture:
    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
        self.sock.settimeout(0.2)
        self.pairs: list[tuple[int, int]] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            if len(data) >= 8 and data[:4] != b"\0\0\0\0":
                self.pairs.append(struct.unpack("!II", data[:8]))

    def count(self) -> int:
        return len(self.pairs)

    def close(self) -> None:
        self.stop.set()
        self.thread.join()
        self.sock.close()


class Helper:
    def __init__(self, cfg_path: Path) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "helper", str(cfg_path)],
            stdout=subprocess.PIPE,
            start_new_session=True,
        )
        self.pids: list[int] = []
        self.lock = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self.lock:
                self.pids.append(json.loads(line)["dataplane"])
                self.lock.notify_all()

    def wait_pids(self, n: int, timeout: float = 20.0) -> int:
        with self.lock:
            assert self.lock.wait_for(lambda: len(self.pids) >= n, timeout), (
                f"dataplane {n} never came up"
            )
            return self.pids[n - 1]

    def kill_all(self) -> None:
        # the whole "daemon": helper and its dataplane, kill -9 at once
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()


def _wait_more(cap: Capture, n: int, timeout: float = 20.0) -> bool:
    target = cap.count() + n
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cap.count() >= target:
            return True
        time.sleep(0.01)
    return False


def _gaps(seqs: list[int]) -> int:
    ordered = sorted(set(seqs))
    return sum(1 for a, b in zip(ordered, ordered[1:], strict=False) if b != a + 1)


@pytest.fixture
def capture() -> Iterator[Capture]:
    cap = Capture()
    yield cap
    cap.close()


def test_crash_loop_never_repeats_spi_seq(tmp_path: Path, capture: Capture) -> None:
    rng = random.Random(int(os.environ.get("ESPGATE_RELOAD_SEED", "11")))
    cfg = {
        "store": str(tmp_path / "state" / "state.sqlite"),
        "peer_host": "127.0.0.1",
        "peer_port": capture.sock.getsockname()[1],
        "resume": False,
    }
    cfg_path = tmp_path / "helper.json"
    cfg_path.write_text(json.dumps(cfg))
    helper_proc = Helper(cfg_path)
    helpers = [helper_proc]
    kinds: list[str] = []
    try:
        helper_proc.wait_pids(1)
        assert _wait_more(capture, 200), "no traffic before the first cycle"
        for cycle in range(CYCLES):
            time.sleep(rng.uniform(0.02, 0.4))
            if cycle % 2 == 0:
                kinds.append("dataplane")
                pid = helper_proc.wait_pids(len(helper_proc.pids))
                os.kill(pid, signal.SIGKILL)
                helper_proc.wait_pids(len(helper_proc.pids) + 1)
            else:
                kinds.append("daemon")
                helper_proc.kill_all()
                cfg["resume"] = True
                cfg_path.write_text(json.dumps(cfg))
                helper_proc = Helper(cfg_path)
                helpers.append(helper_proc)
                helper_proc.wait_pids(1)
            # traffic resumes after each restart
            assert _wait_more(capture, 100), f"no traffic after cycle {cycle}"
    finally:
        for h in helpers:
            if h.proc.poll() is None:
                h.kill_all()
    time.sleep(0.3)
    pairs = list(capture.pairs)
    seqs = [seq for spi, seq in pairs if spi == SPI_OUT]
    repeated = len(pairs) - len(set(pairs))
    print(
        f"cycles {len(kinds)} ({kinds.count('dataplane')} dataplane, "
        f"{kinds.count('daemon')} daemon), packets checked {len(pairs)}, "
        f"repeated (SPI, seq) {repeated}, gaps {_gaps(seqs)}"
    )
    assert repeated == 0
    assert len(seqs) == len(pairs) > CYCLES * 100
    assert _gaps(seqs) >= 1


def test_reload_restarts_dataplane_above_sent(tmp_path: Path) -> None:
    from control.dataplane import DataplaneProxy
    from control.seqstore import SeqStore
    from fastpath import SAParams

    cap = Capture()
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    udp.setblocking(False)
    tun_engine, tun_app = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    tun_engine.setblocking(False)
    proxy = DataplaneProxy(
        udp.fileno(), crypto="openssl", store=SeqStore(tmp_path / "s.sqlite")
    )
    try:
        proxy.start(lambda data, addr: None)
        proxy.add_session(1, tun_engine.fileno(), vnet_hdr=False)
        proxy.install_sa(
            SAParams(spi=SPI_OUT, inbound=False, key=KEY, salt=SALT, session=1,
                     peer=cap.sock.getsockname())
        )  # fmt: skip
        for i in range(20):
            tun_app.send(_ipv4(i))
        assert _wait_until(lambda: cap.count() >= 20)
        before = proxy.sa_counters(SPI_OUT, False)
        old = proxy.dataplane_pid()
        new = proxy.reload()
        assert new != old and proxy.counters()["dataplane_restarts"] == 1
        for i in range(20):
            tun_app.send(_ipv4(100 + i))
        assert _wait_until(lambda: cap.count() >= 40)
        after = proxy.sa_counters(SPI_OUT, False)
        seqs = [seq for _spi, seq in cap.pairs]
        # resumed at the reserved mark: strictly above all 20 first numbers
        assert min(seqs[20:]) == before["seq_reserved"] > max(seqs[:20])
        assert after["seq_reserved"] > after["next_seq"]
        assert len(set(seqs)) == len(seqs)
    finally:
        proxy.stop()
        cap.close()
        for s in (udp, tun_engine, tun_app):
            s.close()


def _wait_until(pred: Any, timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.01)
    return bool(pred())


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "helper":
        helper(json.loads(Path(sys.argv[2]).read_text()))
