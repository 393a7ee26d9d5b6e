"""Traffic selector parsing and the engine's per-packet selector match.

`fastpath.sa.parse_ts` reads the text `control.ike.trafficsel.ts_to_string`
writes; `fastpath._engine.flow_selects` runs the same C match the workers run
on one packet: an outbound SA takes a packet from its ``local_ts`` to its
``remote_ts``, an inbound SA one from its ``remote_ts`` to its ``local_ts``.
"""

from __future__ import annotations

import ipaddress
import struct

import pytest

from control.ike.trafficsel import ts_for_address, ts_from_network, ts_to_string
from fastpath import SAParams
from fastpath._engine import flow_selects
from fastpath.sa import ANY_TS, Selector, parse_ts

CLIENT, CLIENT6 = "198.18.128.10", "2001:db8:80::10"
SERVER, SERVER6 = "198.19.1.1", "2001:db8:19::1"


def _sa(
    local: tuple[str, ...], remote: tuple[str, ...], inbound: bool = False
) -> SAParams:
    return SAParams(spi=0x1000, inbound=inbound, key=bytes(16), salt=bytes(4),
                    session=1, peer=("198.18.0.2", 4500), local_ts=local,
                    remote_ts=remote)  # fmt: skip


def _ip(proto: int, src: str, dst: str, l4: bytes, frag: int = 0) -> bytes:
    a, b = ipaddress.ip_address(src), ipaddress.ip_address(dst)
    if a.version == 6:
        return struct.pack("!IHBB", 6 << 28, len(l4), proto, 64) + a.packed + (
            b.packed + l4
        )
    return struct.pack("!BBHHHBBH", 0x45, 0, 20 + len(l4), 1, frag, 64, proto, 0) + (
        a.packed + b.packed + l4
    )


def _tcp(src: str, dst: str, sport: int, dport: int) -> bytes:
    return _ip(6, src, dst, struct.pack("!HH", sport, dport) + bytes(16))


def _icmp(src: str, dst: str, kind: int = 8, proto: int = 1) -> bytes:
    return _ip(proto, src, dst, bytes([kind, 0]) + bytes(6))


def test_parse_ts_cidr_and_any() -> None:
    assert parse_ts("198.19.0.0/16") == Selector(
        4, bytes([198, 19, 0, 0]), bytes([198, 19, 255, 255])
    )
    sel = parse_ts("::/0")
    assert sel.version == 6 and sel.end == b"\xff" * 16 and sel.any_port


def test_parse_ts_range_with_protocol_and_ports() -> None:
    sel = parse_ts("198.19.1.5-198.19.1.9[6/80-443]")
    assert (sel.start[-1], sel.end[-1]) == (5, 9)
    assert (sel.protocol, sel.port_lo, sel.port_hi) == (6, 80, 443)


def test_parse_ts_reads_what_trafficsel_writes() -> None:
    for ts in (
        ts_from_network("198.19.0.0/16"),
        ts_for_address(ipaddress.ip_address(CLIENT), 17, (53, 53)),
        ts_for_address(ipaddress.ip_address(CLIENT6), 58, (0, 65535)),
    ):
        sel = parse_ts(ts_to_string(ts))
        assert (sel.start, sel.end) == (ts.start_address, ts.end_address)
        assert (sel.protocol, sel.port_lo, sel.port_hi) == (
            ts.ip_protocol, ts.start_port, ts.end_port
        )


@pytest.mark.parametrize(
    "text",
    ["198.19.0.0/33", "198.19.1.9-198.19.1.5", "198.19.1.1-::1", "10.0.0.0/8[300]",
     "10.0.0.0/8[6/90-80]", "10.0.0.0/8[6/0-70000]", "10.0.0.0/8[tcp]", ""],
)  # fmt: skip
def test_parse_ts_bad_text_rejected(text: str) -> None:
    with pytest.raises(ValueError):
        parse_ts(text)


def test_saparams_bad_local_ts_rejected() -> None:
    with pytest.raises(ValueError):
        _sa(("198.19.0.0/33",), ANY_TS)
    with pytest.raises(ValueError):
        _sa((), ANY_TS)


def test_flow_selects_protocol_picks_sa() -> None:
    icmp_sa = _sa((f"{SERVER}/24[1/0-65535]",), (f"{CLIENT}/32",))
    tcp_sa = _sa((f"{SERVER}/24[6/0-65535]",), (f"{CLIENT}/32",))
    echo_reply = _icmp(SERVER, CLIENT, 0)
    segment = _tcp(SERVER, CLIENT, 443, 50000)
    assert flow_selects(icmp_sa, echo_reply) and not flow_selects(icmp_sa, segment)
    assert flow_selects(tcp_sa, segment) and not flow_selects(tcp_sa, echo_reply)


def test_flow_selects_destination_outside_remote_ts_refused() -> None:
    sa = _sa(ANY_TS, (f"{CLIENT}/32",))
    assert flow_selects(sa, _tcp(SERVER, CLIENT, 80, 1234))
    assert not flow_selects(sa, _tcp(SERVER, "198.18.128.11", 80, 1234))
    # the source must lie in local_ts
    narrow = _sa(("198.19.2.0/24",), (f"{CLIENT}/32",))
    assert not flow_selects(narrow, _tcp(SERVER, CLIENT, 80, 1234))


def test_flow_selects_port_ranges_on_both_sides() -> None:
    # our side sends from 80..443, the client's side listens on 1000..2000
    sa = _sa((f"{SERVER}/32[6/80-443]",), (f"{CLIENT}/32[6/1000-2000]",))
    assert flow_selects(sa, _tcp(SERVER, CLIENT, 80, 1000))
    assert flow_selects(sa, _tcp(SERVER, CLIENT, 443, 2000))
    assert not flow_selects(sa, _tcp(SERVER, CLIENT, 444, 1500))
    assert not flow_selects(sa, _tcp(SERVER, CLIENT, 80, 2001))
    # a non-first fragment has no ports: only an any-port selector takes it
    frag = _ip(6, SERVER, CLIENT, bytes(24), frag=0x0010)
    assert not flow_selects(sa, frag)
    assert flow_selects(_sa((f"{SERVER}/32[6/0-65535]",), (f"{CLIENT}/32",)), frag)


def test_flow_selects_icmp_type_code_as_port() -> None:
    # RFC 7296 section 3.13.1: type 8 code 0 is "port" 0x0800
    sa = _sa((f"{SERVER}/32[1/2048-2048]",), (f"{CLIENT}/32",))
    assert flow_selects(sa, _icmp(SERVER, CLIENT, 8))
    assert not flow_selects(sa, _icmp(SERVER, CLIENT, 0))


def test_flow_selects_inbound_swaps_sides() -> None:
    sa = _sa((f"{SERVER}/24[6/0-65535]",), (f"{CLIENT}/32",), inbound=True)
    assert flow_selects(sa, _tcp(CLIENT, SERVER, 50000, 443))
    assert not flow_selects(sa, _tcp(SERVER, CLIENT, 443, 50000))
    assert not flow_selects(sa, _icmp(CLIENT, SERVER))


def test_flow_selects_ipv6_by_family() -> None:
    sa = _sa(("::/0[6/0-65535]",), (f"{CLIENT6}/128",))
    assert flow_selects(sa, _tcp(SERVER6, CLIENT6, 80, 1234))
    assert not flow_selects(sa, _icmp(SERVER6, CLIENT6, 129, proto=58))
    # an IPv4 packet never matches IPv6 selectors
    assert not flow_selects(sa, _tcp(SERVER, CLIENT, 80, 1234))


def test_flow_selects_defaults_take_everything() -> None:
    sa = _sa(ANY_TS, ANY_TS)
    for pkt in (_tcp(SERVER, CLIENT, 1, 2), _icmp(SERVER6, CLIENT6, 128, proto=58),
                _ip(47, SERVER, CLIENT, bytes(8))):  # fmt: skip
        assert flow_selects(sa, pkt)


def test_flow_selects_non_ip_rejected() -> None:
    with pytest.raises(ValueError):
        flow_selects(_sa(ANY_TS, ANY_TS), b"\x00" * 40)
