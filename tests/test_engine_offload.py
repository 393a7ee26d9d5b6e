"""Offload paths of the engine: TUN super-packets, TCP coalescing, UDP GSO/GRO.

The segmenter and coalescer are checked through the same C the worker runs
(``tun_segment``, ``tun_coalesce``) against a checksum written here in Python
(RFC 1071).  UDP GSO and GRO run on loopback with a datagram socketpair standing
in for the session's TUN, so packet boundaries survive and nothing is timed:
packets are queued before the worker starts and counters are polled.
"""

from __future__ import annotations

import os
import socket
import struct
import time
from collections.abc import Callable, Iterator

import pytest

from fastpath import (
    Engine,
    SAParams,
    esp_decrypt,
    esp_encrypt,
    tun_coalesce,
    tun_segment,
)

SOL_UDP = 17
UDP_SEGMENT = 103
SO_NO_CHECK = 11
SRC4, DST4 = bytes([198, 19, 1, 1]), bytes([198, 19, 2, 1])
SRC6 = bytes.fromhex("20010db8000000000000000000000001")
DST6 = bytes.fromhex("20010db8000000000000000000000002")
WAIT = 15.0


def _wait_for(pred: Callable[[], bool], timeout: float = WAIT) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.02)
    return pred()


def _sum(data: bytes) -> int:
    # RFC 1071: one's-complement sum of 16-bit big-endian words
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return s


def _pseudo(pkt: bytes, proto: int, l4len: int) -> bytes:
    if pkt[0] >> 4 == 4:
        return pkt[12:20] + struct.pack("!BBH", 0, proto, l4len)
    return pkt[8:40] + struct.pack("!IxxxB", l4len, proto)


def _l4_ok(pkt: bytes) -> bool:
    ihl = (pkt[0] & 15) * 4 if pkt[0] >> 4 == 4 else 40
    proto = pkt[9] if ihl == 20 else pkt[6]
    l4 = pkt[ihl:]
    return _sum(_pseudo(pkt, proto, len(l4)) + l4) == 0xFFFF


def _ipv4(proto: int, body: bytes, ident: int = 0x1234) -> bytes:
    hdr = struct.pack(
        "!BBHHHBBH4s4s",
        0x45,
        0,
        20 + len(body),
        ident,
        0x4000,
        64,
        proto,
        0,
        SRC4,
        DST4,
    )
    ck = (~_sum(hdr)) & 0xFFFF
    return hdr[:10] + struct.pack("!H", ck) + hdr[12:] + body


def _ipv6(proto: int, body: bytes) -> bytes:
    return (
        struct.pack("!IHBB16s16s", 0x60000000, len(body), proto, 64, SRC6, DST6) + body
    )


def _tcp(seq: int, flags: int, payload: bytes) -> bytes:
    # 12 octets of options (NOP, NOP, timestamps) as Linux sends them
    opts = bytes.fromhex("0101080a0000007b000001c8")
    return (
        struct.pack("!HHIIBBHHH", 40000, 5201, seq, 77, 8 << 4, flags, 512, 0, 0)
        + opts
        + payload
    )


def _vnet(
    flags: int, gso_type: int, hdr_len: int, gso: int, start: int, off: int
) -> bytes:
    return struct.pack("<BBHHHH", flags, gso_type, hdr_len, gso, start, off)


PAYLOAD = bytes((i * 7 + 3) & 0xFF for i in range(5000))


def _tcp_super(v6: bool, flags: int = 0x18) -> tuple[bytes, bytes]:
    pkt = (
        _ipv6(6, _tcp(1000, flags, PAYLOAD))
        if v6
        else _ipv4(6, _tcp(1000, flags, PAYLOAD))
    )
    ihl = 40 if v6 else 20
    # the kernel leaves the pseudo-header sum in the checksum field
    partial = _sum(_pseudo(pkt, 6, len(pkt) - ihl))
    pkt = pkt[: ihl + 16] + struct.pack("!H", partial) + pkt[ihl + 18 :]
    hdr = _vnet(1, 4 if v6 else 1, ihl + 32, 1448, ihl, 16)
    return hdr, pkt


@pytest.mark.parametrize("v6", [False, True])
def test_tun_segment_tcp_super_packet_valid_segments(v6: bool) -> None:
    hdr, pkt = _tcp_super(v6)
    segs = tun_segment(hdr, pkt)
    ihl = 40 if v6 else 20
    assert [len(s) - ihl - 32 for s in segs] == [1448, 1448, 1448, 656]
    for i, s in enumerate(segs):
        if v6:
            assert struct.unpack("!H", s[4:6])[0] == len(s) - 40
        else:
            assert struct.unpack("!HH", s[2:6]) == (len(s), 0x1234 + i)
            assert _sum(s[:20]) == 0xFFFF
        assert struct.unpack("!I", s[ihl + 4 : ihl + 8])[0] == 1000 + 1448 * i
        # PSH only on the last segment
        assert s[ihl + 13] == (0x18 if i == 3 else 0x10)
        assert _l4_ok(s)
    assert b"".join(s[ihl + 32 :] for s in segs) == PAYLOAD


def test_tun_segment_fin_only_on_last() -> None:
    hdr, pkt = _tcp_super(False, flags=0x19)
    flags = [s[33] for s in tun_segment(hdr, pkt)]
    assert flags == [0x10, 0x10, 0x10, 0x19]


def test_tun_segment_udp_super_packet_valid_datagrams() -> None:
    body = struct.pack("!HHHH", 5000, 6000, 8 + 3000, 0) + PAYLOAD[:3000]
    pkt = _ipv4(17, body)
    hdr = _vnet(1, 5, 28, 1000, 20, 6)
    segs = tun_segment(hdr, pkt)
    assert len(segs) == 3
    for i, s in enumerate(segs):
        assert struct.unpack("!H", s[24:26])[0] == 1008
        assert _l4_ok(s)
        assert s[28:] == PAYLOAD[i * 1000 : (i + 1) * 1000]


def test_tun_segment_partial_checksum_completed() -> None:
    body = struct.pack("!HHHH", 5000, 6000, 8 + 100, 0) + PAYLOAD[:100]
    pkt = _ipv4(17, body)
    partial = _sum(_pseudo(pkt, 17, 108))
    pkt = pkt[:26] + struct.pack("!H", partial) + pkt[28:]
    (done,) = tun_segment(_vnet(1, 0, 0, 0, 20, 6), pkt)
    assert _l4_ok(done)


def test_tun_segment_mismatched_protocol_rejected() -> None:
    body = struct.pack("!HHHH", 5000, 6000, 8 + 3000, 0) + PAYLOAD[:3000]
    with pytest.raises(ValueError):
        tun_segment(_vnet(1, 1, 40, 1000, 20, 16), _ipv4(17, body))


@pytest.mark.parametrize("v6", [False, True])
def test_tun_coalesce_in_order_run_round_trips(v6: bool) -> None:
    hdr, pkt = _tcp_super(v6)
    segs = tun_segment(hdr, pkt)
    (one,) = tun_coalesce(segs)
    flags, gso_type, hdr_len, gso, start, off = struct.unpack("<BBHHHH", one[:10])
    ihl = 40 if v6 else 20
    assert (flags, gso_type, hdr_len, gso, start, off) == (
        1,
        4 if v6 else 1,
        ihl + 32,
        1448,
        ihl,
        16,
    )
    big = one[10:]
    assert big[ihl + 32 :] == PAYLOAD
    assert big[ihl + 13] == 0x18
    # the checksum field holds the pseudo-header sum, as the kernel's own
    field = struct.unpack("!H", big[ihl + 16 : ihl + 18])[0]
    assert field == _sum(_pseudo(big, 6, len(big) - ihl))
    if not v6:
        assert _sum(big[:20]) == 0xFFFF
    # cutting the super-packet again gives back the very same segments
    assert tun_segment(one[:10], big) == segs


def test_tun_coalesce_gap_or_other_flow_splits() -> None:
    hdr, pkt = _tcp_super(False)
    segs = tun_segment(hdr, pkt)
    out = tun_coalesce([segs[0], segs[2], segs[3]])
    assert len(out) == 2
    other = _ipv4(17, struct.pack("!HHHH", 1, 2, 8, 0))
    out = tun_coalesce([segs[0], other + bytes(20), segs[1]])
    assert [o[:10] for o in out] == [bytes(10)] * 3


# ---------------------------------------------------------------- UDP GSO/GRO


SPI = 0x5000_0001
KEY, SALT = bytes(range(16)), b"\x0a\x0b\x0c\x0d"


def _params(inbound: bool, peer: tuple[str, int]) -> SAParams:
    return SAParams(
        spi=SPI,
        inbound=inbound,
        key=KEY,
        salt=SALT,
        session=1,
        peer=peer,
        # the client's side: where inbound packets come from, outbound ones go
        remote_ts=("198.19.1.0/24",) if inbound else ("198.19.2.0/24",),
    )


def _inner(i: int, size: int = 1000) -> bytes:
    body = bytes([i]) * (size - 28)
    return _ipv4(17, struct.pack("!HHHH", 7, 9, 8 + len(body), 0) + body)


@pytest.fixture
def rig() -> Iterator[
    tuple[socket.socket, socket.socket, socket.socket, socket.socket]
]:
    """Yield (engine UDP socket, peer UDP socket, TUN end, engine end)."""
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    udp.setblocking(False)
    peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    peer.bind(("127.0.0.1", 0))
    peer.settimeout(WAIT)
    tun, inner = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    inner.setblocking(False)
    try:
        yield udp, peer, tun, inner
    finally:
        for s in (udp, peer, tun, inner):
            s.close()


def _send_ten(rig: tuple, **kw: bool) -> tuple[Engine, list[bytes]]:
    udp, peer, tun, inner = rig
    engine = Engine(udp.fileno(), batch=32, crypto="ipsec-mb", **kw)
    engine.add_session(1, inner.fileno())
    engine.install_sa(_params(False, peer.getsockname()))
    # nine equal packets and a shorter last one, queued before the worker runs
    sent = [_inner(i) for i in range(9)] + [_inner(9, 600)]
    for pkt in sent:
        tun.send(pkt)
    engine.start(lambda data, addr: None)
    got = [esp_decrypt(_params(True, ("127.0.0.1", 1)), peer.recv(4096)) for _ in sent]
    engine.stop()
    assert got == list(enumerate(sent, 1))
    return engine, sent


def test_udp_gso_run_sent_as_one_datagram(rig: tuple) -> None:
    engine, _ = _send_ten(rig)
    c = engine.counters()
    assert (c["udp_tx"], c["udp_gso_tx"], c["udp_gso_segs"]) == (10, 1, 10)
    assert engine.features()["udp_gso"]


def test_udp_gso_refused_falls_back(rig: tuple) -> None:
    # the kernel refuses UDP_SEGMENT on a socket that skips checksums (EINVAL)
    rig[0].setsockopt(socket.SOL_SOCKET, SO_NO_CHECK, 1)
    engine, _ = _send_ten(rig)
    c = engine.counters()
    assert (c["udp_tx"], c["udp_gso_tx"], c["udp_gso_fallbacks"]) == (10, 0, 1)
    assert not engine.features()["udp_gso"]


def test_udp_gso_disabled_sends_singles(rig: tuple) -> None:
    engine, _ = _send_ten(rig, gso=False)
    c = engine.counters()
    assert (c["udp_tx"], c["udp_gso_tx"], c["udp_gso_fallbacks"]) == (10, 0, 0)


def _gro_datagram(tamper: int | None = None) -> tuple[bytes, list[bytes], int]:
    sa = _params(False, ("127.0.0.1", 4500))
    inner = [_inner(i) for i in range(10)]
    esp = [bytearray(esp_encrypt(sa, i + 1, p)) for i, p in enumerate(inner)]
    if tamper is not None:
        esp[tamper][-1] ^= 0x01
    return b"".join(esp), inner, len(esp[0])


def _receive_ten(
    rig: tuple, tamper: int | None = None, **kw: bool
) -> tuple[Engine, list]:
    udp, peer, tun, inner = rig
    engine = Engine(udp.fileno(), batch=32, crypto="ipsec-mb", **kw)
    engine.add_session(1, inner.fileno())
    engine.install_sa(_params(True, peer.getsockname()))
    engine.start(lambda data, addr: None)
    blob, sent, seg = _gro_datagram(tamper)
    peer.setsockopt(SOL_UDP, UDP_SEGMENT, seg)
    peer.sendto(blob, udp.getsockname())
    want = 10 if tamper is None else 9
    tun.settimeout(WAIT)
    got = [tun.recv(4096) for _ in range(want)]
    assert _wait_for(lambda: engine.counters()["rx_esp"] == 10)
    engine.stop()
    expect = [p for i, p in enumerate(sent) if i != tamper]
    assert got == expect
    return engine, got


def test_udp_gro_datagram_split_and_delivered(rig: tuple) -> None:
    engine, _ = _receive_ten(rig)
    c = engine.counters()
    assert engine.features()["udp_gro"]
    assert (c["udp_rx"], c["udp_gro_rx"], c["udp_gro_segs"]) == (1, 1, 10)


def test_udp_gro_datagram_tampered_segment_dropped(rig: tuple) -> None:
    engine, _ = _receive_ten(rig, tamper=4)
    c = engine.counters()
    assert (c["udp_gro_rx"], c["tun_tx"]) == (1, 9)


def test_udp_gro_disabled_receives_singles(rig: tuple) -> None:
    engine, _ = _receive_ten(rig, gro=False)
    c = engine.counters()
    assert not engine.features()["udp_gro"]
    assert (c["udp_rx"], c["udp_gro_rx"]) == (10, 0)


def test_vnet_detection_on_plain_fd() -> None:
    from fastpath import tun_vnet_hdr

    r, w = os.pipe()
    try:
        assert not tun_vnet_hdr(r)
    finally:
        os.close(r)
        os.close(w)
