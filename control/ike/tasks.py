"""Responder tasks: one per exchange concern, each with a process and a build step.

Theory of operation: for every request the manager (`control.ike.responder`)
picks the tasks of its exchange from `EXCHANGE_TASKS`, runs every task's
`process` in that order, then every task's `build`, so the response payloads
come out in task order. A task that must refuse the whole exchange sets
`Exchange.fatal`; the manager then answers with that notify alone. A task
that refuses only the CHILD SA sets `Exchange.child_error` and later tasks
leave the CHILD SA out.

    IKE_SA_INIT      IkeInitTask (no SA exists yet; run on its own)
    IKE_AUTH         AuthTask -> AuthorizeTask -> ConfigTask -> ChildCreateTask
                     (EAP rounds: control.ike.eap picks EapTask instead of
                     AuthTask; AuthorizeTask may park for the AAA answer)
    INFORMATIONAL    DeleteTask -> LivenessTask -> ConfigAckTask
    CREATE_CHILD_SA  IkeRekeyTask (control.ike.rekey) -> ChildRekeyTask (new or
                     rekeyed CHILD SA); each leaves the other's requests alone

Which payloads each request may carry, and how many, is data: `REQUEST_RULES`.
"""

from __future__ import annotations

import dataclasses
import datetime
import hmac
import ipaddress
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from control.ike import flows, trafficsel
from control.ike.certs import (
    CERT_X509_SIGNATURE,
    SIGNATURE_METHODS,
    CertError,
    certreq_data,
    identity_in_cert,
    parse_signature_hashes,
    sign_auth,
    signature_hash_data,
    verify_auth,
)
from control.ike.crypto import (
    KEY_PAD,
    derive_child_keys,
    derive_ike_keys,
    nat_detection_hash,
    new_key_exchange,
    new_sk_cipher,
    signed_octets,
)
from control.ike.events import Address, ChildSADown, ChildSAUp, Event
from control.ike.matching import select_profile
from control.ike.messages import (
    IKE_VERSION,
    VID_CISCO_FLEXVPN,
    VID_CISCO_UNITY,
    AuthMethod,
    AuthPayload,
    CertPayload,
    CertReqPayload,
    CfgAttribute,
    CfgType,
    ConfigAttribute,
    CPPayload,
    DecodeError,
    DeletePayload,
    DhGroup,
    ExchangeType,
    Header,
    HeaderFlag,
    IDiPayload,
    IDrPayload,
    KEPayload,
    Message,
    NoncePayload,
    NotifyPayload,
    NotifyType,
    Payload,
    PayloadType,
    ProtocolError,
    ProtocolId,
    SAPayload,
    TrafficSelector,
    TSiPayload,
    TSrPayload,
    UnknownPayload,
    VendorIDPayload,
    notify_name,
    pull_message,
    push_message,
)
from control.ike.profiles import Identity, IkeAlgorithms, Profile, SessionPolicy
from control.ike.proposals import EspChoice, select_esp, select_ike
from control.ike.sa import ChildSA, IkeSA

if TYPE_CHECKING:
    from control.ike.responder import IkeResponder

NONCE_SIZE = 32
MANY = 255

# RFC 7296 1.2-1.4 and 3.x: payloads a request of each exchange may carry,
# as (minimum, maximum) counts; unknown non-critical payloads are skipped.
REQUEST_RULES: dict[int, dict[int, tuple[int, int]]] = {
    ExchangeType.IKE_SA_INIT: {
        PayloadType.SA: (1, 1),
        PayloadType.KE: (1, 1),
        PayloadType.NONCE: (1, 1),
        PayloadType.NOTIFY: (0, MANY),
        PayloadType.VENDOR_ID: (0, MANY),
        PayloadType.CERTREQ: (0, MANY),
    },
    ExchangeType.IKE_AUTH: {
        PayloadType.IDI: (1, 1),
        PayloadType.IDR: (0, 1),
        PayloadType.AUTH: (0, 1),
        PayloadType.CERT: (0, MANY),
        PayloadType.CERTREQ: (0, MANY),
        PayloadType.CP: (0, 1),
        PayloadType.SA: (0, 1),
        PayloadType.TSI: (0, 1),
        PayloadType.TSR: (0, 1),
        PayloadType.NOTIFY: (0, MANY),
        PayloadType.VENDOR_ID: (0, MANY),
        PayloadType.EAP: (0, 1),
    },
    ExchangeType.INFORMATIONAL: {
        PayloadType.DELETE: (0, MANY),
        PayloadType.NOTIFY: (0, MANY),
        PayloadType.CP: (0, 1),
        PayloadType.VENDOR_ID: (0, MANY),
    },
    ExchangeType.CREATE_CHILD_SA: {
        PayloadType.SA: (1, 1),
        PayloadType.NONCE: (1, 1),
        PayloadType.KE: (0, 1),
        PayloadType.TSI: (0, 1),
        PayloadType.TSR: (0, 1),
        PayloadType.NOTIFY: (0, MANY),
        PayloadType.VENDOR_ID: (0, MANY),
    },
}

# payloads a response to one of our requests may carry
RESPONSE_RULES: dict[int, dict[int, tuple[int, int]]] = {
    ExchangeType.INFORMATIONAL: {
        PayloadType.DELETE: (0, MANY),
        PayloadType.NOTIFY: (0, MANY),
        PayloadType.VENDOR_ID: (0, MANY),
    },
    # RFC 7296 1.3: SA, Nr, [KEr], [TSi, TSr], or only an error notify
    ExchangeType.CREATE_CHILD_SA: {
        PayloadType.SA: (0, 1),
        PayloadType.NONCE: (0, 1),
        PayloadType.KE: (0, 1),
        PayloadType.TSI: (0, 1),
        PayloadType.TSR: (0, 1),
        PayloadType.NOTIFY: (0, MANY),
        PayloadType.VENDOR_ID: (0, MANY),
    },
}


def check_rules(payloads: list[Payload], rules: dict[int, tuple[int, int]]) -> None:
    """Raise DecodeError unless each payload type appears an allowed number of times."""
    counts: dict[int, int] = {}
    for payload in payloads:
        if isinstance(payload, UnknownPayload):
            continue
        ptype = payload.payload_type
        if ptype not in rules:
            raise DecodeError(f"payload {ptype} not allowed here")
        counts[ptype] = counts.get(ptype, 0) + 1
    for ptype, (low, high) in rules.items():
        if not low <= counts.get(ptype, 0) <= high:
            raise DecodeError(f"payload {ptype} appears {counts.get(ptype, 0)} times")


def first(payloads: list[Payload], cls: type[Payload]) -> Payload | None:
    return next((p for p in payloads if isinstance(p, cls)), None)


def notifies(payloads: list[Payload], ntype: int) -> list[NotifyPayload]:
    return [
        p for p in payloads if isinstance(p, NotifyPayload) and p.notify_type == ntype
    ]


def peer_leaf(payloads: list[Payload]) -> x509.Certificate | None:
    """Return the first X.509 CERT payload's certificate, None if none or junk."""
    cert = next(
        (
            p
            for p in payloads
            if isinstance(p, CertPayload) and p.encoding == CERT_X509_SIGNATURE
        ),
        None,
    )
    if cert is None:
        return None
    try:
        return x509.load_der_x509_certificate(cert.data)
    except ValueError:
        return None


def address_bytes(address: Address) -> bytes:
    return ipaddress.ip_address(address[0]).packed


# -- IKE_SA_INIT ------------------------------------------------------------------


@dataclass
class InitResult:
    ike: IkeSA | None
    response: bytes


class IkeInitTask:
    """Answer an IKE_SA_INIT request: proposal, key exchange, nonces, NAT detection."""

    def __init__(self, responder: IkeResponder) -> None:
        self.responder = responder

    def run(
        self, message: Message, data: bytes, local: Address, remote: Address, now: float
    ) -> InitResult:
        """Process the request; return the new half-open SA and our response.

        Raises DecodeError for junk (the caller drops it); a refusal comes back
        as a response carrying only the notify, with no SA.
        """
        header = message.header
        check_rules(message.payloads, REQUEST_RULES[ExchangeType.IKE_SA_INIT])
        try:
            return self._accept(message, data, local, remote, now)
        except ProtocolError as exc:
            self.responder.counters[f"init_refused_{notify_name(exc.notify)}"] += 1
            # RFC 7296 1.2: an error response to IKE_SA_INIT has a zero SPIr
            reply = Message(
                Header(
                    header.spi_i,
                    bytes(8),
                    0,
                    IKE_VERSION,
                    ExchangeType.IKE_SA_INIT,
                    HeaderFlag.RESPONSE,
                    0,
                ),
                [NotifyPayload(ProtocolId.NONE, exc.notify, b"", exc.data)],
            )
            return InitResult(None, push_message(reply))

    def _accept(
        self, message: Message, data: bytes, local: Address, remote: Address, now: float
    ) -> InitResult:
        responder = self.responder
        header = message.header
        sa = first(message.payloads, SAPayload)
        ke = first(message.payloads, KEPayload)
        nonce = first(message.payloads, NoncePayload)
        assert isinstance(sa, SAPayload) and isinstance(ke, KEPayload)
        assert isinstance(nonce, NoncePayload)

        # proposal and group: the union of what the profiles accept
        allowed: list[IkeAlgorithms] = []
        groups: list[int] = []
        for profile in responder.config.profiles:
            allowed += [a for a in profile.ike_proposals if a not in allowed]
            groups += [g for g in profile.dh_groups if g not in groups]
        choice = select_ike(sa.proposals, allowed, groups, ke.group)

        # key exchange, nonce and our SPI
        kex = new_key_exchange(choice.dh_group, responder.rng)
        shared = kex.exchange(ke.data)
        nonce_r = responder.rng(NONCE_SIZE)
        spi_r = responder.new_ike_spi()

        # RFC 7296 2.23: compare the peer's NAT_DETECTION hashes (computed with
        # a zero SPIr) against the addresses this packet really carried
        zero = bytes(8)
        sources = notifies(message.payloads, NotifyType.NAT_DETECTION_SOURCE_IP)
        dests = notifies(message.payloads, NotifyType.NAT_DETECTION_DESTINATION_IP)
        remote_hash = nat_detection_hash(
            header.spi_i, zero, address_bytes(remote), remote[1]
        )
        local_hash = nat_detection_hash(
            header.spi_i, zero, address_bytes(local), local[1]
        )
        peer_behind_nat = bool(sources) and all(n.data != remote_hash for n in sources)
        self_behind_nat = bool(dests) and all(n.data != local_hash for n in dests)

        # keys (RFC 7296 2.14)
        a = choice.algorithms
        keys = derive_ike_keys(
            responder.prf_for(a.prf),
            a.encr,
            a.key_length,
            a.integ,
            shared,
            nonce.data,
            nonce_r,
            header.spi_i,
            spi_r,
        )
        rng = responder.rng
        cipher_in = new_sk_cipher(a.encr, a.integ, keys.sk_ei, keys.sk_ai, rng)
        cipher_out = new_sk_cipher(a.encr, a.integ, keys.sk_er, keys.sk_ar, rng)

        # response: SA, KE, Nonce, CERTREQ for the CAs we trust, and our NAT
        # detection if the peer sent its own
        payloads: list[Payload] = [
            SAPayload([choice.reply()]),
            KEPayload(choice.dh_group, kex.public),
            NoncePayload(nonce_r),
        ]
        anchors = responder.trust_anchors()
        if anchors:
            payloads.append(CertReqPayload(CERT_X509_SIGNATURE, certreq_data(anchors)))
        if sources or dests:
            payloads += [
                NotifyPayload(
                    ProtocolId.NONE,
                    NotifyType.NAT_DETECTION_SOURCE_IP,
                    b"",
                    nat_detection_hash(
                        header.spi_i, spi_r, address_bytes(local), local[1]
                    ),
                ),
                NotifyPayload(
                    ProtocolId.NONE,
                    NotifyType.NAT_DETECTION_DESTINATION_IP,
                    b"",
                    nat_detection_hash(
                        header.spi_i, spi_r, address_bytes(remote), remote[1]
                    ),
                ),
            ]
        # RFC 7383 2.3: announce fragmentation back when the peer did
        fragmentation = responder.config.fragment_size > 0 and bool(
            notifies(message.payloads, NotifyType.IKEV2_FRAGMENTATION_SUPPORTED)
        )
        if fragmentation:
            payloads.append(
                NotifyPayload(ProtocolId.NONE, NotifyType.IKEV2_FRAGMENTATION_SUPPORTED)
            )
        # RFC 7427 4: answer the peer's hash list with ours
        peer_hashes = notifies(message.payloads, NotifyType.SIGNATURE_HASH_ALGORITHMS)
        if peer_hashes:
            payloads.append(
                NotifyPayload(
                    ProtocolId.NONE,
                    NotifyType.SIGNATURE_HASH_ALGORITHMS,
                    b"",
                    signature_hash_data(),
                )
            )
        reply = Message(
            Header(
                header.spi_i,
                spi_r,
                0,
                IKE_VERSION,
                ExchangeType.IKE_SA_INIT,
                HeaderFlag.RESPONSE,
                0,
            ),
            payloads,
        )
        response = push_message(reply)
        ike = IkeSA(
            spi_i=header.spi_i,
            spi_r=spi_r,
            local=local,
            remote=remote,
            created=now,
            algorithms=a,
            dh_group=choice.dh_group,
            prf=responder.prf_for(a.prf),
            nonce_i=nonce.data,
            nonce_r=nonce_r,
            init_request=data,
            init_response=response,
            keys=keys,
            cipher_in=cipher_in,
            cipher_out=cipher_out,
            peer_behind_nat=peer_behind_nat,
            self_behind_nat=self_behind_nat,
            half_open_deadline=now + responder.config.half_open_timeout,
            fragmentation=fragmentation,
            peer_sig_hashes=[
                h for n in peer_hashes for h in parse_signature_hashes(n.data)
            ],
        )
        return InitResult(ike, response)


# -- tasks on an existing IKE SA --------------------------------------------------


@dataclass
class Exchange:
    """One request being answered, shared by the tasks of its exchange."""

    ike: IkeSA
    request: list[Payload]
    now: float
    response: list[Payload] = field(default_factory=list)
    fatal: ProtocolError | None = None
    child_error: int | None = None
    authenticated: bool = False
    delete_ike: bool = False
    events: list[Event] = field(default_factory=list)
    # EAP: parked until the AAA answer comes back; mid-way, neither up nor dead
    waiting: bool = False
    pending_auth: bool = False
    # what authentication learnt, for authorization (see AuthorizeTask)
    auth_info: dict[str, object] = field(default_factory=dict)


class Task:
    def __init__(self, responder: IkeResponder) -> None:
        self.responder = responder

    def process(self, ex: Exchange) -> None:
        """Read this task's payloads from the request and decide."""

    def build(self, ex: Exchange) -> None:
        """Append this task's payloads to the response."""

    def resume(self, ex: Exchange, result: object) -> None:
        """Take the answer this task waited for (it set `Exchange.waiting`)."""


class AuthTask(Task):
    """Identities, profile lookup and authentication both ways (RFC 7296 2.15).

    The peer proves itself by PSK or by a signature with a certificate the
    profile's trust store accepts (RFC 7427, or the older RSA/ECDSA methods);
    we answer by our profile's own method, which may differ (asymmetric auth).
    """

    profile: Profile
    local_id: Identity

    def process(self, ex: Exchange) -> None:
        ike = ex.ike
        idi = first(ex.request, IDiPayload)
        idr = first(ex.request, IDrPayload)
        auth = first(ex.request, AuthPayload)
        assert isinstance(idi, IDiPayload)
        identity = Identity(idi.id_type, idi.data)
        wanted = (
            Identity(idr.id_type, idr.data) if isinstance(idr, IDrPayload) else None
        )
        profiles = self.responder.config.profiles

        # profile: the first that admits the remote identity and, for a
        # certificate map, the (not yet verified) end-entity certificate
        leaf = peer_leaf(ex.request)
        profile = select_profile(profiles, identity.type, identity.data, leaf)
        if profile is None:
            subject = leaf.subject.rfc4514_string() if leaf else "no certificate"
            return self._fail(
                ex, "no profile matches identity %s", f"{identity} ({subject})"
            )
        ike.log.debug("identity %s selects profile %s", identity, profile.name)
        if ike.algorithms not in profile.ike_proposals or (
            ike.dh_group not in profile.dh_groups
        ):
            return self._fail(ex, "profile %s refuses the IKE algorithms", profile.name)

        # RFC 7296 3.7: remember which CAs the peer asked our chain to lead to
        for req in ex.request:
            if isinstance(req, CertReqPayload) and req.encoding == CERT_X509_SIGNATURE:
                data = req.data
                ike.peer_certreq += [data[i : i + 20] for i in range(0, len(data), 20)]

        # RFC 7296 2.16: an IKE_AUTH without AUTH asks for EAP
        if not isinstance(auth, AuthPayload):
            if "eap" not in profile.remote_auth:
                return self._fail(ex, "%s sends no AUTH payload", identity)
            from control.ike import eap

            self._choose_local_id(profiles, profile, wanted)
            self.profile = profile
            ike.profile = profile
            ike.identity = str(identity)
            idr = IDrPayload(self.local_id.type, self.local_id.data)
            eap.begin(ex, identity, idi.push_body(), idr.push_body())
            return
        octets = signed_octets(
            ike.prf, ike.init_request, ike.nonce_r, ike.keys.sk_pi, idi.push_body()
        )
        if profile.cert_map and auth.method not in SIGNATURE_METHODS:
            # the map read an unverified certificate: only a signature by it counts
            return self._fail(ex, "profile %s needs a certificate", profile.name)
        if auth.method == AuthMethod.SHARED_KEY_MIC:
            if "pre-share" not in profile.remote_auth:
                return self._fail(ex, "profile %s refuses PSK auth", profile.name)
            if profile.aaa_psk:
                # the keys come from AAA: park the exchange until they do
                from control.ike.eap import AaaRequest

                self._parked = (profile, identity, wanted, auth.data, octets)
                self.responder.emit(
                    AaaRequest(
                        ike.session_id, "psk", profile.name, str(identity),
                        ike.remote[0], b"",
                    )
                )  # fmt: skip
                self.responder.counters["aaa_requests"] += 1
                ex.waiting = True
                return
            # RFC 7296 2.15: AUTH = prf(prf(PSK, "Key Pad for IKEv2"), octets)
            expected = ike.prf(ike.prf(profile.psk, KEY_PAD), octets)
            if not hmac.compare_digest(expected, auth.data):
                return self._fail(ex, "wrong PSK from %s", identity)
        elif auth.method in SIGNATURE_METHODS:
            problem = self._check_signature(ex, profile, identity, auth, octets)
            if problem is not None:
                return self._fail(ex, "%s", f"{identity}: {problem}")
        else:
            return self._fail(ex, "auth method %d not supported", auth.method)
        self._accept(ex, profile, identity, wanted)

    def resume(self, ex: Exchange, result: object) -> None:
        """Check the peer's AUTH with the PSKs the AAA server returned."""
        ike = ex.ike
        profile, identity, wanted, data, octets = self._parked
        remote = getattr(result, "psk_remote", b"")
        if getattr(result, "outcome", None) != "accept" or not remote:
            return self._fail(ex, "aaa gave no PSK for %s", identity)
        # RFC 7296 2.15: AUTH = prf(prf(PSK, "Key Pad for IKEv2"), octets)
        expected = ike.prf(ike.prf(remote, KEY_PAD), octets)
        if not hmac.compare_digest(expected, data):
            return self._fail(ex, "wrong PSK (from aaa) from %s", identity)
        self.local_psk = getattr(result, "psk_local", b"") or remote
        # implicit (cached) authorization from the same answer
        ike.policy = getattr(result, "policy", None)
        ex.auth_info["cached"] = getattr(result, "attributes", {})
        self._accept(ex, profile, identity, wanted)

    def _accept(
        self,
        ex: Exchange,
        profile: Profile,
        identity: Identity,
        wanted: Identity | None,
    ) -> None:
        ike = ex.ike
        profiles = self.responder.config.profiles
        self._choose_local_id(profiles, profile, wanted)
        self.profile = profile
        ike.profile = profile
        ike.identity = str(identity)
        ex.auth_info["ike_identity"] = str(identity)
        ex.authenticated = True
        self.responder.counters["auth_ok"] += 1

        # RFC 7296 2.4: INITIAL_CONTACT means older SAs of this peer are gone
        if notifies(ex.request, NotifyType.INITIAL_CONTACT):
            self.responder.drop_identity(ike.identity, ike)

    def _choose_local_id(
        self, profiles: list[Profile], profile: Profile, wanted: Identity | None
    ) -> None:
        # our identity: the one asked for if it is ours, else the profile's
        local_ids = {p.local_id for p in profiles}
        self.local_id = profile.local_id
        if wanted is not None and wanted in local_ids:
            self.local_id = wanted

    def _check_signature(
        self,
        ex: Exchange,
        profile: Profile,
        identity: Identity,
        auth: AuthPayload,
        octets: bytes,
    ) -> str | None:
        """Verify chain, identity binding and signature; return the problem."""
        if profile.trust is None:
            return f"profile {profile.name} accepts no certificates"
        certs: list[x509.Certificate] = []
        for payload in ex.request:
            if not isinstance(payload, CertPayload):
                continue
            if payload.encoding != CERT_X509_SIGNATURE:
                continue
            try:
                certs.append(x509.load_der_x509_certificate(payload.data))
            except ValueError:
                return "undecodable certificate"
        # RFC 7296 3.6: the first CERT holds the key that signs AUTH
        if not certs:
            return "signature auth without a certificate"
        clock = self.responder.config.wall_clock()
        now = datetime.datetime.fromtimestamp(clock, datetime.UTC)
        try:
            profile.trust.verify(certs[0], certs[1:], now)
            kind = verify_auth(certs[0], auth.method, auth.data, octets)
        except CertError as exc:
            return str(exc)
        if not profile.accepts_signature(kind):
            return f"profile {profile.name} refuses {kind} signatures"
        # RFC 7296 3.5: the identity must be the certificate's
        if not identity_in_cert(identity.type, identity.data, certs[0]):
            return "identity is not in the certificate"
        ex.ike.log.debug("certificate %s verified", certs[0].subject.rfc4514_string())
        ex.auth_info["cert_dn"] = certs[0].subject.rfc4514_string()
        return None

    def _fail(self, ex: Exchange, what: str, arg: object) -> None:
        self.responder.counters["auth_failed"] += 1
        ex.ike.log.warning("authentication failed: " + what, arg)
        ex.fatal = ProtocolError(NotifyType.AUTHENTICATION_FAILED)

    def build(self, ex: Exchange) -> None:
        ike = ex.ike
        profile = self.profile
        idr = IDrPayload(self.local_id.type, self.local_id.data)
        # RFC 7296 2.15: RealMessage2 | NonceIData | prf(SK_pr, IDr')
        octets = signed_octets(
            ike.prf, ike.init_response, ike.nonce_i, ike.keys.sk_pr, idr.push_body()
        )
        if profile.local_auth == "pre-share":
            psk = getattr(self, "local_psk", None) or profile.psk
            data = ike.prf(ike.prf(psk, KEY_PAD), octets)
            ex.response += [idr, AuthPayload(AuthMethod.SHARED_KEY_MIC, data)]
            return
        credential = profile.credential
        assert credential is not None
        # RFC 7296 3.6: our end-entity certificate first, then the chain
        certs = [
            CertPayload(CERT_X509_SIGNATURE, cert.public_bytes(Encoding.DER))
            for cert in credential.certs_for(ike.peer_certreq)
        ]
        method, data = sign_auth(credential.key, octets, ike.peer_sig_hashes)
        ex.response += [idr, *certs, AuthPayload(method, data)]


class AuthorizeTask(Task):
    """Ask AAA for the session's policy once the peer is authenticated.

    Runs only for profiles with authorization configured; the daemon merges
    local policies and RADIUS answers (control.aaa.authorize) and answers
    with the policy config mode and the CHILD SA then use.
    """

    def process(self, ex: Exchange) -> None:
        ike = ex.ike
        profile = ike.profile
        if not ex.authenticated or profile is None or not profile.authorize:
            return
        from control.ike.eap import AaaRequest

        assert ike.identity is not None
        info = dict(ex.auth_info)
        self.responder.emit(
            AaaRequest(
                ike.session_id, "authorize", profile.name, ike.identity,
                ike.remote[0], b"", info,
            )
        )  # fmt: skip
        self.responder.counters["aaa_requests"] += 1
        ex.waiting = True

    def resume(self, ex: Exchange, result: object) -> None:
        """Take the merged policy, or refuse the session."""
        if getattr(result, "outcome", None) != "accept":
            self.responder.counters["authorization_failed"] += 1
            ex.ike.log.warning("authorization of %s failed", ex.ike.identity)
            ex.authenticated = False
            ex.fatal = ProtocolError(NotifyType.AUTHENTICATION_FAILED)
            return
        ex.ike.policy = getattr(result, "policy", None)


class ConfigTask(Task):
    """Config mode: hand out inside addresses and settings (RFC 7296 2.19, 3.15).

    An IPv4 address unless the client asked for IPv6 only; an IPv6 address
    (with its prefix length) when asked for and an IPv6 pool is configured.
    The IPv4 address comes from authorization (Framed-IP-Address), else the
    pool authorization named, else the profile's pool, else DHCP.

    The profile's `config_mode` says how: "request" answers a CFG_REQUEST
    with a CFG_REPLY (and refuses a client without one), "set" pushes a
    CFG_SET, "both" answers a request and pushes to a client without one.
    Cisco Unity attributes go only to clients that sent the Unity or the
    FlexVPN vendor ID; configuration URL and version only to FlexVPN ones.

    A client's own CFG_SET is answered with a CFG_ACK naming what we took
    (APPLICATION_VERSION only: a headend lets no client alter its settings);
    it is no request, so "request" mode still refuses the CHILD SA and
    "set"/"both" push a CFG_SET after the CFG_ACK. strongSwan 5.9.8 ignores a
    CFG_SET ("ignoring CFG_SET config payload"), installs no virtual IP and
    deletes the CHILD SA: "set" mode warns when a client sent a CFG_REQUEST.

    Route accept: a client may announce its own networks as valued
    INTERNAL_IP4/6_SUBNET attributes of its CFG_REQUEST or CFG_SET.
    `accept_routes` keeps those the session's policy accepts in
    `SessionPolicy.accepted_routes`; the daemon routes them into the session's
    TUN and the CHILD SA's TSi is widened to them.
    """

    ack: list[ConfigAttribute] | None = None

    def process(self, ex: Exchange) -> None:
        ike = ex.ike
        assert ike.identity is not None and ike.profile is not None
        mode = ike.profile.config_mode
        cp = first(ex.request, CPPayload)
        requested = isinstance(cp, CPPayload) and cp.cfg_type == CfgType.CFG_REQUEST
        if isinstance(cp, CPPayload):
            self._announced(ike, cp)
        if isinstance(cp, CPPayload) and cp.cfg_type == CfgType.CFG_SET:
            # RFC 7296 3.15: the peer returns the attributes it supported,
            # with zero-length values
            self.ack = [
                ConfigAttribute(a.type)
                for a in cp.attributes
                if a.type in CFG_SET_TAKEN
            ]
            self.responder.counters["cfg_set_received"] += 1
            ike.log.debug("cfg_set from client, acking %d attributes", len(self.ack))
        if requested and mode == "set":
            self.responder.counters["cfg_set_to_requester"] += 1
            ike.log.warning(
                "client sent CFG_REQUEST but profile %s pushes CFG_SET; clients "
                "that only pull (strongSwan) ignore it: use config_mode both",
                ike.profile.name,
            )
        if not requested and mode == "request":
            # RFC 7296 3.10.1: we require config mode, so say so
            ex.child_error = NotifyType.FAILED_CP_REQUIRED
            return
        # RFC 7296 3.15: CFG_SET from the headend when the profile pushes
        self.reply_type = (
            CfgType.CFG_REPLY if requested and mode != "set" else CfgType.CFG_SET
        )
        asked = {a.type for a in cp.attributes} if isinstance(cp, CPPayload) else set()
        want6 = CfgAttribute.INTERNAL_IP6_ADDRESS in asked
        want4 = CfgAttribute.INTERNAL_IP4_ADDRESS in asked or not want6
        try:
            if want6 or not requested:
                ike.inside_address6 = self._allocate6(ike)
            if want4 and self._use_dhcp(ike):
                # the daemon's DHCP relay leases the address: park until then
                from control.ike.eap import AaaRequest

                # a DHCP server from authorization goes along to the relay
                policy = ike.policy
                info = {}
                if policy is not None and policy.dhcp_server is not None:
                    info = {
                        "dhcp_server": str(policy.dhcp_server),
                        "dhcp_giaddr": str(policy.dhcp_giaddr or ""),
                        "dhcp_timeout": policy.dhcp_timeout,
                    }
                self.responder.emit(
                    AaaRequest(
                        ike.session_id, "dhcp", ike.profile.name, ike.identity,
                        ike.remote[0], b"", info,
                    )
                )  # fmt: skip
                ex.waiting = True
                return
            if want4:
                ike.inside_address = self._allocate4(ike)
        except Exception:
            ike.log.exception("address allocator failed")
        self._check(ex)

    def resume(self, ex: Exchange, result: object) -> None:
        """Take the DHCP lease the daemon obtained (or its failure)."""
        ike = ex.ike
        policy = getattr(result, "policy", None)
        if getattr(result, "outcome", None) == "accept" and policy is not None:
            ike.inside_address = policy.address
            # DNS servers of the lease, unless authorization named some
            if policy.dns and not (ike.policy is not None and ike.policy.dns):
                base = ike.policy or SessionPolicy()
                ike.policy = dataclasses.replace(base, dns=list(policy.dns))
        self._check(ex)

    def _announced(self, ike: IkeSA, cp: CPPayload) -> None:
        # the client's own networks (route accept), kept in the session policy
        counters = self.responder.counters
        routes, refused = accept_routes(
            cp.attributes, ike.policy, ike.profile, counters
        )
        if refused:
            ike.log.warning("refused %d routes announced by the client, first %s",
                            len(refused), refused[0])  # fmt: skip
        if routes:
            assert ike.policy is not None
            ike.policy = dataclasses.replace(ike.policy, accepted_routes=routes)
            ike.log.info("accepted %d routes announced by the client", len(routes))

    def _use_dhcp(self, ike: IkeSA) -> bool:
        # DHCP only without any pool; a pool error never falls through to DHCP
        assert ike.profile is not None
        policy = ike.policy
        if policy is not None and (policy.address is not None or policy.pool):
            return False
        # a DHCP server named by authorization switches this session to DHCP
        if policy is not None and policy.dhcp_server is not None:
            return True
        return ike.profile.dhcp

    def _check(self, ex: Exchange) -> None:
        ike = ex.ike
        # RFC 7296 3.15.4: an address was asked for and none can be given
        if ike.inside_address is None and ike.inside_address6 is None:
            self.responder.counters["address_failed"] += 1
            ex.child_error = NotifyType.INTERNAL_ADDRESS_FAILURE

    def _allocate4(self, ike: IkeSA) -> ipaddress.IPv4Address | None:
        config = self.responder.config
        policy = ike.policy
        assert ike.identity is not None and ike.profile is not None
        if policy is not None and policy.address is not None:
            # the address from authorization (Framed-IP-Address) comes first
            return policy.address
        if policy is not None and policy.pool and config.allocate_from_pool:
            return config.allocate_from_pool(policy.pool, ike.session_id)
        if config.allocate_in_profile is not None:
            return config.allocate_in_profile(
                ike.profile.name, ike.identity, ike.session_id
            )
        return config.allocate_address(ike.identity, ike.session_id)

    def _allocate6(self, ike: IkeSA) -> ipaddress.IPv6Interface | None:
        config = self.responder.config
        assert ike.identity is not None and ike.profile is not None
        if ike.policy is not None and ike.policy.address6 is not None:
            # the address from authorization (ipsec:addrv6) comes before any pool
            return ike.policy.address6
        if config.allocate_address6 is None:
            return None
        pool = ike.policy.pool6 if ike.policy is not None else None
        return config.allocate_address6(ike.profile.name, pool, ike.session_id)

    def build(self, ex: Exchange) -> None:
        ike = ex.ike
        if self.ack is not None:
            ex.response.append(CPPayload(CfgType.CFG_ACK, self.ack))
        if ike.inside_address is None and ike.inside_address6 is None:
            assert ex.child_error is not None
            ex.response.append(NotifyPayload(ProtocolId.NONE, ex.child_error))
            return
        assert ike.profile is not None
        policy = ike.policy or SessionPolicy()
        attrs = config_attributes(
            ike.inside_address,
            ike.inside_address6,
            policy,
            ike.profile,
            client_kinds([*ex.request, *init_payloads(ike)]),
        )
        reply_type = getattr(self, "reply_type", CfgType.CFG_REPLY)
        ex.response.append(CPPayload(reply_type, attrs))


# route accept: the most networks one client may announce
ROUTE_ACCEPT_MAX = 50


def pull_subnet(attr: ConfigAttribute) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    """Return the network of a valued INTERNAL_IP4/6_SUBNET attribute."""
    value = attr.value
    # RFC 7296 3.15.1: IPv4 address and netmask (8 octets); IPv6 address and
    # prefix length (17 octets)
    if attr.type == CfgAttribute.INTERNAL_IP4_SUBNET and len(value) == 8:
        address = ipaddress.IPv4Address(value[:4])
        return ipaddress.IPv4Network(f"{address}/{ipaddress.IPv4Address(value[4:])}",
                                     strict=False)  # fmt: skip
    if attr.type == CfgAttribute.INTERNAL_IP6_SUBNET and len(value) == 17:
        if value[16] > 128:
            raise ValueError(f"prefix length {value[16]}")
        address6 = ipaddress.IPv6Address(value[:16])
        return ipaddress.IPv6Network(f"{address6}/{value[16]}", strict=False)
    raise ValueError(f"{len(value)} octets")


def accept_routes(
    attributes: list[ConfigAttribute],
    policy: SessionPolicy | None,
    profile: Profile | None,
    counters: dict[str, int],
) -> tuple[list[str], list[str]]:
    """Return the networks a client announced that its policy accepts, and why
    the others were refused.

    Without route accept in the policy announcements are counted and ignored.
    Refused (and counted): a default route, a network
    overlapping the pools or the subnets routed to the client (local_ts other
    than a default route), malformed values, and any beyond ROUTE_ACCEPT_MAX.
    """
    kinds = (CfgAttribute.INTERNAL_IP4_SUBNET, CfgAttribute.INTERNAL_IP6_SUBNET)
    # an empty value asks for our subnets: only valued ones announce
    announced = [a for a in attributes if a.type in kinds and a.value]
    if not announced:
        return [], []
    if policy is None or policy.route_accept is None:
        counters["routes_ignored"] = counters.get("routes_ignored", 0) + len(announced)
        return [], []
    local = policy.local_ts or (profile.local_ts if profile is not None else [])
    taken = [ipaddress.ip_network(n) for n in policy.route_accept_exclude] + [
        net for net in map(ipaddress.ip_network, local) if net.prefixlen > 0
    ]
    accepted: list[str] = []
    refused: list[str] = []
    for attr in announced:
        try:
            net = pull_subnet(attr)
        except ValueError as exc:
            refused.append(f"malformed ({exc})")
            continue
        if net.prefixlen == 0:
            refused.append(f"{net} (default route)")
        elif any(net.version == t.version and net.overlaps(t) for t in taken):
            refused.append(f"{net} (overlaps pools or routed subnets)")
        elif len(accepted) >= ROUTE_ACCEPT_MAX:
            refused.append(f"{net} (more than {ROUTE_ACCEPT_MAX})")
        elif str(net) not in accepted:
            accepted.append(str(net))
    for name, items in (("routes_refused", refused), ("routes_accepted", accepted)):
        counters[name] = counters.get(name, 0) + len(items)
    return accepted, refused


APPLICATION_VERSION = b"espgate"
# attributes of a client's CFG_SET we take (and name in the CFG_ACK)
CFG_SET_TAKEN = frozenset({CfgAttribute.APPLICATION_VERSION})
# RFC 7296 3.15.1 has no Unity split entry: address, mask and six bytes of
# padding per network, as Cisco's Unity client reads them
UNITY_SPLIT_PAD = bytes(6)
# "include local LAN": Cisco's convention is 0.0.0.0/255.255.255.255
UNITY_LOCAL_LAN_ENTRY = bytes(4) + b"\xff\xff\xff\xff" + UNITY_SPLIT_PAD


def init_payloads(ike: IkeSA) -> list[Payload]:
    """Return the payloads of the peer's IKE_SA_INIT request (for vendor IDs)."""
    try:
        return pull_message(ike.init_request).payloads
    except (DecodeError, AttributeError):
        return []


def client_kinds(payloads: list[Payload]) -> set[str]:
    """Return "unity" and/or "flexvpn" for the Cisco vendor IDs among payloads."""
    kinds = set()
    for payload in payloads:
        if isinstance(payload, VendorIDPayload):
            if payload.data == VID_CISCO_UNITY:
                kinds.add("unity")
            elif payload.data == VID_CISCO_FLEXVPN:
                kinds.update(("unity", "flexvpn"))
    return kinds


def config_attributes(
    address: ipaddress.IPv4Address | None,
    address6: ipaddress.IPv6Interface | None,
    policy: SessionPolicy,
    profile: Profile,
    kinds: set[str],
) -> list[ConfigAttribute]:
    """Return the CFG_REPLY/CFG_SET attributes of one session.

    Everything the session has is included whether or not it was asked for;
    the Cisco attributes only for the client `kinds` that understand them.
    """
    attrs: list[ConfigAttribute] = []

    def add(kind: int, value: bytes) -> None:
        attrs.append(ConfigAttribute(kind, value))

    # RFC 7296 3.15.1: one IPv4 address; a netmask only with it
    if address is not None:
        add(CfgAttribute.INTERNAL_IP4_ADDRESS, address.packed)
        if policy.netmask is not None:
            add(CfgAttribute.INTERNAL_IP4_NETMASK, policy.netmask.packed)
    # RFC 7296 3.15.3: address and prefix length
    if address6 is not None:
        value = address6.ip.packed + bytes([address6.network.prefixlen])
        add(CfgAttribute.INTERNAL_IP6_ADDRESS, value)
    for wins in policy.wins:
        add(CfgAttribute.INTERNAL_IP4_NBNS, ipaddress.IPv4Address(wins).packed)
    for server in policy.dns or profile.dns:
        ip = ipaddress.ip_address(server)
        if ip.version == 4:
            add(CfgAttribute.INTERNAL_IP4_DNS, ip.packed)
        else:
            add(CfgAttribute.INTERNAL_IP6_DNS, ip.packed)

    # RFC 7296 3.15.2: the protected subnets, address and netmask (IPv4) or
    # address and prefix length (IPv6), for each family the client has
    routed = [ipaddress.ip_network(n) for n in policy.local_ts or profile.local_ts]
    for net in routed:
        if net.version == 4 and address is not None:
            add(CfgAttribute.INTERNAL_IP4_SUBNET, net.network_address.packed
                + net.netmask.packed)  # fmt: skip
        elif net.version == 6 and address6 is not None:
            add(CfgAttribute.INTERNAL_IP6_SUBNET, net.network_address.packed
                + bytes([net.prefixlen]))  # fmt: skip
    add(CfgAttribute.APPLICATION_VERSION, APPLICATION_VERSION)

    # Cisco Unity, to clients that identified as Unity or FlexVPN only
    if "unity" in kinds:
        attrs.extend(unity_attributes(policy, routed, profile))
    if "flexvpn" in kinds:
        if policy.configuration_url:
            url = policy.configuration_url.encode()
            add(profile.cisco_attribute("configuration_url"), url)
        if policy.configuration_version is not None:
            version = policy.configuration_version.to_bytes(4, "big")
            add(profile.cisco_attribute("configuration_version"), version)
    return attrs


def unity_attributes(
    policy: SessionPolicy,
    routed: list[ipaddress.IPv4Network | ipaddress.IPv6Network],
    profile: Profile | None = None,
) -> list[ConfigAttribute]:
    """Return the Cisco Unity attributes the policy sets."""
    smartcard = (
        profile.cisco_attribute("smartcard_removal_disconnect")
        if profile is not None
        else CfgAttribute.CISCO_SMARTCARD_REMOVAL_DISCONNECT
    )
    attrs: list[ConfigAttribute] = []
    strings = (
        (CfgAttribute.UNITY_BANNER, policy.banner),
        (CfgAttribute.UNITY_DEF_DOMAIN, policy.default_domain),
        (CfgAttribute.UNITY_SPLITDNS_NAME, ",".join(policy.split_dns)),
        (CfgAttribute.UNITY_BACKUP_SERVERS, ",".join(policy.backup_gateways)),
    )
    for kind, text in strings:
        if text:
            attrs.append(ConfigAttribute(kind, text.encode()))
    flags = (
        (CfgAttribute.UNITY_PFS, policy.pfs),
        (smartcard, policy.smartcard_removal_disconnect),
    )  # fmt: skip
    for number, flag in flags:
        if flag is not None:
            attrs.append(ConfigAttribute(number, int(flag).to_bytes(2, "big")))
    split = b"".join(
        net.network_address.packed + net.netmask.packed + UNITY_SPLIT_PAD
        for net in routed
        if net.version == 4 and net.prefixlen > 0
    )
    if split:
        attrs.append(ConfigAttribute(CfgAttribute.UNITY_SPLIT_INCLUDE, split))
    if policy.include_local_lan:
        attrs.append(
            ConfigAttribute(CfgAttribute.UNITY_LOCAL_LAN, UNITY_LOCAL_LAN_ENTRY)
        )
    return attrs


def accepted_tsi(
    offered: list[TrafficSelector], routes: list[str], have: list[TrafficSelector]
) -> list[TrafficSelector]:
    """Return the parts of the offered TSi within accepted routes, beyond `have`."""
    extra: list[TrafficSelector] = []
    for net in routes:
        own = trafficsel.ts_from_network(net)
        for ts in offered:
            # RFC 7296 2.9: the responder narrows to a subset of what was offered
            common = trafficsel.intersect(ts, own)
            if common is not None and common not in have and common not in extra:
                extra.append(common)
                break
    return extra


class ChildCreateTask(Task):
    """The CHILD SA of IKE_AUTH: ESP proposal, narrowed selectors, keys."""

    child: ChildSA | None = None
    choice: EspChoice
    ts_i: list[TrafficSelector]
    ts_r: list[TrafficSelector]

    def process(self, ex: Exchange) -> None:
        sa = first(ex.request, SAPayload)
        tsi = first(ex.request, TSiPayload)
        tsr = first(ex.request, TSrPayload)
        if ex.child_error is not None or not isinstance(sa, SAPayload):
            return
        # RFC 7296 1.2: SAi2 comes with TSi and TSr
        if not isinstance(tsi, TSiPayload) or not isinstance(tsr, TSrPayload):
            ex.child_error = NotifyType.TS_UNACCEPTABLE
            return
        try:
            self.negotiate(ex, sa, tsi, tsr, ex.ike.nonce_i, ex.ike.nonce_r)
        except ProtocolError as exc:
            ex.child_error = exc.notify
            self.responder.counters[f"child_refused_{notify_name(exc.notify)}"] += 1

    def negotiate(
        self,
        ex: Exchange,
        sa: SAPayload,
        tsi: TSiPayload,
        tsr: TSrPayload,
        nonce_i: bytes,
        nonce_r: bytes,
        ke: KEPayload | None = None,
        pfs: bool = False,
    ) -> None:
        """Choose proposal and selectors, derive keys, record the new CHILD SA."""
        ike = ex.ike
        assert ike.profile is not None and ike.identity is not None
        inside = [a for a in (ike.inside_address, ike.inside_address6) if a is not None]
        if not inside:
            # remote access: every CHILD SA carries the inside address
            raise ProtocolError(NotifyType.TS_UNACCEPTABLE, "no inside address")

        # proposal (with PFS in CREATE_CHILD_SA) and selectors (RFC 7296 2.9)
        # RFC 7296 1.3.1: USE_TRANSPORT_MODE is ignored; tunnel mode it is
        choice = select_esp(
            sa.proposals,
            ike.profile.esp_proposals,
            ike.profile.dh_groups if pfs else None,
            ke.group if ke is not None else None,
        )
        ts_i = trafficsel.narrow_tsi(tsi.selectors, inside)
        policy = ike.policy
        if policy is not None:
            # route accept: the client's accepted networks within its TSi
            ts_i += accepted_tsi(tsi.selectors, policy.accepted_routes, ts_i)
        routed = policy.local_ts if policy is not None and policy.local_ts else None
        ts_r = trafficsel.narrow_tsr(tsr.selectors, routed or ike.profile.local_ts)
        shared = b""
        self.ke_reply: KEPayload | None = None
        if choice.dh_group != DhGroup.NONE:
            assert ke is not None
            kex = new_key_exchange(choice.dh_group, self.responder.rng)
            shared = kex.exchange(ke.data)
            self.ke_reply = KEPayload(choice.dh_group, kex.public)

        # keys (RFC 7296 2.17): i->r first, then r->i
        key_length = choice.algorithms.key_length
        keys = derive_child_keys(
            ike.prf, ike.keys.sk_d, nonce_i, nonce_r, key_length, shared
        )
        spi_in = self.responder.new_child_spi()
        spi_out = int.from_bytes(choice.peer_spi, "big")
        self.choice, self.ts_i, self.ts_r = choice, ts_i, ts_r
        local_ts = [trafficsel.ts_to_string(t) for t in ts_r]
        remote_ts = [trafficsel.ts_to_string(t) for t in ts_i]
        self.child = ChildSA(
            spi_in,
            spi_out,
            key_length,
            local_ts,
            remote_ts,
            pfs_group=choice.dh_group,
            rekey_at=self.responder.rekey_deadline(
                ike.profile.child_rekey_time, ex.now
            ),
            selectors=(ts_i, ts_r),
        )
        ike.children[spi_in] = self.child
        ex.events.append(
            ChildSAUp(
                session_id=ike.session_id,
                identity=ike.identity,
                remote=ike.remote,
                inside_address=ike.inside_address,  # type: ignore[arg-type]
                inside_address6=ike.inside_address6,
                spi_in=spi_in,
                spi_out=spi_out,
                key_in=keys.key_i,
                salt_in=keys.salt_i,
                key_out=keys.key_r,
                salt_out=keys.salt_r,
                esn=False,
                local_ts=local_ts,
                remote_ts=remote_ts,
                udp_encap=ike.nat_detected,
            )
        )

    def build(self, ex: Exchange) -> None:
        if self.child is None:
            # INTERNAL_ADDRESS_FAILURE / FAILED_CP_REQUIRED went out with config
            error = ex.child_error
            ike = ex.ike
            given = ike.inside_address is not None or ike.inside_address6 is not None
            if error is not None and given:
                ex.response.append(NotifyPayload(ProtocolId.NONE, error))
            return
        ex.response += [
            SAPayload([self.choice.reply(self.child.spi_in.to_bytes(4, "big"))]),
            TSiPayload(self.ts_i),
            TSrPayload(self.ts_r),
        ]


class ChildRekeyTask(ChildCreateTask):
    """CREATE_CHILD_SA: a new CHILD SA, or the rekey of one (RFC 7296 1.3.1, 1.3.3).

    A rekey only creates the new SA (make before break); the old one goes when
    the initiator deletes it with an INFORMATIONAL exchange (RFC 7296 2.8).
    """

    def process(self, ex: Exchange) -> None:
        ike = ex.ike
        sa = first(ex.request, SAPayload)
        nonce = first(ex.request, NoncePayload)
        ke = first(ex.request, KEPayload)
        tsi = first(ex.request, TSiPayload)
        tsr = first(ex.request, TSrPayload)
        assert isinstance(sa, SAPayload) and isinstance(nonce, NoncePayload)
        # an IKE SA rekey is IkeRekeyTask's (control.ike.rekey)
        if any(p.protocol == ProtocolId.IKE for p in sa.proposals):
            return
        # RFC 7296 1.3.3: REKEY_SA names the SA by the initiator's inbound SPI
        self.rekeyed: ChildSA | None = None
        for notify in notifies(ex.request, NotifyType.REKEY_SA):
            spi_out = int.from_bytes(notify.spi, "big")
            old = next((c for c in ike.children.values() if c.spi_out == spi_out), None)
            if old is None:
                ex.fatal = ProtocolError(NotifyType.CHILD_SA_NOT_FOUND)
                return
            # RFC 7296 2.25: we rekeyed it already and are deleting it
            if old.replaced:
                ex.fatal = ProtocolError(NotifyType.TEMPORARY_FAILURE)
                return
            self.rekeyed = old
        # RFC 7296 1.3.1: a CHILD SA request carries TSi and TSr
        if not isinstance(tsi, TSiPayload) or not isinstance(tsr, TSrPayload):
            ex.fatal = ProtocolError(NotifyType.INVALID_SYNTAX)
            return
        if self.rekeyed is None:
            try:
                flows.check_new_child(ike, tsr.selectors)
            except ProtocolError as exc:
                self.responder.counters[f"child_refused_{notify_name(exc.notify)}"] += 1
                ex.fatal = exc
                return
        self.nonce_r = self.responder.rng(NONCE_SIZE)
        try:
            self.negotiate(
                ex,
                sa,
                tsi,
                tsr,
                nonce.data,
                self.nonce_r,
                ke if isinstance(ke, KEPayload) else None,
                pfs=True,
            )
        except ProtocolError as exc:
            self.responder.counters[f"child_refused_{notify_name(exc.notify)}"] += 1
            ex.fatal = exc
            return
        if self.rekeyed is not None and self.child is not None:
            # the peer replaces it; a rekey of ours may be colliding (2.8.1)
            self.rekeyed.replaced = True
            self.child.pfs_group = self.choice.dh_group
            self.responder.peer_rekeyed_child(
                ike, self.rekeyed, self.child, nonce.data, self.nonce_r
            )

    def build(self, ex: Exchange) -> None:
        if self.child is None:
            return
        # RFC 7296 1.3.1: HDR, SK {SA, Nr, [KEr], TSi, TSr}
        ex.response += [
            SAPayload([self.choice.reply(self.child.spi_in.to_bytes(4, "big"))]),
            NoncePayload(self.nonce_r),
        ]
        if self.ke_reply is not None:
            ex.response.append(self.ke_reply)
        ex.response += [TSiPayload(self.ts_i), TSrPayload(self.ts_r)]


class DeleteTask(Task):
    """Delete payloads from the peer (RFC 7296 1.4.1)."""

    def process(self, ex: Exchange) -> None:
        ike = ex.ike
        self.deleted: list[ChildSA] = []
        for payload in ex.request:
            if not isinstance(payload, DeletePayload):
                continue
            if payload.protocol == ProtocolId.IKE:
                ex.delete_ike = True
                continue
            if payload.protocol != ProtocolId.ESP:
                continue
            for spi in payload.spis:
                # the peer names its inbound SPI, which is our outbound one
                spi_out = int.from_bytes(spi, "big")
                child = next(
                    (c for c in ike.children.values() if c.spi_out == spi_out), None
                )
                if child is None:
                    continue
                del ike.children[child.spi_in]
                self.deleted.append(child)
                ex.events.append(ChildSADown(ike.session_id, child.spi_in, spi_out))

    def build(self, ex: Exchange) -> None:
        # RFC 7296 1.4.1: the IKE SA delete gets an empty response; a CHILD SA
        # delete gets a Delete with our inbound SPIs of the same pairs
        if ex.delete_ike or not self.deleted:
            return
        spis = [c.spi_in.to_bytes(4, "big") for c in self.deleted]
        ex.response.append(DeletePayload(ProtocolId.ESP, 4, spis))


class LivenessTask(Task):
    """Empty INFORMATIONAL requests are liveness checks: an empty answer (2.4)."""


def _ike_rekey_task(responder: IkeResponder) -> Task:
    from control.ike.rekey import IkeRekeyTask  # it builds on this module

    return IkeRekeyTask(responder)


class ConfigAckTask(Task):
    """A client's CFG_ACK to our CFG_SET, in an INFORMATIONAL request (RFC 7296 3.15).

    Our CFG_SET went out in the IKE_AUTH response, so the only place a client
    can acknowledge it is a later request; it is counted and otherwise taken
    as it is (the session already runs with what we pushed). Any other CP
    type in an INFORMATIONAL request is ignored.
    """

    def process(self, ex: Exchange) -> None:
        cp = first(ex.request, CPPayload)
        if not isinstance(cp, CPPayload):
            return
        if cp.cfg_type == CfgType.CFG_ACK:
            self.responder.counters["cfg_ack_received"] += 1
            ex.ike.log.debug("cfg_ack from client, %d attributes", len(cp.attributes))
        else:
            self.responder.counters["cp_ignored"] += 1


EXCHANGE_TASKS: dict[int, tuple[Callable[[IkeResponder], Task], ...]] = {
    ExchangeType.IKE_AUTH: (AuthTask, AuthorizeTask, ConfigTask, ChildCreateTask),
    ExchangeType.INFORMATIONAL: (DeleteTask, LivenessTask, ConfigAckTask),
    ExchangeType.CREATE_CHILD_SA: (_ike_rekey_task, ChildRekeyTask),
}
