"""IkeResponder against the independent test initiator, with a fake clock.

Exchanges are written in RFC 7296 notation in the step comments:
  HDR, SAi1, KEi, Ni  -->  <--  HDR, SAr1, KEr, Nr
  HDR, SK {IDi, AUTH, CP, SAi2, TSi, TSr}  -->  <--  HDR, SK {IDr, AUTH, ...}
"""

from __future__ import annotations

import copy
import ipaddress
import logging
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from control.ike.certs import TrustStore
from control.ike.matching import CertRule
from control.ike.messages import (
    CertPayload,
    DeletePayload,
    EncrId,
    ExchangeType,
    HeaderFlag,
    IDType,
    NotifyPayload,
    NotifyType,
    PrfId,
    ProtocolId,
    pull_message,
)
from control.ike.responder import (
    ChildSADown,
    ChildSAUp,
    Datagram,
    Identity,
    IkeResponder,
    IkeSADown,
    IkeSAUp,
    Profile,
    ResponderConfig,
)
from tests.ikeclient import (
    DER,
    AuthResult,
    ChildResult,
    IkeClient,
    ServerRefused,
)

SERVER = ("198.18.0.1", 500)
SERVER_NATT = ("198.18.0.1", 4500)
CLIENT = ("198.18.0.2", 500)
CLIENT_NATT = ("198.18.0.2", 4500)
PSK = b"correct horse battery staple"


class Pool:
    def __init__(self, size: int = 4) -> None:
        self.free = [ipaddress.IPv4Address("198.18.100.10") + i for i in range(size)]
        self.calls: list[tuple[str, str]] = []
        self.released: list[ipaddress.IPv4Address] = []

    def allocate(self, identity: str, session: str) -> ipaddress.IPv4Address | None:
        self.calls.append((identity, session))
        return self.free.pop(0) if self.free else None

    def release(self, address: ipaddress.IPv4Address) -> None:
        self.released.append(address)
        self.free.append(address)


def make_responder(pool: Pool | None = None, **profile_args: object) -> IkeResponder:
    pool = pool or Pool()
    args: dict[str, object] = {
        "name": "staff",
        "remote_ids": ["*@example.net"],
        "local_id": Identity.from_string("vpn.example.net"),
        "psk": PSK,
        "local_ts": ["198.18.50.0/24", "198.18.60.0/24"],
        "dns": ["198.18.50.53"],
    }
    args.update(profile_args)
    profile = Profile(**args)  # type: ignore[arg-type]
    config = ResponderConfig(
        profiles=[profile],
        allocate_address=pool.allocate,
        release_address=pool.release,
    )
    responder = IkeResponder(config)
    responder.pool = pool  # type: ignore[attr-defined]
    return responder


def exchange(
    r: IkeResponder,
    data: bytes,
    now: float = 0.0,
    local: tuple[str, int] = SERVER,
    remote: tuple[str, int] = CLIENT,
) -> list[Datagram]:
    r.datagram_received(data, local, remote, now)
    return r.datagrams_to_send()


def events(r: IkeResponder) -> list[Any]:
    out: list[Any] = []
    while (event := r.next_event()) is not None:
        out.append(event)
    return out


def connect(r: IkeResponder, client: IkeClient, float_port: bool = True) -> AuthResult:
    """Run IKE_SA_INIT and IKE_AUTH; the client floats to 4500 like strongSwan."""
    # HDR, SAi1, KEi, Ni, N(NAT_D)x2 --> <-- HDR, SAr1, KEr, Nr, N(NAT_D)x2
    (reply,) = exchange(r, client.init_request())
    assert reply.local == SERVER and reply.remote == CLIENT
    client.handle_init_response(reply.data)
    # HDR, SK {IDi, IDr, AUTH, CP, SAi2, TSi, TSr} on port 4500
    local, remote = (SERVER_NATT, CLIENT_NATT) if float_port else (SERVER, CLIENT)
    (reply,) = exchange(r, client.auth_request(), local=local, remote=remote)
    assert reply.local == local and reply.remote == remote
    return client.handle_auth_response(reply.data)


@pytest.mark.parametrize("group", [19, 20, 31, 14])
@pytest.mark.parametrize(
    "encr,key_length,prf",
    [
        (EncrId.ENCR_AES_GCM_16, 256, PrfId.PRF_HMAC_SHA2_256),
        (EncrId.ENCR_AES_GCM_16, 128, PrfId.PRF_HMAC_SHA2_384),
        (EncrId.ENCR_AES_CBC, 256, PrfId.PRF_HMAC_SHA2_512),
        (EncrId.ENCR_AES_CBC, 128, PrfId.PRF_HMAC_SHA2_256),
    ],
)
def test_handshake_succeeds_for_group_and_cipher(
    group: int, encr: int, key_length: int, prf: int
) -> None:
    r = make_responder()
    client = IkeClient(dh_group=group, encr=encr, key_length=key_length, prf=prf)
    result = connect(r, client)
    assert result.inside_address == ipaddress.IPv4Address("198.18.100.10")
    assert result.dns == ["198.18.50.53"]
    assert result.idr == (IDType.ID_FQDN, b"vpn.example.net")
    up, child_up = events(r)
    assert isinstance(up, IkeSAUp) and up.identity == "client@example.net"
    assert up.profile == "staff"
    assert isinstance(child_up, ChildSAUp)
    assert child_up.session_id == up.session_id
    assert r.sessions()[0]["state"] == "established"


@pytest.mark.parametrize("esp_key_length", [128, 256])
def test_child_keys_match_on_both_sides(esp_key_length: int) -> None:
    r = make_responder()
    client = IkeClient(esp_key_lengths=(esp_key_length,))
    result = connect(r, client)
    (_, up) = events(r)
    child = result.child
    assert child is not None and isinstance(up, ChildSAUp)
    # we receive what the initiator sends (i->r) with our SPI, and vice versa
    assert up.spi_in == child.spi_r and up.spi_out == child.spi_i
    assert up.key_in == child.key_ir and up.salt_in == child.salt_ir
    assert up.key_out == child.key_ri and up.salt_out == child.salt_ri
    assert len(up.key_in) == esp_key_length // 8 and len(up.salt_in) == 4
    assert up.key_in != up.key_out
    assert up.esn is False
    assert up.inside_address == result.inside_address
    assert up.remote == CLIENT_NATT
    assert "key_in" not in repr(up) and up.key_in.hex() not in repr(up)


def test_invalid_ke_then_retry_succeeds() -> None:
    r = make_responder(dh_groups=[20, 31])
    client = IkeClient(dh_group=19, offered_groups=[19, 20])
    # KEi in group 19, which we do not accept: <-- HDR(A,0), N(INVALID_KE_PAYLOAD)
    (reply,) = exchange(r, client.init_request())
    message = pull_message(reply.data)
    assert message.header.spi_r == bytes(8)
    with pytest.raises(ServerRefused) as refused:
        client.handle_init_response(reply.data)
    assert refused.value.notify == NotifyType.INVALID_KE_PAYLOAD
    assert refused.value.data == (20).to_bytes(2, "big")
    assert r.sessions() == []
    client.retry_with_group(20)
    result = connect(r, client)
    assert result.child is not None


def test_ke_group_accepted_when_offered_in_proposal() -> None:
    r = make_responder(dh_groups=[20, 19])
    client = IkeClient(dh_group=19, offered_groups=[20, 19])
    assert connect(r, client).child is not None


def test_sa_init_without_common_proposal_gets_no_proposal_chosen() -> None:
    r = make_responder()
    client = IkeClient(dh_group=15)
    (reply,) = exchange(r, client.init_request())
    with pytest.raises(ServerRefused) as refused:
        client.handle_init_response(reply.data)
    assert refused.value.notify == NotifyType.NO_PROPOSAL_CHOSEN


def test_auth_with_wrong_psk_fails_and_sa_dies() -> None:
    r = make_responder()
    client = IkeClient(psk=b"not the psk")
    with pytest.raises(ServerRefused) as refused:
        connect(r, client)
    assert refused.value.notify == NotifyType.AUTHENTICATION_FAILED
    assert r.sessions() == [] and events(r) == []
    assert r.counters["auth_failed"] == 1
    assert r.pool.calls == []  # type: ignore[attr-defined]


def test_auth_with_unknown_identity_fails() -> None:
    r = make_responder()
    client = IkeClient(identity="mallory@example.org")
    with pytest.raises(ServerRefused) as refused:
        connect(r, client)
    assert refused.value.notify == NotifyType.AUTHENTICATION_FAILED
    assert r.sessions() == []


def test_auth_with_empty_pool_gets_internal_address_failure() -> None:
    r = make_responder(Pool(size=0))
    result = connect(r, IkeClient())
    assert result.child is None and result.inside_address is None
    assert NotifyType.INTERNAL_ADDRESS_FAILURE in result.notifies
    # the IKE SA stays (RFC 7296 3.15.4) but no CHILD SA comes up
    assert [type(e) for e in events(r)] == [IkeSAUp]
    assert r.sessions()[0]["child_spis"] == []


def test_auth_without_config_request_gets_failed_cp_required() -> None:
    r = make_responder()
    result = connect(r, IkeClient(request_config=False))
    assert result.child is None
    assert NotifyType.FAILED_CP_REQUIRED in result.notifies


def test_auth_honours_requested_idr_when_it_is_ours() -> None:
    other = Identity.from_string("198.18.0.1")
    r = make_responder()
    r.config.profiles.append(Profile("ops", ["*@ops.example.net"], other, b"other psk"))
    client = IkeClient(remote_id="198.18.0.1", psk=b"correct horse battery staple")
    result = connect(r, client)
    # the staff profile (by IDi) with the asked-for local identity
    assert result.idr == (IDType.ID_IPV4_ADDR, bytes([198, 18, 0, 1]))
    client2 = IkeClient(remote_id="nobody.example.net")
    assert connect(r, client2).idr == (IDType.ID_FQDN, b"vpn.example.net")


def test_retransmitted_request_gets_identical_cached_response() -> None:
    r = make_responder()
    client = IkeClient()
    init = client.init_request()
    (first,) = exchange(r, init)
    (again,) = exchange(r, init, now=1.0)
    assert again.data == first.data
    client.handle_init_response(first.data)
    auth = client.auth_request()
    (first,) = exchange(r, auth, local=SERVER_NATT, remote=CLIENT_NATT)
    (again,) = exchange(r, auth, now=2.0, local=SERVER_NATT, remote=CLIENT_NATT)
    assert again.data == first.data
    client.handle_auth_response(again.data)
    assert len(r.sessions()) == 1 and r.pool.calls != []  # type: ignore[attr-defined]
    assert len(r.pool.calls) == 1  # type: ignore[attr-defined]
    assert r.counters["retransmitted_response"] == 2


def test_old_message_id_is_dropped() -> None:
    r = make_responder()
    client = IkeClient()
    connect(r, client)
    exchange(r, client.informational([]), local=SERVER_NATT, remote=CLIENT_NATT)
    exchange(r, client.informational([]), local=SERVER_NATT, remote=CLIENT_NATT)
    client.next_mid = 2  # replay an ID two behind the window
    assert (
        exchange(r, client.informational([]), local=SERVER_NATT, remote=CLIENT_NATT)
        == []
    )
    assert r.counters["drop_message_id"] == 1


def test_tampered_request_is_dropped_silently() -> None:
    r = make_responder()
    client = IkeClient()
    (reply,) = exchange(r, client.init_request())
    client.handle_init_response(reply.data)
    auth = bytearray(client.auth_request())
    auth[-20] ^= 1
    assert exchange(r, bytes(auth), local=SERVER_NATT, remote=CLIENT_NATT) == []
    assert r.counters["drop_integrity"] == 1
    assert events(r) == []


def test_junk_is_dropped_and_counted() -> None:
    r = make_responder()
    for junk in (b"", b"\x00" * 10, b"\xff" * 28, bytes(27) + b"\x1c"):
        assert exchange(r, junk) == []
    assert r.counters["drop_short"] + r.counters["drop_decode"] >= 3
    assert r.counters["internal_error"] == 0


def test_liveness_check_gets_empty_response() -> None:
    r = make_responder()
    client = IkeClient()
    connect(r, client)
    (reply,) = exchange(
        r, client.informational([]), local=SERVER_NATT, remote=CLIENT_NATT
    )
    assert client.open_response(reply.data) == []


def test_delete_child_by_client_answers_with_our_spi() -> None:
    r = make_responder()
    client = IkeClient()
    result = connect(r, client)
    events(r)
    (reply,) = exchange(r, client.delete_child(), local=SERVER_NATT, remote=CLIENT_NATT)
    (delete,) = client.open_response(reply.data)
    assert result.child is not None
    assert isinstance(delete, DeletePayload) and delete.protocol == ProtocolId.ESP
    assert delete.spis == [result.child.spi_r.to_bytes(4, "big")]
    (down,) = events(r)
    assert down == ChildSADown(down.session_id, result.child.spi_r, result.child.spi_i)
    assert r.sessions()[0]["child_spis"] == []


def test_delete_ike_by_client_removes_sa_and_releases_address() -> None:
    r = make_responder()
    client = IkeClient()
    result = connect(r, client)
    events(r)
    (reply,) = exchange(r, client.delete_ike(), local=SERVER_NATT, remote=CLIENT_NATT)
    assert client.open_response(reply.data) == []
    child_down, ike_down = events(r)
    assert isinstance(child_down, ChildSADown) and isinstance(ike_down, IkeSADown)
    assert ike_down.reason == "deleted by peer"
    assert r.sessions() == []
    assert r.pool.released == [result.inside_address]  # type: ignore[attr-defined]


def test_delete_ike_by_server_completes_on_response() -> None:
    r = make_responder()
    client = IkeClient()
    connect(r, client)
    (up, _) = events(r)
    assert r.delete_ike_sa(up.session_id, now=10.0)
    (request,) = r.datagrams_to_send()
    assert request.remote == CLIENT_NATT and request.local == SERVER_NATT
    header = pull_message(request.data).header
    assert header.exchange == ExchangeType.INFORMATIONAL and header.flags == 0
    assert r.get_timer() == 12.0
    payloads, answer = client.answer_request(request.data)
    assert payloads == [DeletePayload(ProtocolId.IKE, 0, [])]
    exchange(r, answer, now=10.5, local=SERVER_NATT, remote=CLIENT_NATT)
    assert [type(e) for e in events(r)] == [ChildSADown, IkeSADown]
    assert r.sessions() == [] and r.get_timer() is None


def test_delete_child_by_server_completes_on_response() -> None:
    r = make_responder()
    client = IkeClient()
    connect(r, client)
    (_, up) = events(r)
    assert r.delete_child_sa(up.session_id, up.spi_in, now=5.0)
    (request,) = r.datagrams_to_send()
    payloads, answer = client.answer_request(request.data)
    assert payloads == [
        DeletePayload(ProtocolId.ESP, 4, [up.spi_in.to_bytes(4, "big")])
    ]
    exchange(r, answer, now=5.1, local=SERVER_NATT, remote=CLIENT_NATT)
    assert events(r) == [ChildSADown(up.session_id, up.spi_in, up.spi_out)]
    assert r.sessions()[0]["state"] == "established"


def test_server_delete_retransmits_with_backoff_then_gives_up() -> None:
    r = make_responder()
    client = IkeClient()
    connect(r, client)
    (up, _) = events(r)
    r.delete_ike_sa(up.session_id, now=0.0)
    (first,) = r.datagrams_to_send()
    deadlines = []
    while (deadline := r.get_timer()) is not None:
        deadlines.append(deadline)
        r.handle_timer(deadline)
        for datagram in r.datagrams_to_send():
            assert datagram.data == first.data
    # 2 s, then 4, 8, 16, 32, 64 after each of the 5 retransmissions
    assert deadlines == [2.0, 6.0, 14.0, 30.0, 62.0, 126.0]
    assert r.counters["retransmitted_request"] == 5
    assert [type(e) for e in events(r)] == [ChildSADown, IkeSADown]
    assert r.sessions() == []


def test_half_open_sa_times_out() -> None:
    r = make_responder()
    client = IkeClient()
    exchange(r, client.init_request(), now=100.0)
    assert len(r.sessions()) == 1
    assert r.get_timer() == 130.0
    r.handle_timer(129.9)
    assert len(r.sessions()) == 1
    r.handle_timer(130.0)
    assert r.sessions() == [] and r.get_timer() is None
    assert r.counters["half_open_expired"] == 1 and events(r) == []


def test_nat_detection_without_nat() -> None:
    r = make_responder()
    client = IkeClient()
    (reply,) = exchange(r, client.init_request())
    client.handle_init_response(reply.data)
    # the responder's own hashes describe the addresses the client sees
    nat = client.nat_notifies
    assert nat[NotifyType.NAT_DETECTION_SOURCE_IP] == client.nat_hash(
        client.spi_r, SERVER
    )
    assert nat[NotifyType.NAT_DETECTION_DESTINATION_IP] == client.nat_hash(
        client.spi_r, CLIENT
    )
    (reply,) = exchange(r, client.auth_request())
    client.handle_auth_response(reply.data)
    (_, up) = events(r)
    assert isinstance(up, ChildSAUp) and up.udp_encap is False


def test_nat_detection_with_faked_nat_forces_udp_encap() -> None:
    r = make_responder()
    client = IkeClient(fake_nat=True)
    connect(r, client)
    (_, up) = events(r)
    assert isinstance(up, ChildSAUp) and up.udp_encap is True
    assert up.remote == CLIENT_NATT


def test_nat_detection_of_our_own_side() -> None:
    r = make_responder()
    client = IkeClient(server=("198.51.100.1", 500))
    connect(r, client)
    (_, up) = events(r)
    assert isinstance(up, ChildSAUp) and up.udp_encap is True


def test_traffic_selectors_are_narrowed() -> None:
    r = make_responder()
    client = IkeClient(tsr=["198.18.50.128/25", "198.18.60.0/23", "10.0.0.0/8"])
    connect(r, client)
    (_, up) = events(r)
    assert isinstance(up, ChildSAUp)
    assert up.remote_ts == ["198.18.100.10/32"]
    assert up.local_ts == ["198.18.50.128/25", "198.18.60.0/24"]


def test_traffic_selectors_outside_local_subnets_refused() -> None:
    r = make_responder()
    result = connect(r, IkeClient(tsr=["10.0.0.0/8"]))
    assert result.child is None
    assert NotifyType.TS_UNACCEPTABLE in result.notifies


def test_client_address_change_is_adopted() -> None:
    r = make_responder()
    client = IkeClient()
    connect(r, client)
    events(r)
    moved = ("198.18.0.99", 61000)
    (reply,) = exchange(r, client.informational([]), local=SERVER_NATT, remote=moved)
    assert reply.remote == moved
    assert r.sessions()[0]["remote"] == moved
    (event,) = events(r)
    assert event.remote == moved


def test_cbc_auth_response_uses_integrity() -> None:
    r = make_responder()
    client = IkeClient(encr=EncrId.ENCR_AES_CBC, key_length=128)
    (reply,) = exchange(r, client.init_request())
    client.handle_init_response(reply.data)
    (reply,) = exchange(r, client.auth_request(), local=SERVER_NATT, remote=CLIENT_NATT)
    tampered = bytearray(reply.data)
    tampered[40] ^= 0x80
    with pytest.raises(ValueError):
        client.handle_auth_response(bytes(tampered))
    assert client.handle_auth_response(reply.data).child is not None


def test_initial_contact_replaces_older_session() -> None:
    r = make_responder()
    connect(r, IkeClient())
    first_up = events(r)[0]
    connect(r, IkeClient())
    kinds = [type(e) for e in events(r)]
    assert kinds == [ChildSADown, IkeSADown, IkeSAUp, ChildSAUp]
    assert r.sessions()[0]["id"] != first_up.session_id


def test_critical_unknown_payload_in_auth_is_refused() -> None:
    from control.ike.messages import Payload, UnknownPayload

    r = make_responder()
    client = IkeClient()
    (reply,) = exchange(r, client.init_request())
    client.handle_init_response(reply.data)
    extra: list[Payload] = [UnknownPayload(200, True, b"x")]
    (reply,) = exchange(
        r, client.auth_request(extra), local=SERVER_NATT, remote=CLIENT_NATT
    )
    _, payloads = client.open(reply.data)
    assert payloads == [
        NotifyPayload(0, NotifyType.UNSUPPORTED_CRITICAL_PAYLOAD, b"", bytes([200]))
    ]
    assert r.sessions() == []


def test_sa_init_response_sets_only_the_response_flag() -> None:
    r = make_responder()
    client = IkeClient()
    (reply,) = exchange(r, client.init_request())
    header = pull_message(reply.data).header
    assert header.flags == HeaderFlag.RESPONSE and header.message_id == 0
    assert header.spi_i == client.spi_i and header.spi_r != bytes(8)


def test_allocator_exception_becomes_internal_address_failure() -> None:
    r = make_responder()

    def broken(identity: str, session: str) -> ipaddress.IPv4Address | None:
        raise RuntimeError("pool backend down")

    r.config.allocate_address = broken
    result = connect(r, IkeClient())
    assert NotifyType.INTERNAL_ADDRESS_FAILURE in result.notifies
    assert r.counters["internal_error"] == 0


def test_profile_refusing_chosen_ike_algorithms_fails_auth() -> None:
    r = make_responder()
    r.config.profiles.append(
        Profile(
            "strict",
            ["*@strict.example.net"],
            Identity.from_string("vpn.example.net"),
            PSK,
            dh_groups=[20],
        )
    )
    client = IkeClient(identity="a@strict.example.net", dh_group=19)
    with pytest.raises(ServerRefused) as refused:
        connect(r, client)
    assert refused.value.notify == NotifyType.AUTHENTICATION_FAILED


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 10_000), st.integers(0, 255), st.booleans())
def test_mutated_messages_never_raise_or_break_the_responder(
    position: int, value: int, in_auth: bool
) -> None:
    r = make_responder()
    client = IkeClient()
    init = bytearray(client.init_request())
    if not in_auth:
        init[position % len(init)] = value
        r.datagram_received(bytes(init), SERVER, CLIENT, 0.0)
    else:
        (reply,) = exchange(r, bytes(init))
        client.handle_init_response(reply.data)
        auth = bytearray(client.auth_request())
        auth[position % len(auth)] = value
        r.datagram_received(bytes(auth), SERVER_NATT, CLIENT_NATT, 1.0)
    assert r.counters["internal_error"] == 0
    r.datagrams_to_send()
    events(r)


def _child_up(r: IkeResponder) -> ChildSAUp:
    (event,) = events(r)
    assert isinstance(event, ChildSAUp)
    return event


def _check_keys(up: ChildSAUp, child: ChildResult) -> None:
    assert up.spi_in == child.spi_r and up.spi_out == child.spi_i
    assert (up.key_in, up.salt_in) == (child.key_ir, child.salt_ir)
    assert (up.key_out, up.salt_out) == (child.key_ri, child.salt_ri)


def test_create_child_sa_after_delete_succeeds() -> None:
    r = make_responder()
    client = IkeClient()
    connect(r, client)
    exchange(r, client.delete_child(), local=SERVER_NATT, remote=CLIENT_NATT)
    events(r)
    # HDR, SK {SA, Ni, TSi, TSr} --> <-- HDR, SK {SA, Nr, TSi, TSr}
    (reply,) = exchange(r, client.create_child(), local=SERVER_NATT, remote=CLIENT_NATT)
    child = client.handle_create_child_response(reply.data)
    up = _child_up(r)
    _check_keys(up, child)
    assert up.remote_ts == ["198.18.100.10/32"]


@pytest.mark.parametrize("group", [19, 31])
def test_rekey_child_with_pfs_keys_match_and_old_sa_stays(group: int) -> None:
    r = make_responder()
    client = IkeClient()
    connect(r, client)
    (_, old) = events(r)
    # HDR, SK {N(REKEY_SA), SA, Ni, KEi, TSi, TSr} --> <-- HDR, SK {SA, Nr, KEr, ...}
    request = client.create_child(rekey=True, pfs_group=group)
    (reply,) = exchange(r, request, local=SERVER_NATT, remote=CLIENT_NATT)
    child = client.handle_create_child_response(reply.data)
    new = _child_up(r)
    _check_keys(new, child)
    assert new.key_in != old.key_in
    assert len(r.sessions()[0]["child_spis"]) == 2
    # make before break: the initiator then deletes the old CHILD SA
    delete = client.delete_child(client.old_esp_spi)
    exchange(r, delete, local=SERVER_NATT, remote=CLIENT_NATT)
    assert events(r) == [ChildSADown(old.session_id, old.spi_in, old.spi_out)]


def test_rekey_unknown_child_gets_child_sa_not_found() -> None:
    r = make_responder()
    client = IkeClient()
    connect(r, client)
    client.esp_spi = 0x7777
    (reply,) = exchange(
        r, client.create_child(rekey=True), local=SERVER_NATT, remote=CLIENT_NATT
    )
    with pytest.raises(ServerRefused) as refused:
        client.handle_create_child_response(reply.data)
    assert refused.value.notify == NotifyType.CHILD_SA_NOT_FOUND


def test_rekey_with_unaccepted_pfs_group_gets_no_proposal_chosen() -> None:
    r = make_responder(dh_groups=[19, 31])
    client = IkeClient()
    connect(r, client)
    events(r)
    request = client.create_child(rekey=True, pfs_group=20)
    (reply,) = exchange(r, request, local=SERVER_NATT, remote=CLIENT_NATT)
    with pytest.raises(ServerRefused) as refused:
        client.handle_create_child_response(reply.data)
    assert refused.value.notify == NotifyType.NO_PROPOSAL_CHOSEN
    assert events(r) == [] and r.sessions()[0]["state"] == "established"


def test_ike_rekey_without_ke_and_with_ts_gets_invalid_syntax() -> None:
    r = make_responder()
    client = IkeClient()
    connect(r, client)
    events(r)
    # RFC 7296 1.3.2: SA, Ni, KEi and no selectors; this one is a CHILD layout
    request = client.create_child(ike=True)
    (reply,) = exchange(r, request, local=SERVER_NATT, remote=CLIENT_NATT)
    with pytest.raises(ServerRefused) as refused:
        client.handle_create_child_response(reply.data)
    assert refused.value.notify == NotifyType.INVALID_SYNTAX
    assert r.sessions()[0]["state"] == "established"


@pytest.mark.parametrize("group", [19, 31])
def test_ike_rekey_moves_session_to_new_sa(group: int) -> None:
    r = make_responder()
    client = IkeClient(dh_group=group)
    connect(r, client)
    (up,) = [e for e in events(r) if isinstance(e, ChildSAUp)]
    before = r.sessions()[0]

    # HDR, SK {SA, Ni, KEi} --> <-- HDR, SK {SA, Nr, KEr}
    request = client.rekey_ike()
    old = copy.copy(client)
    (reply,) = exchange(r, request, local=SERVER_NATT, remote=CLIENT_NATT)
    client.handle_ike_rekey_response(reply.data)
    (after,) = r.sessions()
    assert after["id"] == before["id"] == up.session_id
    assert after["ike_spis"] != before["ike_spis"]
    assert after["ike_spis"][0] == client.spi_i.hex()
    assert after["child_spis"] == before["child_spis"]
    assert r.counters["ike_rekeyed"] == 1

    # the new SA answers at message ID 0 with the independently derived keys
    (reply,) = exchange(r, client.informational([]), local=SERVER_NATT,
                        remote=CLIENT_NATT)  # fmt: skip
    assert client.open_response(reply.data) == []

    # the peer deletes the old SA: nothing of the session goes
    (reply,) = exchange(r, old.delete_ike(), local=SERVER_NATT, remote=CLIENT_NATT)
    assert old.open_response(reply.data) == []
    assert events(r) == [] and r.pool.released == []  # type: ignore[attr-defined]

    # a CHILD rekey on the new SA derives from the new SK_d
    (reply,) = exchange(r, client.create_child(rekey=True), local=SERVER_NATT,
                        remote=CLIENT_NATT)  # fmt: skip
    _check_keys(_child_up(r), client.handle_create_child_response(reply.data))

    # and deleting the new SA ends the session
    exchange(r, client.delete_ike(), local=SERVER_NATT, remote=CLIENT_NATT)
    downs = [e for e in events(r) if isinstance(e, IkeSADown)]
    assert [d.session_id for d in downs] == [up.session_id]


def test_ike_rekey_tampered_is_dropped_silently() -> None:
    r = make_responder()
    client = IkeClient()
    connect(r, client)
    events(r)
    request = bytearray(client.rekey_ike())
    request[-1] ^= 1
    assert exchange(r, bytes(request), local=SERVER_NATT, remote=CLIENT_NATT) == []
    assert r.counters["drop_integrity"] == 1 and r.counters["ike_rekeyed"] == 0


def test_rekey_with_ke_in_unaccepted_group_gets_invalid_ke() -> None:
    r = make_responder(dh_groups=[19, 31])
    client = IkeClient()
    connect(r, client)
    events(r)
    request = client.create_child(rekey=True, pfs_group=20, extra_groups=(31,))
    (reply,) = exchange(r, request, local=SERVER_NATT, remote=CLIENT_NATT)
    with pytest.raises(ServerRefused) as refused:
        client.handle_create_child_response(reply.data)
    assert refused.value.notify == NotifyType.INVALID_KE_PAYLOAD
    assert refused.value.data == (31).to_bytes(2, "big")
    assert events(r) == []


def test_logs_never_contain_psk_or_keys(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="espgate.ike")
    r = make_responder()
    with pytest.raises(ServerRefused):
        connect(r, IkeClient(psk=b"a wrong but secret psk"))
    client = IkeClient()
    result = connect(r, client)
    exchange(r, client.delete_ike(), local=SERVER_NATT, remote=CLIENT_NATT)
    assert result.child is not None and "ike sa up" in caplog.text
    text = caplog.text + "".join(repr(e) for e in events(r)) + repr(r.sessions())
    for secret in (PSK, b"a wrong but secret psk", result.child.key_ir, client.sk_d):
        assert secret.hex() not in text and repr(secret) not in text
    assert PSK.decode() not in text


def test_first_admitting_profile_is_used() -> None:
    r = make_responder()
    second = Profile("all", ["*"], Identity.from_string("vpn.example.net"), b"other")
    r.config.profiles.append(second)
    connect(r, IkeClient())
    assert events(r)[0].profile == "staff"
    with pytest.raises(ServerRefused):
        connect(r, IkeClient(psk=b"other"))
    connect(r, IkeClient(identity="someone@example.org", psk=b"other"))
    assert events(r)[0].profile == "all"


@pytest.fixture(scope="module")
def client_pki(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from control.lab.pki import LabPki

    return LabPki.create(tmp_path_factory.mktemp("pki"), "p256", chain=True)


def _cert_profile(name: str, pki: Any, rules: list[CertRule]) -> Profile:
    return Profile(
        name,
        ["*"],
        Identity.from_string("vpn.example.net"),
        PSK,
        remote_auth=["ecdsa-sig"],
        trust=TrustStore([pki.root.cert]),
        cert_map=rules,
    )


def _cert_client(pki: Any) -> IkeClient:
    return IkeClient(
        identity="client1@espgate.example",
        signer=pki.client.key,
        certs=[pki.client.cert, pki.client_intermediate.cert],
    )


def test_certificate_map_selects_profile_and_its_pool(client_pki: Any) -> None:
    r = make_responder()
    wrong = _cert_profile("servers", client_pki, [CertRule("issuer.cn", "contains",
                                                           "server CA")])  # fmt: skip
    right = _cert_profile("clients", client_pki, [CertRule("issuer.cn", "contains",
                                                           "client CA")])  # fmt: skip
    r.config.profiles[:] = [wrong, right]
    chosen: list[str] = []

    def allocate_for(profile: str, identity: str, session: str) -> Any:
        chosen.append(profile)
        return ipaddress.IPv4Address("198.18.200.1")

    r.config.allocate_in_profile = allocate_for
    result = connect(r, _cert_client(client_pki))
    assert result.inside_address == ipaddress.IPv4Address("198.18.200.1")
    assert chosen == ["clients"]
    assert events(r)[0].profile == "clients"


def test_certificate_map_without_match_fails_auth(client_pki: Any) -> None:
    r = make_responder()
    rule = CertRule("subject.cn", "equals", "somebody else")
    r.config.profiles[:] = [_cert_profile("clients", client_pki, [rule])]
    with pytest.raises(ServerRefused) as refused:
        connect(r, _cert_client(client_pki))
    assert refused.value.notify == NotifyType.AUTHENTICATION_FAILED
    assert r.counters["auth_failed"] == 1


def test_certificate_map_refuses_psk_with_a_matching_certificate(
    client_pki: Any,
) -> None:
    # a CERT payload alone proves nothing: a map profile needs its signature
    r = make_responder()
    rule = CertRule("issuer.cn", "contains", "client CA")
    profile = _cert_profile("clients", client_pki, [rule])
    profile.remote_auth = ["pre-share", "ecdsa-sig"]
    r.config.profiles[:] = [profile]
    client = IkeClient(identity="client1@espgate.example")
    connect_extra = [CertPayload(4, client_pki.client.cert.public_bytes(DER))]
    (reply,) = exchange(r, client.init_request())
    client.handle_init_response(reply.data)
    (reply,) = exchange(r, client.auth_request(extra=connect_extra))
    with pytest.raises(ServerRefused):
        client.handle_auth_response(reply.data)
    assert r.counters["auth_failed"] == 1


def test_dn_identity_selects_dn_profile() -> None:
    r = make_responder()
    r.config.profiles.insert(
        0,
        Profile("ops", ["dn:O=espgate lab,OU=ops"],
                Identity.from_string("vpn.example.net"), b"ops-psk-0123456789"),
    )  # fmt: skip
    dn = "dn:CN=carol,OU=ops,O=espgate lab,C=CH"
    connect(r, IkeClient(identity=dn, psk=b"ops-psk-0123456789"))
    up = events(r)[0]
    assert up.profile == "ops" and up.identity == "CN=carol,OU=ops,O=espgate lab,C=CH"


def test_key_id_identity_selects_key_id_profile() -> None:
    r = make_responder()
    r.config.profiles.insert(
        0,
        Profile("android", ["keyid:a1b2c3d4"],
                Identity.from_string("vpn.example.net"), b"android-psk-01234567"),
    )  # fmt: skip
    connect(r, IkeClient(identity="keyid:a1b2c3d4", psk=b"android-psk-01234567"))
    assert events(r)[0].profile == "android"
    with pytest.raises(ServerRefused):
        connect(r, IkeClient(identity="keyid:a1b2c3d5", psk=b"android-psk-01234567"))


# -- rekeys started by the headend (control.ike.initiate) ---------------------------


def _natt(r: IkeResponder, data: bytes, now: float) -> list[Datagram]:
    return exchange(r, data, now=now, local=SERVER_NATT, remote=CLIENT_NATT)


def test_child_rekey_by_server_at_lifetime_installs_new_then_deletes_old() -> None:
    r = make_responder(child_rekey_time=100.0, ike_rekey_time=None)
    client = IkeClient()
    connect(r, client)
    (_, old) = events(r)
    timer = r.get_timer()
    assert timer is not None and 90.0 <= timer <= 100.0
    r.handle_timer(timer)
    (request,) = r.datagrams_to_send()
    header = pull_message(request.data).header
    assert header.exchange == ExchangeType.CREATE_CHILD_SA and header.flags == 0
    # HDR, SK {N(REKEY_SA), SA, Ni, TSi, TSr} --> <-- HDR, SK {SA, Nr, TSi, TSr}
    child, answer = client.answer_child_rekey(request.data)
    assert child is not None
    (delete,) = _natt(r, answer, timer + 0.1)
    new = _child_up(r)
    _check_keys(new, child)
    assert new.remote_ts == old.remote_ts and new.local_ts == old.local_ts
    # then the old SA goes: Delete with our old inbound SPI
    payloads, answer = client.answer_request(delete.data)
    assert payloads == [
        DeletePayload(ProtocolId.ESP, 4, [old.spi_in.to_bytes(4, "big")])
    ]
    _natt(r, answer, timer + 0.2)
    assert events(r) == [ChildSADown(old.session_id, old.spi_in, old.spi_out)]
    assert r.counters["child_rekeyed_by_us"] == 1


def test_child_rekey_by_server_retries_with_pfs_when_peer_insists() -> None:
    r = make_responder(child_rekey_time=100.0, ike_rekey_time=None, dh_groups=[19, 31])
    client = IkeClient()
    connect(r, client)
    events(r)
    r.handle_timer(100.0)
    (request,) = r.datagrams_to_send()
    refused, answer = client.answer_child_rekey(request.data, want_pfs=19)
    assert refused is None
    (retry,) = _natt(r, answer, 100.1)
    child, answer = client.answer_child_rekey(retry.data, want_pfs=19)
    assert child is not None and client.dh_group == 19
    _natt(r, answer, 100.2)
    _check_keys(_child_up(r), child)
    assert r.counters["child_rekey_refused_NO_PROPOSAL_CHOSEN"] == 1


def test_child_rekey_by_server_refused_tries_again_later() -> None:
    r = make_responder(child_rekey_time=100.0, ike_rekey_time=None)
    client = IkeClient()
    connect(r, client)
    events(r)
    r.handle_timer(100.0)
    (request,) = r.datagrams_to_send()
    _, answer = client.answer_child_rekey(request.data, NotifyType.TEMPORARY_FAILURE)
    assert _natt(r, answer, 100.1) == [] and events(r) == []
    assert r.get_timer() == pytest.approx(160.1)


def test_ike_rekey_by_server_makes_us_initiator_of_new_sa() -> None:
    r = make_responder(ike_rekey_time=1000.0, child_rekey_time=None)
    client = IkeClient()
    connect(r, client)
    (up, child_up) = events(r)
    timer = r.get_timer()
    assert timer is not None and 900.0 <= timer <= 1000.0
    r.handle_timer(timer)
    (request,) = r.datagrams_to_send()
    answer = client.answer_ike_rekey(request.data)
    # RFC 7296 2.18: we delete the old IKE SA once the new one is up
    (delete,) = _natt(r, answer, timer + 0.1)
    assert pull_message(delete.data).header.spi_i == client.old_spis[0]
    assert r.counters["ike_rekeyed"] == 1
    (session,) = r.sessions()
    assert session["id"] == up.session_id
    assert session["ike_spis"] == (client.spi_i.hex(), client.spi_r.hex())
    # the new SA works with us as initiator: the peer's liveness check
    (reply,) = _natt(r, client.informational([]), timer + 0.2)
    header = pull_message(reply.data).header
    assert header.flags == HeaderFlag.RESPONSE | HeaderFlag.INITIATOR
    assert client.open_response(reply.data) == []
    assert events(r) == []
    assert session["child_spis"] == [(child_up.spi_in, child_up.spi_out)]
