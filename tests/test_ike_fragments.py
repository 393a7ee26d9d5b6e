"""IKE fragmentation (RFC 7383): reassembly rules and the responder both ways.

The responder runs against the independent test initiator (`tests.ikeclient`,
its own SKF code) with a fake clock:
  HDR, SAi1, KEi, Ni, N(FRAGMENTATION_SUPPORTED)  -->
                      <--  HDR, SAr1, KEr, Nr, N(FRAGMENTATION_SUPPORTED)
  HDR, SKF(1/n) {IDi, CERT, ...} ... HDR, SKF(n/n) {...}  -->
                      <--  HDR, SKF(1/m) {IDr, AUTH, ...} ... (or one SK)
"""

from __future__ import annotations

from typing import Any

import pytest

from control.ike.certs import TrustStore
from control.ike.fragments import (
    MAX_FRAGMENTS,
    MAX_MESSAGE,
    REASSEMBLY_TIMEOUT,
    Reassembly,
    datagram_budget,
)
from control.ike.messages import (
    EncryptedFragmentPayload,
    NotifyPayload,
    NotifyType,
    pull_message,
)
from control.ike.responder import IkeResponder
from tests.ikeclient import IkeClient
from tests.test_ike_responder import (
    CLIENT_NATT,
    SERVER_NATT,
    events,
    exchange,
    make_responder,
)

# UDP payload of a Windows client's fragment: 576-byte IPv4 datagrams
# (MS-IKEE), less 20 IP, 8 UDP and the 4-byte non-ESP marker
WINDOWS_UDP = 576 - 32
# many DNS servers make a PSK response larger than one small fragment
MANY_DNS = [f"198.18.50.{n}" for n in range(1, 120)]


# -- reassembly -----------------------------------------------------------------


def test_reassembly_joins_fragments_in_any_order() -> None:
    r = Reassembly()
    assert r.add(5, 3, 3, 0, b"cc", 0.0) is None
    assert r.add(5, 1, 3, 35, b"aa", 0.1) is None
    assert r.add(5, 1, 3, 35, b"aa", 0.1) is None  # a duplicate changes nothing
    assert r.add(5, 2, 3, 0, b"bb", 0.2) == (35, b"aabbcc")
    assert r.chunks == {}


def test_reassembly_restarts_on_larger_total() -> None:
    # RFC 7383 2.6: a sender that shrinks its fragments resends more of them
    r = Reassembly()
    r.add(7, 1, 2, 35, b"big", 0.0)
    assert r.add(7, 1, 3, 35, b"a", 0.1) is None
    assert r.add(7, 2, 3, 0, b"b", 0.1) is None
    assert r.add(7, 3, 3, 0, b"c", 0.1) == (35, b"abc")


def test_reassembly_drops_smaller_total() -> None:
    r = Reassembly()
    r.add(7, 1, 3, 35, b"a", 0.0)
    with pytest.raises(ValueError, match="below"):
        r.add(7, 2, 2, 0, b"b", 0.0)
    assert set(r.chunks) == {1}


def test_reassembly_refuses_too_many_fragments() -> None:
    with pytest.raises(ValueError, match="exceed"):
        Reassembly().add(1, 1, MAX_FRAGMENTS + 1, 35, b"a", 0.0)


def test_reassembly_refuses_oversized_message() -> None:
    r = Reassembly()
    r.add(1, 1, 3, 35, bytes(MAX_MESSAGE - 10), 0.0)
    with pytest.raises(ValueError, match="beyond"):
        r.add(1, 2, 3, 0, bytes(11), 0.0)
    assert r.chunks == {}


def test_reassembly_forgets_fragments_after_timeout() -> None:
    r = Reassembly()
    r.add(1, 1, 2, 35, b"a", 0.0)
    assert r.add(1, 2, 2, 0, b"b", REASSEMBLY_TIMEOUT + 1) is None
    assert set(r.chunks) == {2}


def test_datagram_budget_counts_ip_udp_and_marker() -> None:
    assert datagram_budget(1280, "198.18.0.1") == 1280 - 20 - 8 - 4
    assert datagram_budget(1280, "2001:db8::1") == 1280 - 40 - 8 - 4


# -- the responder ------------------------------------------------------------------


def _init(r: IkeResponder, client: IkeClient) -> list[int]:
    (reply,) = exchange(r, client.init_request())
    client.handle_init_response(reply.data)
    message = pull_message(reply.data)
    return [p.notify_type for p in message.payloads if isinstance(p, NotifyPayload)]


def _send_all(r: IkeResponder, datagrams: list[bytes], now: float = 0.0) -> list[Any]:
    out = []
    for data in datagrams:
        out += exchange(r, data, now=now, local=SERVER_NATT, remote=CLIENT_NATT)
    return out


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from control.lab.pki import LabPki

    return LabPki.create(tmp_path_factory.mktemp("pki"), "rsa", chain=True)


def _cert_client(pki: Any) -> IkeClient:
    return IkeClient(
        identity="client1@espgate.example",
        signer=pki.client.key,
        certs=[pki.client.cert, pki.client_intermediate.cert],
    )


def _cert_responder(pki: Any, **profile: Any) -> IkeResponder:
    return make_responder(
        remote_ids=["*@espgate.example"],
        remote_auth=["rsa-sig"],
        trust=TrustStore([pki.root.cert]),
        **profile,
    )


def test_sa_init_announces_fragmentation_when_offered() -> None:
    assert NotifyType.IKEV2_FRAGMENTATION_SUPPORTED in _init(
        make_responder(), IkeClient()
    )


def test_sa_init_without_fragmentation_when_disabled() -> None:
    r = make_responder()
    r.config.fragment_size = 0
    assert NotifyType.IKEV2_FRAGMENTATION_SUPPORTED not in _init(r, IkeClient())


def test_fragmented_cert_request_is_reassembled(pki: Any) -> None:
    r = _cert_responder(pki)
    client = _cert_client(pki)
    _init(r, client)
    fragments = client.auth_request_fragments(WINDOWS_UDP)
    assert len(fragments) >= 3
    replies = _send_all(r, fragments)
    assert r.counters["reassembled"] == 1
    assert r.counters["fragment_rx"] == len(fragments)
    result = client.handle_auth_response([d.data for d in replies])
    assert result.child is not None
    assert [type(e).__name__ for e in events(r)] == ["IkeSAUp", "ChildSAUp"]


def test_tampered_fragment_is_dropped_and_good_copy_completes(pki: Any) -> None:
    r = _cert_responder(pki)
    client = _cert_client(pki)
    _init(r, client)
    fragments = client.auth_request_fragments(WINDOWS_UDP)
    bad = bytearray(fragments[1])
    bad[-1] ^= 1
    assert _send_all(r, [fragments[0], bytes(bad), *fragments[2:]]) == []
    assert r.counters["drop_integrity"] == 1 and r.sessions()[0]["state"] == (
        "half-open"
    )
    replies = _send_all(r, [fragments[1]])
    assert replies and r.counters["reassembled"] == 1


def test_response_follows_the_peers_smaller_fragments(pki: Any) -> None:
    # a Windows-sized request (576-byte datagrams) gets 576-byte fragments back
    r = _cert_responder(pki, dns=MANY_DNS)
    client = _cert_client(pki)
    _init(r, client)
    replies = _send_all(r, client.auth_request_fragments(WINDOWS_UDP))
    assert len(replies) >= 2
    assert all(len(d.data) <= WINDOWS_UDP for d in replies)
    for d in replies:
        skf = pull_message(d.data).payloads[-1]
        assert isinstance(skf, EncryptedFragmentPayload)
        assert skf.total == len(replies)
    assert client.handle_auth_response([d.data for d in replies]).child is not None


def test_large_response_is_fragmented_at_configured_size() -> None:
    r = make_responder(dns=MANY_DNS)
    r.config.fragment_size = 700
    client = IkeClient()
    _init(r, client)
    replies = _send_all(r, [client.auth_request()])
    assert len(replies) >= 2 and r.counters["fragmented"] == 1
    assert all(len(d.data) <= datagram_budget(700, SERVER_NATT[0]) for d in replies)
    assert client.handle_auth_response([d.data for d in replies]).child is not None


def test_small_response_is_not_fragmented() -> None:
    r = make_responder()
    client = IkeClient()
    _init(r, client)
    (reply,) = _send_all(r, [client.auth_request()])
    assert client.handle_auth_response(reply.data).child is not None


def test_fragments_are_dropped_without_negotiation(pki: Any) -> None:
    r = _cert_responder(pki)
    r.config.fragment_size = 0
    client = _cert_client(pki)
    _init(r, client)
    assert _send_all(r, client.auth_request_fragments(WINDOWS_UDP)) == []
    assert r.counters["drop_fragment_not_negotiated"] >= 3


def test_retransmitted_fragments_get_the_whole_response_once(pki: Any) -> None:
    # RFC 7383 2.6.1: the cached response goes out again on fragment 1 only
    r = _cert_responder(pki, dns=MANY_DNS)
    client = _cert_client(pki)
    _init(r, client)
    fragments = client.auth_request_fragments(WINDOWS_UDP)
    first = _send_all(r, fragments)
    again = _send_all(r, fragments, now=2.0)
    assert [d.data for d in again] == [d.data for d in first]
    assert r.counters["retransmitted_response"] == 1
