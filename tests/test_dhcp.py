"""DHCP relay client: codec, and leases from an in-process fake server."""

from __future__ import annotations

import asyncio
import ipaddress
import struct
from typing import Any

import pytest

from control.dhcp import (
    ACK,
    BOOTREPLY,
    BOOTREQUEST,
    DISCOVER,
    NAK,
    OFFER,
    OPT_DNS,
    OPT_LEASE_TIME,
    OPT_NETMASK,
    OPT_SERVER_ID,
    OPT_TYPE,
    RELEASE,
    REQUEST,
    DhcpError,
    DhcpMessage,
    DhcpRelay,
    client_ids,
    pull_message,
    push_message,
)

IPv4 = ipaddress.IPv4Address
SERVER_ID = IPv4("127.0.0.1")


def test_message_round_trip_keeps_fields_and_options() -> None:
    m = DhcpMessage(
        BOOTREQUEST,
        0x12345678,
        ciaddr=IPv4("198.18.130.11"),
        giaddr=IPv4("198.18.130.1"),
        chaddr=bytes.fromhex("020102030405"),
        hops=1,
        options={OPT_TYPE: bytes([REQUEST]), OPT_SERVER_ID: SERVER_ID.packed},
    )
    data = push_message(m)
    # RFC 2131 2: 236 fixed octets, the magic cookie, options, END
    assert len(data) == 236 + 4 + 3 + 6 + 1 and data[236:240] == b"\x63\x82\x53\x63"
    assert pull_message(data) == m


def test_pull_truncated_option_rejected() -> None:
    data = push_message(DhcpMessage(BOOTREPLY, 1, options={OPT_DNS: bytes(8)}))
    with pytest.raises(DhcpError):
        pull_message(data[:-4])


def test_pull_without_magic_cookie_rejected() -> None:
    data = bytearray(push_message(DhcpMessage(BOOTREPLY, 1)))
    data[236] ^= 0xFF
    with pytest.raises(DhcpError):
        pull_message(bytes(data))


def test_client_ids_are_stable_and_locally_administered() -> None:
    mac, cid = client_ids("abcd")
    assert client_ids("abcd") == (mac, cid) and client_ids("abce")[0] != mac
    assert mac[0] & 0x02 and not mac[0] & 0x01


class FakeServer(asyncio.DatagramProtocol):
    """Grants 198.18.130.11 for 120 s; NAKs when `nak` is set."""

    def __init__(self, nak: bool = False, silent: bool = False) -> None:
        self.nak = nak
        self.silent = silent
        self.seen: list[DhcpMessage] = []

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: Any) -> None:
        m = pull_message(data)
        self.seen.append(m)
        if self.silent or m.kind == RELEASE:
            return
        kind = {DISCOVER: OFFER, REQUEST: NAK if self.nak else ACK}[m.kind]
        reply = DhcpMessage(
            BOOTREPLY,
            m.xid,
            yiaddr=IPv4("198.18.130.11"),
            giaddr=m.giaddr,
            chaddr=m.chaddr,
            options={
                OPT_TYPE: bytes([kind]),
                OPT_SERVER_ID: SERVER_ID.packed,
                OPT_LEASE_TIME: struct.pack("!I", 120),
                OPT_NETMASK: IPv4("255.255.255.0").packed,
                OPT_DNS: IPv4("198.19.1.54").packed + IPv4("198.19.1.55").packed,
            },
        )
        self.transport.sendto(push_message(reply), addr)


def run(server: FakeServer, steps: Any) -> Any:
    async def go() -> Any:
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(
            lambda: server, local_addr=("127.0.0.1", 0)
        )
        port = transport.get_extra_info("sockname")[1]
        relay = DhcpRelay("127.0.0.1", "127.0.0.1", timeout=0.2, retries=1, port=port)
        await relay.start()
        try:
            return await steps(relay)
        finally:
            relay.close()
            transport.close()

    return asyncio.run(go())


def test_lease_renew_release_through_relay() -> None:
    server = FakeServer()

    async def steps(relay: DhcpRelay) -> Any:
        lease = await relay.lease("s1")
        assert lease is not None
        renewed = await relay.renew(lease)
        relay.release(lease)
        await asyncio.sleep(0.05)
        return lease, renewed

    lease, renewed = run(server, steps)
    assert lease.address == IPv4("198.18.130.11") and lease.lease_time == 120
    assert lease.dns == [IPv4("198.19.1.54"), IPv4("198.19.1.55")]
    assert lease.renew_after == 60
    assert renewed is not None and renewed.address == lease.address
    kinds = [m.kind for m in server.seen]
    assert kinds == [DISCOVER, REQUEST, REQUEST, RELEASE]
    # RFC 2131 4.1: the relay sets giaddr; the renewal carries ciaddr
    assert all(m.giaddr == IPv4("127.0.0.1") for m in server.seen)
    assert server.seen[2].ciaddr == lease.address
    assert server.seen[1].options[50] == lease.address.packed


def test_lease_refused_by_nak() -> None:
    assert run(FakeServer(nak=True), lambda relay: relay.lease("s1")) is None


def test_lease_silent_server_times_out_after_retries() -> None:
    server = FakeServer(silent=True)
    assert run(server, lambda relay: relay.lease("s1")) is None
    assert [m.kind for m in server.seen] == [DISCOVER, DISCOVER]
