"""Security association parameters handed from the control plane to the engine.

Theory of operation: IKEv2 negotiates a CHILD SA pair and the control plane turns
each direction into one frozen :class:`SAParams`.  The engine copies what it needs
into C structs when the SA is installed (expanded key, salt, peer sockaddr, traffic
selectors), so the Python object is never touched on the packet path.  Validation
happens once, here, so the C side can trust every field.

Only AES-GCM with a 16-octet ICV (RFC 4106, ENCR_AES_GCM_16) is supported; the key
is 16 or 32 octets and the salt 4.

Traffic selectors travel as text in the form `control.ike.trafficsel` renders
them: a CIDR or an ``first-last`` address range, optionally followed by
``[protocol/port-port]`` (protocol 0 = any).  `parse_ts` turns one into a
:class:`Selector` of packed range ends, which the engine copies into C.  Each
SA carries both sides: ``local_ts`` (our side, the responder's TSr) and
``remote_ts`` (the client's side, TSi).  Inbound packets must come from
``remote_ts`` and go to ``local_ts``; an outbound SA is chosen for a packet
whose source lies in its ``local_ts`` and destination in its ``remote_ts``
(RFC 4301 section 4.4.1, RFC 7296 section 3.13.1).
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import NamedTuple

__all__ = ["ANY_TS", "ENGINES", "SAParams", "Selector", "parse_ts"]

ENGINES = ("userspace", "kernel", "auto")
ANY_TS = ("0.0.0.0/0", "::/0")
MAX_TS = 16  # per side, as the engine's sa_t holds them

_TS_RE = re.compile(r"^([^\[\]]+)(?:\[(\d+)(?:/(\d+)-(\d+))?\])?$")


class Selector(NamedTuple):
    """One traffic selector: an address range, an IP protocol and a port range."""

    version: int
    start: bytes
    end: bytes
    protocol: int = 0
    port_lo: int = 0
    port_hi: int = 65535

    @property
    def any_port(self) -> bool:
        return self.port_lo == 0 and self.port_hi == 65535


def parse_ts(text: str) -> Selector:
    """Parse ``CIDR`` or ``first-last``, with an optional ``[proto/lo-hi]`` tail."""
    m = _TS_RE.match(text.strip()) if isinstance(text, str) else None
    if m is None:
        raise ValueError(f"Bad traffic selector {text!r}")
    addr, proto, lo, hi = m.groups()
    try:
        if "-" in addr:
            first, last = (ipaddress.ip_address(a) for a in addr.split("-", 1))
        else:
            net = ipaddress.ip_network(addr, strict=False)
            first, last = net.network_address, net.broadcast_address
    except ValueError:
        raise ValueError(f"Bad traffic selector {text!r}") from None
    port_lo, port_hi = (int(lo), int(hi)) if lo is not None else (0, 65535)
    # RFC 7296 section 3.13.1: ranges run from start to end inclusive
    if first.version != last.version or first.packed > last.packed:
        raise ValueError(f"Bad traffic selector {text!r}")
    if int(proto or 0) > 255 or port_hi > 65535 or port_lo > port_hi:
        raise ValueError(f"Bad traffic selector {text!r}")
    return Selector(first.version, first.packed, last.packed, int(proto or 0),
                    port_lo, port_hi)  # fmt: skip


def _check_addr(name: str, value: object) -> None:
    assert isinstance(value, tuple) and len(value) == 2, f"{name} must be (addr, port)"
    addr, port = value
    try:
        ipaddress.ip_address(addr)
    except ValueError:
        raise ValueError(f"Bad {name} address {addr!r}") from None
    if not isinstance(port, int) or not 0 < port < 65536:
        raise ValueError(f"Bad {name} port {port!r}")


@dataclass(frozen=True)
class SAParams:
    """One direction of an ESP SA (AES-GCM-16) as the engine consumes it.

    ``next_seq`` is the next number to send (outbound) or expected (inbound: the
    replay window starts just below it, for SAs resumed from stored state).
    ``seq_limit`` (outbound, 0 = none) is the highest number the engine may send
    until the sequence store raises it: the end of the durably reserved block.
    ``encap`` selects ESP in UDP (RFC 3948, NAT found); without it the SA
    carries raw ESP, IP protocol 50, and the peer's port is ignored.
    ``local_ts`` and ``remote_ts`` are our and the client's traffic selectors
    (see the module docstring); both default to everything.
    """

    spi: int
    inbound: bool
    key: bytes
    salt: bytes
    session: int
    peer: tuple[str, int]
    local: tuple[str, int] | None = None
    esn: bool = False
    replay_window: int = 1024
    next_seq: int = 1
    remote_ts: tuple[str, ...] = ANY_TS
    engine: str = "userspace"
    seq_limit: int = 0
    encap: bool = True
    local_ts: tuple[str, ...] = ANY_TS

    def __post_init__(self) -> None:
        # RFC 4303 section 2.1: SPI values 1..255 are reserved by IANA and 0 is
        # local use only, so neither appears on the wire
        if not isinstance(self.spi, int) or not 256 <= self.spi <= 0xFFFFFFFF:
            raise ValueError(f"Bad SPI {self.spi!r}")
        # RFC 4106 section 8.1: 16 or 32 octet AES key plus a 4 octet salt
        if not isinstance(self.key, bytes) or len(self.key) not in (16, 32):
            raise ValueError(f"Bad key length {len(self.key)}")
        if not isinstance(self.salt, bytes) or len(self.salt) != 4:
            raise ValueError(f"Bad salt length {len(self.salt)}")
        if not isinstance(self.session, int) or not 0 <= self.session <= 0xFFFFFFFF:
            raise ValueError(f"Bad session {self.session!r}")
        _check_addr("peer", self.peer)
        if self.local is not None:
            _check_addr("local", self.local)
        w = self.replay_window
        if not isinstance(w, int) or w < 64 or w > 4096 or w & (w - 1):
            raise ValueError(f"Bad replay window {w!r}")
        # RFC 4303 section 3.3.3: the counter never cycles, 0 is never sent
        limit = 0xFFFFFFFFFFFFFFFF if self.esn else 0xFFFFFFFF
        if not isinstance(self.next_seq, int) or not 1 <= self.next_seq <= limit:
            raise ValueError(f"Bad next_seq {self.next_seq!r}")
        if not isinstance(self.seq_limit, int) or not 0 <= self.seq_limit <= limit:
            raise ValueError(f"Bad seq_limit {self.seq_limit!r}")
        for name in ("local_ts", "remote_ts"):
            selectors = getattr(self, name)
            if not selectors:
                raise ValueError(f"Empty {name}")
            if len(selectors) > MAX_TS:
                raise ValueError(f"Too many traffic selectors {len(selectors)}")
            for ts in selectors:
                parse_ts(ts)
        if self.engine not in ENGINES:
            raise ValueError(f"Bad engine {self.engine!r}")
        if not isinstance(self.encap, bool):
            raise ValueError(f"Bad encap {self.encap!r}")

    def __repr__(self) -> str:
        # keys and salts never reach a log
        return (
            f"SAParams(spi=0x{self.spi:08x}, inbound={self.inbound}, "
            f"session={self.session}, peer={self.peer}, esn={self.esn}, "
            f"encap={self.encap})"
        )
