"""RADIUS client for the headend: EAP relay with timeout, retransmit and failover.

Theory of operation: pyrad encodes and decodes packets (with our own
dictionary, `control/aaa/dictionary`); this module owns the asyncio UDP I/O.
A `RadiusClient` serves one server group: every request goes to the current
server, is retransmitted unchanged after `timeout` seconds up to
`retransmit` times, and when the server stays silent the next server of the
group becomes current (failover; the order wraps around once per request).
Each attempt on a new server is a new packet, since the authenticators
depend on its secret.

Every Access-Request carries a Message-Authenticator (RFC 3579 3.2), and
every answer must carry a valid one and a valid Response Authenticator
(pyrad's `VerifyReply` with `enforce_ma`); anything else is counted and
dropped as if lost. An EAP conversation is tracked per IKE session: the
State attribute of each Access-Challenge goes back in the next request
(RFC 2865 5.24). On Access-Accept the MSK is MS-MPPE-Recv-Key followed by
MS-MPPE-Send-Key, decrypted here (RFC 2548 2.4.2, RFC 3748 / RFC 5216 usage).

Shared secrets, MPPE keys and EAP payloads never reach a log.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import logging
import os
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from pyrad import packet
from pyrad.dictionary import Dictionary

from control.aaa.attributes import parse_authorization
from control.ike.eap import AaaRequest, AaaResult

log = logging.getLogger("espgate.aaa")

# RFC 3579 3.1: EAP-Message attributes carry at most 253 octets each
EAP_CHUNK = 253
SERVICE_FRAMED = 2
NAS_PORT_VIRTUAL = 5


class RadiusError(Exception):
    """No server of the group gave a valid answer."""


@dataclass(frozen=True)
class RadiusServer:
    address: str
    port: int
    secret: bytes = field(repr=False)


def load_dictionary() -> Dictionary:
    """Return the pyrad dictionary shipped with espgate."""
    path = resources.files("control") / "aaa" / "dictionary"
    with resources.as_file(path) as real:
        return Dictionary(str(real))


def mppe_decrypt(value: bytes, secret: bytes, request_authenticator: bytes) -> bytes:
    """Decrypt an MS-MPPE-Send-Key or -Recv-Key value (RFC 2548 2.4.2-2.4.3).

    The value is a two-byte salt and a string of 16-byte blocks: block i is
    plaintext i xor MD5(secret | previous), where "previous" is request
    authenticator and salt for the first block, else the ciphertext block
    before. The plaintext starts with the key length.
    """
    # RFC 2548 2.4.2: the salt's high bit is set; the string is 16n octets
    if len(value) < 18 or (len(value) - 2) % 16 or not value[0] & 0x80:
        raise ValueError(f"malformed MPPE key attribute ({len(value)} bytes)")
    salt, cipher = value[:2], value[2:]
    plain = b""
    previous = request_authenticator + salt
    for start in range(0, len(cipher), 16):
        block = cipher[start : start + 16]
        pad = hashlib.md5(secret + previous).digest()
        plain += bytes(a ^ b for a, b in zip(block, pad, strict=True))
        previous = block
    length = plain[0]
    if length > len(plain) - 1:
        raise ValueError(f"MPPE key length {length} exceeds the attribute")
    return plain[1 : 1 + length]


class _Exchange(asyncio.DatagramProtocol):
    """One request on its own connected UDP socket; the first valid reply wins."""

    def __init__(self, request: packet.AuthPacket, stats: collections.Counter[str]):
        self.request = request
        self.stats = stats
        self.reply: asyncio.Future[packet.Packet] = (
            asyncio.get_running_loop().create_future()
        )

    def datagram_received(self, data: bytes, addr: Any) -> None:
        if self.reply.done():
            return
        try:
            reply = packet.Packet(
                packet=data, secret=self.request.secret, dict=self.request.dict
            )
        except packet.PacketError:
            self.stats["drop_malformed"] += 1
            return
        # RFC 3579 3.2: a reply without a valid Message-Authenticator is void
        if not self.request.VerifyReply(reply, data, enforce_ma=True):
            self.stats["drop_authenticator"] += 1
            return
        self.reply.set_result(reply)

    def error_received(self, exc: Exception) -> None:
        self.stats["socket_errors"] += 1


class RadiusClient:
    """Authenticate through one group of RADIUS servers (tried in order)."""

    def __init__(
        self,
        name: str,
        servers: list[RadiusServer],
        *,
        timeout: float = 2.0,
        retransmit: int = 2,
        nas_identifier: str = "espgate",
        user_password: str = "espgate",
        dictionary: Dictionary | None = None,
    ) -> None:
        assert servers, "a RADIUS group needs a server"
        self.name = name
        self.servers = servers
        self.timeout = timeout
        self.retransmit = retransmit
        self.nas_identifier = nas_identifier
        self.user_password = user_password
        self.dict = dictionary or load_dictionary()
        self.stats: collections.Counter[str] = collections.Counter()
        self._current = 0
        self._state: dict[str, bytes] = {}

    async def eap(self, request: AaaRequest) -> AaaResult:
        """Relay one EAP response; return the verdict or the next challenge."""
        state = self._state.pop(request.session_id, None)

        def build(server: RadiusServer) -> packet.AuthPacket:
            pkt = self._access_request(server, request.user_name, request)
            eap = request.eap_message
            pkt["EAP-Message"] = [
                eap[i : i + EAP_CHUNK] for i in range(0, len(eap), EAP_CHUNK)
            ]
            if state is not None:
                pkt["State"] = state
            return pkt

        try:
            sent, reply = await self.send(build)
        except RadiusError as exc:
            log.warning("radius group %s: %s", self.name, exc)
            return AaaResult("error")
        eap_message = b"".join(reply.get("EAP-Message", []))
        if reply.code == packet.AccessChallenge:
            if "State" in reply:
                self._state[request.session_id] = reply["State"][0]
            return AaaResult("challenge", eap_message)
        if reply.code != packet.AccessAccept:
            self.stats["access_reject"] += 1
            return AaaResult("reject", eap_message)
        self.stats["access_accept"] += 1
        try:
            msk = self._msk(sent, reply)
        except ValueError as exc:
            log.warning("radius group %s: %s", self.name, exc)
            return AaaResult("reject", b"")
        names = reply.get("User-Name", [])
        attributes = reply_attributes(reply)
        authorization = parse_authorization(attributes, self.stats)
        return AaaResult(
            "accept",
            eap_message,
            msk=msk,
            user_name=str(names[0]) if names else None,
            attributes=attributes,
            policy=None if authorization.is_empty() else authorization.policy(),
        )

    async def psk(self, request: AaaRequest) -> AaaResult:
        """Fetch the PSKs (and authorization) of an IKE identity.

        The peer's key is ipsec:ikev2-password-remote, else Tunnel-Password
        (RFC 2868 3.5); ours is ipsec:ikev2-password-local, else the same.
        """

        def build(server: RadiusServer) -> packet.AuthPacket:
            pkt = self._access_request(server, request.user_name, request)
            pkt["User-Password"] = pkt.PwCrypt(self.user_password)
            return pkt

        try:
            sent, reply = await self.send(build)
        except RadiusError as exc:
            log.warning("radius group %s: %s", self.name, exc)
            return AaaResult("error")
        if reply.code != packet.AccessAccept:
            self.stats["access_reject"] += 1
            return AaaResult("reject")
        self.stats["access_accept"] += 1
        attributes = reply_attributes(reply)
        authorization = parse_authorization(attributes, self.stats)
        remote = authorization.ikev2_password_remote
        tunnel = attributes.pop("Tunnel-Password", [])
        if remote is None and tunnel:
            try:
                # RFC 2868 3.5: a tag octet, then salt and string as for MPPE
                remote = mppe_decrypt(tunnel[0][1:], sent.secret, sent.authenticator)
            except ValueError as exc:
                log.warning("radius group %s: Tunnel-Password: %s", self.name, exc)
        local = authorization.ikev2_password_local or remote
        # the password pairs are secrets: keep them out of what is passed on
        pairs = [p for p in attributes.pop("Cisco-AVPair", []) if "password" not in p]
        if pairs:
            attributes["Cisco-AVPair"] = pairs
        return AaaResult(
            "accept",
            user_name=request.user_name,
            attributes=attributes,
            policy=None if authorization.is_empty() else authorization.policy(),
            psk_remote=remote or b"",
            psk_local=local or b"",
        )

    async def lookup(
        self, user_name: str, calling_station: str
    ) -> tuple[str, dict[str, list[Any]]]:
        """Ask for the authorization attributes of a user or group name.

        Returns ("accept", attributes), ("reject", {}) or ("error", {}).
        """
        request = AaaRequest("", "authorize", "", user_name, calling_station, b"")

        def build(server: RadiusServer) -> packet.AuthPacket:
            pkt = self._access_request(server, user_name, request)
            pkt["User-Password"] = pkt.PwCrypt(self.user_password)
            return pkt

        try:
            _, reply = await self.send(build)
        except RadiusError as exc:
            log.warning("radius group %s: %s", self.name, exc)
            return "error", {}
        if reply.code != packet.AccessAccept:
            self.stats["access_reject"] += 1
            return "reject", {}
        self.stats["access_accept"] += 1
        return "accept", reply_attributes(reply)

    def forget(self, session_id: str) -> None:
        """Drop the EAP state of a session that went away."""
        self._state.pop(session_id, None)

    async def send(self, build: Any) -> tuple[packet.AuthPacket, packet.Packet]:
        """Send `build(server)` with retransmits and failover; return both packets.

        Raises RadiusError when no server answers validly.
        """
        loop = asyncio.get_running_loop()
        for step in range(len(self.servers)):
            index = (self._current + step) % len(self.servers)
            server = self.servers[index]
            pkt = build(server)
            data = pkt.RequestPacket()
            proto = _Exchange(pkt, self.stats)

            def factory(made: _Exchange = proto) -> _Exchange:
                return made

            transport, _ = await loop.create_datagram_endpoint(
                factory, remote_addr=(server.address, server.port)
            )
            try:
                for attempt in range(1 + self.retransmit):
                    self.stats["requests" if attempt == 0 else "retransmits"] += 1
                    transport.sendto(data)
                    try:
                        reply = await asyncio.wait_for(
                            asyncio.shield(proto.reply), self.timeout
                        )
                    except TimeoutError:
                        continue
                    if index != self._current:
                        log.info(
                            "radius group %s: failed over to %s:%d",
                            self.name,
                            server.address,
                            server.port,
                        )
                        self._current = index
                    return pkt, reply
            finally:
                transport.close()
            self.stats["server_timeouts"] += 1
            log.warning(
                "radius server %s:%d of group %s does not answer",
                server.address,
                server.port,
                self.name,
            )
        raise RadiusError("no server answered")

    def _access_request(
        self, server: RadiusServer, user_name: str, request: AaaRequest
    ) -> packet.AuthPacket:
        pkt = packet.AuthPacket(
            code=packet.AccessRequest,
            secret=server.secret,
            dict=self.dict,
            authenticator=os.urandom(16),
        )
        pkt.add_message_authenticator()
        pkt["User-Name"] = user_name
        pkt["Service-Type"] = SERVICE_FRAMED
        pkt["NAS-Port-Type"] = NAS_PORT_VIRTUAL
        pkt["NAS-Identifier"] = self.nas_identifier
        pkt["Calling-Station-Id"] = request.calling_station
        return pkt

    def _msk(self, sent: packet.AuthPacket, reply: packet.Packet) -> bytes:
        # RFC 3748 / RFC 2548: MSK = recv key | send key (the NAS's view)
        recv = reply.get("MS-MPPE-Recv-Key", [])
        send = reply.get("MS-MPPE-Send-Key", [])
        if not recv or not send:
            return b""
        secret = sent.secret
        auth = sent.authenticator
        return mppe_decrypt(recv[0], secret, auth) + mppe_decrypt(send[0], secret, auth)


def reply_attributes(reply: packet.Packet) -> dict[str, list[Any]]:
    """Return the reply's attributes by name, minus EAP, keys and authenticators."""
    skip = {
        "EAP-Message",
        "Message-Authenticator",
        "MS-MPPE-Recv-Key",
        "MS-MPPE-Send-Key",
        "State",
    }
    out: dict[str, list[Any]] = {}
    for key in reply.keys():  # noqa: SIM118 (pyrad names them here)
        if isinstance(key, str) and key not in skip:
            out[key] = list(reply[key])
    return out
