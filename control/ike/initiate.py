"""Exchanges the headend starts itself: CHILD and IKE SA rekeys when lifetimes end.

Theory of operation: every CHILD SA and IKE SA gets a `rekey_at` deadline
from its profile (`child_rekey_time`, `ike_rekey_time`, less up to 10%
jitter). `IkeResponder.handle_timer` calls `start_due_rekeys`, which starts
at most one rekey per IKE SA and only while our initiator window is idle, so
our requests never overtake each other. `rekey_deadlines` hides deadlines
that cannot act yet, so the timer never spins.

CHILD SA rekey (RFC 7296 1.3.3), we are the exchange's initiator:

    HDR, SK {N(REKEY_SA), SA, Ni, [KEi], TSi, TSr}  -->
                                  <--  HDR, SK {SA, Nr, [KEr], TSi, TSr}

The new SA is reported (`ChildSAUp`) before we delete the old one, so the
daemon installs it before the old one goes. Without PFS first (what the old
SA had); NO_PROPOSAL_CHOSEN retries once with the profile's first group,
INVALID_KE_PAYLOAD once with the group the peer names.

IKE SA rekey (RFC 7296 1.3.2, 2.18): HDR, SK {SA, Ni, KEi} on the old SA; the
new SA has us as original initiator (`IkeSA.we_initiated`), inherits the
session, and we delete the old SA.

Collisions (RFC 7296 2.8.1, 2.8.2): when the peer rekeys the same SA while
our request is in flight, both exchanges complete; of the two new SAs, the
one whose exchange used the lowest of the four nonces is deleted by the side
that created it, and the other side deletes the old SA.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import TYPE_CHECKING, Any

from control.ike import trafficsel
from control.ike.crypto import derive_child_keys, new_key_exchange, new_sk_cipher
from control.ike.events import ChildSAUp
from control.ike.messages import (
    DeletePayload,
    DhGroup,
    EsnId,
    ExchangeType,
    KEPayload,
    NoncePayload,
    NotifyPayload,
    NotifyType,
    Payload,
    Proposal,
    ProtocolId,
    SAPayload,
    Transform,
    TransformType,
    TSiPayload,
    TSrPayload,
    notify_name,
)
from control.ike.proposals import IkeChoice
from control.ike.rekey import IKE_SPI_SIZE, derive_rekeyed_ike_keys
from control.ike.sa import ChildSA, IkeSA, IkeState
from control.ike.tasks import NONCE_SIZE, first

if TYPE_CHECKING:
    from control.ike.responder import IkeResponder

__all__ = [
    "ChildRekeyRequest",
    "IkeRekeyRequest",
    "rekey_deadlines",
    "start_due_rekeys",
]

logger = logging.getLogger("espgate.ike")

# after a refused rekey, try again this much later
RETRY_AFTER = 60.0


def _busy(ike: IkeSA) -> bool:
    return bool(ike.pending or ike.queued or ike.rekeying or ike.child_rekeys)


def _due_children(ike: IkeSA) -> list[ChildSA]:
    return [
        c
        for c in ike.children.values()
        if c.rekey_at is not None and not c.rekeying and not c.replaced
    ]


def rekey_deadlines(ike: IkeSA) -> list[float]:
    """Return the rekey deadlines of `ike` that could start now if due."""
    if _busy(ike):
        return []
    out = [c.rekey_at for c in _due_children(ike) if c.rekey_at is not None]
    if ike.rekey_at is not None:
        out.append(ike.rekey_at)
    return out


def start_due_rekeys(responder: IkeResponder, ike: IkeSA, now: float) -> None:
    """Start the first rekey of `ike` that is due, if our window is idle."""
    if _busy(ike):
        return
    if ike.rekey_at is not None and now >= ike.rekey_at:
        IkeRekeyRequest(responder, ike, ike.dh_group).send(now)
        return
    for child in _due_children(ike):
        if child.rekey_at is not None and now >= child.rekey_at:
            ChildRekeyRequest(responder, ike, child, child.pfs_group).send(now)
            return


def _error(payloads: list[Payload]) -> NotifyPayload | None:
    return next(
        (p for p in payloads if isinstance(p, NotifyPayload) and p.is_error), None
    )


class ChildRekeyRequest:
    """Our rekey of one CHILD SA (RFC 7296 1.3.3), with collision handling."""

    def __init__(
        self,
        responder: IkeResponder,
        ike: IkeSA,
        old: ChildSA,
        group: int,
        retried: bool = False,
    ) -> None:
        self.responder = responder
        self.ike = ike
        self.old = old
        self.group = group
        self.retried = retried
        self.collision: tuple[ChildSA, bytes, bytes] | None = None

    def send(self, now: float) -> None:
        """Build and send the CREATE_CHILD_SA request."""
        responder, ike, old = self.responder, self.ike, self.old
        assert ike.profile is not None
        old.rekeying = True
        ike.child_rekeys[old.spi_in] = self
        self.spi_in = responder.new_child_spi()
        self.nonce = responder.rng(NONCE_SIZE)

        # proposals: the old SA's algorithms first, then the profile's others
        algorithms = sorted(
            ike.profile.esp_proposals, key=lambda a: a.key_length != old.key_length
        )
        self.offered = algorithms
        proposals = []
        for number, a in enumerate(algorithms, start=1):
            transforms = [Transform.make(TransformType.ENCR, a.encr, a.key_length)]
            if self.group != DhGroup.NONE:
                transforms.append(Transform.make(TransformType.DH, self.group))
            transforms.append(Transform.make(TransformType.ESN, EsnId.NO_ESN))
            spi = self.spi_in.to_bytes(4, "big")
            proposals.append(Proposal(number, ProtocolId.ESP, spi, transforms))

        # RFC 7296 1.3.3: REKEY_SA carries our inbound SPI of the old SA; we
        # are the initiator here, so TSi is our side and TSr the peer's
        remote_sel, local_sel = old.selectors
        payloads: list[Payload] = [
            NotifyPayload(ProtocolId.ESP, NotifyType.REKEY_SA,
                          old.spi_in.to_bytes(4, "big")),
            SAPayload(proposals),
            NoncePayload(self.nonce),
        ]  # fmt: skip
        self.kex: Any = None
        if self.group != DhGroup.NONE:
            self.kex = new_key_exchange(self.group, responder.rng)
            payloads.append(KEPayload(self.group, self.kex.public))
        payloads += [TSiPayload(list(local_sel)), TSrPayload(list(remote_sel))]
        responder.counters["child_rekey_started"] += 1
        ike.log.debug("rekeying child sa %08x, pfs group %d", old.spi_in, self.group)
        responder.request(
            ike, payloads, self.on_response, now, ExchangeType.CREATE_CHILD_SA
        )

    def collided(self, new: ChildSA, nonce_i: bytes, nonce_r: bytes) -> None:
        """Note that the peer rekeyed the same SA in its own exchange."""
        self.collision = (new, nonce_i, nonce_r)
        self.responder.counters["child_rekey_collision"] += 1

    def _finish(self) -> None:
        self.old.rekeying = False
        for ike in (self.ike, self.responder.session_sa(self.ike.session_id)):
            if ike is not None and ike.child_rekeys.get(self.old.spi_in) is self:
                del ike.child_rekeys[self.old.spi_in]

    def on_response(self, payloads: list[Payload], now: float) -> None:
        """Install the new SA and delete the old one, or retry or give up."""
        responder, old = self.responder, self.old
        self._finish()
        current = responder.session_sa(self.ike.session_id)
        if current is None or current.state != IkeState.ESTABLISHED:
            responder.release_child_spi(self.spi_in)
            return
        error = _error(payloads)
        if error is not None:
            responder.release_child_spi(self.spi_in)
            self._refused(current, error, now)
            return
        try:
            new, event = self._accept(current, payloads, now)
        except ValueError as exc:
            responder.release_child_spi(self.spi_in)
            responder.counters["child_rekey_bad_response"] += 1
            current.log.warning("child sa rekey: bad response: %s", exc)
            old.rekey_at = now + RETRY_AFTER
            return
        current.children[new.spi_in] = new
        responder.counters["child_rekeyed_by_us"] += 1
        responder.child_up(current, event)

        # RFC 7296 2.8.1: of two rekeys of one SA, the one with the lowest
        # nonce goes, deleted by its initiator; the other's initiator
        # deletes the old SA
        if self.collision is not None:
            _, nonce_i, nonce_r = self.collision
            ours = min(self.nonce, self.nonce_r)
            if ours < min(nonce_i, nonce_r):
                current.log.debug("child rekey collision: ours is redundant")
                new.replaced = True
                responder.delete_child_sa(current.session_id, new.spi_in, now)
                return
            current.log.debug("child rekey collision: ours survives")
        old.replaced = True
        if old.spi_in in current.children:
            responder.delete_child_sa(current.session_id, old.spi_in, now)

    def _refused(self, ike: IkeSA, error: NotifyPayload, now: float) -> None:
        responder, old = self.responder, self.old
        assert ike.profile is not None
        ntype = error.notify_type
        group = None
        # RFC 7296 1.3: INVALID_KE_PAYLOAD names the group the peer wants
        if ntype == NotifyType.INVALID_KE_PAYLOAD and len(error.data) == 2:
            wanted = int.from_bytes(error.data, "big")
            if wanted in ike.profile.dh_groups:
                group = wanted
        # a peer that insists on PFS says NO_PROPOSAL_CHOSEN to "no PFS"
        elif ntype == NotifyType.NO_PROPOSAL_CHOSEN and self.group == DhGroup.NONE:
            group = ike.profile.dh_groups[0] if ike.profile.dh_groups else None
        responder.counters[f"child_rekey_refused_{notify_name(ntype)}"] += 1
        if group is not None and not self.retried and old.spi_in in ike.children:
            ike.log.debug("child rekey refused (%s), retrying with group %d",
                          notify_name(ntype), group)  # fmt: skip
            ChildRekeyRequest(responder, ike, old, group, retried=True).send(now)
            return
        ike.log.warning("child sa rekey refused: %s", notify_name(ntype))
        old.rekey_at = now + RETRY_AFTER

    def _accept(
        self, ike: IkeSA, payloads: list[Payload], now: float
    ) -> tuple[ChildSA, ChildSAUp]:
        assert ike.profile is not None and ike.identity is not None
        assert ike.inside_address is not None
        sa = first(payloads, SAPayload)
        nonce = first(payloads, NoncePayload)
        ke = first(payloads, KEPayload)
        tsi = first(payloads, TSiPayload)
        tsr = first(payloads, TSrPayload)
        if not isinstance(sa, SAPayload) or not isinstance(nonce, NoncePayload):
            raise ValueError("no SA or nonce")
        if not isinstance(tsi, TSiPayload) or not isinstance(tsr, TSrPayload):
            raise ValueError("no traffic selectors")
        # RFC 7296 2.7: exactly one of our proposals, with the peer's SPI
        if len(sa.proposals) != 1:
            raise ValueError(f"{len(sa.proposals)} proposals in the answer")
        chosen = sa.proposals[0]
        if chosen.protocol != ProtocolId.ESP or len(chosen.spi) != 4:
            raise ValueError("not an ESP proposal")
        encr = chosen.of_type(TransformType.ENCR)
        if len(encr) != 1 or not 1 <= chosen.number <= len(self.offered):
            raise ValueError("bad proposal number or transforms")
        algorithms = self.offered[chosen.number - 1]
        dh = [t.id for t in chosen.of_type(TransformType.DH)]
        if dh not in ([], [DhGroup.NONE], [self.group]) or (
            self.group != DhGroup.NONE and dh != [self.group]
        ):
            raise ValueError(f"DH {dh} not what we offered")
        shared = b""
        if self.group != DhGroup.NONE:
            if not isinstance(ke, KEPayload) or ke.group != self.group:
                raise ValueError("KE missing or of another group")
            shared = self.kex.exchange(ke.data)
        self.nonce_r = nonce.data

        # keys (RFC 7296 2.17): we are the initiator, so i->r is our outbound
        keys = derive_child_keys(
            self.ike.prf,
            self.ike.keys.sk_d,
            self.nonce,
            nonce.data,
            algorithms.key_length,
            shared,
        )
        spi_out = int.from_bytes(chosen.spi, "big")
        local_ts = [trafficsel.ts_to_string(t) for t in tsi.selectors]
        remote_ts = [trafficsel.ts_to_string(t) for t in tsr.selectors]
        new = ChildSA(
            self.spi_in,
            spi_out,
            algorithms.key_length,
            local_ts,
            remote_ts,
            pfs_group=self.group,
            rekey_at=self.responder.rekey_deadline(ike.profile.child_rekey_time, now),
            selectors=(list(tsr.selectors), list(tsi.selectors)),
        )
        event = ChildSAUp(
            session_id=ike.session_id,
            identity=ike.identity,
            remote=ike.remote,
            inside_address=ike.inside_address,
            spi_in=self.spi_in,
            spi_out=spi_out,
            key_in=keys.key_r,
            salt_in=keys.salt_r,
            key_out=keys.key_i,
            salt_out=keys.salt_i,
            esn=False,
            local_ts=local_ts,
            remote_ts=remote_ts,
            udp_encap=ike.nat_detected,
        )
        return new, event


class IkeRekeyRequest:
    """Our rekey of an IKE SA (RFC 7296 2.18), with collision handling (2.8.2)."""

    def __init__(
        self, responder: IkeResponder, ike: IkeSA, group: int, retried: bool = False
    ) -> None:
        self.responder = responder
        self.ike = ike
        self.group = group
        self.retried = retried
        self.collision: IkeSA | None = None

    def send(self, now: float) -> None:
        """Build and send HDR, SK {SA, Ni, KEi} on the old SA."""
        responder, ike = self.responder, self.ike
        ike.rekeying = self
        self.spi = responder.new_ike_spi()
        self.nonce = responder.rng(NONCE_SIZE)
        self.kex = new_key_exchange(self.group, responder.rng)
        self.choice = IkeChoice(1, ike.algorithms, self.group)
        proposal = dataclasses.replace(self.choice.reply(), spi=self.spi)
        payloads: list[Payload] = [
            SAPayload([proposal]),
            NoncePayload(self.nonce),
            KEPayload(self.group, self.kex.public),
        ]
        responder.counters["ike_rekey_started"] += 1
        ike.log.debug("rekeying ike sa, group %d", self.group)
        responder.request(
            ike, payloads, self.on_response, now, ExchangeType.CREATE_CHILD_SA
        )

    def collided(self, new: IkeSA) -> None:
        """Note that the peer rekeyed this IKE SA too, making `new`."""
        self.collision = new
        self.responder.counters["ike_rekey_collision"] += 1

    def on_response(self, payloads: list[Payload], now: float) -> None:
        """Switch to the new IKE SA and delete the old one, or retry or give up."""
        responder, old = self.responder, self.ike
        old.rekeying = None
        if old.state == IkeState.DEAD:
            return
        assert old.profile is not None
        error = _error(payloads)
        if error is not None:
            ntype = error.notify_type
            responder.counters[f"ike_rekey_refused_{notify_name(ntype)}"] += 1
            wanted = int.from_bytes(error.data, "big") if len(error.data) == 2 else 0
            # RFC 7296 1.3: INVALID_KE_PAYLOAD names the group the peer wants
            if (
                ntype == NotifyType.INVALID_KE_PAYLOAD
                and wanted in old.profile.dh_groups
                and not self.retried
                and not old.superseded
            ):
                IkeRekeyRequest(responder, old, wanted, retried=True).send(now)
                return
            old.log.warning("ike sa rekey refused: %s", notify_name(ntype))
            old.rekey_at = now + RETRY_AFTER
            return
        try:
            new = self._accept(payloads, now)
        except ValueError as exc:
            responder.counters["ike_rekey_bad_response"] += 1
            old.log.warning("ike sa rekey: bad response: %s", exc)
            old.rekey_at = now + RETRY_AFTER
            return

        # RFC 7296 2.8.2: with a collision the new SA with the lowest nonce
        # goes, deleted by its creator; the other inherits the session
        peer_new = self.collision
        if peer_new is not None:
            if min(new.nonce_i, new.nonce_r) < min(peer_new.nonce_i, peer_new.nonce_r):
                old.log.debug("ike rekey collision: ours is redundant")
                new.profile, new.identity = old.profile, old.identity
                new.superseded = True
                new.set_state(IkeState.ESTABLISHED)
                responder.add_sa(new)
                responder.request(
                    new,
                    [DeletePayload(ProtocolId.IKE, 0, [])],
                    lambda p, n: responder.kill(new, "redundant rekey"),
                    now,
                )
                return
            old.log.debug("ike rekey collision: ours survives")
            responder.ike_rekeyed(peer_new, new, now)
        else:
            responder.ike_rekeyed(old, new, now)
        # RFC 7296 2.18: the initiator of the surviving rekey deletes the old SA
        responder.request(
            old,
            [DeletePayload(ProtocolId.IKE, 0, [])],
            lambda p, n: responder.kill(old, "rekeyed"),
            now,
        )

    def _accept(self, payloads: list[Payload], now: float) -> IkeSA:
        old = self.ike
        sa = first(payloads, SAPayload)
        nonce = first(payloads, NoncePayload)
        ke = first(payloads, KEPayload)
        if not isinstance(sa, SAPayload) or not isinstance(nonce, NoncePayload):
            raise ValueError("no SA or nonce")
        if not isinstance(ke, KEPayload) or ke.group != self.group:
            raise ValueError("KE missing or of another group")
        if len(sa.proposals) != 1:
            raise ValueError(f"{len(sa.proposals)} proposals in the answer")
        chosen = sa.proposals[0]
        if chosen.protocol != ProtocolId.IKE or len(chosen.spi) != IKE_SPI_SIZE:
            raise ValueError("not an IKE proposal with an 8-octet SPI")
        if not any(chosen.spi) or chosen.spi == self.spi:
            raise ValueError("bad responder SPI")

        def shape(p: Proposal) -> set[tuple[int, int, int | None]]:
            return {(t.type, t.id, t.key_length) for t in p.transforms}

        if shape(chosen) != shape(self.choice.reply()):
            raise ValueError("transforms differ from our proposal")

        # RFC 7296 2.18: we initiated, so Ni and SPIi are ours
        shared = self.kex.exchange(ke.data)
        a = old.algorithms
        rng = self.responder.rng
        prf = self.responder.prf_for(a.prf)
        keys = derive_rekeyed_ike_keys(
            old.prf, old.keys.sk_d, prf, a.encr, a.key_length, a.integ,
            shared, self.nonce, nonce.data, self.spi, chosen.spi,
        )  # fmt: skip
        return IkeSA(
            spi_i=self.spi,
            spi_r=chosen.spi,
            local=old.local,
            remote=old.remote,
            created=now,
            algorithms=a,
            dh_group=self.group,
            prf=prf,
            nonce_i=self.nonce,
            nonce_r=nonce.data,
            init_request=old.init_request,
            init_response=old.init_response,
            keys=keys,
            cipher_in=new_sk_cipher(a.encr, a.integ, keys.sk_er, keys.sk_ar, rng),
            cipher_out=new_sk_cipher(a.encr, a.integ, keys.sk_ei, keys.sk_ai, rng),
            peer_behind_nat=old.peer_behind_nat,
            self_behind_nat=old.self_behind_nat,
            peer_sig_hashes=old.peer_sig_hashes,
            peer_certreq=old.peer_certreq,
            expected_request_id=0,
            session=old.session_id,
            we_initiated=True,
        )
