"""EAP pass-through in IKE_AUTH (RFC 7296 2.16) against the test initiator.

The AAA server is played by the test: each `AaaRequest` the responder emits
is answered through `aaa_result`. Rounds in RFC 7296 notation:

  HDR, SK {IDi, [IDr], SAi2, TSi, TSr, CP}  -->  <--  HDR, SK {IDr, CERT, AUTH, EAP}
  HDR, SK {EAP}                             -->  <--  HDR, SK {EAP}
  HDR, SK {AUTH}                            -->  <--  HDR, SK {AUTH, CP, SAr2, TSi, TSr}
"""

from __future__ import annotations

import hmac
import ipaddress
from typing import Any

import pytest

from control.ike.certs import Credential
from control.ike.eap import (
    EAP_FAILURE,
    EAP_REQUEST,
    EAP_SUCCESS,
    AaaRequest,
    AaaResult,
    eap_packet,
)
from control.ike.messages import (
    AuthMethod,
    AuthPayload,
    CfgAttribute,
    CfgType,
    ConfigAttribute,
    CPPayload,
    EAPPayload,
    ExchangeType,
    HeaderFlag,
    IDiPayload,
    IDrPayload,
    NotifyPayload,
    NotifyType,
    Payload,
    SAPayload,
    TSiPayload,
    TSrPayload,
)
from control.ike.responder import (
    ChildSAUp,
    Identity,
    IkeResponder,
    IkeSAUp,
    Profile,
    ResponderConfig,
)
from control.lab.pki import LabPki

try:
    from tests.ikeclient import IkeClient
except ImportError:  # pytest's rootdir-relative import without tests/__init__.py
    from ikeclient import IkeClient  # type: ignore[no-redef]

SERVER = ("198.18.0.1", 4500)
CLIENT = ("198.18.0.2", 4500)
SERVER_ID = "vpn.espgate.example"
MSK = bytes(range(64))


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> LabPki:
    return LabPki.create(tmp_path_factory.mktemp("pki"), "p256")


def make_responder(pki: LabPki, **profile_args: Any) -> IkeResponder:
    allocated: list[str] = []

    def allocate_in(profile: str, identity: str, session: str) -> Any:
        allocated.append(identity)
        return ipaddress.IPv4Address("198.18.100.10")

    profile = Profile(
        name="eap",
        remote_ids=["*"],
        local_id=Identity.from_string(SERVER_ID),
        psk=b"",
        local_auth="ecdsa-sig",
        remote_auth=["eap"],
        credential=Credential(pki.server.key, [pki.server.cert]),
        local_ts=["198.18.50.0/24"],
        **profile_args,
    )
    config = ResponderConfig(
        profiles=[profile],
        allocate_address=lambda identity, session: None,
        release_address=lambda address: None,
        allocate_in_profile=allocate_in,
    )
    responder = IkeResponder(config)
    responder.allocated = allocated  # type: ignore[attr-defined]
    return responder


def send(r: IkeResponder, data: bytes, now: float = 1.0) -> list[bytes]:
    r.datagram_received(data, SERVER, CLIENT, now)
    return [d.data for d in r.datagrams_to_send()]


def sent(r: IkeResponder) -> list[bytes]:
    return [d.data for d in r.datagrams_to_send()]


def drain(r: IkeResponder) -> list[Any]:
    out = []
    while (event := r.next_event()) is not None:
        out.append(event)
    return out


class EapPeer:
    """The test initiator plus the EAP rounds of RFC 7296 2.16."""

    def __init__(self, r: IkeResponder, identity: str) -> None:
        self.r = r
        self.client = IkeClient(identity=identity, remote_id=SERVER_ID)
        self.client.address, self.client.server = CLIENT, SERVER
        (reply,) = send(r, self.client.init_request())
        self.client.handle_init_response(reply)
        self.mid = 1

    def request(self, payloads: list[Payload]) -> list[bytes]:
        data = self.client.seal(
            ExchangeType.IKE_AUTH, self.mid, payloads, HeaderFlag.INITIATOR
        )
        self.last = data
        return send(self.r, data)

    def reply(self, data: bytes) -> list[Payload]:
        header, payloads = self.client.open(data)
        assert header.message_id == self.mid
        self.mid += 1
        return payloads

    def first(self) -> list[bytes]:
        c = self.client
        self.idi = IDiPayload(c.identity.type, c.identity.data)
        assert c.remote_id is not None
        cp = CPPayload(
            CfgType.CFG_REQUEST, [ConfigAttribute(CfgAttribute.INTERNAL_IP4_ADDRESS)]
        )
        return self.request(
            [
                self.idi,
                IDrPayload(c.remote_id.type, c.remote_id.data),
                cp,
                SAPayload([c.esp_proposal()]),
                TSiPayload(c.tsi),
                TSrPayload(c.tsr),
            ]
        )

    def final_auth(self, key: bytes) -> bytes:
        # RFC 7296 2.15/2.16: prf(prf(key, "Key Pad for IKEv2"), octets)
        c = self.client
        octets = c.init_req + c.nonce_r + c.prf(c.sk_pi, self.idi.push_body())
        return c.prf(c.prf(key, b"Key Pad for IKEv2"), octets)

    def server_auth_ok(self, payloads: list[Payload], key: bytes, idr: bytes) -> bool:
        c = self.client
        auth = next(p for p in payloads if isinstance(p, AuthPayload))
        octets = c.init_resp + c.nonce_i + c.prf(c.sk_pr, idr)
        expected = c.prf(c.prf(key, b"Key Pad for IKEv2"), octets)
        return hmac.compare_digest(expected, auth.data)


def md5_challenge(identifier: int) -> bytes:
    # RFC 3748 5.4: type 4, value size, value
    return eap_packet(EAP_REQUEST, identifier, bytes([4, 16]) + bytes(16))


def run_to_success(r: IkeResponder, peer: EapPeer, msk: bytes) -> tuple[bytes, int]:
    """Drive round 1 and the EAP rounds; return our IDr body and the last EAP id."""
    assert peer.first() == []
    (ask,) = drain(r)
    assert isinstance(ask, AaaRequest) and ask.user_name == str(peer.client.identity)
    r.aaa_result(ask.session_id, AaaResult("challenge", md5_challenge(7)), 1.0)
    (data,) = sent(r)
    payloads = peer.reply(data)
    idr = next(p for p in payloads if isinstance(p, IDrPayload))
    assert any(isinstance(p, AuthPayload) for p in payloads)
    eap = next(p for p in payloads if isinstance(p, EAPPayload))
    assert eap.data == md5_challenge(7)
    response = eap_packet(2, 7, bytes([4, 16]) + bytes(16))
    assert peer.request([EAPPayload(response)]) == []
    (ask,) = drain(r)
    assert ask.eap_message == response
    success = eap_packet(EAP_SUCCESS, 7)
    r.aaa_result(ask.session_id, AaaResult("accept", success, msk=msk), 2.0)
    (data,) = sent(r)
    eap = next(p for p in peer.reply(data) if isinstance(p, EAPPayload))
    assert eap.data == success
    return idr.push_body(), 7


@pytest.mark.parametrize("msk", [MSK, b""], ids=["msk", "no-msk"])
def test_eap_relay_with_and_without_msk_establishes(pki: LabPki, msk: bytes) -> None:
    r = make_responder(pki)
    peer = EapPeer(r, "alice@espgate.example")
    idr, _ = run_to_success(r, peer, msk)
    # RFC 7296 2.16: without an MSK, SK_pi and SK_pr key the AUTH payloads
    key_i = msk or peer.client.sk_pi
    key_r = msk or peer.client.sk_pr
    (data,) = peer.request(
        [AuthPayload(AuthMethod.SHARED_KEY_MIC, peer.final_auth(key_i))]
    )
    payloads = peer.reply(data)
    assert peer.server_auth_ok(payloads, key_r, idr)
    assert any(isinstance(p, CPPayload) for p in payloads)
    assert any(isinstance(p, SAPayload) for p in payloads)
    kinds = [type(e) for e in drain(r)]
    assert kinds == [ChildSAUp, IkeSAUp] or kinds == [IkeSAUp, ChildSAUp]


def test_eap_final_auth_with_wrong_key_fails(pki: LabPki) -> None:
    r = make_responder(pki)
    peer = EapPeer(r, "alice@espgate.example")
    run_to_success(r, peer, MSK)
    tampered = bytes(64)
    (data,) = peer.request(
        [AuthPayload(AuthMethod.SHARED_KEY_MIC, peer.final_auth(tampered))]
    )
    payloads = peer.reply(data)
    assert [p.notify_type for p in payloads if isinstance(p, NotifyPayload)] == [
        NotifyType.AUTHENTICATION_FAILED
    ]
    assert r.sessions() == []


def test_eap_reject_sends_failure_and_forgets_sa(pki: LabPki) -> None:
    r = make_responder(pki)
    peer = EapPeer(r, "alice@espgate.example")
    peer.first()
    (ask,) = drain(r)
    r.aaa_result(ask.session_id, AaaResult("reject"), 1.0)
    (data,) = sent(r)
    eap = next(p for p in peer.reply(data) if isinstance(p, EAPPayload))
    assert eap.data[0] == EAP_FAILURE
    assert r.sessions() == [] and r.counters["auth_failed"] == 1


def test_eap_query_identity_asks_then_uses_eap_identity(pki: LabPki) -> None:
    r = make_responder(pki, eap_query_identity=True)
    peer = EapPeer(r, "laptop@espgate.example")
    (data,) = peer.first()
    eap = next(p for p in peer.reply(data) if isinstance(p, EAPPayload))
    # RFC 3748 5.1: Request/Identity
    assert eap.data[0] == EAP_REQUEST and eap.data[4] == 1
    answer = eap_packet(2, eap.data[1], b"\x01bob")
    assert peer.request([EAPPayload(answer)]) == []
    (ask,) = drain(r)
    assert ask.user_name == "bob" and ask.eap_message == answer


def test_eap_authorization_identity_prefers_access_accept_user_name(
    pki: LabPki,
) -> None:
    r = make_responder(pki)
    peer = EapPeer(r, "alice@espgate.example")
    peer.first()
    (ask,) = drain(r)
    success = eap_packet(EAP_SUCCESS, 0)
    r.aaa_result(ask.session_id, AaaResult("accept", success, user_name="ALICE"), 1.0)
    (data,) = sent(r)
    payloads = peer.reply(data)
    idr = next(p for p in payloads if isinstance(p, IDrPayload)).push_body()
    (data,) = peer.request(
        [AuthPayload(AuthMethod.SHARED_KEY_MIC, peer.final_auth(peer.client.sk_pi))]
    )
    assert peer.server_auth_ok(peer.reply(data), peer.client.sk_pr, idr)
    assert r.allocated == ["ALICE"]  # type: ignore[attr-defined]
    assert r.sessions()[0]["identity"] == "ALICE"


def test_eap_ip_identity_without_query_is_refused(pki: LabPki) -> None:
    r = make_responder(pki)
    peer = EapPeer(r, "198.18.0.2")
    (data,) = peer.first()
    payloads = peer.reply(data)
    assert [p.notify_type for p in payloads if isinstance(p, NotifyPayload)] == [
        NotifyType.AUTHENTICATION_FAILED
    ]
    assert drain(r) == [] and r.sessions() == []


def test_eap_retransmission_while_waiting_for_aaa_is_dropped(pki: LabPki) -> None:
    r = make_responder(pki)
    peer = EapPeer(r, "alice@espgate.example")
    peer.first()
    assert send(r, peer.last) == []
    assert len(drain(r)) == 1 and r.counters["drop_aaa_pending"] == 1


def test_eap_stale_aaa_result_is_ignored(pki: LabPki) -> None:
    r = make_responder(pki)
    r.aaa_result("00" * 8, AaaResult("accept"), 1.0)
    assert r.counters["aaa_result_unexpected"] == 1


def test_eap_client_silence_expires_the_sa(pki: LabPki) -> None:
    r = make_responder(pki, eap_timeout=10.0)
    peer = EapPeer(r, "alice@espgate.example")
    peer.first()
    (ask,) = drain(r)
    r.aaa_result(ask.session_id, AaaResult("challenge", md5_challenge(1)), 1.0)
    sent(r)
    assert r.get_timer() == pytest.approx(11.0)
    r.handle_timer(11.5)
    assert r.sessions() == []
