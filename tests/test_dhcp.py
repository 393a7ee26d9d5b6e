"""DHCP relay client: codec, and leases from an in-process fake server."""

from __future__ import annotations

import asyncio
import ipaddress
import os
import shutil
import struct
import subprocess
import sys
import time
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


# -- half-open sessions: the daemon releases what a dead session leased -------

HALF_OPEN_CONFIG = """\
[server]
listen = "127.0.0.1"
state_dir = "{state}"

[[profiles]]
name = "p"
local_identity = "fqdn:vpn.example"
psk = "a-long-enough-psk-0123"
dhcp_server = "{server}"
dhcp_giaddr = "{giaddr}"
dhcp_timeout = 3
"""


class FakeIkeSA:
    def __init__(self) -> None:
        from control.ike.sa import IkeState

        self.state = IkeState.HALF_OPEN
        self.superseded = False

    def die(self) -> None:
        from control.ike.sa import IkeState

        self.state = IkeState.DEAD


class FakeResponder:
    """The core as the daemon sees it: one session `s1`, and AAA answers."""

    def __init__(self) -> None:
        self.sa: FakeIkeSA | None = FakeIkeSA()
        self.results: list[Any] = []

    def session_sa(self, session_id: str) -> FakeIkeSA | None:
        sa = self.sa
        return sa if sa is not None and sa.state.value != "dead" else None

    def aaa_result(self, session_id: str, result: Any, now: float) -> None:
        self.results.append(result)

    def next_event(self) -> None:
        return None

    def datagrams_to_send(self) -> list[Any]:
        return []

    def get_timer(self) -> None:
        return None

    def established(self) -> list[Any]:
        return []


def half_open_headend(state: Any, relay: DhcpRelay) -> Any:
    """A Headend around a fake core, its DHCP relay given."""
    from control.config import parse
    from control.daemon import Headend

    text = HALF_OPEN_CONFIG.format(
        state=state, server=relay.server, giaddr=relay.giaddr
    )
    h = Headend(parse(text, "t.toml"))
    h.responder = FakeResponder()
    h._loop = asyncio.get_running_loop()
    h._relays[(str(relay.server), str(relay.giaddr))] = relay
    return h


def dhcp_request(session_id: str = "s1") -> Any:
    from control.ike.eap import AaaRequest

    return AaaRequest(session_id, "dhcp", "p", "alice", "198.18.0.2", b"")


async def until(check: Any, rounds: int = 200) -> None:
    """Let the loop run until `check()` holds (the fake server answers)."""
    for _ in range(rounds):
        if check():
            return
        await asyncio.sleep(0.01)


class HoldingServer(FakeServer):
    """Offers, then holds every REQUEST until `answer()` (or forever)."""

    def __init__(self) -> None:
        super().__init__()
        self.held: list[tuple[bytes, Any]] = []
        self.answering = False

    def datagram_received(self, data: bytes, addr: Any) -> None:
        if pull_message(data).kind == REQUEST and not self.answering:
            self.held.append((data, addr))
            return
        super().datagram_received(data, addr)

    def answer(self) -> None:
        self.answering = True
        for data, addr in self.held:
            super().datagram_received(data, addr)
        self.held.clear()


def released(server: FakeServer) -> list[IPv4]:
    return [m.ciaddr for m in server.seen if m.kind == RELEASE]


def test_half_open_session_dies_after_ack_lease_released(tmp_path) -> None:
    server = FakeServer()

    async def steps(relay: DhcpRelay) -> Any:
        h = half_open_headend(tmp_path, relay)
        h._aaa_start(dhcp_request())
        await h._dhcp_pending["s1"]
        assert [r.outcome for r in h.responder.results] == ["accept"]
        # IKE_AUTH never completes: the core forgets the SA, says nothing
        h.responder.sa.die()
        h._after_step()
        await until(lambda: released(server))
        return h

    h = run(server, steps)
    assert released(server) == [IPv4("198.18.130.11")]
    assert h._leases == {} and h._dhcp_open == {}
    assert h.counters["dhcp_half_open"] == 1


def test_half_open_session_alive_keeps_lease(tmp_path) -> None:
    server = FakeServer()

    async def steps(relay: DhcpRelay) -> Any:
        h = half_open_headend(tmp_path, relay)
        h._aaa_start(dhcp_request())
        await h._dhcp_pending["s1"]
        h._after_step()
        await asyncio.sleep(0.05)
        for task in h._leases["s1"][2:]:
            task.cancel()
        return h

    h = run(server, steps)
    assert released(server) == [] and "s1" in h._leases


def test_half_open_request_in_flight_cancelled_and_released(tmp_path) -> None:
    server = HoldingServer()

    async def steps(relay: DhcpRelay) -> Any:
        h = half_open_headend(tmp_path, relay)
        h._aaa_start(dhcp_request())
        task = h._dhcp_pending["s1"]
        await until(lambda: server.held)
        h.responder.sa.die()
        h._after_step()
        await asyncio.gather(task, return_exceptions=True)
        # the server's ACK comes after all: nobody takes it
        server.answer()
        await until(lambda: relay.stats.get("drop_unexpected"))
        return h, task

    h, task = run(server, steps)
    assert task.cancelled() and h.responder.results == []
    # RFC 2131 4.4.6: the REQUEST may have bound the address: released
    assert released(server) == [IPv4("198.18.130.11")]
    assert h._leases == {} and h._dhcp_pending == {}


def test_half_open_ack_after_death_released(tmp_path) -> None:
    server = HoldingServer()

    async def steps(relay: DhcpRelay) -> Any:
        h = half_open_headend(tmp_path, relay)
        h._aaa_start(dhcp_request())
        task = h._dhcp_pending["s1"]
        await until(lambda: server.held)
        # the SA dies, and the ACK arrives before the daemon looks again
        h.responder.sa.die()
        server.answer()
        await task
        await until(lambda: released(server))
        return h

    h = run(server, steps)
    assert [r.outcome for r in h.responder.results] == ["error"]
    assert released(server) == [IPv4("198.18.130.11")] and h._leases == {}


def test_shutdown_cancels_request_in_flight_and_releases(tmp_path) -> None:
    server = HoldingServer()

    async def steps(relay: DhcpRelay) -> Any:
        h = half_open_headend(tmp_path, relay)
        h._aaa_start(dhcp_request())
        task = h._dhcp_pending["s1"]
        await until(lambda: server.held)
        # keep the relay open for the fixture's own close
        h._relays.clear()
        await h._shutdown()
        await until(lambda: released(server))
        return task

    task = run(server, steps)
    assert task.cancelled() and released(server) == [IPv4("198.18.130.11")]


def test_lease_request_unanswered_releases_requested_address() -> None:
    server = HoldingServer()

    async def steps(relay: DhcpRelay) -> Any:
        lease = await relay.lease("s1")
        await until(lambda: released(server))
        return lease

    assert run(server, steps) is None
    assert released(server) == [IPv4("198.18.130.11")]


# -- the same against dnsmasq, in namespaces of our own ---------------------

HUB_GIADDR = "198.18.130.1"


async def _hub_half_open(server: str, state: str) -> None:
    """In the hub namespace: lease for a session, then let it die half-open."""
    # dnsmasq pings an address (about 3 s) before it offers it
    relay = DhcpRelay(server, HUB_GIADDR, timeout=4.0, retries=2)
    await relay.start()
    h = half_open_headend(state, relay)
    h._aaa_start(dhcp_request())
    await h._dhcp_pending["s1"]
    print(h._leases["s1"][1].address, flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    h.responder.sa.die()
    h._after_step()
    await asyncio.sleep(0.2)
    print("released" if not h._leases else "kept", flush=True)
    relay.close()


@pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("dnsmasq") is None,
    reason="needs root for namespaces, and dnsmasq",
)
def test_half_open_lease_gone_from_dnsmasq(tmp_path) -> None:
    from control.lab.dhcp import Dnsmasq
    from control.lab.procs import ProcessSet

    tag = f"egt-sa{os.getpid()}"
    hub, srv = f"{tag}h", f"{tag}s"
    hub_if, srv_if = f"egtsa{os.getpid()}a"[:15], f"egtsa{os.getpid()}b"[:15]

    def ip(*argv: str) -> None:
        subprocess.run(["ip", *argv], check=True, capture_output=True, timeout=10)

    hub_proc = None
    try:
        # hub --veth-- srv; giaddr on the hub's lo, routed back from srv
        ip("netns", "add", hub)
        ip("netns", "add", srv)
        ip("link", "add", hub_if, "netns", hub, "type", "veth", "peer", "name",
           srv_if, "netns", srv)  # fmt: skip
        ip("-n", hub, "addr", "add", "198.18.131.1/24", "dev", hub_if)
        ip("-n", hub, "addr", "add", f"{HUB_GIADDR}/32", "dev", "lo")
        ip("-n", srv, "addr", "add", "198.18.131.2/24", "dev", srv_if)
        for ns, dev in ((hub, hub_if), (hub, "lo"), (srv, srv_if), (srv, "lo")):
            ip("-n", ns, "link", "set", dev, "up")
        ip("-n", srv, "route", "add", "198.18.130.0/24", "via", "198.18.131.1")
        with ProcessSet(tmp_path / "logs") as procs:
            server = Dnsmasq(tmp_path / "dnsmasq", srv, srv_if, "198.18.130.10",
                             "198.18.130.50")  # fmt: skip
            server.start(procs)
            hub_proc = subprocess.Popen(
                ["ip", "netns", "exec", hub, sys.executable, __file__, "hub",
                 "198.18.131.2", str(tmp_path / "state")],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            )  # fmt: skip
            assert hub_proc.stdin is not None and hub_proc.stdout is not None
            address = hub_proc.stdout.readline().strip()
            assert address.startswith("198.18.130.")
            assert address in server.leases()
            hub_proc.stdin.write("die\n")
            hub_proc.stdin.flush()
            assert hub_proc.stdout.readline().strip() == "released"
            assert hub_proc.wait(timeout=30) == 0
            for _ in range(50):
                if address not in server.leases():
                    break
                time.sleep(0.1)
            assert address not in server.leases()
            assert "DHCPRELEASE" in server.log_text()
    finally:
        if hub_proc is not None and hub_proc.poll() is None:
            hub_proc.kill()
            hub_proc.wait(timeout=10)
        for ns in (hub, srv):
            subprocess.run(["ip", "netns", "del", ns], check=False, capture_output=True)


if __name__ == "__main__" and sys.argv[1:2] == ["hub"]:
    asyncio.run(_hub_half_open(sys.argv[2], sys.argv[3]))
