"""Security association parameters handed from the control plane to the engine.

Theory of operation: IKEv2 negotiates a CHILD SA pair and the control plane turns
each direction into one frozen :class:`SAParams`.  The engine copies what it needs
into C structs when the SA is installed (expanded key, salt, peer sockaddr, traffic
selectors), so the Python object is never touched on the packet path.  Validation
happens once, here, so the C side can trust every field.

Only AES-GCM with a 16-octet ICV (RFC 4106, ENCR_AES_GCM_16) is supported; the key
is 16 or 32 octets and the salt 4.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

__all__ = ["SAParams", "ENGINES"]

ENGINES = ("userspace", "kernel", "auto")


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
    remote_ts: tuple[str, ...] = ("0.0.0.0/0",)
    engine: str = "userspace"
    seq_limit: int = 0

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
        if not self.remote_ts:
            raise ValueError("Empty remote_ts")
        for ts in self.remote_ts:
            try:
                ipaddress.ip_network(ts, strict=False)
            except ValueError:
                raise ValueError(f"Bad traffic selector {ts!r}") from None
        if self.engine not in ENGINES:
            raise ValueError(f"Bad engine {self.engine!r}")

    def __repr__(self) -> str:
        # keys and salts never reach a log
        return (
            f"SAParams(spi=0x{self.spi:08x}, inbound={self.inbound}, "
            f"session={self.session}, peer={self.peer}, esn={self.esn})"
        )
