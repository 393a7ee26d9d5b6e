"""IKE SA and CHILD SA state held by the responder.

Theory of operation: an `IkeSA` is created when we answer an IKE_SA_INIT and
lives in one of four states. Transitions go only through `IkeSA.set_state`,
which checks them against `TRANSITIONS` and logs `old -> new` at debug:

    HALF_OPEN --IKE_AUTH ok--> ESTABLISHED --our Delete sent--> DELETING
        |                          |                               |
        +--auth failed/timeout-----+----peer Delete/give up--------+--> DEAD

Each SA keeps two message-ID windows of size one (RFC 7296 2.3): the
responder window (the next request ID we expect from the peer, plus our last
response, cached byte for byte for retransmitted requests) and the initiator
window (our next request ID and the one request in flight, retransmitted on
a doubling timer until answered or given up).
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from control.ike.crypto import IkeKeys, Prf, SkCipher
from control.ike.events import Address
from control.ike.profiles import IkeAlgorithms, Profile

logger = logging.getLogger("espgate.ike")


class IkeState(Enum):
    HALF_OPEN = "half-open"
    ESTABLISHED = "established"
    DELETING = "deleting"
    DEAD = "dead"


TRANSITIONS: dict[IkeState, set[IkeState]] = {
    IkeState.HALF_OPEN: {IkeState.ESTABLISHED, IkeState.DEAD},
    IkeState.ESTABLISHED: {IkeState.DELETING, IkeState.DEAD},
    IkeState.DELETING: {IkeState.DEAD},
    IkeState.DEAD: set(),
}


class SessionLogger(logging.LoggerAdapter):  # type: ignore[type-arg,unused-ignore]
    """Prefix every record with the session id."""

    def process(self, msg: Any, kwargs: Any) -> tuple[Any, Any]:
        return f"[{self.extra['session'] if self.extra else '-'}] {msg}", kwargs


@dataclass
class ChildSA:
    spi_in: int
    spi_out: int
    key_length: int
    local_ts: list[str]
    remote_ts: list[str]


@dataclass
class PendingRequest:
    """Our one request in flight and its retransmission schedule."""

    message_id: int
    data: bytes
    deadline: float
    on_response: Callable[[list[Any]], None]
    tries: int = 0


@dataclass
class IkeSA:
    spi_i: bytes
    spi_r: bytes
    local: Address
    remote: Address
    created: float
    algorithms: IkeAlgorithms
    dh_group: int
    prf: Prf
    nonce_i: bytes = field(repr=False)
    nonce_r: bytes = field(repr=False)
    init_request: bytes = field(repr=False)
    init_response: bytes = field(repr=False)
    keys: IkeKeys = field(repr=False)
    cipher_in: SkCipher = field(repr=False)
    cipher_out: SkCipher = field(repr=False)
    peer_behind_nat: bool = False
    self_behind_nat: bool = False
    # RFC 7427 hashes the peer can verify; CA hashes from its CERTREQs
    peer_sig_hashes: list[int] = field(default_factory=list)
    peer_certreq: list[bytes] = field(default_factory=list, repr=False)
    state: IkeState = IkeState.HALF_OPEN
    half_open_deadline: float | None = None
    established_at: float | None = None
    # responder window (RFC 7296 2.3)
    expected_request_id: int = 1
    last_response: bytes | None = field(default=None, repr=False)
    last_request_digest: bytes | None = field(default=None, repr=False)
    # initiator window
    next_our_request_id: int = 0
    pending: PendingRequest | None = field(default=None, repr=False)
    queued: list[tuple[list[Any], Callable[[list[Any]], None]]] = field(
        default_factory=list, repr=False
    )
    # authenticated peer and what it got
    profile: Profile | None = None
    identity: str | None = None
    inside_address: ipaddress.IPv4Address | None = None
    children: dict[int, ChildSA] = field(default_factory=dict)
    # the session this SA serves: its first SA's SPIr, kept across IKE rekeys
    session: str = ""
    # replaced by a rekey (RFC 7296 2.18); waits for the peer's delete
    superseded: bool = False

    def __post_init__(self) -> None:
        self.log = SessionLogger(logger, {"session": self.session_id})

    @property
    def session_id(self) -> str:
        return self.session or self.spi_r.hex()

    @property
    def nat_detected(self) -> bool:
        return self.peer_behind_nat or self.self_behind_nat

    def set_state(self, new: IkeState) -> None:
        """Move to `new`, checking the transition table."""
        assert new in TRANSITIONS[self.state], f"bad transition {self.state} -> {new}"
        self.log.debug("ike sa %s -> %s", self.state.value, new.value)
        self.state = new
