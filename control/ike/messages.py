"""IKEv2 message codec (RFC 7296 section 3), sans-I/O.

Theory of operation: a datagram is a fixed 28-byte header followed by a chain
of payloads, each opening with a 4-byte generic header that names the *next*
payload's type. `pull_message` parses the header and walks the chain into a
list of dataclasses (fields in wire order); `push_message` does the reverse and
fills in every length. The Encrypted payload (SK) is always last: its generic
header names the first *inner* payload, and its body (IV, ciphertext, ICV) is
kept opaque here; `control.ike.crypto` opens it and hands the plaintext back to
`pull_payloads` with that first inner type. The Encrypted Fragment payload
(SKF, RFC 7383) is parsed the same way, with its fragment number and total.

Every structure checks its own lengths. Anything malformed raises
`DecodeError` (a `ValueError`) and nothing else; an unknown payload is skipped
unless its critical bit is set, which raises `DecodeError` carrying
UNSUPPORTED_CRITICAL_PAYLOAD. `ProtocolError` is the second error family: a
well-formed message the responder must refuse with a given notify type.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import IntEnum, IntFlag
from typing import ClassVar

HEADER_LENGTH = 28
IKE_VERSION = 0x20


class ExchangeType(IntEnum):
    IKE_SA_INIT = 34
    IKE_AUTH = 35
    CREATE_CHILD_SA = 36
    INFORMATIONAL = 37


class HeaderFlag(IntFlag):
    INITIATOR = 0x08
    VERSION = 0x10
    RESPONSE = 0x20


class PayloadType(IntEnum):
    NONE = 0
    SA = 33
    KE = 34
    IDI = 35
    IDR = 36
    CERT = 37
    CERTREQ = 38
    AUTH = 39
    NONCE = 40
    NOTIFY = 41
    DELETE = 42
    VENDOR_ID = 43
    TSI = 44
    TSR = 45
    SK = 46
    CP = 47
    EAP = 48
    SKF = 53


class ProtocolId(IntEnum):
    NONE = 0
    IKE = 1
    AH = 2
    ESP = 3


class TransformType(IntEnum):
    ENCR = 1
    PRF = 2
    INTEG = 3
    DH = 4
    ESN = 5


class EncrId(IntEnum):
    ENCR_AES_CBC = 12
    ENCR_AES_GCM_8 = 18
    ENCR_AES_GCM_12 = 19
    ENCR_AES_GCM_16 = 20


class PrfId(IntEnum):
    PRF_HMAC_SHA1 = 2
    PRF_HMAC_SHA2_256 = 5
    PRF_HMAC_SHA2_384 = 6
    PRF_HMAC_SHA2_512 = 7


class IntegId(IntEnum):
    NONE = 0
    AUTH_HMAC_SHA1_96 = 2
    AUTH_HMAC_SHA2_256_128 = 12
    AUTH_HMAC_SHA2_384_192 = 13
    AUTH_HMAC_SHA2_512_256 = 14


class DhGroup(IntEnum):
    NONE = 0
    MODP_1024 = 2
    MODP_2048 = 14
    ECP_256 = 19
    ECP_384 = 20
    CURVE25519 = 31


class EsnId(IntEnum):
    NO_ESN = 0
    ESN = 1


class AttributeType(IntEnum):
    KEY_LENGTH = 14


class IDType(IntEnum):
    ID_IPV4_ADDR = 1
    ID_FQDN = 2
    ID_RFC822_ADDR = 3
    ID_IPV6_ADDR = 5
    ID_DER_ASN1_DN = 9
    ID_DER_ASN1_GN = 10
    ID_KEY_ID = 11


class AuthMethod(IntEnum):
    RSA_SIGNATURE = 1
    SHARED_KEY_MIC = 2
    DSS_SIGNATURE = 3
    DIGITAL_SIGNATURE = 14


class CfgType(IntEnum):
    CFG_REQUEST = 1
    CFG_REPLY = 2
    CFG_SET = 3
    CFG_ACK = 4


class CfgAttribute(IntEnum):
    INTERNAL_IP4_ADDRESS = 1
    INTERNAL_IP4_NETMASK = 2
    INTERNAL_IP4_DNS = 3
    INTERNAL_IP4_NBNS = 4
    INTERNAL_IP4_DHCP = 6
    APPLICATION_VERSION = 7
    INTERNAL_IP6_ADDRESS = 8
    INTERNAL_IP6_DNS = 10
    INTERNAL_IP4_SUBNET = 13
    SUPPORTED_ATTRIBUTES = 14
    INTERNAL_IP6_SUBNET = 15
    # Cisco private range (28672..), as the Unity client and strongSwan's unity
    # plugin number them
    UNITY_BANNER = 28672
    UNITY_DEF_DOMAIN = 28674
    UNITY_SPLITDNS_NAME = 28675
    UNITY_SPLIT_INCLUDE = 28676
    UNITY_LOCAL_LAN = 28678
    UNITY_PFS = 28679
    UNITY_BACKUP_SERVERS = 28681
    # FIXME: the next three are not in any public table we found; the values
    # follow the Unity block and are unverified against a Cisco client (a
    # profile's cisco_attributes overrides them: CISCO_PRIVATE_DEFAULTS).
    CISCO_SMARTCARD_REMOVAL_DISCONNECT = 28683
    CISCO_CONFIGURATION_URL = 28684
    CISCO_CONFIGURATION_VERSION = 28685


# the Cisco private attributes whose numbers a profile may override, by the
# names of the policy fields they carry
CISCO_PRIVATE_DEFAULTS: dict[str, int] = {
    "smartcard_removal_disconnect": CfgAttribute.CISCO_SMARTCARD_REMOVAL_DISCONNECT,
    "configuration_url": CfgAttribute.CISCO_CONFIGURATION_URL,
    "configuration_version": CfgAttribute.CISCO_CONFIGURATION_VERSION,
}
# RFC 7296 3.15.1: configuration attribute types reserved for private use
PRIVATE_ATTRIBUTES = (16384, 32767)


# Vendor ID payload data by which clients identify themselves: the Cisco Unity
# client (MD5 of "CISCO-UNITY" with version bytes 1.0) and Cisco's FlexVPN
# (the ASCII string strongSwan also sends with charon.cisco_flexvpn)
VID_CISCO_UNITY = bytes.fromhex("12f5f28c457168a9702d9fe274cc0100")
VID_CISCO_FLEXVPN = b"FLEXVPN-SUPPORTED"


class TSType(IntEnum):
    TS_IPV4_ADDR_RANGE = 7
    TS_IPV6_ADDR_RANGE = 8


class NotifyType(IntEnum):
    # errors (RFC 7296 3.10.1)
    UNSUPPORTED_CRITICAL_PAYLOAD = 1
    INVALID_IKE_SPI = 4
    INVALID_MAJOR_VERSION = 5
    INVALID_SYNTAX = 7
    INVALID_MESSAGE_ID = 9
    INVALID_SPI = 11
    NO_PROPOSAL_CHOSEN = 14
    INVALID_KE_PAYLOAD = 17
    AUTHENTICATION_FAILED = 24
    SINGLE_PAIR_REQUIRED = 34
    NO_ADDITIONAL_SAS = 35
    INTERNAL_ADDRESS_FAILURE = 36
    FAILED_CP_REQUIRED = 37
    TS_UNACCEPTABLE = 38
    INVALID_SELECTORS = 39
    TEMPORARY_FAILURE = 43
    CHILD_SA_NOT_FOUND = 44
    # status types
    INITIAL_CONTACT = 16384
    SET_WINDOW_SIZE = 16385
    ADDITIONAL_TS_POSSIBLE = 16386
    IPCOMP_SUPPORTED = 16387
    NAT_DETECTION_SOURCE_IP = 16388
    NAT_DETECTION_DESTINATION_IP = 16389
    COOKIE = 16390
    USE_TRANSPORT_MODE = 16391
    HTTP_CERT_LOOKUP_SUPPORTED = 16392
    REKEY_SA = 16393
    ESP_TFC_PADDING_NOT_SUPPORTED = 16394
    NON_FIRST_FRAGMENTS_ALSO = 16395
    MOBIKE_SUPPORTED = 16396
    NO_ADDITIONAL_ADDRESSES = 16399
    MULTIPLE_AUTH_SUPPORTED = 16404
    REDIRECT_SUPPORTED = 16406
    EAP_ONLY_AUTHENTICATION = 16417
    IKEV2_MESSAGE_ID_SYNC_SUPPORTED = 16420
    IKEV2_FRAGMENTATION_SUPPORTED = 16430
    SIGNATURE_HASH_ALGORITHMS = 16431


# RFC 7296 3.10.1: types below 16384 are errors, the rest status.
NOTIFY_ERROR_MAX = 16383


def notify_name(value: int) -> str:
    """Name a notify type for counters and logs, also when we do not know it."""
    try:
        return NotifyType(value).name
    except ValueError:
        return f"NOTIFY_{value}"


class DecodeError(ValueError):
    """A malformed message; `notify` is the error type a peer would get."""

    def __init__(
        self,
        message: str,
        notify: int = NotifyType.INVALID_SYNTAX,
        data: bytes = b"",
    ) -> None:
        super().__init__(message)
        self.notify = notify
        self.data = data


class ProtocolError(Exception):
    """A well-formed message refused with the IKEv2 notify `notify`."""

    def __init__(self, notify: int, message: str = "", data: bytes = b"") -> None:
        super().__init__(message or f"refused with notify {notify}")
        self.notify = notify
        self.data = data


class Buffer:
    """A read cursor over bytes whose every read checks the remaining length."""

    def __init__(self, data: bytes) -> None:
        self._data = data
        self._pos = 0

    def eof(self) -> bool:
        return self._pos >= len(self._data)

    def remaining(self) -> int:
        return len(self._data) - self._pos

    def pull_bytes(self, n: int) -> bytes:
        if n < 0 or self._pos + n > len(self._data):
            raise DecodeError(f"truncated: need {n} bytes, have {self.remaining()}")
        out = self._data[self._pos : self._pos + n]
        self._pos += n
        return out

    def pull_uint8(self) -> int:
        return self.pull_bytes(1)[0]

    def pull_uint16(self) -> int:
        return int(struct.unpack("!H", self.pull_bytes(2))[0])

    def pull_uint32(self) -> int:
        return int(struct.unpack("!I", self.pull_bytes(4))[0])


# -- header -----------------------------------------------------------------
#
#  0                   1                   2                   3
#  0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1
# +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
# |                       IKE SA Initiator's SPI                  |
# |                                                               |
# +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
# |                       IKE SA Responder's SPI                  |
# |                                                               |
# +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
# |  Next Payload | MjVer | MnVer | Exchange Type |     Flags     |
# +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
# |                          Message ID                           |
# +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
# |                            Length                             |
# +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+


@dataclass
class Header:
    spi_i: bytes
    spi_r: bytes
    next_payload: int
    version: int
    exchange: int
    flags: int
    message_id: int
    length: int = 0

    @property
    def is_response(self) -> bool:
        return bool(self.flags & HeaderFlag.RESPONSE)

    @property
    def is_initiator(self) -> bool:
        return bool(self.flags & HeaderFlag.INITIATOR)


def pull_header(buf: Buffer) -> Header:
    spi_i = buf.pull_bytes(8)
    spi_r = buf.pull_bytes(8)
    next_payload = buf.pull_uint8()
    version = buf.pull_uint8()
    exchange = buf.pull_uint8()
    flags = buf.pull_uint8()
    message_id = buf.pull_uint32()
    length = buf.pull_uint32()
    if length < HEADER_LENGTH:
        raise DecodeError(f"header length {length} below {HEADER_LENGTH}")
    return Header(
        spi_i, spi_r, next_payload, version, exchange, flags, message_id, length
    )


def push_header(header: Header) -> bytes:
    assert len(header.spi_i) == 8 and len(header.spi_r) == 8, "spis must be 8 bytes"
    return (
        header.spi_i
        + header.spi_r
        + struct.pack(
            "!BBBBII",
            header.next_payload,
            header.version,
            header.exchange,
            header.flags,
            header.message_id,
            header.length,
        )
    )


# -- generic payload header ---------------------------------------------------
#
# +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
# | Next Payload  |C|  RESERVED   |         Payload Length        |
# +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+

GENERIC_HEADER_LENGTH = 4
CRITICAL = 0x80


# -- SA payload: proposals, transforms, attributes ----------------------------
#
# Proposal substructure:
# +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
# | Last Substruc |   RESERVED    |         Proposal Length       |
# +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
# | Proposal Num  |  Protocol ID  |    SPI Size   |Num  Transforms|
# +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
# ~                        SPI (variable)                         ~
# +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
# ~                        <Transforms>                           ~
# +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
#
# Transform substructure:
# +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
# | Last Substruc |   RESERVED    |        Transform Length       |
# +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
# |Transform Type |   RESERVED    |          Transform ID         |
# +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
# ~                      Transform Attributes                     ~
# +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
#
# Attribute (AF=1: value in the second half-word; AF=0: length, value):
# +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
# |A|       Attribute Type        |    AF=0  Attribute Length     |
# |F|                             |    AF=1  Attribute Value      |
# +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
# |                   AF=0  Attribute Value                       |
# +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+

LAST_PROPOSAL = 0
MORE_PROPOSALS = 2
LAST_TRANSFORM = 0
MORE_TRANSFORMS = 3
ATTRIBUTE_TV = 0x8000


@dataclass
class TransformAttribute:
    type: int
    value: int | bytes  # int: TV format (AF=1); bytes: TLV format (AF=0)


@dataclass
class Transform:
    type: int
    id: int
    attributes: list[TransformAttribute] = field(default_factory=list)

    @property
    def key_length(self) -> int | None:
        for attr in self.attributes:
            if attr.type == AttributeType.KEY_LENGTH and isinstance(attr.value, int):
                return attr.value
        return None

    @classmethod
    def make(cls, type: int, id: int, key_length: int | None = None) -> Transform:
        attrs = []
        if key_length is not None:
            attrs.append(TransformAttribute(AttributeType.KEY_LENGTH, key_length))
        return cls(type, id, attrs)


@dataclass
class Proposal:
    number: int
    protocol: int
    spi: bytes
    transforms: list[Transform]

    def of_type(self, type: int) -> list[Transform]:
        return [t for t in self.transforms if t.type == type]


def pull_transform_attributes(buf: Buffer) -> list[TransformAttribute]:
    attrs = []
    while not buf.eof():
        word = buf.pull_uint16()
        if word & ATTRIBUTE_TV:
            attrs.append(TransformAttribute(word & 0x7FFF, buf.pull_uint16()))
        else:
            length = buf.pull_uint16()
            attrs.append(TransformAttribute(word, buf.pull_bytes(length)))
    return attrs


def push_transform_attributes(attrs: Sequence[TransformAttribute]) -> bytes:
    out = b""
    for attr in attrs:
        if isinstance(attr.value, int):
            out += struct.pack("!HH", attr.type | ATTRIBUTE_TV, attr.value)
        else:
            out += struct.pack("!HH", attr.type & 0x7FFF, len(attr.value)) + attr.value
    return out


def pull_transform(buf: Buffer) -> tuple[bool, Transform]:
    last = buf.pull_uint8()
    buf.pull_uint8()
    length = buf.pull_uint16()
    # RFC 7296 3.3.2: 3 means more transforms follow, 0 this is the last
    if last not in (LAST_TRANSFORM, MORE_TRANSFORMS):
        raise DecodeError(f"bad last-substructure value {last} in transform")
    if length < 8:
        raise DecodeError(f"transform length {length} below 8")
    body = Buffer(buf.pull_bytes(length - 4))
    ttype = body.pull_uint8()
    body.pull_uint8()
    tid = body.pull_uint16()
    attrs = pull_transform_attributes(body)
    return last == MORE_TRANSFORMS, Transform(ttype, tid, attrs)


def push_transform(transform: Transform, last: bool) -> bytes:
    attrs = push_transform_attributes(transform.attributes)
    return (
        struct.pack(
            "!BBHBBH",
            LAST_TRANSFORM if last else MORE_TRANSFORMS,
            0,
            8 + len(attrs),
            transform.type,
            0,
            transform.id,
        )
        + attrs
    )


def pull_proposal(buf: Buffer) -> tuple[bool, Proposal]:
    last = buf.pull_uint8()
    buf.pull_uint8()
    length = buf.pull_uint16()
    # RFC 7296 3.3.1: 2 means more proposals follow, 0 this is the last
    if last not in (LAST_PROPOSAL, MORE_PROPOSALS):
        raise DecodeError(f"bad last-substructure value {last} in proposal")
    if length < 8:
        raise DecodeError(f"proposal length {length} below 8")
    body = Buffer(buf.pull_bytes(length - 4))
    number = body.pull_uint8()
    protocol = body.pull_uint8()
    spi_size = body.pull_uint8()
    count = body.pull_uint8()
    spi = body.pull_bytes(spi_size)
    transforms = []
    more = True
    while more:
        if body.eof():
            raise DecodeError(f"proposal {number} ends before its last transform")
        more, transform = pull_transform(body)
        transforms.append(transform)
    if not body.eof():
        raise DecodeError(f"{body.remaining()} trailing bytes in proposal {number}")
    if len(transforms) != count:
        raise DecodeError(
            f"proposal {number} says {count} transforms, carries {len(transforms)}"
        )
    return last == MORE_PROPOSALS, Proposal(number, protocol, spi, transforms)


def push_proposal(proposal: Proposal, last: bool) -> bytes:
    body = b"".join(
        push_transform(t, i == len(proposal.transforms) - 1)
        for i, t in enumerate(proposal.transforms)
    )
    return (
        struct.pack(
            "!BBHBBBB",
            LAST_PROPOSAL if last else MORE_PROPOSALS,
            0,
            8 + len(proposal.spi) + len(body),
            proposal.number,
            proposal.protocol,
            len(proposal.spi),
            len(proposal.transforms),
        )
        + proposal.spi
        + body
    )


# -- payload bodies ------------------------------------------------------------
#
# Each payload class knows its type and how to pull/push its body (everything
# after the generic header).


class Payload:
    TYPE: ClassVar[int]

    @classmethod
    def pull_body(cls, buf: Buffer) -> Payload:
        raise NotImplementedError

    def push_body(self) -> bytes:
        raise NotImplementedError

    @property
    def payload_type(self) -> int:
        return self.TYPE


@dataclass
class SAPayload(Payload):
    TYPE: ClassVar[int] = PayloadType.SA
    proposals: list[Proposal]

    @classmethod
    def pull_body(cls, buf: Buffer) -> SAPayload:
        proposals = []
        more = True
        while more:
            if buf.eof():
                raise DecodeError("SA payload ends before its last proposal")
            more, proposal = pull_proposal(buf)
            proposals.append(proposal)
        if not buf.eof():
            raise DecodeError(f"{buf.remaining()} trailing bytes in SA payload")
        return cls(proposals)

    def push_body(self) -> bytes:
        return b"".join(
            push_proposal(p, i == len(self.proposals) - 1)
            for i, p in enumerate(self.proposals)
        )


# KE payload body:
# +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
# |   Diffie-Hellman Group Num    |           RESERVED            |
# +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
# ~                       Key Exchange Data                       ~
# +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
@dataclass
class KEPayload(Payload):
    TYPE: ClassVar[int] = PayloadType.KE
    group: int
    data: bytes

    @classmethod
    def pull_body(cls, buf: Buffer) -> KEPayload:
        group = buf.pull_uint16()
        buf.pull_uint16()
        return cls(group, buf.pull_bytes(buf.remaining()))

    def push_body(self) -> bytes:
        return struct.pack("!HH", self.group, 0) + self.data


# Nonce payload body: the nonce itself, 16..256 octets (RFC 7296 3.9).
@dataclass
class NoncePayload(Payload):
    TYPE: ClassVar[int] = PayloadType.NONCE
    data: bytes

    @classmethod
    def pull_body(cls, buf: Buffer) -> NoncePayload:
        data = buf.pull_bytes(buf.remaining())
        # RFC 7296 3.9: nonce data is between 16 and 256 octets
        if not 16 <= len(data) <= 256:
            raise DecodeError(f"nonce length {len(data)} outside 16..256")
        return cls(data)

    def push_body(self) -> bytes:
        return self.data


# Notify payload body:
# +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
# |  Protocol ID  |   SPI Size    |      Notify Message Type      |
# +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
# ~                Security Parameter Index (SPI)                 ~
# +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
# ~                       Notification Data                       ~
# +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
@dataclass
class NotifyPayload(Payload):
    TYPE: ClassVar[int] = PayloadType.NOTIFY
    protocol: int
    notify_type: int
    spi: bytes = b""
    data: bytes = b""

    @classmethod
    def pull_body(cls, buf: Buffer) -> NotifyPayload:
        protocol = buf.pull_uint8()
        spi_size = buf.pull_uint8()
        ntype = buf.pull_uint16()
        spi = buf.pull_bytes(spi_size)
        return cls(protocol, ntype, spi, buf.pull_bytes(buf.remaining()))

    def push_body(self) -> bytes:
        return (
            struct.pack("!BBH", self.protocol, len(self.spi), self.notify_type)
            + self.spi
            + self.data
        )

    @property
    def is_error(self) -> bool:
        return self.notify_type <= NOTIFY_ERROR_MAX


# Delete payload body:
# +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
# | Protocol ID   |   SPI Size    |          Num of SPIs          |
# +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
# ~               Security Parameter Index(es) (SPI)              ~
# +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
@dataclass
class DeletePayload(Payload):
    TYPE: ClassVar[int] = PayloadType.DELETE
    protocol: int
    spi_size: int
    spis: list[bytes]

    @classmethod
    def pull_body(cls, buf: Buffer) -> DeletePayload:
        protocol = buf.pull_uint8()
        spi_size = buf.pull_uint8()
        count = buf.pull_uint16()
        # RFC 7296 3.11: SPI size 0 for IKE, 4 for ESP/AH
        if protocol == ProtocolId.IKE and (spi_size != 0 or count != 0):
            raise DecodeError(f"IKE delete with spi size {spi_size}, {count} spis")
        if buf.remaining() != spi_size * count:
            raise DecodeError(
                f"delete payload has {buf.remaining()} bytes for {count} spis "
                f"of {spi_size}"
            )
        return cls(protocol, spi_size, [buf.pull_bytes(spi_size) for _ in range(count)])

    def push_body(self) -> bytes:
        assert all(len(s) == self.spi_size for s in self.spis), "spi size mismatch"
        return struct.pack("!BBH", self.protocol, self.spi_size, len(self.spis)) + (
            b"".join(self.spis)
        )


@dataclass
class VendorIDPayload(Payload):
    TYPE: ClassVar[int] = PayloadType.VENDOR_ID
    data: bytes

    @classmethod
    def pull_body(cls, buf: Buffer) -> VendorIDPayload:
        return cls(buf.pull_bytes(buf.remaining()))

    def push_body(self) -> bytes:
        return self.data


# IDi/IDr payload body:
# +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
# |   ID Type     |                 RESERVED                      |
# +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
# ~                   Identification Data                         ~
# +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
@dataclass
class _IDPayload(Payload):
    id_type: int
    data: bytes

    @classmethod
    def pull_body(cls, buf: Buffer) -> _IDPayload:
        id_type = buf.pull_uint8()
        buf.pull_bytes(3)
        data = buf.pull_bytes(buf.remaining())
        if not data:
            raise DecodeError("empty identification data")
        return cls(id_type, data)

    def push_body(self) -> bytes:
        return bytes([self.id_type, 0, 0, 0]) + self.data


@dataclass
class IDiPayload(_IDPayload):
    TYPE: ClassVar[int] = PayloadType.IDI


@dataclass
class IDrPayload(_IDPayload):
    TYPE: ClassVar[int] = PayloadType.IDR


# AUTH payload body:
# +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
# | Auth Method   |                RESERVED                       |
# +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
# ~                      Authentication Data                      ~
# +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
@dataclass
class AuthPayload(Payload):
    TYPE: ClassVar[int] = PayloadType.AUTH
    method: int
    data: bytes

    @classmethod
    def pull_body(cls, buf: Buffer) -> AuthPayload:
        method = buf.pull_uint8()
        buf.pull_bytes(3)
        return cls(method, buf.pull_bytes(buf.remaining()))

    def push_body(self) -> bytes:
        return bytes([self.method, 0, 0, 0]) + self.data


# CERT / CERTREQ payload body:
# +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
# | Cert Encoding |                                               |
# +-+-+-+-+-+-+-+-+                                               |
# ~         Certificate Data / Certification Authority            ~
# +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
@dataclass
class _CertBody(Payload):
    encoding: int
    data: bytes

    @classmethod
    def pull_body(cls, buf: Buffer) -> _CertBody:
        return cls(buf.pull_uint8(), buf.pull_bytes(buf.remaining()))

    def push_body(self) -> bytes:
        return bytes([self.encoding]) + self.data


@dataclass
class CertPayload(_CertBody):
    TYPE: ClassVar[int] = PayloadType.CERT


@dataclass
class CertReqPayload(_CertBody):
    TYPE: ClassVar[int] = PayloadType.CERTREQ


# Traffic selector payload body, then each selector:
# +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
# | Number of TSs |                 RESERVED                      |
# +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
# ~                       <Traffic Selectors>                     ~
# +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
#
# +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
# |   TS Type     |IP Protocol ID*|       Selector Length         |
# +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
# |           Start Port*         |           End Port*           |
# +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
# ~                         Starting Address*                     ~
# +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
# ~                         Ending Address*                       ~
# +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
TS_ADDRESS_SIZES: dict[int, int] = {
    TSType.TS_IPV4_ADDR_RANGE: 4,
    TSType.TS_IPV6_ADDR_RANGE: 16,
}


@dataclass
class TrafficSelector:
    ts_type: int
    ip_protocol: int
    start_port: int
    end_port: int
    start_address: bytes
    end_address: bytes


def pull_traffic_selector(buf: Buffer) -> TrafficSelector:
    ts_type = buf.pull_uint8()
    ip_protocol = buf.pull_uint8()
    length = buf.pull_uint16()
    # RFC 7296 3.13.1: the length follows from the type (16 or 40 octets)
    size = TS_ADDRESS_SIZES.get(ts_type)
    if size is None:
        raise DecodeError(f"unknown traffic selector type {ts_type}")
    if length != 8 + 2 * size:
        raise DecodeError(f"traffic selector length {length} for type {ts_type}")
    start_port = buf.pull_uint16()
    end_port = buf.pull_uint16()
    start = buf.pull_bytes(size)
    end = buf.pull_bytes(size)
    return TrafficSelector(ts_type, ip_protocol, start_port, end_port, start, end)


def push_traffic_selector(ts: TrafficSelector) -> bytes:
    assert len(ts.start_address) == len(ts.end_address), "address sizes differ"
    return (
        struct.pack(
            "!BBHHH",
            ts.ts_type,
            ts.ip_protocol,
            8 + 2 * len(ts.start_address),
            ts.start_port,
            ts.end_port,
        )
        + ts.start_address
        + ts.end_address
    )


@dataclass
class _TSPayload(Payload):
    selectors: list[TrafficSelector]

    @classmethod
    def pull_body(cls, buf: Buffer) -> _TSPayload:
        count = buf.pull_uint8()
        buf.pull_bytes(3)
        selectors = [pull_traffic_selector(buf) for _ in range(count)]
        if not buf.eof():
            raise DecodeError(f"{buf.remaining()} trailing bytes after {count} TSs")
        return cls(selectors)

    def push_body(self) -> bytes:
        return bytes([len(self.selectors), 0, 0, 0]) + b"".join(
            push_traffic_selector(ts) for ts in self.selectors
        )


@dataclass
class TSiPayload(_TSPayload):
    TYPE: ClassVar[int] = PayloadType.TSI


@dataclass
class TSrPayload(_TSPayload):
    TYPE: ClassVar[int] = PayloadType.TSR


# CP payload body, then each attribute:
# +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
# |   CFG Type    |                    RESERVED                   |
# +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
# ~                   Configuration Attributes                    ~
# +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
#
# +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
# |R|         Attribute Type      |            Length             |
# +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
# ~                             Value                             ~
# +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
@dataclass
class ConfigAttribute:
    type: int
    value: bytes = b""


@dataclass
class CPPayload(Payload):
    TYPE: ClassVar[int] = PayloadType.CP
    cfg_type: int
    attributes: list[ConfigAttribute]

    @classmethod
    def pull_body(cls, buf: Buffer) -> CPPayload:
        cfg_type = buf.pull_uint8()
        buf.pull_bytes(3)
        attrs = []
        while not buf.eof():
            atype = buf.pull_uint16() & 0x7FFF
            length = buf.pull_uint16()
            attrs.append(ConfigAttribute(atype, buf.pull_bytes(length)))
        return cls(cfg_type, attrs)

    def push_body(self) -> bytes:
        return bytes([self.cfg_type, 0, 0, 0]) + b"".join(
            struct.pack("!HH", a.type & 0x7FFF, len(a.value)) + a.value
            for a in self.attributes
        )


# EAP payload body: one EAP message, kept opaque here (RFC 7296 3.16).
@dataclass
class EAPPayload(Payload):
    TYPE: ClassVar[int] = PayloadType.EAP
    data: bytes

    @classmethod
    def pull_body(cls, buf: Buffer) -> EAPPayload:
        data = buf.pull_bytes(buf.remaining())
        # RFC 3748 4: code, identifier, 2-byte length covering the message
        if len(data) < 4 or struct.unpack("!H", data[2:4])[0] != len(data):
            raise DecodeError(f"EAP message length mismatch ({len(data)} bytes)")
        return cls(data)

    def push_body(self) -> bytes:
        return self.data


# Encrypted payload body (RFC 7296 3.14); `first_payload` is the type carried
# in its generic header, naming the first inner payload:
# +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
# |                     Initialization Vector                     |
# +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
# ~                    Encrypted IKE Payloads                     ~
# +               +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
# |               |             Padding (0-255 octets)            |
# +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+               +-+-+-+-+-+-+-+-+
# |                                               |  Pad Length   |
# +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
# ~                    Integrity Checksum Data                    ~
# +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
@dataclass
class EncryptedPayload(Payload):
    TYPE: ClassVar[int] = PayloadType.SK
    first_payload: int
    data: bytes


# Encrypted Fragment payload body (RFC 7383 2.5); `first_payload` is the
# first inner payload's type in fragment 1 and zero in the others:
# +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
# |        Fragment Number        |        Total Fragments        |
# +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
# |                     Initialization Vector                     |
# +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
# ~                Encrypted content, padding, ICV                ~
# +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
FRAGMENT_FIELDS_LENGTH = 4


@dataclass
class EncryptedFragmentPayload(Payload):
    TYPE: ClassVar[int] = PayloadType.SKF
    first_payload: int
    number: int
    total: int
    data: bytes

    @classmethod
    def pull_fragment(cls, first_payload: int, body: bytes) -> EncryptedFragmentPayload:
        buf = Buffer(body)
        number = buf.pull_uint16()
        total = buf.pull_uint16()
        # RFC 7383 2.5: numbers start at 1 and never exceed the total
        if not 1 <= number <= total:
            raise DecodeError(f"fragment number {number} of {total}")
        # RFC 7383 2.5: only the first fragment names the first inner payload
        if number != 1 and first_payload != PayloadType.NONE:
            raise DecodeError(f"fragment {number} names next payload {first_payload}")
        return cls(first_payload, number, total, buf.pull_bytes(buf.remaining()))

    def push_body(self) -> bytes:
        return struct.pack("!HH", self.number, self.total) + self.data


@dataclass
class UnknownPayload(Payload):
    payload_type_code: int
    critical: bool
    data: bytes

    @property
    def payload_type(self) -> int:
        return self.payload_type_code

    def push_body(self) -> bytes:
        return self.data


PAYLOAD_CLASSES: dict[int, type[Payload]] = {
    cls.TYPE: cls
    for cls in (
        SAPayload,
        KEPayload,
        NoncePayload,
        NotifyPayload,
        DeletePayload,
        VendorIDPayload,
        IDiPayload,
        IDrPayload,
        AuthPayload,
        CertPayload,
        CertReqPayload,
        TSiPayload,
        TSrPayload,
        CPPayload,
        EAPPayload,
    )
}


def pull_payloads(data: bytes, first: int) -> list[Payload]:
    """Parse a payload chain starting with type `first`."""
    buf = Buffer(data)
    payloads: list[Payload] = []
    ptype = first
    while ptype != PayloadType.NONE:
        next_type = buf.pull_uint8()
        flags = buf.pull_uint8()
        length = buf.pull_uint16()
        if length < GENERIC_HEADER_LENGTH:
            raise DecodeError(f"payload {ptype} length {length} below 4")
        body = buf.pull_bytes(length - GENERIC_HEADER_LENGTH)
        if ptype == PayloadType.SK:
            # RFC 7296 3.14: the Encrypted payload is the last one
            if not buf.eof():
                raise DecodeError("encrypted payload is not the last payload")
            payloads.append(EncryptedPayload(next_type, body))
            break
        if ptype == PayloadType.SKF:
            # RFC 7383 2.5: the Encrypted Fragment payload is the last one
            if not buf.eof():
                raise DecodeError("encrypted fragment is not the last payload")
            payloads.append(EncryptedFragmentPayload.pull_fragment(next_type, body))
            break
        cls = PAYLOAD_CLASSES.get(ptype)
        if cls is None:
            # RFC 7296 2.5: skip unknown payloads unless marked critical
            if flags & CRITICAL:
                raise DecodeError(
                    f"unsupported critical payload {ptype}",
                    NotifyType.UNSUPPORTED_CRITICAL_PAYLOAD,
                    bytes([ptype]),
                )
            payloads.append(UnknownPayload(ptype, False, body))
        else:
            body_buf = Buffer(body)
            payloads.append(cls.pull_body(body_buf))
            if not body_buf.eof():
                raise DecodeError(f"trailing bytes in payload {ptype}")
        ptype = next_type
    if not buf.eof():
        raise DecodeError(f"{buf.remaining()} bytes after the last payload")
    return payloads


def push_payloads(payloads: Sequence[Payload]) -> tuple[int, bytes]:
    """Serialize a chain; return the first payload's type and the bytes."""
    out = []
    for i, payload in enumerate(payloads):
        if isinstance(payload, EncryptedPayload | EncryptedFragmentPayload):
            assert i == len(payloads) - 1, "encrypted payload must be last"
            next_type = payload.first_payload
            body = payload.data
            if isinstance(payload, EncryptedFragmentPayload):
                body = payload.push_body()
        else:
            next_type = payloads[i + 1].payload_type if i + 1 < len(payloads) else 0
            body = payload.push_body()
        critical = isinstance(payload, UnknownPayload) and payload.critical
        flags = CRITICAL if critical else 0
        out.append(struct.pack("!BBH", next_type, flags, 4 + len(body)) + body)
    first = payloads[0].payload_type if payloads else PayloadType.NONE
    return first, b"".join(out)


@dataclass
class Message:
    header: Header
    payloads: list[Payload]

    def find(self, cls: type[Payload]) -> list[Payload]:
        return [p for p in self.payloads if isinstance(p, cls)]


def pull_message(data: bytes) -> Message:
    """Parse a whole datagram (without any non-ESP marker) into a `Message`."""
    buf = Buffer(data)
    header = pull_header(buf)
    # RFC 7296 3.1: the length field covers header and payloads
    if header.length != len(data):
        raise DecodeError(f"header length {header.length} but {len(data)} bytes")
    # RFC 7296 3.1: a different major version is not parsed further
    if header.version >> 4 != 2:
        raise DecodeError(
            f"major version {header.version >> 4}", NotifyType.INVALID_MAJOR_VERSION
        )
    payloads = pull_payloads(data[HEADER_LENGTH:], header.next_payload)
    return Message(header, payloads)


def push_message(message: Message) -> bytes:
    """Serialize a message, filling in next-payload and length fields."""
    first, body = push_payloads(message.payloads)
    message.header.next_payload = first
    message.header.length = HEADER_LENGTH + len(body)
    return push_header(message.header) + body
