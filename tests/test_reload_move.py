"""Live moves with the process dataplane: the cap, the floor and the window.

A :class:`control.dataplane.DataplaneProxy` runs a real dataplane child on a
loopback UDP socket with a SeqStore in a temporary directory; a Unix datagram
pair stands in for the session's TUN.  The proxy's own ticker is slowed to an
hour so the tests drive the reserver by hand: what the ticker would do, at
the moment the test picks.
"""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from control.dataplane import DataplaneProxy
from control.seqstore import SeqReserver, SeqStore
from fastpath import SAParams, esp_encrypt

SPI_OUT, SPI_IN = 0x0F0E0001, 0x0F0E0002
KEY, SALT = bytes(range(48, 64)), b"\x21\x22\x23\x24"
# ICMP echo 198.19.1.1 -> 198.19.2.1: the inner packet of every test packet
ICMP = bytes.fromhex("4500001c0000000040010000c6130101c61302010800f7ff00000000")
WAIT = 15.0


def _wait_for(pred: Callable[[], bool], timeout: float = WAIT) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.02)
    return pred()


class _Rig:
    def __init__(self, tmp: Path):
        self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.udp.bind(("127.0.0.1", 0))
        self.udp.setblocking(False)
        self.peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.peer.bind(("127.0.0.1", 0))
        self.peer.settimeout(0.2)
        self.tun, self.app = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.tun.setblocking(False)
        self.store = SeqStore(tmp / "state.sqlite")
        self.proxy = DataplaneProxy(
            self.udp.fileno(),
            crypto="openssl",
            batch=8,
            store=self.store,
            tick=3600.0,
            reserver_kwargs={"min_block": 16, "max_block": 64},
        )
        self.proxy.start(lambda data, addr: None)
        self.proxy.add_session(1, self.tun.fileno(), vnet_hdr=False)

    def params(self, spi: int, inbound: bool, **kw: Any) -> SAParams:
        return SAParams(spi=spi, inbound=inbound, key=KEY, salt=SALT, session=1,
                        peer=self.peer.getsockname(), replay_window=64,
                        **kw)  # fmt: skip

    @property
    def reserver(self) -> SeqReserver:
        assert self.proxy.reserver is not None
        return self.proxy.reserver

    def out(self, key: str) -> int:
        return int(self.proxy.sa_counters(SPI_OUT, False)[key])

    def send_inner(self, n: int) -> None:
        for _ in range(n):
            self.app.send(ICMP)

    def received_seqs(self) -> list[int]:
        seqs = []
        while True:
            try:
                data = self.peer.recv(4096)
            except TimeoutError:
                return seqs
            if data[:4] != b"\0\0\0\0":
                seqs.append(struct.unpack("!I", data[4:8])[0])

    def send_esp(self, seq: int, tamper: bool = False) -> None:
        sa = self.params(SPI_IN, False)
        packet = bytearray(esp_encrypt(sa, seq, ICMP))
        if tamper:
            packet[-1] ^= 0x01
        self.peer.sendto(bytes(packet), self.udp.getsockname())

    def inbound(self, packets: int, **drops: int) -> bool:
        def done() -> bool:
            c = self.proxy.sa_counters(SPI_IN, True)
            return c["packets"] == packets and all(
                c["drops"][k] == v for k, v in drops.items()
            )

        return _wait_for(done)

    def close(self) -> None:
        self.proxy.stop()
        self.store.close()
        for sock in (self.udp, self.peer, self.tun, self.app):
            sock.close()


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[_Rig]:
    r = _Rig(tmp_path)
    yield r
    r.close()


# ---------------------------------------------------------------- the cap


def test_reserver_tick_keeps_cap_of_moved_out_sa(rig: _Rig) -> None:
    rig.proxy.install_sa(rig.params(SPI_OUT, False))
    rig.send_inner(8)
    assert _wait_for(lambda: rig.out("next_seq") == 9)
    # the move's freeze: 8 sent, 4 more allowed before the kernel's numbers
    rig.proxy.set_seq_limit(SPI_OUT, 12)
    rig.send_inner(20)
    assert _wait_for(lambda: rig.out("seq_blocked") > 0)
    # the ticker's work, many times over: every raise reserves a new block
    for _ in range(5):
        rig.reserver.tick(SPI_OUT, rig.out("next_seq") + 1000)
    assert rig.out("seq_limit") == 12
    rig.send_inner(20)
    assert _wait_for(lambda: rig.out("seq_blocked") >= 20)
    seqs = rig.received_seqs()
    assert max(seqs) == 12 and len(seqs) == len(set(seqs)) == 12


def test_reserver_tick_raises_uncapped_sa(rig: _Rig) -> None:
    # the twin: without a cap the same ticks lift the limit past 12
    rig.proxy.install_sa(rig.params(SPI_OUT, False))
    rig.reserver.tick(SPI_OUT, 1000)
    assert rig.out("seq_limit") > 1000


def test_restart_keeps_cap_of_moved_out_sa(rig: _Rig) -> None:
    rig.proxy.install_sa(rig.params(SPI_OUT, False))
    rig.proxy.set_seq_limit(SPI_OUT, 12)
    rig.proxy.reload()
    # a restart resumes at the stored end, which is above the cap: no sending
    assert rig.out("seq_limit") == 12
    assert rig.out("next_seq") > 12
    assert rig.proxy.seq_cap(SPI_OUT) == 12


def test_set_seq_limit_unknown_sa_rejected(rig: _Rig) -> None:
    with pytest.raises(KeyError):
        rig.proxy.set_seq_limit(SPI_OUT, 12)


# ---------------------------------------------------------------- the floor


def test_move_in_reserves_above_next_seq_before_first_packet(rig: _Rig) -> None:
    # a move back from the kernel: its last number was 4999, margin included
    rig.proxy.install_sa(rig.params(SPI_OUT, False, next_seq=5000))
    stored = rig.store.reserved(SPI_OUT)
    assert stored is not None and stored > 5000
    assert rig.out("next_seq") == 5000
    assert rig.out("seq_limit") == stored - 1
    rig.send_inner(3)
    assert min(rig.received_seqs()) == 5000
    # a crash now: the resume starts at the stored end, above all sent
    again = SeqReserver(rig.store, lambda spi, limit: None)
    assert again.open_sa(SPI_OUT, resume=True) == stored


def test_new_sa_starts_at_one(rig: _Rig) -> None:
    # the twin: a fresh SA (next_seq 1) is not pushed up by the floor
    rig.proxy.install_sa(rig.params(SPI_OUT, False))
    assert rig.out("next_seq") == 1


# ---------------------------------------------------------------- the window


def _seen_then_reload(rig: _Rig, window: bool) -> None:
    rig.proxy.install_sa(rig.params(SPI_IN, True))
    for seq in (1, 2, 4, 5):
        rig.send_esp(seq)
    assert rig.inbound(4, replay=0, auth=0)
    if window:
        rig.proxy.replay_window(SPI_IN)  # the ticker's poll
    rig.proxy.reload()


def test_reload_restores_polled_window_replay_rejected(rig: _Rig) -> None:
    _seen_then_reload(rig, window=True)
    rig.send_esp(4)
    # counters carry their totals across the reload: 4 before, none since
    assert rig.inbound(4, replay=1)


def test_reload_restores_polled_window_unseen_accepted(rig: _Rig) -> None:
    _seen_then_reload(rig, window=True)
    rig.send_esp(3, tamper=True)
    assert rig.inbound(4, auth=1, replay=0)
    rig.send_esp(3)
    assert rig.inbound(5, auth=1, replay=0)


def test_install_sa_with_window_rejects_seen(rig: _Rig) -> None:
    # a move kernel -> userspace: the kernel's window comes with the SA
    rig.proxy.install_sa(rig.params(SPI_IN, True), (5, 0b11011))
    rig.send_esp(4)
    rig.send_esp(3)
    assert rig.inbound(1, replay=1)
    assert rig.proxy.replay_window(SPI_IN) == (5, 0b11111)


# ---------------------------------------------------------------- failed moves

MARGIN = 256


class _Kernel:
    """A KernelEngine stand-in that fails at the step named by ``fail``."""

    def __init__(self, fail: str):
        from fastpath.xfrm import ReplayState

        self.fail = fail
        self.sas: dict[tuple[int, bool], Any] = {}
        self.policies: set[str] = set()
        self.state = ReplayState

    def install_sa(self, params: SAParams, *, replay: Any = None, **kw: Any) -> None:
        if self.fail == "install_sa" and not params.inbound:
            raise OSError(22, "Invalid argument")
        state = replay or self.state(params.next_seq - 1, 0, params.replay_window,
                                     [0] * (params.replay_window // 32))  # fmt: skip
        self.sas[(params.spi, bool(params.inbound))] = state

    def install_policies(self, session: int, *, dirs: tuple[str, ...], **kw: Any):
        if self.fail == "policies" and "in" in dirs:
            raise OSError(17, "File exists")
        self.policies |= set(dirs)

    def remove_policies(self, session: int, dirs: Any = None) -> int:
        self.policies -= set(dirs or ("out", "in", "fwd"))
        return 0

    def remove_sa(self, spi: int, inbound: bool) -> None:
        del self.sas[(spi, bool(inbound))]

    def sa_counters(self, spi: int, inbound: bool) -> dict[str, Any]:
        state = self.sas[(spi, bool(inbound))]
        return {"packets": 0, "bytes": 0, "next_seq": state.oseq + 1,
                "highest_seq": state.seq}  # fmt: skip

    def sa_state(self, spi: int, inbound: bool) -> Any:
        return self.sas[(spi, bool(inbound))]

    def set_sa_state(self, spi: int, inbound: bool, state: Any) -> None:
        self.sas[(spi, bool(inbound))] = state

    def encap_sockets(self) -> dict[Any, int]:
        return {}

    def close_encap(self, local: Any, peer: Any) -> None:
        pass


def _headend(rig: _Rig, tmp: Path, kernel: _Kernel | None) -> Any:
    from control import config as configmod
    from control.daemon import Headend, Session

    config = configmod.replace_server(configmod.load(None), listen="127.0.0.1",
                                      state_dir=str(tmp / "hs"))  # fmt: skip
    headend = Headend(config)
    headend.engine = rig.proxy
    headend.kernel = kernel
    headend.kernel_ok = kernel is not None
    headend.kernel_reason = "rfc4106(gcm(aes)) not available"
    local = ("127.0.0.1", 4500)
    session = Session("s1", 1, "a@espgate.example", rig.peer.getsockname())
    session.children = [(SPI_IN, SPI_OUT)]
    session.params = {
        (SPI_IN, True): rig.params(SPI_IN, True, local=local),
        (SPI_OUT, False): rig.params(SPI_OUT, False, local=local),
    }
    for params in session.params.values():
        rig.proxy.install_sa(params)
    headend.sessions["s1"] = session
    return headend


def _traffic_after_reload(rig: _Rig, counted: int, replay: int = 0) -> None:
    # `espgate reload dataplane`, then both directions still carry packets
    rig.proxy.reload()
    assert rig.proxy.seq_cap(SPI_OUT) is None
    rig.send_inner(4)
    assert len(rig.received_seqs()) == 4
    rig.send_esp(4)
    assert rig.inbound(counted + 1, replay=replay)


def _traffic_before(rig: _Rig) -> None:
    rig.send_inner(3)
    assert len(rig.received_seqs()) == 3
    for seq in (1, 2, 3):
        rig.send_esp(seq)
    assert rig.inbound(3, replay=0)


def test_move_refused_kernel_unavailable_reload_keeps_traffic(rig, tmp_path):
    headend = _headend(rig, tmp_path, None)
    _traffic_before(rig)
    answer = headend.control("sa-move", {"spi": f"{SPI_OUT:08x}", "to": "kernel"})
    assert answer == {"error": "kernel engine unavailable: "
                      "rfc4106(gcm(aes)) not available"}  # fmt: skip
    assert rig.out("seq_limit") > 4 and "seq_cap" not in rig.proxy.sa_counters(
        SPI_OUT, False
    )
    _traffic_after_reload(rig, 3)


def test_move_kernel_install_fails_rolls_back(rig, tmp_path):
    kernel = _Kernel("install_sa")
    headend = _headend(rig, tmp_path, kernel)
    _traffic_before(rig)
    answer = headend.control("sa-move", {"spi": f"{SPI_IN:08x}", "to": "kernel"})
    assert answer == {"error": "Invalid argument"}
    assert kernel.sas == {} and kernel.policies == set()
    assert headend.sessions["s1"].engine == "userspace"
    _traffic_after_reload(rig, 3)


def test_move_last_step_fails_rolls_back_above_kernel_numbers(rig, tmp_path):
    kernel = _Kernel("policies")
    headend = _headend(rig, tmp_path, kernel)
    _traffic_before(rig)
    answer = headend.control("sa-move", {"spi": f"{SPI_OUT:08x}", "to": "kernel"})
    assert "File exists" in answer["error"]
    assert kernel.sas == {} and kernel.policies == set()
    # the engine's SAs are back: out above the kernel's range, in with its window
    assert rig.out("next_seq") >= 4 + MARGIN
    # (a reinstalled SA counts from zero)
    rig.send_esp(2)
    assert rig.inbound(0, replay=1)
    _traffic_after_reload(rig, 0, replay=1)


def test_move_capped_sa_counts_held_back_packets(rig, tmp_path):
    # the twin of a rollback: a cap that stands is shown and its drops counted
    rig.proxy.install_sa(rig.params(SPI_OUT, False))
    rig.proxy.set_seq_limit(SPI_OUT, 2)
    rig.send_inner(5)
    assert _wait_for(lambda: rig.proxy.sa_counters(SPI_OUT, False)["drops"].get(
        "seq_cap") == 3)  # fmt: skip
    assert rig.proxy.sa_counters(SPI_OUT, False)["seq_cap"] == 2
    rig.proxy.lift_seq_cap(SPI_OUT)
    assert "seq_cap" not in rig.proxy.sa_counters(SPI_OUT, False)


# ---------------------------------------------------------------- whole-daemon restart


@pytest.mark.parametrize("whole_window", [True, False])
def test_resume_counts_everything_to_the_stored_top_as_seen(
    rig: _Rig, whole_window: bool
) -> None:
    # after a whole-daemon restart only the stored top is known: which of the
    # numbers below it arrived is lost, so the daemon marks them all as seen
    top = 30
    replay = (top, (1 << 64) - 1) if whole_window else None
    rig.proxy.install_sa(rig.params(SPI_IN, True, next_seq=top + 1), replay)

    def counters() -> dict[str, Any]:
        return dict(rig.proxy.sa_counters(SPI_IN, True))

    rig.send_esp(20)  # below the top: maybe a replay of one seen before the crash
    if whole_window:
        assert _wait_for(lambda: counters()["drops"].get("replay", 0) == 1)
    else:  # the twin: a window that starts empty takes it
        assert _wait_for(lambda: counters()["packets"] == 1)
    rig.send_esp(top + 1)  # the peer's next fresh packet
    assert _wait_for(lambda: counters()["highest_seq"] == top + 1)
