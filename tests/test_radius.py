"""The RADIUS client against in-process fake servers built with pyrad's server side.

The fake server checks each Access-Request's Message-Authenticator, answers
with a Message-Authenticator of its own, and encrypts MS-MPPE keys with
pyrad's RFC 2868 salt encryption (the same scheme as RFC 2548 2.4.2), so the
client's hand-written MPPE decryption is checked against an independent
encoder.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest
from pyrad import packet

from control.aaa.radius import (
    RadiusClient,
    RadiusServer,
    load_dictionary,
    mppe_decrypt,
)
from control.ike.eap import AaaRequest, eap_packet

SECRET = b"radius-test-secret-0123"
DICT = load_dictionary()
RECV_KEY = bytes(range(32))
SEND_KEY = bytes(range(100, 132))

Answer = Callable[[packet.AuthPacket], packet.AuthPacket | None]


class FakeServer(asyncio.DatagramProtocol):
    def __init__(self, answer: Answer, tamper: bool = False) -> None:
        self.answer = answer
        self.tamper = tamper
        self.requests: list[packet.AuthPacket] = []

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: Any) -> None:
        req = packet.AuthPacket(packet=data, secret=SECRET, dict=DICT)
        assert req.message_authenticator and req.verify_message_authenticator()
        self.requests.append(req)
        reply = self.answer(req)
        if reply is None:
            return
        reply.add_message_authenticator()
        raw = bytearray(reply.ReplyPacket())
        if self.tamper:
            raw[-1] ^= 1  # inside the Message-Authenticator
        self.transport.sendto(bytes(raw), addr)


async def start(answer: Answer, tamper: bool = False) -> tuple[Any, FakeServer, int]:
    loop = asyncio.get_running_loop()
    transport, proto = await loop.create_datagram_endpoint(
        lambda: FakeServer(answer, tamper), local_addr=("127.0.0.1", 0)
    )
    return transport, proto, transport.get_extra_info("sockname")[1]


def silent_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def eap_request(user: str = "alice") -> AaaRequest:
    return AaaRequest(
        "s1", "eap", "p", user, "198.18.0.2", eap_packet(2, 0, b"\x01" + user.encode())
    )


def challenge_then_accept(req: packet.AuthPacket) -> packet.AuthPacket:
    reply = req.CreateReply()
    if "State" not in req:
        reply.code = packet.AccessChallenge
        reply["EAP-Message"] = [eap_packet(1, 1, bytes([4, 16]) + bytes(16))]
        reply["State"] = b"state-1"
        return reply
    assert req["State"] == [b"state-1"]
    reply.code = packet.AccessAccept
    reply["EAP-Message"] = [eap_packet(3, 1)]
    reply["User-Name"] = "alice-canonical"
    reply["Framed-IP-Address"] = "198.18.128.77"
    reply["MS-MPPE-Recv-Key"] = reply.SaltCrypt(RECV_KEY)
    reply["MS-MPPE-Send-Key"] = reply.SaltCrypt(SEND_KEY)
    return reply


def test_mppe_decrypt_undoes_pyrad_salt_encryption() -> None:
    req = packet.AuthPacket(code=packet.AccessRequest, secret=SECRET, dict=DICT)
    req.authenticator = bytes(range(16))
    reply = req.CreateReply()
    value = reply.SaltCrypt(RECV_KEY)
    assert mppe_decrypt(value, SECRET, req.authenticator) == RECV_KEY


def test_mppe_decrypt_tampered_gives_other_key_or_error() -> None:
    req = packet.AuthPacket(code=packet.AccessRequest, secret=SECRET, dict=DICT)
    req.authenticator = bytes(range(16))
    value = bytearray(req.CreateReply().SaltCrypt(RECV_KEY))
    value[5] ^= 0x40
    try:
        assert mppe_decrypt(bytes(value), SECRET, req.authenticator) != RECV_KEY
    except ValueError:
        pass


def test_mppe_decrypt_malformed_length_rejected() -> None:
    with pytest.raises(ValueError):
        mppe_decrypt(b"\x80\x01" + bytes(15), SECRET, bytes(16))


def test_eap_challenge_then_accept_gives_msk_and_user_name() -> None:
    async def run() -> tuple[Any, Any, FakeServer]:
        transport, server, port = await start(challenge_then_accept)
        client = RadiusClient("g", [RadiusServer("127.0.0.1", port, SECRET)])
        first = await client.eap(eap_request())
        second = await client.eap(eap_request())
        transport.close()
        return first, second, server

    first, second, server = asyncio.run(run())
    assert first.outcome == "challenge" and first.eap_message[0] == 1
    assert second.outcome == "accept" and second.eap_message == eap_packet(3, 1)
    # RFC 2548 / RFC 3748: the MSK is the receive key, then the send key
    assert second.msk == RECV_KEY + SEND_KEY
    assert second.user_name == "alice-canonical"
    assert second.attributes["Framed-IP-Address"] == ["198.18.128.77"]
    req = server.requests[0]
    assert req["User-Name"] == ["alice"]
    assert req["Calling-Station-Id"] == ["198.18.0.2"]
    assert b"".join(req["EAP-Message"]) == eap_request().eap_message


def test_eap_reply_with_bad_message_authenticator_is_dropped() -> None:
    async def run() -> Any:
        transport, server, port = await start(challenge_then_accept, tamper=True)
        client = RadiusClient(
            "g", [RadiusServer("127.0.0.1", port, SECRET)], timeout=0.2, retransmit=1
        )
        result = await client.eap(eap_request())
        transport.close()
        return result, client.stats

    result, stats = asyncio.run(run())
    assert result.outcome == "error"
    assert stats["drop_authenticator"] == 2 and stats["retransmits"] == 1


def test_eap_silent_server_fails_over_to_the_next() -> None:
    async def run() -> Any:
        transport, server, port = await start(challenge_then_accept)
        client = RadiusClient(
            "g",
            [
                RadiusServer("127.0.0.1", silent_port(), SECRET),
                RadiusServer("127.0.0.1", port, SECRET),
            ],
            timeout=0.2,
            retransmit=2,
        )
        first = await client.eap(eap_request())
        second = await client.eap(eap_request())
        transport.close()
        return first, second, client.stats, len(server.requests)

    first, second, stats, served = asyncio.run(run())
    assert first.outcome == "challenge" and second.outcome == "accept"
    # three tries on the silent server, then the live one stays current
    assert stats["server_timeouts"] == 1 and stats["retransmits"] == 2
    assert served == 2


def test_eap_reject_is_reported() -> None:
    def reject(req: packet.AuthPacket) -> packet.AuthPacket:
        reply = req.CreateReply()
        reply.code = packet.AccessReject
        reply["EAP-Message"] = [eap_packet(4, 1)]
        return reply

    async def run() -> Any:
        transport, server, port = await start(reject)
        client = RadiusClient("g", [RadiusServer("127.0.0.1", port, SECRET)])
        result = await client.eap(eap_request())
        transport.close()
        return result

    result = asyncio.run(run())
    assert result.outcome == "reject" and result.eap_message == eap_packet(4, 1)
