"""Responder tasks: one per exchange concern, each with a process and a build step.

Theory of operation: for every request the manager (`control.ike.responder`)
picks the tasks of its exchange from `EXCHANGE_TASKS`, runs every task's
`process` in that order, then every task's `build`, so the response payloads
come out in task order. A task that must refuse the whole exchange sets
`Exchange.fatal`; the manager then answers with that notify alone. A task
that refuses only the CHILD SA sets `Exchange.child_error` and later tasks
leave the CHILD SA out.

    IKE_SA_INIT      IkeInitTask (no SA exists yet; run on its own)
    IKE_AUTH         AuthTask -> ConfigTask -> ChildCreateTask
    INFORMATIONAL    DeleteTask -> LivenessTask
    CREATE_CHILD_SA  IkeRekeyTask (control.ike.rekey) -> ChildRekeyTask (new or
                     rekeyed CHILD SA); each leaves the other's requests alone

Which payloads each request may carry, and how many, is data: `REQUEST_RULES`.
"""

from __future__ import annotations

import datetime
import hmac
import ipaddress
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from control.ike import trafficsel
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
    notify_name,
    push_message,
)
from control.ike.profiles import Identity, IkeAlgorithms, Profile
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


class Task:
    def __init__(self, responder: IkeResponder) -> None:
        self.responder = responder

    def process(self, ex: Exchange) -> None:
        """Read this task's payloads from the request and decide."""

    def build(self, ex: Exchange) -> None:
        """Append this task's payloads to the response."""


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

        # TODO: EAP (an IKE_AUTH without AUTH).
        if not isinstance(auth, AuthPayload):
            return self._fail(ex, "%s sends no AUTH payload", identity)
        octets = signed_octets(
            ike.prf, ike.init_request, ike.nonce_r, ike.keys.sk_pi, idi.push_body()
        )
        if profile.cert_map and auth.method not in SIGNATURE_METHODS:
            # the map read an unverified certificate: only a signature by it counts
            return self._fail(ex, "profile %s needs a certificate", profile.name)
        if auth.method == AuthMethod.SHARED_KEY_MIC:
            if "pre-share" not in profile.remote_auth:
                return self._fail(ex, "profile %s refuses PSK auth", profile.name)
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

        # our identity: the one asked for if it is ours, else the profile's
        local_ids = {p.local_id for p in profiles}
        self.local_id = profile.local_id
        if wanted is not None and wanted in local_ids:
            self.local_id = wanted
        self.profile = profile
        ike.profile = profile
        ike.identity = str(identity)
        ex.authenticated = True
        self.responder.counters["auth_ok"] += 1

        # RFC 7296 2.4: INITIAL_CONTACT means older SAs of this peer are gone
        if notifies(ex.request, NotifyType.INITIAL_CONTACT):
            self.responder.drop_identity(ike.identity, ike)

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
            data = ike.prf(ike.prf(profile.psk, KEY_PAD), octets)
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


class ConfigTask(Task):
    """Config mode: hand out an inside address and DNS (RFC 7296 2.19, 3.15)."""

    def process(self, ex: Exchange) -> None:
        ike = ex.ike
        cp = first(ex.request, CPPayload)
        if not isinstance(cp, CPPayload) or cp.cfg_type != CfgType.CFG_REQUEST:
            # RFC 7296 3.10.1: we require config mode, so say so
            ex.child_error = NotifyType.FAILED_CP_REQUIRED
            return
        assert ike.identity is not None and ike.profile is not None
        config = self.responder.config
        try:
            if config.allocate_for_profile is not None:
                address = config.allocate_for_profile(
                    ike.profile.name, ike.identity, ike.session_id
                )
            else:
                address = config.allocate_address(ike.identity, ike.session_id)
        except Exception:
            ike.log.exception("address allocator failed")
            address = None
        if address is None:
            # RFC 7296 3.15.4: no address, no CHILD SA; the IKE SA stays
            self.responder.counters["address_failed"] += 1
            ex.child_error = NotifyType.INTERNAL_ADDRESS_FAILURE
            return
        ike.inside_address = address

    def build(self, ex: Exchange) -> None:
        ike = ex.ike
        if ike.inside_address is None:
            assert ex.child_error is not None
            ex.response.append(NotifyPayload(ProtocolId.NONE, ex.child_error))
            return
        assert ike.profile is not None
        attrs = [
            ConfigAttribute(
                CfgAttribute.INTERNAL_IP4_ADDRESS, ike.inside_address.packed
            )
        ]
        for server in ike.profile.dns:
            address = ipaddress.ip_address(server)
            kind = (
                CfgAttribute.INTERNAL_IP4_DNS
                if address.version == 4
                else CfgAttribute.INTERNAL_IP6_DNS
            )
            attrs.append(ConfigAttribute(kind, address.packed))
        ex.response.append(CPPayload(CfgType.CFG_REPLY, attrs))


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
        if ike.inside_address is None:
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
        ts_i = trafficsel.narrow_tsi(tsi.selectors, ike.inside_address)
        ts_r = trafficsel.narrow_tsr(tsr.selectors, ike.profile.local_ts)
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
        self.child = ChildSA(spi_in, spi_out, key_length, local_ts, remote_ts)
        ike.children[spi_in] = self.child
        ex.events.append(
            ChildSAUp(
                session_id=ike.session_id,
                identity=ike.identity,
                remote=ike.remote,
                inside_address=ike.inside_address,
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
            if error is not None and ex.ike.inside_address is not None:
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
        for notify in notifies(ex.request, NotifyType.REKEY_SA):
            spi_out = int.from_bytes(notify.spi, "big")
            if not any(c.spi_out == spi_out for c in ike.children.values()):
                ex.fatal = ProtocolError(NotifyType.CHILD_SA_NOT_FOUND)
                return
        # RFC 7296 1.3.1: a CHILD SA request carries TSi and TSr
        if not isinstance(tsi, TSiPayload) or not isinstance(tsr, TSrPayload):
            ex.fatal = ProtocolError(NotifyType.INVALID_SYNTAX)
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


EXCHANGE_TASKS: dict[int, tuple[Callable[[IkeResponder], Task], ...]] = {
    ExchangeType.IKE_AUTH: (AuthTask, ConfigTask, ChildCreateTask),
    ExchangeType.INFORMATIONAL: (DeleteTask, LivenessTask),
    ExchangeType.CREATE_CHILD_SA: (_ike_rekey_task, ChildRekeyTask),
}
