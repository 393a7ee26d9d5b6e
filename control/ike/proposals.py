"""Proposal selection for IKE and ESP SAs (RFC 7296 2.7, 3.3).

Theory of operation: the initiator offers proposals, each a set of transforms
per type (ENCR, PRF, INTEG, DH, ESN) where one of each type must be chosen.
We walk its proposals in its order and accept the first that contains one of
our algorithm sets (in our order), then answer with exactly one proposal that
carries the initiator's proposal number and one transform per type.

For IKE the DH group is settled apart: if the group of the initiator's KE
payload is acceptable in some matching proposal, that proposal wins (no round
trip); otherwise the first match decides our preferred group and the request
is refused with INVALID_KE_PAYLOAD naming it (RFC 7296 1.2).
"""

from __future__ import annotations

from dataclasses import dataclass

from control.ike.messages import (
    AttributeType,
    DhGroup,
    EsnId,
    IntegId,
    NotifyType,
    Proposal,
    ProtocolError,
    ProtocolId,
    Transform,
    TransformType,
)
from control.ike.profiles import EspAlgorithms, IkeAlgorithms


@dataclass(frozen=True)
class IkeChoice:
    number: int
    algorithms: IkeAlgorithms
    dh_group: int

    def reply(self) -> Proposal:
        a = self.algorithms
        transforms = [
            Transform.make(TransformType.ENCR, a.encr, a.key_length),
            Transform.make(TransformType.PRF, a.prf),
        ]
        if a.integ != IntegId.NONE:
            transforms.append(Transform.make(TransformType.INTEG, a.integ))
        transforms.append(Transform.make(TransformType.DH, self.dh_group))
        return Proposal(self.number, ProtocolId.IKE, b"", transforms)


@dataclass(frozen=True)
class EspChoice:
    number: int
    peer_spi: bytes
    algorithms: EspAlgorithms
    dh_group: int = DhGroup.NONE

    def reply(self, our_spi: bytes) -> Proposal:
        a = self.algorithms
        transforms = [Transform.make(TransformType.ENCR, a.encr, a.key_length)]
        if self.dh_group != DhGroup.NONE:
            transforms.append(Transform.make(TransformType.DH, self.dh_group))
        transforms.append(Transform.make(TransformType.ESN, EsnId.NO_ESN))
        return Proposal(self.number, ProtocolId.ESP, our_spi, transforms)


def _usable(transforms: list[Transform]) -> list[Transform]:
    # RFC 7296 3.3.6: a transform with an attribute we do not know is unusable
    return [
        t
        for t in transforms
        if all(
            a.type == AttributeType.KEY_LENGTH and isinstance(a.value, int)
            for a in t.attributes
        )
    ]


def _ids(proposal: Proposal, ttype: int) -> set[int]:
    return {t.id for t in _usable(proposal.of_type(ttype))}


def _encrs(proposal: Proposal) -> set[tuple[int, int | None]]:
    return {(t.id, t.key_length) for t in _usable(proposal.of_type(TransformType.ENCR))}


def _integ_ok(proposal: Proposal, integ: int) -> bool:
    offered = _ids(proposal, TransformType.INTEG)
    if integ == IntegId.NONE:
        # RFC 5282 8: with an AEAD cipher INTEG is absent or NONE
        return not offered or offered == {IntegId.NONE}
    return integ in offered


def _ike_matches(
    proposal: Proposal, allowed: list[IkeAlgorithms]
) -> IkeAlgorithms | None:
    encrs = _encrs(proposal)
    prfs = _ids(proposal, TransformType.PRF)
    for a in allowed:
        if (
            (a.encr, a.key_length) in encrs
            and a.prf in prfs
            and _integ_ok(proposal, a.integ)
        ):
            return a
    return None


def select_ike(
    offered: list[Proposal],
    allowed: list[IkeAlgorithms],
    groups: list[int],
    ke_group: int,
) -> IkeChoice:
    """Choose an IKE proposal; raise ProtocolError when none or the KE is wrong."""
    fallback: IkeChoice | None = None
    for proposal in offered:
        # RFC 7296 3.3.1: an initial IKE proposal carries no SPI
        if proposal.protocol != ProtocolId.IKE or proposal.spi:
            continue
        algorithms = _ike_matches(proposal, allowed)
        if algorithms is None:
            continue
        offered_groups = _ids(proposal, TransformType.DH)
        candidates = [g for g in groups if g in offered_groups and g != DhGroup.NONE]
        if not candidates:
            continue
        if ke_group in candidates:
            return IkeChoice(proposal.number, algorithms, ke_group)
        if fallback is None:
            fallback = IkeChoice(proposal.number, algorithms, candidates[0])
    if fallback is None:
        raise ProtocolError(NotifyType.NO_PROPOSAL_CHOSEN, "no acceptable IKE proposal")
    # RFC 7296 1.2: a KE in a group other than the selected one is refused
    # with INVALID_KE_PAYLOAD carrying the group we want
    raise ProtocolError(
        NotifyType.INVALID_KE_PAYLOAD,
        f"KE group {ke_group}, want {fallback.dh_group}",
        fallback.dh_group.to_bytes(2, "big"),
    )


def select_esp(
    offered: list[Proposal],
    allowed: list[EspAlgorithms],
    groups: list[int] | None = None,
    ke_group: int | None = None,
) -> EspChoice:
    """Choose an ESP proposal; `groups` given means DH (PFS) is negotiated too.

    In IKE_AUTH `groups` is None and DH transforms are ignored (RFC 7296 1.2:
    the first CHILD SA is keyed from the IKE SA). In CREATE_CHILD_SA a KE
    payload in `ke_group` must match the chosen group, else INVALID_KE_PAYLOAD.
    """
    fallback: EspChoice | None = None
    for proposal in offered:
        # RFC 7296 3.3.1: ESP proposals carry the sender's 4-octet inbound SPI
        if proposal.protocol != ProtocolId.ESP or len(proposal.spi) != 4:
            continue
        # RFC 7296 3.3.3: ESN is mandatory for ESP; we only do without ESN
        esns = _ids(proposal, TransformType.ESN)
        if esns and EsnId.NO_ESN not in esns:
            continue
        encrs = _encrs(proposal)
        algorithms = next(
            (a for a in allowed if (a.encr, a.key_length) in encrs),
            None,
        )
        if algorithms is None or not _integ_ok(proposal, IntegId.NONE):
            continue
        if groups is None:
            return EspChoice(proposal.number, proposal.spi, algorithms)
        dh = _ids(proposal, TransformType.DH)
        candidates = [g for g in groups if g in dh and g != DhGroup.NONE]
        # RFC 7296 1.3.1: without a KE payload only "no PFS" can be chosen
        if ke_group is None:
            if not dh or DhGroup.NONE in dh:
                return EspChoice(proposal.number, proposal.spi, algorithms)
            if candidates and fallback is None:
                fallback = EspChoice(
                    proposal.number, proposal.spi, algorithms, candidates[0]
                )
            continue
        if ke_group in candidates:
            return EspChoice(proposal.number, proposal.spi, algorithms, ke_group)
        if candidates and fallback is None:
            fallback = EspChoice(
                proposal.number, proposal.spi, algorithms, candidates[0]
            )
    if fallback is None:
        raise ProtocolError(NotifyType.NO_PROPOSAL_CHOSEN, "no acceptable ESP proposal")
    # RFC 7296 1.3.1: a KE in the wrong group gets INVALID_KE_PAYLOAD
    raise ProtocolError(
        NotifyType.INVALID_KE_PAYLOAD,
        f"KE group {ke_group}, want {fallback.dh_group}",
        fallback.dh_group.to_bytes(2, "big"),
    )
