"""DHCP leases for clients, obtained by the headend acting as a relay agent.

Theory of operation: a remote-access client has no link to the DHCP server,
so the headend asks on its behalf as a relay agent would (RFC 2131 4.1,
RFC 1542): every message carries `giaddr`, an address of the headend on
which it listens on port 67, and the server answers there. Per session the
headend makes up a hardware address (locally administered, from the session
id) and a client identifier (option 61, from the session id), so the server
keeps one binding per session:

    DISCOVER --> OFFER --> REQUEST(server id, requested address) --> ACK
    at T1:   REQUEST(ciaddr) --> ACK       (renew; the lease moves on)
    at end:  RELEASE                       (no answer)

`pull_message` / `push_message` are the codec (RFC 2131 2, options RFC
2132); `DhcpRelay` owns the asyncio socket and matches answers by xid, with
a timeout and retransmissions; nothing here raises into the loop.

A lease must never outlive its session. Once our REQUEST has left, the
server may have bound the address even if we never see its ACK: when
`lease()` is cancelled at that point (the session died meanwhile), or the
ACK does not come, we send a RELEASE for the requested address, which costs
nothing if the server never bound it.
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import logging
import os
import socket
import struct
from dataclasses import dataclass, field

log = logging.getLogger("espgate.dhcp")

SERVER_PORT = 67
MAGIC = b"\x63\x82\x53\x63"
BOOTREQUEST, BOOTREPLY = 1, 2
DISCOVER, OFFER, REQUEST, DECLINE, ACK, NAK, RELEASE = 1, 2, 3, 4, 5, 6, 7
# RFC 2132 option codes
OPT_PAD, OPT_END = 0, 255
OPT_NETMASK, OPT_ROUTER, OPT_DNS, OPT_DOMAIN = 1, 3, 6, 15
OPT_REQUESTED, OPT_LEASE_TIME, OPT_TYPE, OPT_SERVER_ID = 50, 51, 53, 54
OPT_PARAMS, OPT_T1, OPT_T2, OPT_CLIENT_ID = 55, 58, 59, 61

IPv4 = ipaddress.IPv4Address
ZERO = IPv4(0)

# RFC 2131 2: the fixed part of a message
#  op htype hlen hops | xid | secs flags | ciaddr | yiaddr | siaddr | giaddr |
#  chaddr (16) | sname (64) | file (128) | magic cookie | options
FIXED = struct.Struct("!BBBBIHH4s4s4s4s16s64s128s4s")


class DhcpError(ValueError):
    """A DHCP message that cannot be decoded."""


@dataclass
class DhcpMessage:
    op: int
    xid: int
    ciaddr: IPv4 = ZERO
    yiaddr: IPv4 = ZERO
    giaddr: IPv4 = ZERO
    chaddr: bytes = bytes(6)
    flags: int = 0
    hops: int = 0
    options: dict[int, bytes] = field(default_factory=dict)

    @property
    def kind(self) -> int:
        value = self.options.get(OPT_TYPE, b"")
        return value[0] if value else 0


def push_message(m: DhcpMessage) -> bytes:
    """Encode a BOOTP/DHCP message (RFC 2131 2) with its options."""
    fixed = FIXED.pack(
        m.op, 1, len(m.chaddr), m.hops, m.xid, 0, m.flags,
        m.ciaddr.packed, m.yiaddr.packed, ZERO.packed, m.giaddr.packed,
        m.chaddr.ljust(16, b"\0"), bytes(64), bytes(128), MAGIC,
    )  # fmt: skip
    options = b""
    for code, value in m.options.items():
        options += bytes([code, len(value)]) + value
    return fixed + options + bytes([OPT_END])


def pull_message(data: bytes) -> DhcpMessage:
    """Decode a message; raise DhcpError for anything malformed."""
    if len(data) < FIXED.size:
        raise DhcpError(f"DHCP message too short ({len(data)} bytes)")
    (op, _htype, hlen, hops, xid, _secs, flags, ciaddr, yiaddr, _siaddr, giaddr,
     chaddr, _sname, _file, magic) = FIXED.unpack_from(data)  # fmt: skip
    # RFC 2131 3: options follow the magic cookie
    if magic != MAGIC or hlen > 16:
        raise DhcpError("not a DHCP message")
    options: dict[int, bytes] = {}
    pos = FIXED.size
    while pos < len(data):
        code = data[pos]
        if code == OPT_END:
            break
        if code == OPT_PAD:
            pos += 1
            continue
        if pos + 2 > len(data) or pos + 2 + data[pos + 1] > len(data):
            raise DhcpError(f"option {code} overruns the message")
        length = data[pos + 1]
        # RFC 3396: a repeated option is one long option
        options[code] = options.get(code, b"") + data[pos + 2 : pos + 2 + length]
        pos += 2 + length
    return DhcpMessage(
        op, xid, IPv4(ciaddr), IPv4(yiaddr), IPv4(giaddr), chaddr[:hlen], flags, hops,
        options,
    )  # fmt: skip


@dataclass
class Lease:
    """One client's lease as the server granted it."""

    session_id: str
    address: IPv4
    server: IPv4
    lease_time: int
    netmask: IPv4 | None = None
    dns: list[IPv4] = field(default_factory=list)
    chaddr: bytes = bytes(6)
    client_id: bytes = b""

    @property
    def renew_after(self) -> float:
        """Seconds until T1 (RFC 2131 4.4.5: half the lease by default)."""
        return max(1.0, self.lease_time / 2)


def client_ids(session_id: str) -> tuple[bytes, bytes]:
    """Return a locally administered MAC and a client identifier for a session."""
    digest = hashlib.sha256(session_id.encode()).digest()
    chaddr = bytes([(digest[0] & 0xFC) | 0x02]) + digest[1:6]
    return chaddr, b"\x00espgate-" + session_id.encode()


class _Protocol(asyncio.DatagramProtocol):
    def __init__(self, relay: DhcpRelay) -> None:
        self.relay = relay

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.relay._answer(data)

    def error_received(self, exc: Exception) -> None:
        self.relay.stats["socket_errors"] = self.relay.stats.get("socket_errors", 0) + 1


class DhcpRelay:
    """Get, renew and release leases from one DHCP server through `giaddr`."""

    def __init__(
        self,
        server: str,
        giaddr: str,
        timeout: float = 2.0,
        retries: int = 2,
        port: int = SERVER_PORT,
    ) -> None:
        self.server = IPv4(server)
        self.giaddr = IPv4(giaddr)
        # both ends use 67 (RFC 2131 4.1); another port only for tests
        self.port = port
        self.timeout = timeout
        self.retries = retries
        self.stats: dict[str, int] = {}
        self._waiting: dict[int, asyncio.Future[DhcpMessage]] = {}
        self._transport: asyncio.DatagramTransport | None = None

    async def start(self) -> None:
        """Listen on giaddr:67 for the server's answers."""
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # tests on another port let a fake server answer to our source port
        sock.bind((str(self.giaddr), SERVER_PORT if self.port == SERVER_PORT else 0))
        self._transport, _ = await loop.create_datagram_endpoint(
            lambda: _Protocol(self), sock=sock
        )

    def close(self) -> None:
        """Stop listening."""
        if self._transport is not None:
            self._transport.close()
            self._transport = None

    async def lease(self, session_id: str) -> Lease | None:
        """Obtain a lease for a session (DISCOVER, OFFER, REQUEST, ACK)."""
        chaddr, client_id = client_ids(session_id)
        offer = await self._exchange(
            self._message(DISCOVER, chaddr, client_id), (OFFER,)
        )
        if offer is None:
            return None
        server_id = offer.options.get(OPT_SERVER_ID, self.server.packed)
        request = self._message(REQUEST, chaddr, client_id)
        request.options[OPT_SERVER_ID] = server_id
        request.options[OPT_REQUESTED] = offer.yiaddr.packed
        # what the server may bind from the REQUEST on, ACK seen or not
        requested = Lease(session_id, offer.yiaddr, IPv4(server_id), 0,
                          chaddr=chaddr, client_id=client_id)  # fmt: skip
        try:
            ack = await self._exchange(request, (ACK, NAK))
        except asyncio.CancelledError:
            self._count("cancelled")
            self._release_quietly(requested)
            raise
        if ack is None:
            self._count("no_ack")
            self._release_quietly(requested)
            return None
        if ack.kind != ACK:
            self._count("nak")
            return None
        self._count("leases")
        return self._lease(session_id, ack, chaddr, client_id)

    async def renew(self, lease: Lease) -> Lease | None:
        """Renew a lease (RFC 2131 4.3.2, RENEWING); None if refused or lost."""
        request = self._message(REQUEST, lease.chaddr, lease.client_id)
        request.ciaddr = lease.address
        ack = await self._exchange(request, (ACK, NAK))
        if ack is None or ack.kind != ACK:
            self._count("renew_failed")
            return None
        self._count("renewals")
        return self._lease(lease.session_id, ack, lease.chaddr, lease.client_id)

    def release(self, lease: Lease) -> None:
        """Give a lease back (RFC 2131 4.4.6); the server does not answer."""
        message = self._message(RELEASE, lease.chaddr, lease.client_id)
        message.ciaddr = lease.address
        message.options[OPT_SERVER_ID] = lease.server.packed
        self._send(message)
        self._count("releases")

    # -- helpers ------------------------------------------------------------

    def _release_quietly(self, lease: Lease) -> None:
        if self._transport is None:
            return
        try:
            self.release(lease)
        except OSError as exc:
            log.error("dhcp release of %s failed: %s", lease.address, exc)

    def _message(self, kind: int, chaddr: bytes, client_id: bytes) -> DhcpMessage:
        xid = int.from_bytes(os.urandom(4), "big")
        return DhcpMessage(
            BOOTREQUEST,
            xid,
            giaddr=self.giaddr,
            chaddr=chaddr,
            hops=1,
            options={
                OPT_TYPE: bytes([kind]),
                OPT_CLIENT_ID: client_id,
                OPT_PARAMS: bytes([OPT_NETMASK, OPT_DNS, OPT_LEASE_TIME]),
            },
        )

    async def _exchange(
        self, message: DhcpMessage, kinds: tuple[int, ...]
    ) -> DhcpMessage | None:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[DhcpMessage] = loop.create_future()
        self._waiting[message.xid] = future
        try:
            for _ in range(1 + self.retries):
                self._send(message)
                try:
                    waiting = asyncio.shield(future)
                    answer = await asyncio.wait_for(waiting, self.timeout)
                except TimeoutError:
                    self._count("timeouts")
                    continue
                return answer if answer.kind in kinds else None
            log.warning("dhcp server %s does not answer", self.server)
            return None
        finally:
            self._waiting.pop(message.xid, None)

    def _send(self, message: DhcpMessage) -> None:
        if self._transport is None:
            raise RuntimeError("DhcpRelay not started")
        self._transport.sendto(push_message(message), (str(self.server), self.port))

    def _answer(self, data: bytes) -> None:
        try:
            message = pull_message(data)
        except DhcpError:
            self._count("drop_malformed")
            return
        future = self._waiting.get(message.xid)
        if message.op != BOOTREPLY or future is None or future.done():
            self._count("drop_unexpected")
            return
        future.set_result(message)

    def _lease(
        self, session_id: str, ack: DhcpMessage, chaddr: bytes, client_id: bytes
    ) -> Lease:
        options = ack.options
        # RFC 2132 9.2: lease time; an hour when the server leaves it out
        raw = options.get(OPT_LEASE_TIME, struct.pack("!I", 3600))
        lease_time = struct.unpack("!I", raw[:4].rjust(4, b"\0"))[0]
        dns = options.get(OPT_DNS, b"")
        return Lease(
            session_id=session_id,
            address=ack.yiaddr,
            server=IPv4(options.get(OPT_SERVER_ID, self.server.packed)),
            lease_time=lease_time,
            netmask=IPv4(options[OPT_NETMASK]) if OPT_NETMASK in options else None,
            dns=[IPv4(dns[i : i + 4]) for i in range(0, len(dns) - 3, 4)],
            chaddr=chaddr,
            client_id=client_id,
        )

    def _count(self, key: str) -> None:
        self.stats[key] = self.stats.get(key, 0) + 1
