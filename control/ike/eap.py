"""EAP in IKE_AUTH: the headend relays EAP between client and AAA server.

Theory of operation (RFC 7296 2.16, RFC 3579): an IKE_AUTH request without
an AUTH payload asks for EAP. `AuthTask` picks the profile by the IKE identity
and answers with our certificate and signature; `EapTask` adds the first EAP
request. The IKE SA then stays half-open through more IKE_AUTH rounds that
carry only EAP, until the client sends AUTH computed with the MSK:

    IDi, [IDr], SA, TSi, TSr, CP   -->  IDr, CERT, AUTH, EAP(Request)
    EAP(Response)                  -->  EAP(Request) ... EAP(Success)
    AUTH                           -->  AUTH, CP, SA, TSi, TSr

The core never talks to the AAA server. A round that needs it emits an
`AaaRequest` event and parks the exchange (`Exchange.waiting`); the daemon
answers with `IkeResponder.aaa_result`, which resumes the same task with an
`AaaResult`. Retransmissions of a parked request are dropped. The phases of
one EAP conversation:

    START --query identity--> IDENTITY --response--> RELAY
      |                                                |  challenge: RELAY
      +-------IKE identity as EAP identity------------>+  accept: SUCCESS
                                                          reject: FAILED
    SUCCESS --AUTH ok--> done (IKE SA up)

Without `query_identity` the IKE identity is the EAP identity, so an IPv4 or
IPv6 IKE identity ends the session. After success the identity used for
authorization is the User-Name of the Access-Accept, else the queried EAP
identity, else the IKE identity. Methods without an MSK (EAP-MD5) sign with
SK_pi and SK_pr instead (RFC 7296 2.16). EAP payloads never reach a log.
"""

from __future__ import annotations

import hmac
import struct
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Any

from control.ike.crypto import KEY_PAD, signed_octets
from control.ike.messages import (
    AuthMethod,
    AuthPayload,
    EAPPayload,
    ExchangeType,
    IDType,
    NotifyType,
    Payload,
    PayloadType,
    ProtocolError,
)
from control.ike.profiles import Identity
from control.ike.tasks import AuthorizeTask, ChildCreateTask, ConfigTask, Task

if TYPE_CHECKING:
    from control.ike.sa import IkeSA
    from control.ike.tasks import AuthTask, Exchange

# RFC 3748 4 and 5: codes and the Identity type
EAP_REQUEST = 1
EAP_RESPONSE = 2
EAP_SUCCESS = 3
EAP_FAILURE = 4
EAP_TYPE_IDENTITY = 1

MANY = 255

# RFC 7296 2.16: the IKE_AUTH requests after the first carry EAP or AUTH
CONTINUE_RULES: dict[int, tuple[int, int]] = {
    PayloadType.EAP: (0, 1),
    PayloadType.AUTH: (0, 1),
    PayloadType.NOTIFY: (0, MANY),
    PayloadType.VENDOR_ID: (0, MANY),
}


class EapPhase(Enum):
    START = "start"
    IDENTITY = "identity"
    RELAY = "relay"
    SUCCESS = "success"
    FAILED = "failed"


@dataclass(frozen=True)
class AaaRequest:
    """Ask the daemon's AAA client to relay one EAP response ("eap") or fetch
    the PSKs of an identity ("psk"); answer by `IkeResponder.aaa_result`."""

    session_id: str
    kind: str  # "eap", "psk" or "authorize"
    profile: str
    user_name: str
    calling_station: str
    eap_message: bytes = field(repr=False)
    # "authorize": what authentication left for authorization (identities,
    # certificate DN, the cached attributes of the EAP or PSK answer)
    info: dict[str, Any] = field(default_factory=dict, repr=False)


@dataclass(frozen=True)
class AaaResult:
    """The AAA server's verdict on one `AaaRequest`.

    outcome: "challenge" (eap_message is the next EAP request), "accept"
    (msk when the method made one, user_name from the Access-Accept),
    "reject" or "error" (no server answered).
    """

    outcome: str
    eap_message: bytes = field(default=b"", repr=False)
    msk: bytes = field(default=b"", repr=False)
    user_name: str | None = None
    attributes: dict[str, Any] = field(default_factory=dict)
    # the authorization the answer carried (control.ike.profiles.SessionPolicy)
    policy: Any = None
    # "psk" requests: the peer's key and ours (ours defaults to the peer's)
    psk_remote: bytes = field(default=b"", repr=False)
    psk_local: bytes = field(default=b"", repr=False)


@dataclass
class EapState:
    """One EAP conversation, kept on the IKE SA until it is up."""

    ike_identity: Identity
    idi_body: bytes = field(repr=False)
    idr_body: bytes = field(repr=False)
    # SA, TSi, TSr and CP of the first IKE_AUTH: the CHILD SA of the last round
    first_request: list[Payload] = field(repr=False)
    phase: EapPhase = EapPhase.START
    identifier: int = 0
    eap_identity: str | None = None
    user_name: str | None = None
    msk: bytes = field(default=b"", repr=False)
    attributes: dict[str, Any] = field(default_factory=dict)
    reply: bytes = field(default=b"", repr=False)

    def set_phase(self, ike: IkeSA, new: EapPhase) -> None:
        ike.log.debug("eap %s -> %s", self.phase.value, new.value)
        self.phase = new

    def authz_identity(self) -> str:
        """Return the identity used for authorization, in the documented order."""
        return self.user_name or self.eap_identity or str(self.ike_identity)


def eap_packet(code: int, identifier: int, body: bytes = b"") -> bytes:
    """Encode an EAP packet (RFC 3748 4): code, identifier, length, body."""
    return struct.pack("!BBH", code, identifier & 0xFF, 4 + len(body)) + body


def request_rules(ike: IkeSA, exchange: int) -> dict[int, tuple[int, int]] | None:
    """Return the payload rules of an EAP round, or None for the usual ones."""
    if exchange == ExchangeType.IKE_AUTH and ike.eap is not None:
        return CONTINUE_RULES
    return None


def ike_auth_tasks(
    ike: IkeSA, payloads: list[Payload], auth_task: type[AuthTask]
) -> tuple[type[Task], ...] | None:
    """Return the tasks of an IKE_AUTH that starts or continues EAP, or None.

    Config and CHILD SA run only in the round that checks the final AUTH.
    """
    if ike.eap is not None and ike.eap.phase == EapPhase.SUCCESS:
        return (EapTask, AuthorizeTask, ConfigTask, ChildCreateTask)
    if ike.eap is not None:
        return (EapTask,)
    if not any(isinstance(p, AuthPayload) for p in payloads):
        return (auth_task, EapTask)
    return None


def begin(ex: Exchange, identity: Identity, idi_body: bytes, idr_body: bytes) -> None:
    """Start EAP on the IKE SA of `ex` (called by AuthTask when AUTH is absent)."""
    ex.ike.eap = EapState(identity, idi_body, idr_body, list(ex.request))
    ex.pending_auth = True


class EapTask(Task):
    """Run one round of EAP pass-through, or check the final MSK-based AUTH."""

    def process(self, ex: Exchange) -> None:
        ike = ex.ike
        state = ike.eap
        if state is None:
            return  # AuthTask failed before EAP began
        profile = ike.profile
        assert profile is not None
        ex.pending_auth = True
        eap = next((p for p in ex.request if isinstance(p, EAPPayload)), None)
        if state.phase == EapPhase.START:
            if profile.eap_query_identity:
                # RFC 3748 5.1: ask for the identity ourselves
                state.identifier = 1
                state.reply = eap_packet(
                    EAP_REQUEST, state.identifier, bytes([EAP_TYPE_IDENTITY])
                )
                state.set_phase(ike, EapPhase.IDENTITY)
                return
            # RFC 7296 2.16: the IKE identity is the EAP identity; an address
            # cannot be one
            if state.ike_identity.type in (IDType.ID_IPV4_ADDR, IDType.ID_IPV6_ADDR):
                return self._fail(ex, "an IP address cannot be an EAP identity")
            name = str(state.ike_identity)
            body = bytes([EAP_TYPE_IDENTITY]) + name.encode()
            start = eap_packet(EAP_RESPONSE, 0, body)
            state.set_phase(ike, EapPhase.RELAY)
            return self._ask(ex, name, start)
        if state.phase == EapPhase.SUCCESS:
            return self._final_auth(ex)
        if not isinstance(eap, EAPPayload):
            return self._fail(ex, "no EAP payload in an EAP round")
        data = eap.data
        # RFC 3748 4.1: the peer only ever sends responses
        if data[0] != EAP_RESPONSE or len(data) < 5:
            return self._fail(ex, "EAP packet is not a response")
        if state.phase == EapPhase.IDENTITY:
            if data[4] != EAP_TYPE_IDENTITY:
                return self._fail(ex, "EAP response is not an identity")
            state.eap_identity = data[5:].decode("utf-8", "replace")
            ike.log.debug("eap identity %s", state.eap_identity)
            state.set_phase(ike, EapPhase.RELAY)
        self._ask(ex, state.eap_identity or str(state.ike_identity), data)

    def resume(self, ex: Exchange, result: Any) -> None:
        """Take the AAA server's answer to the round that waited for it."""
        ike = ex.ike
        state = ike.eap
        assert state is not None and isinstance(result, AaaResult)
        if result.outcome == "challenge" and result.eap_message[:1] == bytes(
            [EAP_REQUEST]
        ):
            state.reply = result.eap_message
            state.identifier = result.eap_message[1]
            return
        if result.outcome == "accept":
            state.msk = result.msk
            state.user_name = result.user_name
            state.attributes = dict(result.attributes)
            # implicit (cached) authorization: what the Access-Accept carried
            ike.policy = result.policy
            state.reply = result.eap_message or eap_packet(
                EAP_SUCCESS, state.identifier
            )
            state.set_phase(ike, EapPhase.SUCCESS)
            self.responder.counters["eap_success"] += 1
            return
        state.reply = result.eap_message or eap_packet(EAP_FAILURE, state.identifier)
        if state.reply[:1] != bytes([EAP_FAILURE]):
            state.reply = eap_packet(EAP_FAILURE, state.identifier)
        self._fail(ex, f"aaa answered {result.outcome}", keep_reply=True)

    def build(self, ex: Exchange) -> None:
        state = ex.ike.eap
        if state is None:
            return
        if state.phase == EapPhase.SUCCESS and ex.authenticated:
            ex.response.append(self.our_auth)
            return
        if state.reply:
            ex.response.append(EAPPayload(state.reply))
            state.reply = b""

    def _ask(self, ex: Exchange, user: str, message: bytes) -> None:
        ike = ex.ike
        assert ike.profile is not None
        self.responder.emit(
            AaaRequest(
                ike.session_id, "eap", ike.profile.name, user, ike.remote[0], message
            )
        )
        self.responder.counters["aaa_requests"] += 1
        ex.waiting = True

    def _final_auth(self, ex: Exchange) -> None:
        ike = ex.ike
        state = ike.eap
        assert state is not None
        auth = next((p for p in ex.request if isinstance(p, AuthPayload)), None)
        if not isinstance(auth, AuthPayload):
            return self._fail(ex, "no AUTH after EAP success")
        if auth.method != AuthMethod.SHARED_KEY_MIC:
            return self._fail(ex, "AUTH after EAP is not a shared key MIC")
        # RFC 7296 2.16: AUTH keyed by the MSK, or by SK_pi/SK_pr without one
        keys = ike.keys
        key_i = state.msk or keys.sk_pi
        octets = signed_octets(
            ike.prf, ike.init_request, ike.nonce_r, keys.sk_pi, state.idi_body
        )
        if not hmac.compare_digest(ike.prf(ike.prf(key_i, KEY_PAD), octets), auth.data):
            return self._fail(ex, "AUTH after EAP does not verify")
        key_r = state.msk or keys.sk_pr
        octets = signed_octets(
            ike.prf, ike.init_response, ike.nonce_i, keys.sk_pr, state.idr_body
        )
        self.our_auth = AuthPayload(
            AuthMethod.SHARED_KEY_MIC, ike.prf(ike.prf(key_r, KEY_PAD), octets)
        )
        ike.identity = state.authz_identity()
        ex.auth_info.update(
            ike_identity=str(state.ike_identity),
            eap_identity=state.eap_identity,
            cached=state.attributes,
        )
        ex.pending_auth = False
        ex.authenticated = True
        # the CHILD SA and config come from the first IKE_AUTH request
        ex.request = state.first_request
        self.responder.counters["auth_ok"] += 1
        ike.log.debug("eap authentication of %s complete", ike.identity)

    def _fail(self, ex: Exchange, why: str, keep_reply: bool = False) -> None:
        ike = ex.ike
        state = ike.eap
        self.responder.counters["auth_failed"] += 1
        ike.log.warning("eap authentication failed: %s", why)
        ex.pending_auth = False
        if state is not None and keep_reply:
            state.set_phase(ike, EapPhase.FAILED)
            return
        ex.fatal = ProtocolError(NotifyType.AUTHENTICATION_FAILED)
