"""Traffic selectors: conversion and narrowing (RFC 7296 2.9).

Theory of operation: a selector is an address range, an IP protocol (0 = any)
and a port range. Narrowing intersects what the initiator proposed with what
we allow, field by field: the overlap of the address ranges, of the port
ranges, and a protocol that is either the common one or the specific one when
the other side says any. For a remote-access client TSi collapses to the one
inside address we handed out, and TSr to the intersection of its request with
the profile's local subnets. A dual-stack client gets one selector per
inside address, IPv4 and IPv6.
"""

from __future__ import annotations

import ipaddress
from typing import Any

from control.ike.messages import NotifyType, ProtocolError, TrafficSelector, TSType

ANY_PORT = (0, 65535)


def ts_from_network(text: str) -> TrafficSelector:
    """Build a selector for all protocols and ports of a CIDR like "10.0.0.0/8"."""
    network = ipaddress.ip_network(text, strict=False)
    ts_type = (
        TSType.TS_IPV4_ADDR_RANGE if network.version == 4 else TSType.TS_IPV6_ADDR_RANGE
    )
    return TrafficSelector(
        ts_type,
        0,
        *ANY_PORT,
        network.network_address.packed,
        network.broadcast_address.packed,
    )


def ts_for_address(
    address: ipaddress.IPv4Address | ipaddress.IPv6Address,
    ip_protocol: int = 0,
    ports: tuple[int, int] = ANY_PORT,
) -> TrafficSelector:
    kind = (
        TSType.TS_IPV4_ADDR_RANGE
        if address.version == 4
        else (TSType.TS_IPV6_ADDR_RANGE)
    )
    return TrafficSelector(kind, ip_protocol, *ports, address.packed, address.packed)


def ts_to_string(ts: TrafficSelector) -> str:
    """Render a selector as CIDR (or start-end) with [proto/ports] when not any."""
    start = ipaddress.ip_address(ts.start_address)
    end = ipaddress.ip_address(ts.end_address)
    nets = []
    if start.version == end.version and ts.start_address <= ts.end_address:
        nets = list(ipaddress.summarize_address_range(start, end))
    text = str(nets[0]) if len(nets) == 1 else f"{start}-{end}"
    if ts.ip_protocol or (ts.start_port, ts.end_port) != ANY_PORT:
        text += f"[{ts.ip_protocol}/{ts.start_port}-{ts.end_port}]"
    return text


def intersect(a: TrafficSelector, b: TrafficSelector) -> TrafficSelector | None:
    """Return the selector both `a` and `b` cover, or None."""
    if a.ts_type != b.ts_type:
        return None
    if a.ip_protocol and b.ip_protocol and a.ip_protocol != b.ip_protocol:
        return None
    start = max(a.start_address, b.start_address)
    end = min(a.end_address, b.end_address)
    start_port = max(a.start_port, b.start_port)
    end_port = min(a.end_port, b.end_port)
    if start > end or start_port > end_port:
        return None
    return TrafficSelector(
        a.ts_type, a.ip_protocol or b.ip_protocol, start_port, end_port, start, end
    )


def narrow_tsi(
    offered: list[TrafficSelector],
    address: Any,
) -> list[TrafficSelector]:
    """Narrow the initiator's TSi to the inside address(es) we assigned.

    `address` is one address or a list (IPv4Address, IPv6Address or
    IPv6Interface, whose whole prefix is the client's).
    """
    result: list[TrafficSelector] = []
    for item in address if isinstance(address, list) else [address]:
        if isinstance(item, ipaddress.IPv6Interface):
            own = ts_from_network(str(item.network))
        else:
            own = ts_for_address(item)
        for ts in offered:
            common = intersect(ts, own)
            if common is not None:
                result.append(common)
                break
    # RFC 7296 2.9: nothing acceptable within what was proposed
    if not result:
        raise ProtocolError(NotifyType.TS_UNACCEPTABLE, f"TSi does not cover {address}")
    return result


def narrow_tsr(
    offered: list[TrafficSelector], local: list[str]
) -> list[TrafficSelector]:
    """Narrow the initiator's TSr to the profile's local subnets."""
    result: list[TrafficSelector] = []
    for ts in offered:
        for net in local:
            common = intersect(ts, ts_from_network(net))
            if common is not None and common not in result:
                result.append(common)
    # RFC 7296 2.9: nothing acceptable within what was proposed
    if not result:
        raise ProtocolError(NotifyType.TS_UNACCEPTABLE, "TSr outside local subnets")
    return result
