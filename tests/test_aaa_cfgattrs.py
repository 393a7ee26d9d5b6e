"""Config mode attributes: subnets, NBNS, version, Cisco Unity/FlexVPN, CFG_SET.

HDR, SK {IDi, AUTH, [CP(CFG_REQUEST)], [V], SAi2, TSi, TSr}  -->
<--  HDR, SK {IDr, AUTH, CP(CFG_REPLY | CFG_SET), SAr2, TSi, TSr}
"""

from __future__ import annotations

import ipaddress

import pytest

from control.aaa.attributes import parse_authorization
from control.ike.messages import (
    VID_CISCO_FLEXVPN,
    VID_CISCO_UNITY,
    CfgAttribute,
    CfgType,
    ConfigAttribute,
    CPPayload,
    NotifyPayload,
    NotifyType,
    VendorIDPayload,
)
from control.ike.profiles import Identity, Profile, SessionPolicy
from control.ike.responder import IkeResponder, ResponderConfig
from control.ike.tasks import client_kinds, config_attributes

try:
    from tests.ikeclient import IkeClient
except ImportError:  # pytest's rootdir-relative import without tests/__init__.py
    from ikeclient import IkeClient  # type: ignore[no-redef]

SERVER = ("198.18.0.1", 500)
CLIENT = ("198.18.0.2", 500)
PSK = b"correct horse battery staple"
ADDRESS = ipaddress.IPv4Address("198.18.100.10")
UNITY = {
    CfgAttribute.UNITY_BANNER,
    CfgAttribute.UNITY_DEF_DOMAIN,
    CfgAttribute.UNITY_SPLITDNS_NAME,
    CfgAttribute.UNITY_SPLIT_INCLUDE,
    CfgAttribute.UNITY_LOCAL_LAN,
    CfgAttribute.UNITY_PFS,
    CfgAttribute.UNITY_BACKUP_SERVERS,
    CfgAttribute.CISCO_SMARTCARD_REMOVAL_DISCONNECT,
}
FLEXVPN = {
    CfgAttribute.CISCO_CONFIGURATION_URL,
    CfgAttribute.CISCO_CONFIGURATION_VERSION,
}


def profile(**changes: object) -> Profile:
    return Profile(
        name="ra",
        remote_ids=["*@example.net"],
        local_id=Identity.from_string("vpn.example.net"),
        psk=PSK,
        local_ts=["198.18.50.0/24", "2001:db8:19::/64"],
        dns=["198.18.53.53"],
        **changes,  # type: ignore[arg-type]
    )


def full_policy() -> SessionPolicy:
    pairs = [
        "ipsec:banner=Welcome",
        "ipsec:default-domain=corp.example",
        "ipsec:split-dns=corp.example",
        "ipsec:split-dns=lab.example",
        "ipsec:ipsec-backup-gateway=vpn2.example",
        "ipsec:pfs=1",
        "ipsec:include-local-lan=1",
        "ipsec:smartcard-removal-disconnect=1",
        "ipsec:configuration-url=http://198.18.0.1/cfg",
        "ipsec:configuration-version=7",
        "ipsec:wins-servers=198.18.0.137",
        "ipsec:route-set=prefix 198.18.60.0/24",
    ]
    return parse_authorization({"Cisco-AVPair": pairs}).policy()


def values(attrs: list[ConfigAttribute]) -> dict[int, list[bytes]]:
    out: dict[int, list[bytes]] = {}
    for a in attrs:
        out.setdefault(a.type, []).append(a.value)
    return out


def test_attributes_unity_client_gets_unity_not_flexvpn() -> None:
    got = values(config_attributes(ADDRESS, None, full_policy(), profile(), {"unity"}))
    assert set(got) >= UNITY and not FLEXVPN & set(got)
    assert got[CfgAttribute.UNITY_BANNER] == [b"Welcome"]
    assert got[CfgAttribute.UNITY_SPLITDNS_NAME] == [b"corp.example,lab.example"]
    # 198.18.60.0/255.255.255.0 and six bytes of padding
    assert got[CfgAttribute.UNITY_SPLIT_INCLUDE] == [
        bytes.fromhex("c6123c00ffffff00") + bytes(6)
    ]
    assert got[CfgAttribute.UNITY_PFS] == [b"\x00\x01"]


def test_attributes_flexvpn_client_gets_url_and_version() -> None:
    kinds = client_kinds([VendorIDPayload(VID_CISCO_FLEXVPN)])
    got = values(config_attributes(ADDRESS, None, full_policy(), profile(), kinds))
    assert set(got) >= UNITY | FLEXVPN
    assert got[CfgAttribute.CISCO_CONFIGURATION_URL] == [b"http://198.18.0.1/cfg"]
    assert got[CfgAttribute.CISCO_CONFIGURATION_VERSION] == [b"\x00\x00\x00\x07"]


def test_attributes_other_client_gets_no_cisco_attributes() -> None:
    kinds = client_kinds([VendorIDPayload(b"\x88\x2f\xe5\x6d" + bytes(12))])
    got = values(config_attributes(ADDRESS, None, full_policy(), profile(), kinds))
    assert kinds == set() and not (UNITY | FLEXVPN) & set(got)
    assert client_kinds([VendorIDPayload(VID_CISCO_UNITY)]) == {"unity"}


def test_attributes_subnets_nbns_version_without_request() -> None:
    six = ipaddress.IPv6Interface("2001:db8:18::2/128")
    got = values(config_attributes(ADDRESS, six, full_policy(), profile(), set()))
    # route set prefix wins over the profile's local_ts
    assert got[CfgAttribute.INTERNAL_IP4_SUBNET] == [bytes.fromhex("c6123c00ffffff00")]
    assert CfgAttribute.INTERNAL_IP6_SUBNET not in got
    assert got[CfgAttribute.INTERNAL_IP4_NBNS] == [bytes.fromhex("c6120089")]
    assert got[CfgAttribute.APPLICATION_VERSION] == [b"espgate"]
    plain = values(config_attributes(ADDRESS, six, SessionPolicy(), profile(), set()))
    assert plain[CfgAttribute.INTERNAL_IP6_SUBNET] == [
        ipaddress.IPv6Address("2001:db8:19::").packed + bytes([64])
    ]
    assert plain[CfgAttribute.INTERNAL_IP4_DNS] == [bytes.fromhex("c6123535")]


def test_attributes_netmask_only_with_an_address() -> None:
    policy = SessionPolicy(netmask=ipaddress.IPv4Address("255.255.255.0"))
    six = ipaddress.IPv6Interface("2001:db8:18::2/128")
    with4 = values(config_attributes(ADDRESS, None, policy, profile(), set()))
    only6 = values(config_attributes(None, six, policy, profile(), set()))
    assert with4[CfgAttribute.INTERNAL_IP4_NETMASK] == [bytes.fromhex("ffffff00")]
    assert CfgAttribute.INTERNAL_IP4_NETMASK not in only6
    assert CfgAttribute.INTERNAL_IP4_SUBNET not in only6


def make_responder(mode: str) -> IkeResponder:
    free = [ADDRESS]
    config = ResponderConfig(
        profiles=[profile(config_mode=mode)],
        allocate_address=lambda i, s: free.pop(0) if free else None,
        release_address=lambda a: None,
    )
    return IkeResponder(config)


def connect(r: IkeResponder, request: bool, vid: bytes | None = None) -> list[object]:
    client = IkeClient(psk=PSK, tsi=["0.0.0.0/0"], tsr=["0.0.0.0/0"],
                       request_config=request)  # fmt: skip
    r.datagram_received(client.init_request(), SERVER, CLIENT, 0.0)
    client.handle_init_response(r.datagrams_to_send()[0].data)
    extra = [VendorIDPayload(vid)] if vid is not None else []
    r.datagram_received(client.auth_request(extra), SERVER, CLIENT, 0.0)
    _, payloads = client.open(r.datagrams_to_send()[0].data)
    return payloads  # type: ignore[return-value]


def test_config_set_mode_pushes_cfg_set_without_request() -> None:
    payloads = connect(make_responder("set"), request=False)
    (cp,) = [p for p in payloads if isinstance(p, CPPayload)]
    assert cp.cfg_type == CfgType.CFG_SET
    assert values(cp.attributes)[CfgAttribute.INTERNAL_IP4_ADDRESS] == [ADDRESS.packed]


def test_config_both_mode_answers_request_with_reply() -> None:
    payloads = connect(make_responder("both"), request=True)
    (cp,) = [p for p in payloads if isinstance(p, CPPayload)]
    assert cp.cfg_type == CfgType.CFG_REPLY


def test_config_request_mode_without_request_refused() -> None:
    payloads = connect(make_responder("request"), request=False)
    notifies = [p.notify_type for p in payloads if isinstance(p, NotifyPayload)]
    assert NotifyType.FAILED_CP_REQUIRED in notifies
    assert not any(isinstance(p, CPPayload) for p in payloads)


def test_config_unity_vid_in_ike_auth_gets_split_include() -> None:
    payloads = connect(make_responder("request"), True, VID_CISCO_UNITY)
    (cp,) = [p for p in payloads if isinstance(p, CPPayload)]
    got = values(cp.attributes)
    # the profile's local_ts 198.18.50.0/24 as a Unity split include
    assert got[CfgAttribute.UNITY_SPLIT_INCLUDE] == [
        bytes.fromhex("c6123200ffffff00") + bytes(6)
    ]
    assert not FLEXVPN & set(got)


def test_config_without_vid_gets_no_split_include() -> None:
    payloads = connect(make_responder("request"), True)
    (cp,) = [p for p in payloads if isinstance(p, CPPayload)]
    got = values(cp.attributes)
    assert CfgAttribute.INTERNAL_IP4_SUBNET in got
    assert not (UNITY | FLEXVPN) & set(got)


@pytest.mark.parametrize("lifetime,expires", [(300, 310.0), (None, 3610.0)])
def test_session_lifetime_from_authorization_overrides_profile(
    lifetime: int | None, expires: float
) -> None:
    from control.ike.eap import AaaRequest, AaaResult

    free = [ADDRESS]
    config = ResponderConfig(
        profiles=[profile(authorize=True, session_lifetime=3600.0)],
        allocate_address=lambda i, s: free.pop(0) if free else None,
        release_address=lambda a: None,
    )
    r = IkeResponder(config)
    client = IkeClient(psk=PSK, tsi=["0.0.0.0/0"], tsr=["0.0.0.0/0"])
    r.datagram_received(client.init_request(), SERVER, CLIENT, 0.0)
    client.handle_init_response(r.datagrams_to_send()[0].data)
    r.datagram_received(client.auth_request(), SERVER, CLIENT, 10.0)
    events = []
    while (e := r.next_event()) is not None:
        events.append(e)
    (request,) = [e for e in events if isinstance(e, AaaRequest)]
    policy = SessionPolicy(session_lifetime=lifetime)
    r.aaa_result(request.session_id, AaaResult("accept", policy=policy), 10.0)
    (ike,) = [s for s in r._sas.values() if s.policy is policy]
    assert ike.expires_at == expires


@pytest.mark.parametrize("server", ["198.18.0.67", None])
def test_dhcp_server_from_authorization_switches_session_to_dhcp(
    server: str | None,
) -> None:
    from control.ike.eap import AaaRequest, AaaResult

    r = IkeResponder(
        ResponderConfig(
            profiles=[profile(authorize=True)],
            allocate_address=lambda i, s: ADDRESS,
            release_address=lambda a: None,
        )
    )
    client = IkeClient(psk=PSK, tsi=["0.0.0.0/0"], tsr=["0.0.0.0/0"])
    r.datagram_received(client.init_request(), SERVER, CLIENT, 0.0)
    client.handle_init_response(r.datagrams_to_send()[0].data)
    r.datagram_received(client.auth_request(), SERVER, CLIENT, 1.0)
    first_request = r.next_event()
    assert isinstance(first_request, AaaRequest)
    dhcp = ipaddress.IPv4Address(server) if server else None
    policy = SessionPolicy(dhcp_server=dhcp, dhcp_giaddr=dhcp)
    r.aaa_result(first_request.session_id, AaaResult("accept", policy=policy), 1.0)
    events = []
    while (e := r.next_event()) is not None:
        events.append(e)
    kinds = [e.kind for e in events if isinstance(e, AaaRequest)]
    assert kinds == (["dhcp"] if server else [])


def set_and_connect(
    mode: str, cfg_set: list[ConfigAttribute]
) -> tuple[IkeResponder, IkeClient, list[object]]:
    r = make_responder(mode)
    client = IkeClient(psk=PSK, tsi=["0.0.0.0/0"], tsr=["0.0.0.0/0"],
                       request_config=False)  # fmt: skip
    r.datagram_received(client.init_request(), SERVER, CLIENT, 0.0)
    client.handle_init_response(r.datagrams_to_send()[0].data)
    extra = [CPPayload(CfgType.CFG_SET, cfg_set)]
    r.datagram_received(client.auth_request(extra), SERVER, CLIENT, 0.0)
    _, payloads = client.open(r.datagrams_to_send()[0].data)
    return r, client, payloads  # type: ignore[return-value]


# a client's CFG_SET: its application version and an address it would like
CLIENT_SET = [
    ConfigAttribute(CfgAttribute.APPLICATION_VERSION, b"lab client 1.0"),
    ConfigAttribute(CfgAttribute.INTERNAL_IP4_ADDRESS, bytes.fromhex("c6120909")),
]


def test_config_client_cfg_set_acked_with_taken_attributes() -> None:
    r, _, payloads = set_and_connect("both", CLIENT_SET)
    cps = [p for p in payloads if isinstance(p, CPPayload)]
    # RFC 7296 3.15: CFG_ACK with the supported attributes, zero-length values
    assert [cp.cfg_type for cp in cps] == [CfgType.CFG_ACK, CfgType.CFG_SET]
    assert cps[0].attributes == [ConfigAttribute(CfgAttribute.APPLICATION_VERSION)]
    # the client's own address is not taken: ours is pushed
    pushed = values(cps[1].attributes)
    assert pushed[CfgAttribute.INTERNAL_IP4_ADDRESS] == [ADDRESS.packed]
    assert r.counters["cfg_set_received"] == 1


def test_config_client_cfg_set_in_request_mode_acked_but_child_refused() -> None:
    _, _, payloads = set_and_connect("request", CLIENT_SET)
    cps = [p for p in payloads if isinstance(p, CPPayload)]
    assert [cp.cfg_type for cp in cps] == [CfgType.CFG_ACK]
    notifies = [p.notify_type for p in payloads if isinstance(p, NotifyPayload)]
    assert NotifyType.FAILED_CP_REQUIRED in notifies


def test_config_client_cfg_set_without_known_attributes_gets_empty_ack() -> None:
    unknown = [ConfigAttribute(CfgAttribute.INTERNAL_IP4_DNS, bytes(4))]
    _, _, payloads = set_and_connect("set", unknown)
    cps = [p for p in payloads if isinstance(p, CPPayload)]
    assert cps[0].cfg_type == CfgType.CFG_ACK and cps[0].attributes == []


def test_config_client_cfg_ack_to_our_set_accepted() -> None:
    r, client, payloads = connect_client("set")
    assert [p.cfg_type for p in payloads if isinstance(p, CPPayload)] == [
        CfgType.CFG_SET
    ]
    ack = CPPayload(
        CfgType.CFG_ACK, [ConfigAttribute(CfgAttribute.INTERNAL_IP4_ADDRESS)]
    )
    r.datagram_received(client.informational([ack]), SERVER, CLIENT, 1.0)
    (reply,) = r.datagrams_to_send()
    header, answer = client.open(reply.data)
    # an empty INFORMATIONAL response, no error notify, the session stays
    assert header.is_response and answer == []
    assert r.counters["cfg_ack_received"] == 1
    assert len(r._sas) == 1


def test_config_set_mode_warns_for_requesting_client(
    caplog: pytest.LogCaptureFixture,
) -> None:
    r = make_responder("set")
    with caplog.at_level("WARNING"):
        payloads = connect(r, request=True)
    (cp,) = [p for p in payloads if isinstance(p, CPPayload)]
    assert cp.cfg_type == CfgType.CFG_SET
    assert r.counters["cfg_set_to_requester"] == 1
    assert "use config_mode both" in caplog.text


def connect_client(mode: str) -> tuple[IkeResponder, IkeClient, list[object]]:
    r = make_responder(mode)
    client = IkeClient(psk=PSK, tsi=["0.0.0.0/0"], tsr=["0.0.0.0/0"],
                       request_config=False)  # fmt: skip
    r.datagram_received(client.init_request(), SERVER, CLIENT, 0.0)
    client.handle_init_response(r.datagrams_to_send()[0].data)
    r.datagram_received(client.auth_request(), SERVER, CLIENT, 0.0)
    _, payloads = client.open(r.datagrams_to_send()[0].data)
    return r, client, payloads  # type: ignore[return-value]


def test_attributes_cisco_private_numbers_from_profile() -> None:
    policy = SessionPolicy(
        configuration_url="https://cfg.example.net/a.xml",
        configuration_version=3,
        smartcard_removal_disconnect=True,
    )
    numbers = {
        "configuration_url": 16400,
        "configuration_version": 16401,
        "smartcard_removal_disconnect": 16402,
    }
    moved = profile(cisco_attributes=numbers)
    got = values(config_attributes(ADDRESS, None, policy, moved, {"unity", "flexvpn"}))
    assert got[16400] == [b"https://cfg.example.net/a.xml"]
    assert got[16401] == [bytes.fromhex("00000003")]
    assert got[16402] == [bytes.fromhex("0001")]
    assert not FLEXVPN & set(got)
    assert CfgAttribute.CISCO_SMARTCARD_REMOVAL_DISCONNECT not in got
    # the defaults (unverified, 28683..28685) without an override
    plain = values(config_attributes(ADDRESS, None, policy, profile(), {"flexvpn"}))
    assert plain[CfgAttribute.CISCO_CONFIGURATION_URL] == [
        b"https://cfg.example.net/a.xml"
    ]
