"""A minimal IKEv2 initiator for tests, independent of the responder's crypto.

Theory of operation: the client builds requests with the shared codec
(`control.ike.messages`) but computes everything secret on its own, straight
from RFC 7296 with `hmac`, `hashlib` and `cryptography`: prf and prf+,
SKEYSEED and the seven keys, the SK payload for both ciphers, the PSK AUTH
payloads of both sides, NAT detection hashes and the CHILD SA KEYMAT. A
responder bug in any of those shows up as a failed exchange or mismatched
keys, not as two copies of the same mistake agreeing.

Usage: `init_request()` -> responder -> `handle_init_response()`;
`auth_request()` -> responder -> `handle_auth_response()`; then
`informational()` / `open_response()` for later exchanges and
`answer_request()` for requests the responder starts.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa, x25519
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.serialization import Encoding

from control.ike.crypto import MODP_2048_P
from control.ike.messages import (
    AuthMethod,
    AuthPayload,
    CertPayload,
    CfgAttribute,
    CfgType,
    ConfigAttribute,
    CPPayload,
    DeletePayload,
    EncrId,
    EncryptedPayload,
    ExchangeType,
    Header,
    HeaderFlag,
    IDiPayload,
    IDrPayload,
    IntegId,
    KEPayload,
    Message,
    NoncePayload,
    NotifyPayload,
    NotifyType,
    Payload,
    PayloadType,
    PrfId,
    Proposal,
    ProtocolId,
    SAPayload,
    TrafficSelector,
    Transform,
    TransformType,
    TSiPayload,
    TSrPayload,
    TSType,
    pull_message,
    pull_payloads,
    push_message,
    push_payloads,
)
from control.ike.profiles import Identity

# RFC 7427 appendix A.1.2 / A.3.1: sha256WithRSAEncryption, ecdsa-with-sha256
RSA_SHA256_ALG_ID = bytes.fromhex("300d06092a864886f70d01010b0500")
ECDSA_SHA256_ALG_ID = bytes.fromhex("300a06082a8648ce3d040302")

HASHES = {
    PrfId.PRF_HMAC_SHA2_256: hashlib.sha256,
    PrfId.PRF_HMAC_SHA2_384: hashlib.sha384,
    PrfId.PRF_HMAC_SHA2_512: hashlib.sha512,
}


DER = Encoding.DER


class ServerRefused(Exception):
    """The responder answered with an error notify."""

    def __init__(self, notify: int, data: bytes) -> None:
        super().__init__(f"notify {notify}")
        self.notify = notify
        self.data = data


@dataclass
class ChildResult:
    spi_i: int  # our inbound SPI (the responder sends with it)
    spi_r: int  # the responder's inbound SPI
    key_ir: bytes = field(repr=False)
    salt_ir: bytes = field(repr=False)
    key_ri: bytes = field(repr=False)
    salt_ri: bytes = field(repr=False)
    tsi: list[TrafficSelector]
    tsr: list[TrafficSelector]


@dataclass
class AuthResult:
    idr: tuple[int, bytes]
    inside_address: ipaddress.IPv4Address | None
    dns: list[str]
    child: ChildResult | None
    notifies: list[int]


def network_ts(text: str, protocol: int = 0) -> TrafficSelector:
    net = ipaddress.ip_network(text)
    kind = TSType.TS_IPV4_ADDR_RANGE if net.version == 4 else TSType.TS_IPV6_ADDR_RANGE
    return TrafficSelector(
        kind,
        protocol,
        0,
        65535,
        net.network_address.packed,
        net.broadcast_address.packed,
    )


class IkeClient:
    """One IKE SA as seen from the initiator."""

    def __init__(
        self,
        identity: str = "client@example.net",
        psk: bytes = b"correct horse battery staple",
        remote_id: str | None = "vpn.example.net",
        dh_group: int = 19,
        encr: int = EncrId.ENCR_AES_GCM_16,
        key_length: int = 256,
        prf: int = PrfId.PRF_HMAC_SHA2_256,
        offered_groups: list[int] | None = None,
        esp_key_lengths: tuple[int, ...] = (256,),
        address: tuple[str, int] = ("198.18.0.2", 500),
        server: tuple[str, int] = ("198.18.0.1", 500),
        tsi: list[str] | None = None,
        tsr: list[str] | None = None,
        request_config: bool = True,
        fake_nat: bool = False,
        signer: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | None = None,
        certs: list[x509.Certificate] | None = None,
    ) -> None:
        self.identity = Identity.from_string(identity)
        # with a signer: CERT payloads and an RFC 7427 SHA-256 signature
        self.signer = signer
        self.certs = certs or []
        self.psk = psk
        self.remote_id = Identity.from_string(remote_id) if remote_id else None
        self.dh_group = dh_group
        self.offered_groups = offered_groups or [dh_group]
        self.encr = encr
        self.key_length = key_length
        self.integ = (
            IntegId.NONE
            if encr == EncrId.ENCR_AES_GCM_16
            else IntegId.AUTH_HMAC_SHA2_256_128
        )
        self.prf_id = prf
        self.hash = HASHES[PrfId(prf)]
        self.esp_key_lengths = esp_key_lengths
        self.address = address
        self.server = server
        self.tsi = [network_ts(t) for t in (tsi or ["0.0.0.0/0"])]
        self.tsr = [network_ts(t) for t in (tsr or ["0.0.0.0/0"])]
        self.request_config = request_config
        self.fake_nat = fake_nat
        self.spi_i = os.urandom(8)
        self.spi_r = bytes(8)
        self.nonce_i = os.urandom(32)
        self.esp_spi = int.from_bytes(os.urandom(4), "big") | 0x1000
        self.next_mid = 0
        self._new_key()

    # -- primitives, straight from RFC 7296 ----------------------------------

    def prf(self, key: bytes, data: bytes) -> bytes:
        return hmac.new(key, data, self.hash).digest()

    def prf_plus(self, key: bytes, seed: bytes, length: int) -> bytes:
        # RFC 7296 2.13: T1 = prf(K, S | 0x01), Tn = prf(K, Tn-1 | S | n)
        out = b""
        t = b""
        n = 1
        while len(out) < length:
            t = self.prf(key, t + seed + bytes([n]))
            out += t
            n += 1
        return out[:length]

    def _new_key(self) -> None:
        group = self.dh_group
        if group == 31:
            self._x25519 = x25519.X25519PrivateKey.generate()
            self.public = self._x25519.public_key().public_bytes_raw()
        elif group in (19, 20):
            curve: ec.EllipticCurve = ec.SECP256R1() if group == 19 else ec.SECP384R1()
            self._ec = ec.generate_private_key(curve)
            size = 32 if group == 19 else 48
            nums = self._ec.public_key().public_numbers()
            self.public = nums.x.to_bytes(size, "big") + nums.y.to_bytes(size, "big")
        elif group == 14:
            self._x = int.from_bytes(os.urandom(40), "big")
            self.public = pow(2, self._x, MODP_2048_P).to_bytes(256, "big")
        else:
            # an unsupported group: any bytes, the responder must refuse
            self.public = os.urandom(64)

    def _shared(self, peer: bytes) -> bytes:
        if self.dh_group == 31:
            return self._x25519.exchange(x25519.X25519PublicKey.from_public_bytes(peer))
        if self.dh_group in (19, 20):
            curve = self._ec.curve
            point = ec.EllipticCurvePublicKey.from_encoded_point(curve, b"\x04" + peer)
            return self._ec.exchange(ec.ECDH(), point)
        y = int.from_bytes(peer, "big")
        return pow(y, self._x, MODP_2048_P).to_bytes(256, "big")

    def nat_hash(self, spi_r: bytes, address: tuple[str, int]) -> bytes:
        ip = ipaddress.ip_address(address[0]).packed
        return hashlib.sha1(
            self.spi_i + spi_r + ip + address[1].to_bytes(2, "big")
        ).digest()

    # -- IKE_SA_INIT ------------------------------------------------------------

    def ike_proposal(self) -> Proposal:
        transforms = [
            Transform.make(TransformType.ENCR, self.encr, self.key_length),
            Transform.make(TransformType.PRF, self.prf_id),
        ]
        if self.integ != IntegId.NONE:
            transforms.append(Transform.make(TransformType.INTEG, self.integ))
        transforms += [Transform.make(TransformType.DH, g) for g in self.offered_groups]
        return Proposal(1, ProtocolId.IKE, b"", transforms)

    def init_request(self) -> bytes:
        """Build the IKE_SA_INIT request (again, after INVALID_KE_PAYLOAD)."""
        source = self.address
        if self.fake_nat:
            # what strongSwan 5.9.8 does with kernel-libipsec: a bogus source
            source = ("203.0.113.77", 1)
        payloads: list[Payload] = [
            SAPayload([self.ike_proposal()]),
            KEPayload(self.dh_group, self.public),
            NoncePayload(self.nonce_i),
            NotifyPayload(
                0,
                NotifyType.NAT_DETECTION_SOURCE_IP,
                b"",
                self.nat_hash(bytes(8), source),
            ),
            NotifyPayload(
                0,
                NotifyType.NAT_DETECTION_DESTINATION_IP,
                b"",
                self.nat_hash(bytes(8), self.server),
            ),
            NotifyPayload(0, NotifyType.IKEV2_FRAGMENTATION_SUPPORTED),
            NotifyPayload(0, NotifyType.SIGNATURE_HASH_ALGORITHMS, b"", b"\x00\x02"),
            NotifyPayload(0, NotifyType.REDIRECT_SUPPORTED),
        ]
        header = Header(
            self.spi_i,
            bytes(8),
            0,
            0x20,
            ExchangeType.IKE_SA_INIT,
            HeaderFlag.INITIATOR,
            0,
        )
        self.init_req = push_message(Message(header, payloads))
        return self.init_req

    def retry_with_group(self, group: int) -> None:
        """Switch the KE to `group` after INVALID_KE_PAYLOAD."""
        self.dh_group = group
        if group not in self.offered_groups:
            self.offered_groups.append(group)
        self._new_key()

    def handle_init_response(self, data: bytes) -> None:
        """Derive the IKE SA keys from the IKE_SA_INIT response."""
        message = pull_message(data)
        for p in message.payloads:
            if isinstance(p, NotifyPayload) and p.is_error:
                raise ServerRefused(p.notify_type, p.data)
        self.init_resp = data
        self.spi_r = message.header.spi_r
        ke = next(p for p in message.payloads if isinstance(p, KEPayload))
        nonce = next(p for p in message.payloads if isinstance(p, NoncePayload))
        sa = next(p for p in message.payloads if isinstance(p, SAPayload))
        assert len(sa.proposals) == 1 and ke.group == self.dh_group
        self.chosen_ike = sa.proposals[0]
        self.nonce_r = nonce.data
        self.nat_notifies = {
            p.notify_type: p.data
            for p in message.payloads
            if isinstance(p, NotifyPayload)
        }
        shared = self._shared(ke.data)

        # RFC 7296 2.14
        skeyseed = self.prf(self.nonce_i + self.nonce_r, shared)
        self._set_keys(skeyseed, self.nonce_i, self.nonce_r)
        self.next_mid = 1

    def _set_keys(self, skeyseed: bytes, nonce_i: bytes, nonce_r: bytes) -> None:
        n = self.hash().digest_size
        gcm = self.encr == EncrId.ENCR_AES_GCM_16
        e = self.key_length // 8 + (4 if gcm else 0)
        a = 0 if gcm else 32
        stream = self.prf_plus(
            skeyseed,
            nonce_i + nonce_r + self.spi_i + self.spi_r,
            3 * n + 2 * a + 2 * e,
        )
        sizes = [n, a, a, e, e, n, n]
        keys = []
        for size in sizes:
            keys.append(stream[:size])
            stream = stream[size:]
        (
            self.sk_d,
            self.sk_ai,
            self.sk_ar,
            self.sk_ei,
            self.sk_er,
            self.sk_pi,
            self.sk_pr,
        ) = keys

    # -- SK payloads ------------------------------------------------------------

    def seal(
        self, exchange: int, mid: int, payloads: list[Payload], flags: int
    ) -> bytes:
        first, plain = push_payloads(payloads)
        gcm = self.encr == EncrId.ENCR_AES_GCM_16
        if gcm:
            padded = plain + b"\x00"
            iv = os.urandom(8)
            sk_len = 4 + 8 + len(padded) + 16
        else:
            pad = (-(len(plain) + 1)) % 16
            padded = plain + bytes(pad) + bytes([pad])
            iv = os.urandom(16)
            sk_len = 4 + 16 + len(padded) + 16
        header = Header(
            self.spi_i,
            self.spi_r,
            PayloadType.SK,
            0x20,
            exchange,
            flags,
            mid,
            28 + sk_len,
        )
        prefix = (
            self._header_bytes(header) + bytes([first, 0]) + sk_len.to_bytes(2, "big")
        )
        if gcm:
            aead = AESGCM(self.sk_ei[:-4])
            return prefix + iv + aead.encrypt(self.sk_ei[-4:] + iv, padded, prefix)
        enc = Cipher(algorithms.AES(self.sk_ei), modes.CBC(iv)).encryptor()
        body = prefix + iv + enc.update(padded) + enc.finalize()
        return body + hmac.new(self.sk_ai, body, hashlib.sha256).digest()[:16]

    @staticmethod
    def _header_bytes(h: Header) -> bytes:
        return (
            h.spi_i
            + h.spi_r
            + bytes([h.next_payload, h.version, h.exchange, h.flags])
            + h.message_id.to_bytes(4, "big")
            + h.length.to_bytes(4, "big")
        )

    def open(self, data: bytes) -> tuple[Header, list[Payload]]:
        """Verify and decrypt a message from the responder."""
        message = pull_message(data)
        sk = message.payloads[-1]
        assert isinstance(sk, EncryptedPayload)
        offset = len(data) - len(sk.data)
        if self.encr == EncrId.ENCR_AES_GCM_16:
            iv = data[offset : offset + 8]
            aead = AESGCM(self.sk_er[:-4])
            padded = aead.decrypt(
                self.sk_er[-4:] + iv, data[offset + 8 :], data[:offset]
            )
        else:
            icv = hmac.new(self.sk_ar, data[:-16], hashlib.sha256).digest()[:16]
            if not hmac.compare_digest(icv, data[-16:]):
                raise ValueError("icv mismatch")
            iv = data[offset : offset + 16]
            dec = Cipher(algorithms.AES(self.sk_er), modes.CBC(iv)).decryptor()
            padded = dec.update(data[offset + 16 : -16]) + dec.finalize()
        plain = padded[: -(padded[-1] + 1)]
        return message.header, pull_payloads(plain, sk.first_payload)

    # -- IKE_AUTH -----------------------------------------------------------------

    def esp_proposal(self) -> Proposal:
        transforms = [
            Transform.make(TransformType.ENCR, EncrId.ENCR_AES_GCM_16, k)
            for k in self.esp_key_lengths
        ]
        transforms.append(Transform.make(TransformType.ESN, 0))
        return Proposal(1, ProtocolId.ESP, self.esp_spi.to_bytes(4, "big"), transforms)

    def _auth(
        self, real_message: bytes, nonce: bytes, sk_p: bytes, id_body: bytes
    ) -> bytes:
        # RFC 7296 2.15: prf(prf(PSK, "Key Pad for IKEv2"), octets)
        octets = real_message + nonce + self.prf(sk_p, id_body)
        return self.prf(self.prf(self.psk, b"Key Pad for IKEv2"), octets)

    def _signature(self, id_body: bytes) -> AuthPayload:
        # RFC 7427 3: length | AlgorithmIdentifier | signature over the octets
        octets = self.init_req + self.nonce_r + self.prf(self.sk_pi, id_body)
        if isinstance(self.signer, rsa.RSAPrivateKey):
            alg = RSA_SHA256_ALG_ID
            sig = self.signer.sign(octets, padding.PKCS1v15(), hashes.SHA256())
        else:
            assert self.signer is not None
            alg = ECDSA_SHA256_ALG_ID
            sig = self.signer.sign(octets, ec.ECDSA(hashes.SHA256()))
        data = bytes([len(alg)]) + alg + sig
        return AuthPayload(AuthMethod.DIGITAL_SIGNATURE, data)

    def auth_request(self, extra: list[Payload] | None = None) -> bytes:
        """Build the IKE_AUTH request the way strongSwan lays it out."""
        idi = IDiPayload(self.identity.type, self.identity.data)
        payloads: list[Payload] = [
            idi,
            NotifyPayload(0, NotifyType.INITIAL_CONTACT),
        ]
        if self.remote_id is not None:
            payloads.append(IDrPayload(self.remote_id.type, self.remote_id.data))
        if self.signer is None:
            auth = self._auth(self.init_req, self.nonce_r, self.sk_pi, idi.push_body())
            payloads.append(AuthPayload(AuthMethod.SHARED_KEY_MIC, auth))
        else:
            payloads += [CertPayload(4, c.public_bytes(DER)) for c in self.certs]
            payloads.append(self._signature(idi.push_body()))
        if self.request_config:
            payloads.append(
                CPPayload(
                    CfgType.CFG_REQUEST,
                    [
                        ConfigAttribute(CfgAttribute.INTERNAL_IP4_ADDRESS),
                        ConfigAttribute(CfgAttribute.INTERNAL_IP4_DNS),
                    ],
                )
            )
        payloads += [
            SAPayload([self.esp_proposal()]),
            TSiPayload(self.tsi),
            TSrPayload(self.tsr),
            NotifyPayload(0, NotifyType.MOBIKE_SUPPORTED),
            NotifyPayload(0, NotifyType.NO_ADDITIONAL_ADDRESSES),
            NotifyPayload(0, NotifyType.MULTIPLE_AUTH_SUPPORTED),
            NotifyPayload(0, NotifyType.EAP_ONLY_AUTHENTICATION),
        ]
        payloads += extra or []
        self.auth_req = self.seal(
            ExchangeType.IKE_AUTH, 1, payloads, HeaderFlag.INITIATOR
        )
        self.next_mid = 2
        return self.auth_req

    def handle_auth_response(self, data: bytes) -> AuthResult:
        """Check the responder's AUTH and derive the CHILD SA keys."""
        header, payloads = self.open(data)
        assert header.is_response and header.message_id == 1
        errors = [p for p in payloads if isinstance(p, NotifyPayload) and p.is_error]
        if errors and not any(isinstance(p, AuthPayload) for p in payloads):
            raise ServerRefused(errors[0].notify_type, errors[0].data)
        idr = next(p for p in payloads if isinstance(p, IDrPayload))
        auth = next(p for p in payloads if isinstance(p, AuthPayload))
        expected = self._auth(self.init_resp, self.nonce_i, self.sk_pr, idr.push_body())
        if auth.method != AuthMethod.SHARED_KEY_MIC or not hmac.compare_digest(
            expected, auth.data
        ):
            raise ValueError("responder AUTH does not verify")
        inside = None
        dns = []
        for cp in (p for p in payloads if isinstance(p, CPPayload)):
            assert cp.cfg_type == CfgType.CFG_REPLY
            for attr in cp.attributes:
                if attr.type == CfgAttribute.INTERNAL_IP4_ADDRESS:
                    inside = ipaddress.IPv4Address(attr.value)
                elif attr.type == CfgAttribute.INTERNAL_IP4_DNS:
                    dns.append(str(ipaddress.IPv4Address(attr.value)))
        child = None
        sa = next((p for p in payloads if isinstance(p, SAPayload)), None)
        if sa is not None:
            child = self._child(sa, payloads, self.nonce_i + self.nonce_r)
        return AuthResult(
            (idr.id_type, idr.data),
            inside,
            dns,
            child,
            [p.notify_type for p in payloads if isinstance(p, NotifyPayload)],
        )

    def _child(
        self, sa: SAPayload, payloads: list[Payload], seed: bytes
    ) -> ChildResult:
        assert len(sa.proposals) == 1
        proposal = sa.proposals[0]
        assert proposal.protocol == ProtocolId.ESP and len(proposal.spi) == 4
        encr = proposal.of_type(TransformType.ENCR)
        assert len(encr) == 1 and encr[0].id == EncrId.ENCR_AES_GCM_16
        key_length = encr[0].key_length
        assert key_length in self.esp_key_lengths
        esn = proposal.of_type(TransformType.ESN)
        assert [t.id for t in esn] == [0]
        # RFC 7296 2.17: KEYMAT = prf+(SK_d, Ni | Nr); i->r first; GCM adds salt
        k = key_length // 8
        keymat = self.prf_plus(self.sk_d, seed, 2 * (k + 4))
        tsi = next(p for p in payloads if isinstance(p, TSiPayload))
        tsr = next(p for p in payloads if isinstance(p, TSrPayload))
        return ChildResult(
            spi_i=self.esp_spi,
            spi_r=int.from_bytes(proposal.spi, "big"),
            key_ir=keymat[:k],
            salt_ir=keymat[k : k + 4],
            key_ri=keymat[k + 4 : 2 * k + 4],
            salt_ri=keymat[2 * k + 4 :],
            tsi=tsi.selectors,
            tsr=tsr.selectors,
        )

    # -- later exchanges ------------------------------------------------------------

    def informational(self, payloads: list[Payload]) -> bytes:
        """Build an INFORMATIONAL request with the next message ID."""
        mid = self.next_mid
        self.next_mid += 1
        return self.seal(
            ExchangeType.INFORMATIONAL, mid, payloads, HeaderFlag.INITIATOR
        )

    def delete_ike(self) -> bytes:
        return self.informational([DeletePayload(ProtocolId.IKE, 0, [])])

    def delete_child(self, spi_value: int | None = None) -> bytes:
        spi = (spi_value or self.esp_spi).to_bytes(4, "big")
        return self.informational([DeletePayload(ProtocolId.ESP, 4, [spi])])

    def create_child(
        self,
        rekey: bool = False,
        pfs_group: int | None = None,
        ike: bool = False,
        extra_groups: tuple[int, ...] = (),
    ) -> bytes:
        """Build a CREATE_CHILD_SA request for a new or rekeyed CHILD SA."""
        payloads: list[Payload] = []
        if rekey:
            old = self.esp_spi.to_bytes(4, "big")
            payloads.append(NotifyPayload(ProtocolId.ESP, NotifyType.REKEY_SA, old))
        self.old_esp_spi = self.esp_spi
        self.esp_spi = int.from_bytes(os.urandom(4), "big") | 0x1000
        proposal = self.esp_proposal()
        if ike:
            proposal = self.ike_proposal()
            proposal.spi = os.urandom(8)
        elif pfs_group is not None:
            for group in (pfs_group, *extra_groups):
                dh = Transform.make(TransformType.DH, group)
                proposal.transforms.insert(-1, dh)
        self.child_nonce = os.urandom(32)
        payloads += [SAPayload([proposal]), NoncePayload(self.child_nonce)]
        self.child_pfs = pfs_group
        if pfs_group is not None:
            self.dh_group = pfs_group
            self._new_key()
            payloads.append(KEPayload(pfs_group, self.public))
        payloads += [TSiPayload(self.tsi), TSrPayload(self.tsr)]
        mid = self.next_mid
        self.next_mid += 1
        return self.seal(
            ExchangeType.CREATE_CHILD_SA, mid, payloads, HeaderFlag.INITIATOR
        )

    def rekey_ike(self) -> bytes:
        """Build HDR, SK {SA(IKE, new SPIi), Ni, KEi} on the current IKE SA."""
        proposal = self.ike_proposal()
        self.new_spi_i = os.urandom(8)
        proposal.spi = self.new_spi_i
        self.rekey_nonce = os.urandom(32)
        self._new_key()
        payloads: list[Payload] = [
            SAPayload([proposal]),
            NoncePayload(self.rekey_nonce),
            KEPayload(self.dh_group, self.public),
        ]
        mid = self.next_mid
        self.next_mid += 1
        return self.seal(
            ExchangeType.CREATE_CHILD_SA, mid, payloads, HeaderFlag.INITIATOR
        )

    def handle_ike_rekey_response(self, data: bytes) -> None:
        """Switch to the new IKE SA: SKEYSEED = prf(SK_d, g^ir | Ni | Nr) (2.18)."""
        payloads = self.open_response(data)
        errors = [p for p in payloads if isinstance(p, NotifyPayload) and p.is_error]
        if errors:
            raise ServerRefused(errors[0].notify_type, errors[0].data)
        sa = next(p for p in payloads if isinstance(p, SAPayload))
        nonce = next(p for p in payloads if isinstance(p, NoncePayload))
        ke = next(p for p in payloads if isinstance(p, KEPayload))
        assert sa.proposals[0].protocol == ProtocolId.IKE
        assert len(sa.proposals[0].spi) == 8
        skeyseed = self.prf(self.sk_d, self._shared(ke.data) + self.rekey_nonce
                            + nonce.data)  # fmt: skip
        self.old_spis = (self.spi_i, self.spi_r)
        self.spi_i, self.spi_r = self.new_spi_i, sa.proposals[0].spi
        self._set_keys(skeyseed, self.rekey_nonce, nonce.data)
        self.next_mid = 0

    def handle_create_child_response(self, data: bytes) -> ChildResult:
        """Derive the new CHILD SA's keys: prf+(SK_d, [g^ir new |] Ni | Nr)."""
        payloads = self.open_response(data)
        errors = [p for p in payloads if isinstance(p, NotifyPayload) and p.is_error]
        if errors:
            raise ServerRefused(errors[0].notify_type, errors[0].data)
        nonce = next(p for p in payloads if isinstance(p, NoncePayload))
        shared = b""
        if self.child_pfs is not None:
            ke = next(p for p in payloads if isinstance(p, KEPayload))
            assert ke.group == self.child_pfs
            shared = self._shared(ke.data)
        sa = next(p for p in payloads if isinstance(p, SAPayload))
        dh = [t.id for t in sa.proposals[0].of_type(TransformType.DH)]
        assert dh == ([self.child_pfs] if self.child_pfs is not None else [])
        return self._child(sa, payloads, shared + self.child_nonce + nonce.data)

    def open_response(self, data: bytes) -> list[Payload]:
        header, payloads = self.open(data)
        assert header.is_response and not header.is_initiator
        return payloads

    def answer_request(self, data: bytes) -> tuple[list[Payload], bytes]:
        """Answer a request from the responder (deletes) as RFC 7296 1.4.1 says."""
        header, payloads = self.open(data)
        assert not header.is_response and not header.is_initiator
        reply: list[Payload] = []
        for p in payloads:
            if isinstance(p, DeletePayload) and p.protocol == ProtocolId.ESP:
                reply.append(
                    DeletePayload(ProtocolId.ESP, 4, [self.esp_spi.to_bytes(4, "big")])
                )
        flags = HeaderFlag.INITIATOR | HeaderFlag.RESPONSE
        return payloads, self.seal(header.exchange, header.message_id, reply, flags)
