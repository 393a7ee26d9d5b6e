"""IKE SA rekeying by the peer: CREATE_CHILD_SA with an IKE proposal (RFC 7296 2.18).

Theory of operation: the initiator sends, on the old IKE SA,

    HDR, SK {SA(IKE, new SPIi), Ni, KEi}  -->  <--  HDR, SK {SA(new SPIr), Nr, KEr}

`IkeRekeyTask` chooses the proposal from the session's profile, runs the key
exchange and derives the new keys from the old SK_d:

    SKEYSEED = prf(SK_d (old), g^ir (new) | Ni | Nr)
    {SK_d | SK_ai | SK_ar | SK_ei | SK_er | SK_pi | SK_pr}
             = prf+(SKEYSEED, Ni | Nr | SPIi | SPIr)

SKEYSEED uses the old SA's PRF, prf+ the new one. The new IKE SA inherits the
session: its id, identity, profile, inside address and every CHILD SA; its
message IDs start again at 0. The old SA is marked superseded and lingers
only until the peer deletes it, which then releases nothing and reports no
session down (`IkeResponder.ike_rekeyed`). A request that is not an IKE
rekey is left to `ChildRekeyTask`.
"""

from __future__ import annotations

import dataclasses

from control.ike.crypto import (
    INTEG_KEY_SIZES,
    IkeKeys,
    Prf,
    encr_key_material_size,
    new_key_exchange,
    new_sk_cipher,
)
from control.ike.messages import (
    IntegId,
    KEPayload,
    NoncePayload,
    NotifyType,
    Payload,
    ProtocolError,
    ProtocolId,
    SAPayload,
    TSiPayload,
    TSrPayload,
    notify_name,
)
from control.ike.proposals import IkeChoice, select_ike
from control.ike.sa import IkeSA, IkeState
from control.ike.tasks import NONCE_SIZE, Exchange, Task, first

__all__ = ["IkeRekeyTask", "derive_rekeyed_ike_keys", "is_ike_rekey"]

IKE_SPI_SIZE = 8


def is_ike_rekey(payloads: list[Payload]) -> bool:
    """Tell whether a CREATE_CHILD_SA request proposes a new IKE SA."""
    sa = first(payloads, SAPayload)
    return isinstance(sa, SAPayload) and any(
        p.protocol == ProtocolId.IKE for p in sa.proposals
    )


def derive_rekeyed_ike_keys(
    old_prf: Prf,
    old_sk_d: bytes,
    prf: Prf,
    encr: int,
    key_length: int,
    integ: int,
    shared_secret: bytes,
    nonce_i: bytes,
    nonce_r: bytes,
    spi_i: bytes,
    spi_r: bytes,
) -> IkeKeys:
    """Compute the new IKE SA's seven keys from the old SK_d (RFC 7296 2.18)."""
    skeyseed = old_prf(old_sk_d, shared_secret + nonce_i + nonce_r)
    e = encr_key_material_size(encr, key_length)
    a = INTEG_KEY_SIZES[IntegId(integ)]
    p = prf.key_size
    seed = nonce_i + nonce_r + spi_i + spi_r
    stream = prf.plus(skeyseed, seed, 3 * p + 2 * a + 2 * e)
    parts = []
    pos = 0
    for size in (p, a, a, e, e, p, p):
        parts.append(stream[pos : pos + size])
        pos += size
    return IkeKeys(*parts)


class IkeRekeyTask(Task):
    """Answer the peer's IKE SA rekey and hand the session to the new SA."""

    new: IkeSA | None = None
    choice: IkeChoice
    ke_reply: KEPayload
    nonce_r: bytes

    def process(self, ex: Exchange) -> None:
        if not is_ike_rekey(ex.request):
            return
        ike = ex.ike
        sa = first(ex.request, SAPayload)
        nonce = first(ex.request, NoncePayload)
        ke = first(ex.request, KEPayload)
        assert isinstance(sa, SAPayload) and isinstance(nonce, NoncePayload)
        assert ike.profile is not None
        # RFC 7296 1.3.2: an IKE rekey carries KE and no traffic selectors
        if not isinstance(ke, KEPayload) or any(
            isinstance(p, TSiPayload | TSrPayload) for p in ex.request
        ):
            ex.fatal = ProtocolError(NotifyType.INVALID_SYNTAX)
            return
        # RFC 7296 2.25: a rekey while we delete this SA is refused
        if ike.state != IkeState.ESTABLISHED or ike.superseded:
            ex.fatal = ProtocolError(NotifyType.TEMPORARY_FAILURE)
            return

        # proposal: the profile's IKE algorithms; the SPI is the new SPIi
        spis = {p.number: p.spi for p in sa.proposals}
        bare = [
            dataclasses.replace(p, spi=b"")
            for p in sa.proposals
            if p.protocol == ProtocolId.IKE and len(p.spi) == IKE_SPI_SIZE
        ]
        try:
            choice = select_ike(
                bare, ike.profile.ike_proposals, ike.profile.dh_groups, ke.group
            )
        except ProtocolError as exc:
            self.responder.counters[f"ike_rekey_refused_{notify_name(exc.notify)}"] += 1
            ex.fatal = exc
            return

        # key exchange, nonce, new SPIs and keys
        kex = new_key_exchange(choice.dh_group, self.responder.rng)
        shared = kex.exchange(ke.data)
        nonce_r = self.responder.rng(NONCE_SIZE)
        spi_i, spi_r = spis[choice.number], self.responder.new_ike_spi()
        a = choice.algorithms
        prf = self.responder.prf_for(a.prf)
        keys = derive_rekeyed_ike_keys(
            ike.prf, ike.keys.sk_d, prf, a.encr, a.key_length, a.integ,
            shared, nonce.data, nonce_r, spi_i, spi_r,
        )  # fmt: skip
        rng = self.responder.rng

        # RFC 7296 2.18: the new SA starts its message IDs at 0
        self.new = IkeSA(
            spi_i=spi_i,
            spi_r=spi_r,
            local=ike.local,
            remote=ike.remote,
            created=ex.now,
            algorithms=a,
            dh_group=choice.dh_group,
            prf=prf,
            nonce_i=nonce.data,
            nonce_r=nonce_r,
            init_request=ike.init_request,
            init_response=ike.init_response,
            keys=keys,
            cipher_in=new_sk_cipher(a.encr, a.integ, keys.sk_ei, keys.sk_ai, rng),
            cipher_out=new_sk_cipher(a.encr, a.integ, keys.sk_er, keys.sk_ar, rng),
            peer_behind_nat=ike.peer_behind_nat,
            self_behind_nat=ike.self_behind_nat,
            peer_sig_hashes=ike.peer_sig_hashes,
            peer_certreq=ike.peer_certreq,
            expected_request_id=0,
            session=ike.session_id,
        )
        self.choice = dataclasses.replace(choice)
        self.ke_reply = KEPayload(choice.dh_group, kex.public)
        self.nonce_r = nonce_r

    def build(self, ex: Exchange) -> None:
        if self.new is None:
            return
        # RFC 7296 1.3.2: HDR, SK {SA, Nr, KEr}
        reply = dataclasses.replace(self.choice.reply(), spi=self.new.spi_r)
        ex.response += [SAPayload([reply]), NoncePayload(self.nonce_r), self.ke_reply]
        self.responder.ike_rekeyed(ex.ike, self.new, ex.now)
