"""PSKs fetched from AAA: the responder parks IKE_AUTH until the keys come.

HDR, SK {IDi, AUTH, CP, SAi2, TSi, TSr}  -->  (AaaRequest "psk")
aaa_result(accept, psk_remote, psk_local) <--  HDR, SK {IDr, AUTH, CP, ...}
"""

from __future__ import annotations

import asyncio
import ipaddress
from typing import Any

import pytest
from pyrad import packet

from control.aaa.radius import RadiusClient, RadiusServer, load_dictionary
from control.ike.eap import AaaRequest, AaaResult
from control.ike.messages import NotifyType
from control.ike.profiles import SessionPolicy
from control.ike.responder import (
    Identity,
    IkeResponder,
    IkeSAUp,
    Profile,
    ResponderConfig,
)

try:
    from tests.ikeclient import IkeClient, ServerRefused
except ImportError:  # pytest's rootdir-relative import without tests/__init__.py
    from ikeclient import IkeClient, ServerRefused  # type: ignore[no-redef]

SERVER = ("198.18.0.1", 500)
CLIENT = ("198.18.0.2", 500)
KEY = b"aaa-fetched-psk-0123456789"
SECRET = b"radius-test-secret-0123"


def make_responder() -> IkeResponder:
    profile = Profile(
        name="aaa",
        remote_ids=["*@example.net"],
        local_id=Identity.from_string("vpn.example.net"),
        psk=b"",
        aaa_psk=True,
        local_ts=["198.18.50.0/24"],
    )
    free = [ipaddress.IPv4Address("198.18.100.10")]
    config = ResponderConfig(
        profiles=[profile],
        allocate_address=lambda identity, session: free.pop(0) if free else None,
        release_address=lambda address: None,
    )
    return IkeResponder(config)


def start(r: IkeResponder, psk: bytes) -> tuple[IkeClient, AaaRequest]:
    client = IkeClient(psk=psk)
    r.datagram_received(client.init_request(), SERVER, CLIENT, 0.0)
    client.handle_init_response(r.datagrams_to_send()[0].data)
    r.datagram_received(client.auth_request(), SERVER, CLIENT, 0.0)
    assert r.datagrams_to_send() == []
    ask = r.next_event()
    assert isinstance(ask, AaaRequest) and ask.kind == "psk"
    assert ask.user_name == "client@example.net"
    return client, ask


def test_aaa_psk_accepted_establishes_with_cached_dns() -> None:
    r = make_responder()
    client, ask = start(r, KEY)
    policy = SessionPolicy(dns=["198.19.1.77"])
    r.aaa_result(ask.session_id, AaaResult("accept", psk_remote=KEY, policy=policy), 1)
    result = client.handle_auth_response(r.datagrams_to_send()[0].data)
    assert result.inside_address == ipaddress.IPv4Address("198.18.100.10")
    assert result.dns == ["198.19.1.77"]
    assert isinstance(r.next_event(), IkeSAUp)


def test_aaa_psk_wrong_key_fails() -> None:
    r = make_responder()
    client, ask = start(r, b"not-the-key-from-radius-00")
    r.aaa_result(ask.session_id, AaaResult("accept", psk_remote=KEY), 1.0)
    with pytest.raises(ServerRefused) as info:
        client.handle_auth_response(r.datagrams_to_send()[0].data)
    assert info.value.notify == NotifyType.AUTHENTICATION_FAILED
    assert r.sessions() == []


def test_aaa_psk_reject_fails() -> None:
    r = make_responder()
    client, ask = start(r, KEY)
    r.aaa_result(ask.session_id, AaaResult("reject"), 1.0)
    with pytest.raises(ServerRefused):
        client.handle_auth_response(r.datagrams_to_send()[0].data)
    assert r.sessions() == []


class PskServer(asyncio.DatagramProtocol):
    def __init__(self, reply_attrs: dict[str, Any]) -> None:
        self.reply_attrs = reply_attrs
        self.passwords: list[str] = []

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: Any) -> None:
        req = packet.AuthPacket(packet=data, secret=SECRET, dict=load_dictionary())
        self.passwords.append(req.PwDecrypt(req["User-Password"][0]))
        reply = req.CreateReply()
        reply.code = packet.AccessAccept
        for name, value in self.reply_attrs.items():
            # RFC 2868 3.5: Tunnel-Password is a tag, then salt-encrypted
            reply[name] = b"\x00" + reply.SaltCrypt(value) if value is KEY else value
        reply.add_message_authenticator()
        self.transport.sendto(reply.ReplyPacket(), addr)


def fetch(reply_attrs: dict[str, Any]) -> tuple[AaaResult, list[str]]:
    async def run() -> tuple[AaaResult, list[str]]:
        loop = asyncio.get_running_loop()
        transport, server = await loop.create_datagram_endpoint(
            lambda: PskServer(reply_attrs), local_addr=("127.0.0.1", 0)
        )
        port = transport.get_extra_info("sockname")[1]
        client = RadiusClient(
            "g", [RadiusServer("127.0.0.1", port, SECRET)], user_password="pw-x"
        )
        request = AaaRequest("s", "psk", "aaa", "erin@example.net", "198.18.0.2", b"")
        result = await client.psk(request)
        transport.close()
        return result, server.passwords

    return asyncio.run(run())


def test_radius_psk_from_tunnel_password() -> None:
    result, passwords = fetch({"Tunnel-Password": KEY})
    assert result.outcome == "accept" and passwords == ["pw-x"]
    assert result.psk_remote == KEY and result.psk_local == KEY


def test_radius_psk_from_avpairs_local_and_remote() -> None:
    result, _ = fetch(
        {
            "Cisco-AVPair": [
                "ipsec:ikev2-password-remote=theirs-0123456789",
                "ipsec:ikev2-password-local=ours-0123456789",
            ]
        }
    )
    assert result.psk_remote == b"theirs-0123456789"
    assert result.psk_local == b"ours-0123456789"
    assert "Cisco-AVPair" not in result.attributes and "theirs" not in repr(result)
