"""Tests for control.ike.messages: round trips, malformed input, fuzzing."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from control.ike.messages import (
    AuthPayload,
    Buffer,
    CertPayload,
    CertReqPayload,
    ConfigAttribute,
    CPPayload,
    DecodeError,
    DeletePayload,
    EAPPayload,
    EncryptedPayload,
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
    Proposal,
    SAPayload,
    TrafficSelector,
    Transform,
    TransformAttribute,
    TSiPayload,
    TSrPayload,
    UnknownPayload,
    VendorIDPayload,
    pull_header,
    pull_message,
    pull_payloads,
    push_header,
    push_message,
    push_payloads,
)

# A real strongSwan 5.9.8 style IKE_SA_INIT header, written by hand from
# RFC 7296 3.1: SPIi, zero SPIr, next SA (33), version 2.0, IKE_SA_INIT (34),
# flags I (0x08), message ID 0, length 28.
HEADER_HEX = "0102030405060708000000000000000021202208000000000000001c"

# RFC 7296 3.3: one IKE proposal ENCR_AES_GCM_16/256, PRF_HMAC_SHA2_256, DH 19,
# hand-assembled: SA generic header, proposal, three transforms (one with a
# TV key-length attribute 0x800e 0x0100).
SA_PAYLOAD_HEX = (
    "00000028"  # generic header: last payload, length 40
    "00000024"
    "01010003"  # proposal: last, length 36, #1, IKE, no SPI, 3 transforms
    "0300000c"
    "01000014"
    "800e0100"  # ENCR 20 (AES-GCM-16), key length 256
    "03000008"
    "02000005"  # PRF 5 (HMAC-SHA2-256)
    "00000008"
    "04000013"  # DH 19
)

TS = TrafficSelector(7, 0, 0, 65535, bytes(4), b"\xff" * 4)
TS6 = TrafficSelector(8, 6, 443, 443, bytes(16), b"\xff" * 16)

PAYLOADS: list[Payload] = [
    SAPayload(
        [
            Proposal(
                1,
                1,
                b"",
                [
                    Transform.make(1, 20, 256),
                    Transform.make(2, 5),
                    Transform(3, 12, [TransformAttribute(17, b"tlv")]),
                    Transform.make(4, 19),
                ],
            ),
            Proposal(2, 3, b"\x01\x02\x03\x04", [Transform.make(1, 20, 128)]),
        ]
    ),
    KEPayload(19, b"k" * 64),
    NoncePayload(b"n" * 32),
    NotifyPayload(0, NotifyType.NAT_DETECTION_SOURCE_IP, b"", b"h" * 20),
    NotifyPayload(3, NotifyType.REKEY_SA, b"\x00\x00\x10\x01"),
    DeletePayload(3, 4, [b"\x00\x00\x10\x01", b"\x00\x00\x10\x02"]),
    DeletePayload(1, 0, []),
    VendorIDPayload(b"strongSwan"),
    IDiPayload(3, b"client@example.net"),
    IDrPayload(2, b"vpn.example.net"),
    AuthPayload(2, b"a" * 32),
    CertPayload(4, b"\x30\x82"),
    CertReqPayload(4, b"\x00" * 20),
    TSiPayload([TS]),
    TSrPayload([TS, TS6]),
    CPPayload(1, [ConfigAttribute(1), ConfigAttribute(3, b"\xc6\x12\x32\x35")]),
    EAPPayload(b"\x01\x07\x00\x05\x01"),
    UnknownPayload(200, False, b"whatever"),
]


def header(next_payload: int = 0, length: int = 28) -> Header:
    return Header(
        bytes(range(1, 9)),
        bytes(8),
        next_payload,
        0x20,
        34,
        HeaderFlag.INITIATOR,
        0,
        length,
    )


def test_header_round_trip_matches_hand_assembled_bytes() -> None:
    data = bytes.fromhex(HEADER_HEX)
    parsed = pull_header(Buffer(data))
    assert parsed == header(33)
    assert push_header(parsed) == data
    assert parsed.is_initiator and not parsed.is_response


def test_sa_payload_matches_hand_assembled_bytes() -> None:
    data = bytes.fromhex(SA_PAYLOAD_HEX)
    (sa,) = pull_payloads(data, 33)
    assert isinstance(sa, SAPayload)
    (proposal,) = sa.proposals
    assert [(t.type, t.id, t.key_length) for t in proposal.transforms] == [
        (1, 20, 256),
        (2, 5, None),
        (4, 19, None),
    ]
    assert push_payloads([sa]) == (33, data)


@pytest.mark.parametrize("payload", PAYLOADS, ids=lambda p: type(p).__name__)
def test_payload_round_trip(payload: Payload) -> None:
    first, data = push_payloads([payload])
    assert first == payload.payload_type
    assert pull_payloads(data, first) == [payload]


def test_message_round_trip_with_all_payloads() -> None:
    message = Message(header(), list(PAYLOADS))
    data = push_message(message)
    parsed = pull_message(data)
    assert parsed.payloads == PAYLOADS
    assert parsed.header.length == len(data) and parsed.header.next_payload == 33
    assert push_message(parsed) == data


def test_encrypted_payload_is_last_and_names_first_inner() -> None:
    sk = EncryptedPayload(35, b"iv-ct-icv")
    data = push_message(Message(header(), [VendorIDPayload(b"v"), sk]))
    parsed = pull_message(data)
    assert parsed.payloads[-1] == sk


def test_unknown_critical_payload_raises_decode_error_with_notify() -> None:
    _, data = push_payloads([UnknownPayload(200, True, b"x")])
    with pytest.raises(DecodeError) as exc:
        pull_payloads(data, 200)
    assert exc.value.notify == NotifyType.UNSUPPORTED_CRITICAL_PAYLOAD
    assert exc.value.data == bytes([200])


def test_unknown_noncritical_payload_is_skipped_over() -> None:
    _, data = push_payloads([UnknownPayload(200, False, b"x"), NoncePayload(b"n" * 16)])
    assert pull_payloads(data, 200)[1] == NoncePayload(b"n" * 16)


@pytest.mark.parametrize("payload", PAYLOADS, ids=lambda p: type(p).__name__)
def test_truncated_payload_raises_decode_error(payload: Payload) -> None:
    first, data = push_payloads([payload])
    for cut in range(len(data)):
        with pytest.raises(DecodeError):
            pull_payloads(data[:cut], first)


def test_truncated_message_raises_decode_error() -> None:
    data = push_message(Message(header(), list(PAYLOADS)))
    for cut in range(0, len(data), 7):
        with pytest.raises(DecodeError):
            pull_message(data[:cut])


@pytest.mark.parametrize(
    "ptype,body",
    [
        (40, b"n" * 15),  # nonce below 16 octets (RFC 7296 3.9)
        (40, b"n" * 257),
        (42, b"\x03\x04\x00\x02" + b"x" * 7),  # two 4-byte SPIs in 7 bytes
        (42, b"\x01\x04\x00\x01abcd"),  # IKE delete with an SPI
        (44, b"\x01\x00\x00\x00" + b"\x07\x00\x00\x0f" + bytes(12)),  # TS length 15
        (44, b"\x01\x00\x00\x00" + b"\x09\x00\x00\x10" + bytes(12)),  # TS type 9
        (44, b"\x02\x00\x00\x00" + b"\x07\x00\x00\x10" + bytes(12)),  # count 2, one TS
        (35, b"\x02\x00\x00\x00"),  # empty identification data
        (48, b"\x01\x07\x00\x09\x01"),  # EAP length mismatch
        (47, b"\x01\x00\x00\x00\x00\x01\x00\x04ab"),  # CP attribute overruns
        (33, b"\x00\x00\x00\x08\x01\x01\x00\x01"),  # proposal without its transform
        (33, b"\x05\x00\x00\x08\x01\x01\x00\x00"),  # bad last-substructure value
        (33, b"\x00\x00\x00\x10\x01\x01\x00\x02" + b"\x00\x00\x00\x08\x01\x00\x00\x14"),
    ],
)
def test_bad_payload_body_raises_decode_error(ptype: int, body: bytes) -> None:
    data = struct.pack("!BBH", 0, 0, 4 + len(body)) + body
    with pytest.raises(DecodeError):
        pull_payloads(data, ptype)


def test_bad_generic_length_raises_decode_error() -> None:
    for length in (0, 3, 100):
        data = struct.pack("!BBH", 0, 0, length) + b"n" * 20
        with pytest.raises(DecodeError):
            pull_payloads(data, 40)


def test_header_length_mismatch_raises_decode_error() -> None:
    data = push_message(Message(header(), [NoncePayload(b"n" * 16)]))
    with pytest.raises(DecodeError):
        pull_message(data + b"\x00")
    with pytest.raises(DecodeError) as exc:
        pull_message(data[:17] + b"\x30" + data[18:])  # major version 3
    assert exc.value.notify == NotifyType.INVALID_MAJOR_VERSION


def test_encrypted_payload_not_last_raises_decode_error() -> None:
    data = struct.pack("!BBH", 40, 0, 8) + b"abcd" + struct.pack("!BBH", 0, 0, 20)
    with pytest.raises(DecodeError):
        pull_payloads(data + b"n" * 16, 46)


@settings(max_examples=600, deadline=None)
@given(st.binary(max_size=400))
def test_pull_message_on_random_bytes_raises_only_decode_error(data: bytes) -> None:
    try:
        pull_message(data)
    except DecodeError:
        pass


@settings(max_examples=600, deadline=None)
@given(st.integers(0, 255), st.binary(max_size=300))
def test_pull_payloads_on_random_chain_raises_only_decode_error(
    first: int, data: bytes
) -> None:
    try:
        pull_payloads(data, first)
    except DecodeError:
        pass


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 2000), st.integers(0, 255))
def test_pull_message_on_mutated_message_raises_only_decode_error(
    position: int, value: int
) -> None:
    data = bytearray(push_message(Message(header(), list(PAYLOADS))))
    data[position % len(data)] = value
    try:
        pull_message(bytes(data))
    except DecodeError:
        pass


def test_exchange_constants_are_rfc_values() -> None:
    assert [e.value for e in ExchangeType] == [34, 35, 36, 37]
