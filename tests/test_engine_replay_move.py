"""Replay windows carried between engines (a live move), on loopback.

An Engine listens on a loopback UDP socket; its one session writes into a
Unix datagram socket standing in for the TUN.  ESP packets are sealed with
``esp_encrypt`` under a fixed key and sent to the engine, so each test picks
exactly which sequence numbers the source window has seen before the move.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from fastpath import Engine, SAParams, esp_encrypt
from fastpath._engine import ReplayWindow

SPI = 0x0C0D0001
KEY, SALT = bytes(range(100, 116)), b"\x0a\x0b\x0c\x0d"
# ICMP echo 198.19.1.1 -> 198.19.2.1, the inner packet of every ESP test packet
ICMP = bytes.fromhex("4500001c0000000040010000c6130101c61302010800f7ff00000000")
WAIT = 10.0


def _wait_for(pred: Callable[[], bool], timeout: float = WAIT) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.02)
    return pred()


def _params(inbound: bool, esn: bool = False) -> SAParams:
    return SAParams(spi=SPI, inbound=inbound, key=KEY, salt=SALT, session=1,
                    peer=("127.0.0.1", 4500), esn=esn, replay_window=64)  # fmt: skip


def _esp(seq: int, *, tamper: bool = False, esn: bool = False) -> bytes:
    packet = bytearray(esp_encrypt(_params(False, esn), seq, ICMP))
    if tamper:
        packet[-1] ^= 0x01
    return bytes(packet)


class _Box:
    """One engine with one session and an inbound SA, fed from a client socket."""

    def __init__(self, replay: tuple[int, int] | None, esn: bool = False):
        self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.udp.bind(("127.0.0.1", 0))
        self.udp.setblocking(False)
        self.tun, self.tun_peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.tun.setblocking(False)
        self.engine = Engine(self.udp.fileno(), batch=8, crypto="openssl")
        self.engine.add_session(1, self.tun.fileno(), vnet_hdr=False)
        self.engine.install_sa(_params(True, esn), replay)
        self.engine.start(lambda data, addr: None)
        self.client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)

    def send(self, packet: bytes) -> None:
        self.client.sendto(packet, self.udp.getsockname())

    def counters(self) -> dict[str, Any]:
        return self.engine.sa_counters(SPI, True)

    def settled(self, packets: int, **drops: int) -> bool:
        # wait until the SA counted packets and the drops given, nothing else
        def done() -> bool:
            c = self.counters()
            return c["packets"] == packets and all(
                c["drops"][k] == v for k, v in drops.items()
            )

        return _wait_for(done)

    def close(self) -> None:
        self.engine.stop()
        for sock in (self.udp, self.tun, self.tun_peer, self.client):
            sock.close()


@pytest.fixture
def boxes() -> Iterator[list[_Box]]:
    made: list[_Box] = []
    yield made
    for box in made:
        box.close()


def _moved(boxes: list[_Box], seen: list[int], carry: bool) -> _Box:
    """Feed seen to a source engine, then start a destination with its window."""
    src = _Box(None)
    boxes.append(src)
    for seq in seen:
        src.send(_esp(seq))
    assert src.settled(len(seen), replay=0, auth=0)
    window = src.engine.replay_window(SPI)
    dst = _Box(window if carry else None)
    boxes.append(dst)
    return dst


# ---------------------------------------------------------------- ReplayWindow


def test_replay_window_state_round_trips() -> None:
    w = ReplayWindow(64)
    for seq in (1, 2, 5, 9):
        w.update(seq)
    top, seen = w.state()
    # bit i = top - i: 9 (bit 0), 5 (bit 4), 2 (bit 7), 1 (bit 8)
    assert (top, seen) == (9, 0b110010001)
    copy = ReplayWindow(64)
    copy.merge(top, seen)
    assert copy.state() == (9, seen)
    assert not copy.check(5) and copy.check(6)


def test_replay_window_merge_keeps_what_was_seen() -> None:
    w = ReplayWindow(64)
    w.update(20)
    w.merge(10, 0b1)
    # the lower top does not reopen 20, and 10 is now closed too
    assert w.top == 20
    assert not w.check(20) and not w.check(10) and w.check(11)


def test_replay_window_merge_esn_top_above_32_bits() -> None:
    w = ReplayWindow(64, esn=True)
    top = (1 << 32) + 3
    w.merge(top, 0b101)
    assert w.top == top
    assert not w.check(top - 2) and w.check(top - 1)
    # the low half alone is inferred into the window's high half (RFC 4303 A2.2)
    assert w.infer(2) == top - 1


def test_replay_window_merge_top_above_32_bits_without_esn_rejected() -> None:
    with pytest.raises(ValueError):
        ReplayWindow(64).merge(1 << 32, 1)


# ---------------------------------------------------------------- Engine


def test_replay_window_unknown_spi_rejected() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        engine = Engine(udp.fileno(), crypto="openssl")
        with pytest.raises(KeyError):
            engine.replay_window(SPI)
        with pytest.raises(KeyError):
            engine.set_replay_window(SPI, 5, 1)


def test_install_sa_replay_for_outbound_rejected(boxes: list[_Box]) -> None:
    box = _Box(None)
    boxes.append(box)
    with pytest.raises(ValueError):
        box.engine.install_sa(_params(False), (5, 1))


def test_moved_window_rejects_packet_seen_before_move(boxes: list[_Box]) -> None:
    dst = _moved(boxes, [1, 2, 4, 5], carry=True)
    dst.send(_esp(4))
    assert dst.settled(0, replay=1)


def test_fresh_window_accepts_packet_seen_elsewhere(boxes: list[_Box]) -> None:
    # the twin: without the carried window the same copy of 4 gets through
    dst = _moved(boxes, [1, 2, 4, 5], carry=False)
    dst.send(_esp(4))
    assert dst.settled(1, replay=0)


def test_moved_window_accepts_unseen_packet_inside(boxes: list[_Box]) -> None:
    dst = _moved(boxes, [1, 2, 4, 5], carry=True)
    dst.send(_esp(3))
    assert dst.settled(1, replay=0, auth=0)
    assert dst.engine.replay_window(SPI) == (5, 0b11111)


def test_moved_window_tampered_unseen_packet_counted_auth(boxes: list[_Box]) -> None:
    dst = _moved(boxes, [1, 2, 4, 5], carry=True)
    dst.send(_esp(3, tamper=True))
    assert dst.settled(0, auth=1, replay=0)
    # the window is updated only after the ICV: the genuine 3 still passes
    dst.send(_esp(3))
    assert dst.settled(1, auth=1, replay=0)


def test_set_replay_window_late_copy_closes_more(boxes: list[_Box]) -> None:
    # a move's second read of the source window, merged into a live SA
    dst = _moved(boxes, [1, 2], carry=True)
    dst.send(_esp(6))
    assert dst.settled(1)
    dst.engine.set_replay_window(SPI, 4, 0b1)
    # 6 (bit 0), 4 (bit 2), 2 (bit 4), 1 (bit 5)
    assert dst.engine.replay_window(SPI) == (6, 0b110101)
    dst.send(_esp(4))
    dst.send(_esp(5))
    assert dst.settled(2, replay=1)
