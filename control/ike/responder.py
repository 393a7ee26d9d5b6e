"""The IKEv2 responder: a sans-I/O manager of IKE SAs (RFC 7296).

Theory of operation: the daemon feeds every IKE datagram (without the non-ESP
marker) to `datagram_received` with the local and remote addresses and `now`;
it then collects `datagrams_to_send()`, drains `next_event()`, and arms one
timer at `get_timer()` that calls `handle_timer(now)`. Nothing in here reads a
clock, touches a socket or raises into the caller.

A datagram goes through these steps:

1. Parse the header and payload chain; junk is counted and dropped.
2. A request with a zero SPIr is an IKE_SA_INIT: `IkeInitTask` answers it and
   leaves a half-open SA (identical retransmissions get the same answer).
3. Anything else is looked up by our SPI (SPIr). A request whose message ID
   is the one we last answered gets the cached response byte for byte; an
   older one is dropped; the expected one is decrypted (an integrity failure
   is a silent drop), its sender address adopted (RFC 7296 2.23), and handed
   to the tasks of its exchange (`control.ike.tasks.EXCHANGE_TASKS`), which
   process it and build the response in a documented order.
4. A response to one of our own requests (deletes) completes that request.

Choices worth knowing: a failed IKE_AUTH (wrong PSK, unknown identity, no
acceptable profile) answers AUTHENTICATION_FAILED and forgets the SA. When
the address allocator returns None the IKE SA stays up without a CHILD SA, as
RFC 7296 3.15.4 describes; the client normally deletes it. Events are only
emitted for SAs that authenticated: a half-open SA dies silently. INITIAL_CONTACT
replaces older SAs of the same identity. CREATE_CHILD_SA creates or rekeys
CHILD SAs (with PFS when offered) and rekeys the IKE SA
(`control.ike.rekey`): the session keeps its id across IKE SA generations.
`PeerMoved` (beyond the core API) reports an authenticated change of the
peer's address.
"""

from __future__ import annotations

import collections
import hashlib
import ipaddress
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.hashes import SHA256

from control.ike.crypto import IntegrityError, Prf, open_message, seal_message
from control.ike.events import (
    Address,
    ChildSADown,
    ChildSAUp,
    Datagram,
    Event,
    IkeSADown,
    IkeSAUp,
)
from control.ike.messages import (
    HEADER_LENGTH,
    IKE_VERSION,
    DecodeError,
    DeletePayload,
    EncryptedPayload,
    ExchangeType,
    Header,
    HeaderFlag,
    IDType,
    Message,
    NotifyPayload,
    Payload,
    ProtocolError,
    ProtocolId,
    notify_name,
    pull_message,
)
from control.ike.profiles import (
    EspAlgorithms,
    Identity,
    IkeAlgorithms,
    Profile,
    ResponderConfig,
)
from control.ike.sa import ChildSA, IkeSA, IkeState, PendingRequest
from control.ike.tasks import (
    EXCHANGE_TASKS,
    REQUEST_RULES,
    RESPONSE_RULES,
    Exchange,
    IkeInitTask,
    check_rules,
)

__all__ = [
    "ChildSADown",
    "ChildSAUp",
    "Datagram",
    "EspAlgorithms",
    "IDType",
    "Identity",
    "IkeAlgorithms",
    "IkeResponder",
    "IkeSADown",
    "IkeSAUp",
    "PeerMoved",
    "Profile",
    "ResponderConfig",
]

logger = logging.getLogger("espgate.ike")

# which exchanges a peer may start in each state of the IKE SA
ALLOWED_EXCHANGES: dict[IkeState, set[int]] = {
    IkeState.HALF_OPEN: {ExchangeType.IKE_AUTH},
    IkeState.ESTABLISHED: {ExchangeType.INFORMATIONAL, ExchangeType.CREATE_CHILD_SA},
    IkeState.DELETING: {ExchangeType.INFORMATIONAL, ExchangeType.CREATE_CHILD_SA},
    IkeState.DEAD: set(),
}


@dataclass(frozen=True)
class PeerMoved:
    """The peer's outer address changed (authenticated, RFC 7296 2.23)."""

    session_id: str
    remote: Address


class IkeResponder:
    """Answer IKEv2 initiators; sans-I/O (bytes, addresses and `now` in)."""

    def __init__(
        self, config: ResponderConfig, rng: Callable[[int], bytes] = os.urandom
    ) -> None:
        self.config = config
        self.rng = rng
        self.counters: collections.Counter[str] = collections.Counter()
        self._sas: dict[bytes, IkeSA] = {}
        self._half_open: dict[tuple[bytes, Address], IkeSA] = {}
        self._child_spis: set[int] = set()
        self._out: list[Datagram] = []
        self._events: collections.deque[Event | PeerMoved] = collections.deque()
        self._prfs: dict[int, Prf] = {}

    # -- public API -----------------------------------------------------------

    def datagram_received(
        self, data: bytes, local: Address, remote: Address, now: float
    ) -> None:
        """Process one IKE datagram; never raise."""
        self.counters["rx"] += 1
        try:
            self._receive(data, local, remote, now)
        except Exception:
            self.counters["internal_error"] += 1
            logger.exception("internal error handling a datagram")

    def datagrams_to_send(self) -> list[Datagram]:
        """Return and forget the datagrams queued for sending."""
        out, self._out = self._out, []
        return out

    def next_event(self) -> Event | PeerMoved | None:
        """Return the oldest pending event, or None."""
        return self._events.popleft() if self._events else None

    def get_timer(self) -> float | None:
        """Return the earliest deadline at which `handle_timer` must run."""
        deadlines = []
        for ike in self._sas.values():
            if ike.state == IkeState.HALF_OPEN and ike.half_open_deadline is not None:
                deadlines.append(ike.half_open_deadline)
            if ike.pending is not None:
                deadlines.append(ike.pending.deadline)
        return min(deadlines, default=None)

    def handle_timer(self, now: float) -> None:
        """Expire half-open SAs and retransmit or give up our requests."""
        try:
            self._handle_timer(now)
        except Exception:
            self.counters["internal_error"] += 1
            logger.exception("internal error handling timers")

    def delete_ike_sa(self, session_id: str, now: float) -> bool:
        """Start deleting an IKE SA and its CHILD SAs; False if it is unknown."""
        ike = self._by_session(session_id)
        if ike is None or ike.state == IkeState.DELETING:
            return False
        if ike.state == IkeState.HALF_OPEN:
            self._kill(ike, "deleted locally")
            return True
        ike.set_state(IkeState.DELETING)
        self._request(
            ike,
            [DeletePayload(ProtocolId.IKE, 0, [])],
            lambda payloads: self._kill(ike, "deleted locally"),
            now,
        )
        return True

    def delete_child_sa(self, session_id: str, spi_in: int, now: float) -> bool:
        """Start deleting the CHILD SA whose inbound SPI is `spi_in`."""
        ike = self._by_session(session_id)
        if ike is None or ike.state != IkeState.ESTABLISHED:
            return False
        child = ike.children.get(spi_in)
        if child is None:
            return False

        # RFC 7296 1.4.1: the peer answers with its half of the pair; either
        # way the CHILD SA is gone once the exchange completes
        def done(payloads: list[Payload]) -> None:
            if ike.children.pop(spi_in, None) is not None:
                self._child_down(ike, child)

        # send, or queue behind a request already in flight (window of one)
        delete = DeletePayload(ProtocolId.ESP, 4, [spi_in.to_bytes(4, "big")])
        self._request(ike, [delete], done, now)
        return True

    def sessions(self) -> list[dict[str, Any]]:
        """Describe every IKE SA for status output."""
        return [
            {
                "id": ike.session_id,
                "state": ike.state.value,
                "identity": ike.identity,
                "profile": ike.profile.name if ike.profile else None,
                "remote": ike.remote,
                "inside_address": ike.inside_address,
                "ike_spis": (ike.spi_i.hex(), ike.spi_r.hex()),
                "child_spis": [(c.spi_in, c.spi_out) for c in ike.children.values()],
                "established": ike.established_at,
            }
            for ike in self._sas.values()
            if not ike.superseded
        ]

    # -- helpers the tasks use --------------------------------------------------

    def prf_for(self, prf_id: int) -> Prf:
        if prf_id not in self._prfs:
            self._prfs[prf_id] = Prf(prf_id)
        return self._prfs[prf_id]

    def trust_anchors(self) -> list[Any]:
        """Return the trust anchors of all profiles, each once (for CERTREQ)."""
        seen: dict[bytes, Any] = {}
        for profile in self.config.profiles:
            if profile.trust is not None:
                for cert in profile.trust.anchors:
                    seen.setdefault(cert.fingerprint(SHA256()), cert)
        return list(seen.values())

    def new_ike_spi(self) -> bytes:
        while True:
            spi = self.rng(8)
            if any(spi) and spi not in self._sas:
                return spi

    def new_child_spi(self) -> int:
        while True:
            # SPIs 1..255 are reserved by IANA (RFC 4303 2.1)
            spi = int.from_bytes(self.rng(4), "big")
            if spi > 255 and spi not in self._child_spis:
                self._child_spis.add(spi)
                return spi

    def ike_rekeyed(self, old: IkeSA, new: IkeSA, now: float) -> None:
        """Move the session from `old` to its rekeyed `new` IKE SA (RFC 7296 2.18)."""
        new.profile, new.identity = old.profile, old.identity
        new.inside_address, old.inside_address = old.inside_address, None
        new.children, old.children = old.children, {}
        old.superseded = True
        new.set_state(IkeState.ESTABLISHED)
        new.established_at = now
        self._sas[new.spi_r] = new
        self.counters["ike_rekeyed"] += 1
        old.log.info("ike sa rekeyed, new spis %s/%s", new.spi_i.hex(), new.spi_r.hex())

    def drop_identity(self, identity: str, keep: IkeSA) -> None:
        """Forget other SAs of `identity` (INITIAL_CONTACT)."""
        for ike in list(self._sas.values()):
            if ike is not keep and ike.identity == identity and not ike.superseded:
                self._kill(ike, "replaced by initial contact")

    # -- receive path ---------------------------------------------------------------

    def _receive(
        self, data: bytes, local: Address, remote: Address, now: float
    ) -> None:
        if len(data) < HEADER_LENGTH:
            self.counters["drop_short"] += 1
            return
        try:
            message = pull_message(data)
        except DecodeError:
            self.counters["drop_decode"] += 1
            return
        header = message.header
        if header.spi_r == bytes(8):
            self._receive_init(message, data, local, remote, now)
            return
        ike = self._sas.get(header.spi_r)
        # RFC 7296 2.21.4: messages for an unknown SA are not answered here
        if ike is None or ike.spi_i != header.spi_i:
            self.counters["drop_unknown_spi"] += 1
            return
        # RFC 7296 3.1: the peer is the original initiator, so it sets I
        if not header.is_initiator:
            self.counters["drop_flags"] += 1
            return
        # RFC 7296 3.14: every message after IKE_SA_INIT is encrypted
        if not message.payloads or not isinstance(
            message.payloads[-1], EncryptedPayload
        ):
            self.counters["drop_unencrypted"] += 1
            return
        if header.is_response:
            self._receive_response(ike, message, data, now)
        else:
            self._receive_request(ike, message, data, local, remote, now)

    def _receive_init(
        self, message: Message, data: bytes, local: Address, remote: Address, now: float
    ) -> None:
        header = message.header
        # RFC 7296 1.2: IKE_SA_INIT is message ID 0 from the initiator
        if (
            header.exchange != ExchangeType.IKE_SA_INIT
            or header.message_id != 0
            or header.is_response
            or not header.is_initiator
        ):
            self.counters["drop_junk"] += 1
            return
        # TODO: COOKIE challenges (RFC 7296 2.6) once half-open SAs pile up.
        # RFC 7296 2.1: a retransmitted IKE_SA_INIT gets the same answer
        known = self._half_open.get((header.spi_i, remote))
        if known is not None:
            if known.init_request == data:
                self.counters["retransmitted_response"] += 1
                self._send(known.init_response, local, remote)
            else:
                self.counters["drop_init_collision"] += 1
            return
        try:
            result = IkeInitTask(self).run(message, data, local, remote, now)
        except DecodeError:
            self.counters["drop_decode"] += 1
            return
        except ProtocolError as exc:
            # the peer's public value failed validation: junk before auth
            self.counters[f"drop_init_{notify_name(exc.notify)}"] += 1
            return
        self._send(result.response, local, remote)
        if result.ike is not None:
            ike = result.ike
            self._sas[ike.spi_r] = ike
            self._half_open[(ike.spi_i, remote)] = ike
            self.counters["ike_sa_init"] += 1

    def _receive_request(
        self,
        ike: IkeSA,
        message: Message,
        data: bytes,
        local: Address,
        remote: Address,
        now: float,
    ) -> None:
        header = message.header
        mid = header.message_id

        # RFC 7296 2.1: the request we answered last gets the same response
        if mid == ike.expected_request_id - 1 and ike.last_response is not None:
            if ike.last_request_digest == hashlib.sha256(data).digest() or (
                self._verify(ike, message, data) is not None
            ):
                self.counters["retransmitted_response"] += 1
                self._send(ike.last_response, local, remote)
            return
        # RFC 7296 2.3: a window of one; anything but the next ID is dropped
        if mid != ike.expected_request_id:
            self.counters["drop_message_id"] += 1
            return
        if header.exchange not in ALLOWED_EXCHANGES[ike.state]:
            self.counters["drop_exchange"] += 1
            return
        try:
            payloads = open_message(data, message, ike.cipher_in)
        except IntegrityError:
            # RFC 7296 2.21.2: a failed integrity check is a silent drop
            self.counters["drop_integrity"] += 1
            return
        except DecodeError as exc:
            error = ProtocolError(exc.notify, "", exc.data)
            self._refuse(ike, message, data, local, remote, error)
            return

        # RFC 7296 2.23: an authenticated request may come from a new address
        self._adopt_address(ike, local, remote)
        try:
            check_rules(payloads, REQUEST_RULES[header.exchange])
        except DecodeError as exc:
            error = ProtocolError(exc.notify, "", exc.data)
            self._refuse(ike, message, data, local, remote, error)
            return
        self._run_tasks(ike, message, payloads, data, local, remote, now)

    def _verify(
        self, ike: IkeSA, message: Message, data: bytes
    ) -> list[Payload] | None:
        try:
            return open_message(data, message, ike.cipher_in)
        except (IntegrityError, DecodeError):
            return None

    def _run_tasks(
        self,
        ike: IkeSA,
        message: Message,
        payloads: list[Payload],
        data: bytes,
        local: Address,
        remote: Address,
        now: float,
    ) -> None:
        header = message.header
        ex = Exchange(ike, payloads, now)
        tasks = [make(self) for make in EXCHANGE_TASKS[header.exchange]]

        # process in order; a fatal refusal stops the exchange
        for task in tasks:
            task.process(ex)
            if ex.fatal is not None:
                break
        if ex.fatal is not None:
            ex.response = [
                NotifyPayload(ProtocolId.NONE, ex.fatal.notify, b"", ex.fatal.data)
            ]
        else:
            for task in tasks:
                task.build(ex)

        # answer, and cache the answer for retransmitted requests
        self._answer(ike, header, ex.response, data, local, remote)

        # consequences: the SA comes up, goes away, or children change
        if header.exchange == ExchangeType.IKE_AUTH:
            if not ex.authenticated:
                self._kill(ike, "authentication failed")
                return
            self._established(ike, now)
        for event in ex.events:
            if isinstance(event, ChildSAUp):
                self.counters["child_sa_up"] += 1
                ike.log.info(
                    "child sa up, spi in %08x out %08x, %s === %s",
                    event.spi_in,
                    event.spi_out,
                    event.local_ts,
                    event.remote_ts,
                )
            elif isinstance(event, ChildSADown):
                self._child_spis.discard(event.spi_in)
                ike.log.info("child sa down by peer, spi in %08x", event.spi_in)
            self._events.append(event)
        if ex.delete_ike:
            self._kill(ike, "deleted by peer")

    def _answer(
        self,
        ike: IkeSA,
        request: Header,
        payloads: list[Payload],
        data: bytes,
        local: Address,
        remote: Address,
    ) -> None:
        # RFC 7296 2.1/2.2: the response carries the request's message ID and
        # is kept for retransmitted copies of that request
        reply = seal_message(
            Header(
                ike.spi_i,
                ike.spi_r,
                0,
                IKE_VERSION,
                request.exchange,
                HeaderFlag.RESPONSE,
                request.message_id,
            ),
            payloads,
            ike.cipher_out,
        )
        ike.expected_request_id += 1
        ike.last_response = reply
        ike.last_request_digest = hashlib.sha256(data).digest()
        self._send(reply, local, remote)

    def _refuse(
        self,
        ike: IkeSA,
        message: Message,
        data: bytes,
        local: Address,
        remote: Address,
        error: ProtocolError,
    ) -> None:
        # RFC 7296 2.21.2/2.21.3: an integrity-checked request that we cannot
        # parse is answered with the error; in IKE_AUTH the SA is then gone
        header = message.header
        self.counters[f"refused_{notify_name(error.notify)}"] += 1
        notify = NotifyPayload(ProtocolId.NONE, error.notify, b"", error.data)
        self._answer(ike, header, [notify], data, local, remote)
        if header.exchange == ExchangeType.IKE_AUTH:
            self._kill(ike, "malformed IKE_AUTH")

    def _receive_response(
        self, ike: IkeSA, message: Message, data: bytes, now: float
    ) -> None:
        pending = ike.pending
        if pending is None or message.header.message_id != pending.message_id:
            self.counters["drop_unexpected_response"] += 1
            return
        try:
            payloads = open_message(data, message, ike.cipher_in)
            check_rules(payloads, RESPONSE_RULES[ExchangeType.INFORMATIONAL])
        except IntegrityError:
            self.counters["drop_integrity"] += 1
            return
        except DecodeError:
            # a response cannot be refused; take it as an answer all the same
            self.counters["response_decode_error"] += 1
            payloads = []
        ike.pending = None
        pending.on_response(payloads)
        self._send_queued(ike, now)

    def _adopt_address(self, ike: IkeSA, local: Address, remote: Address) -> None:
        if (local, remote) == (ike.local, ike.remote):
            return
        moved = remote != ike.remote
        ike.local, ike.remote = local, remote
        if moved and ike.state == IkeState.ESTABLISHED:
            self.counters["peer_moved"] += 1
            self._events.append(PeerMoved(ike.session_id, remote))

    # -- our own requests ---------------------------------------------------------

    def _request(
        self,
        ike: IkeSA,
        payloads: list[Payload],
        on_response: Callable[..., None],
        now: float,
    ) -> None:
        ike.queued.append((payloads, on_response))
        if ike.pending is None:
            self._send_queued(ike, now)

    def _send_queued(self, ike: IkeSA, now: float) -> None:
        if not ike.queued or ike.state == IkeState.DEAD:
            return
        payloads, on_response = ike.queued.pop(0)
        mid = ike.next_our_request_id
        ike.next_our_request_id += 1
        # RFC 7296 3.1: we are the original responder, so I stays clear
        data = seal_message(
            Header(
                ike.spi_i, ike.spi_r, 0, IKE_VERSION, ExchangeType.INFORMATIONAL, 0, mid
            ),
            payloads,
            ike.cipher_out,
        )
        ike.pending = PendingRequest(
            mid, data, now + self.config.retransmit_timeout, on_response
        )
        self._send(data, ike.local, ike.remote)

    def _handle_timer(self, now: float) -> None:
        for ike in list(self._sas.values()):
            if (
                ike.state == IkeState.HALF_OPEN
                and ike.half_open_deadline is not None
                and now >= ike.half_open_deadline
            ):
                self.counters["half_open_expired"] += 1
                self._kill(ike, "half-open timeout")
                continue
            pending = ike.pending
            if pending is None or now < pending.deadline:
                continue
            # RFC 7296 2.4: retransmit with backoff, then give the peer up
            if pending.tries >= self.config.retransmit_tries:
                self.counters["peer_unreachable"] += 1
                self._kill(ike, "peer not responding")
                continue
            pending.tries += 1
            pending.deadline = now + self.config.retransmit_timeout * 2**pending.tries
            self.counters["retransmitted_request"] += 1
            self._send(pending.data, ike.local, ike.remote)

    # -- lifecycle --------------------------------------------------------------------

    def _established(self, ike: IkeSA, now: float) -> None:
        ike.set_state(IkeState.ESTABLISHED)
        ike.established_at = now
        ike.half_open_deadline = None
        for key, value in list(self._half_open.items()):
            if value is ike:
                del self._half_open[key]
        assert ike.identity is not None and ike.profile is not None
        self.counters["ike_sa_up"] += 1
        ike.log.info(
            "ike sa up: %s from %s:%d, profile %s",
            ike.identity,
            ike.remote[0],
            ike.remote[1],
            ike.profile.name,
        )
        self._events.append(
            IkeSAUp(ike.session_id, ike.identity, ike.remote, ike.profile.name)
        )

    def _child_down(self, ike: IkeSA, child: ChildSA) -> None:
        self._child_spis.discard(child.spi_in)
        ike.log.info("child sa down, spi in %08x", child.spi_in)
        self._events.append(ChildSADown(ike.session_id, child.spi_in, child.spi_out))

    def _kill(self, ike: IkeSA, reason: str) -> None:
        if ike.state == IkeState.DEAD:
            return
        was_up = ike.state in (IkeState.ESTABLISHED, IkeState.DELETING)
        for child in list(ike.children.values()):
            self._child_down(ike, child)
        ike.children.clear()
        ike.set_state(IkeState.DEAD)
        ike.pending = None
        self._sas.pop(ike.spi_r, None)
        ike.queued.clear()
        for key, value in list(self._half_open.items()):
            if value is ike:
                del self._half_open[key]
        if ike.inside_address is not None:
            address: ipaddress.IPv4Address = ike.inside_address
            ike.inside_address = None
            try:
                self.config.release_address(address)
            except Exception:
                ike.log.exception("address release failed")
        if ike.superseded:
            ike.log.debug("rekeyed ike sa gone: %s", reason)
        elif was_up:
            self.counters["ike_sa_down"] += 1
            ike.log.info("ike sa down: %s", reason)
            self._events.append(IkeSADown(ike.session_id, reason))
        else:
            ike.log.debug("half-open sa gone: %s", reason)

    def _by_session(self, session_id: str) -> IkeSA | None:
        return next(
            (
                ike
                for ike in self._sas.values()
                if ike.session_id == session_id and not ike.superseded
            ),
            None,
        )

    def _send(self, data: bytes, local: Address, remote: Address) -> None:
        self.counters["tx"] += 1
        self._out.append(Datagram(data, local, remote))
