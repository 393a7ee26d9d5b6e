"""Events the IKEv2 responder hands to the daemon, and the datagrams it sends.

Theory of operation: the responder never acts on the world itself. Whatever
the daemon must do (install or remove ESP state, track sessions) comes out of
`IkeResponder.next_event()` as one of these dataclasses, in order: an
`IkeSAUp` before the first `ChildSAUp` of that SA, and every `ChildSADown`
of an SA before its `IkeSADown`. Key material is kept out of `repr()`.
A `ChildSAUp` may carry the session's TUN MTU from authorization; the daemon
fills it from the session's policy when the core leaves it unset.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

Address = tuple[str, int]


@dataclass(frozen=True)
class Datagram:
    """One UDP payload to send from `local` to `remote` (no non-ESP marker)."""

    data: bytes
    local: Address
    remote: Address


@dataclass(frozen=True)
class IkeSAUp:
    session_id: str
    identity: str
    remote: Address
    profile: str


@dataclass(frozen=True)
class ChildSAUp:
    """A CHILD SA to install; *_in keys protect what we receive."""

    session_id: str
    identity: str
    remote: Address
    inside_address: ipaddress.IPv4Address
    spi_in: int
    spi_out: int
    key_in: bytes = field(repr=False)
    salt_in: bytes = field(repr=False)
    key_out: bytes = field(repr=False)
    salt_out: bytes = field(repr=False)
    esn: bool
    local_ts: list[str]
    remote_ts: list[str]
    udp_encap: bool
    # IPv6 inside address and the prefix routed to the client, if any
    inside_address6: ipaddress.IPv6Interface | None = None
    # MTU of the session's TUN from authorization (ip:interface-config);
    # None: the engine's default
    mtu: int | None = None


@dataclass(frozen=True)
class ChildSADown:
    session_id: str
    spi_in: int
    spi_out: int


@dataclass(frozen=True)
class IkeSADown:
    session_id: str
    reason: str


Event = IkeSAUp | ChildSAUp | ChildSADown | IkeSADown
