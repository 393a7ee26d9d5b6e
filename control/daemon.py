"""The headend daemon: the one asyncio (uvloop) adapter around the sans-I/O core.

Theory of operation::

    UDP 500  --uvloop endpoint-->  IkeResponder.datagram_received
    UDP 4500 --fastpath worker-->  ESP: decrypted into the session's TUN
                                   IKE (non-ESP marker): call_soon_threadsafe
                                   -> IkeResponder.datagram_received
    IkeResponder.datagrams_to_send -> port 500 transport / Engine.send_ike
    IkeResponder.next_event        -> ChildSAUp: TUN + route + SAs to the engine
                                      ChildSADown / IkeSADown: SAs, TUN removed
    IkeResponder.get_timer         -> one loop.call_at, re-armed after each step

The engine owns the port 4500 socket because ESP arrives there; its worker
thread hands IKE datagrams back to the loop.  Nothing raised while handling a
datagram escapes into the loop: it is logged and counted.

The control socket (a root-only Unix socket) answers one JSON request per
connection: ``{"cmd": "show-sessions"}``, ``{"cmd": "show-counters"}`` or
``{"cmd": "delete-session", "session": ID}`` (the headend deletes the IKE SA).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import ipaddress
import json
import logging
import os
import signal
import socket
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from control.aaa.authorize import Authorizer
from control.config import Config
from control.ikebind import build_radius_clients, build_responder_config
from control.pool import AddressPool, LeaseStore
from control.routes import add_route
from control.seqstore import UntrustedState

log = logging.getLogger("espgate.daemon")

Address = tuple[str, int]
SEQ_POLL = 1.0
POWER_CUT_ENV = "ESPGATE_POWER_CUT_MODEL"


@dataclass
class Session:
    """What the daemon keeps per IKE SA beyond the responder's own state."""

    session_id: str
    index: int
    identity: str
    remote: Address
    tun_fd: int | None = None
    tun_name: str | None = None
    inside_address: str | None = None
    inside_address6: str | None = None
    children: list[tuple[int, int]] = field(default_factory=list)
    created: float = field(default_factory=time.time)
    # per CHILD SA (by inbound SPI) what a whole-daemon restart reinstalls
    child_state: dict[int, dict[str, Any]] = field(default_factory=dict, repr=False)
    # the profile's child_rekey_bytes (0 = off) and the inbound SPIs whose
    # rekey the byte count already started
    rekey_bytes: int = 0
    bytes_rekeyed: set[int] = field(default_factory=set, repr=False)


class _IkeProtocol(asyncio.DatagramProtocol):
    def __init__(self, receive: Callable[[bytes, Address], None]):
        self.receive = receive

    def datagram_received(self, data: bytes, addr: Address) -> None:
        self.receive(data, addr)

    def error_received(self, exc: Exception) -> None:
        log.debug("port 500 socket error: %s", exc)


class Headend:
    """Run the IKE responder, the ESP engine and the control socket."""

    def __init__(self, config: Config):
        self.config = config
        # leases in SQLite under state_dir, so they survive a restart
        state = config.server.state_dir
        self.leases = LeaseStore(Path(state) / "leases.sqlite") if state else None
        self.pools = {
            name: AddressPool(pool, self.leases) for name, pool in config.pools.items()
        }
        self.sessions: dict[str, Session] = {}
        self.counters: dict[str, int] = {
            "ike_rx_500": 0,
            "ike_rx_4500": 0,
            "ike_tx": 0,
            "handler_errors": 0,
            "sessions_up": 0,
            "sessions_down": 0,
        }
        self._next_index = 1
        self._local_cache: dict[str, str] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._stopping: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._transport500: asyncio.DatagramTransport | None = None
        self._sock4500: socket.socket | None = None
        self._ctl_server: asyncio.AbstractServer | None = None
        self._ctl_inode = -1
        self._seq_timer: asyncio.TimerHandle | None = None
        self._store: Any = None
        self._stored: dict[str, bytes] = {}
        # two daemons may share a state dir (labs): each only sees its records
        srv = config.server
        key = f"{srv.listen}|{srv.natt_port}|{srv.control_socket}".encode()
        self._scope = hashlib.sha256(key).hexdigest()[:12] + "/"
        self.engine: Any = None
        self.responder: Any = None
        # AAA: RADIUS groups by name, the group of each profile
        self.radius: dict[str, Any] = {}
        self._aaa_of = {
            (p.name, kind): group
            for p in config.profiles
            for kind, group in (("eap", p.aaa_authentication), ("psk", p.aaa_psk))
        }
        self._aaa_tasks: set[asyncio.Task[None]] = set()
        self._cached_of = {p.name: p.authorization_cached for p in config.profiles}
        self._rekey_bytes_of = {p.name: p.child_rekey_bytes for p in config.profiles}
        self._relays: dict[tuple[str, str], Any] = {}
        self._leases: dict[str, tuple[Any, Any, asyncio.Future[None]]] = {}

    # -- lifecycle ---------------------------------------------------------

    async def run(self) -> None:
        """Serve until SIGTERM or SIGINT, then tear every session down."""
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._stopping = asyncio.Event()
        srv = self.config.server
        self._check_forwarding()

        try:
            await self._start(loop)
        except BaseException:
            await self._shutdown()
            raise
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stopping.set)
        loop.add_signal_handler(signal.SIGHUP, self._on_hangup)
        log.info(
            "listening on %s ports %d/%d, engine %s, %d profile(s)",
            srv.listen,
            srv.ike_port,
            srv.natt_port,
            self.config.engine.crypto,
            len(self.config.profiles),
        )
        try:
            await self._stopping.wait()
        finally:
            await self._shutdown()

    async def _start(self, loop: asyncio.AbstractEventLoop) -> None:
        from control.ike.responder import IkeResponder
        from fastpath import Engine

        srv = self.config.server
        # the control socket first: it refuses to start beside a running daemon
        await self._start_control_socket()

        # sockets: 500 in the loop, 4500 to the engine
        try:
            self._transport500, _ = await loop.create_datagram_endpoint(
                lambda: _IkeProtocol(self._on_port500),
                local_addr=(srv.listen, srv.ike_port),
            )
        except OSError as exc:
            raise StartupError(
                f"cannot bind UDP {srv.listen}:{srv.ike_port}: {exc.strerror or exc}"
            ) from None
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._sock4500 = sock
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
        try:
            sock.bind((srv.listen, srv.natt_port))
        except OSError as exc:
            raise StartupError(
                f"cannot bind UDP {srv.listen}:{srv.natt_port}: {exc.strerror or exc}"
            ) from None
        sock.setblocking(False)

        # engine and responder
        eng = self.config.engine
        if eng.dataplane == "process":
            from control.dataplane import DataplaneProxy
            from control.seqstore import SeqStore

            store: Any = SeqStore.in_dir(srv.state_dir)
            self._store = store
            kwargs: dict[str, Any] = {}
            if os.environ.get(POWER_CUT_ENV) == "1":
                # selftest power-cut-store: the store as its fsync model,
                # small blocks so a cut often meets a reservation in flight
                from control.seqstore import SnapshotStore

                store.close()
                store = SnapshotStore(store.path)
                self._store = None
                kwargs["reserver_kwargs"] = {"min_block": 256}
                log.warning("%s=1: power-cut model store, for tests", POWER_CUT_ENV)
            self.engine = DataplaneProxy(
                sock.fileno(),
                batch=eng.batch,
                crypto=eng.crypto,
                store=store,
                record_scope=self._scope,
                **kwargs,
            )
        else:
            self.engine = Engine(sock.fileno(), batch=eng.batch, crypto=eng.crypto)
        responder_config = build_responder_config(self.config, self.pools)
        self.radius = build_radius_clients(self.config)
        self.authorizer = Authorizer(self.config, self.radius)
        # inbound ESP counts as hearing from the peer (liveness checks)
        responder_config.inbound_packets = lambda spi: int(
            self.engine.sa_counters(spi, True)["packets"]
        )
        self.responder = IkeResponder(responder_config)
        self.engine.start(self._on_port4500_thread)
        self._seq_timer = loop.call_later(SEQ_POLL, self._poll_seq_events)
        if self._store is not None:
            self._resume_sessions()
            self._after_step()

    def _on_hangup(self) -> None:
        log.warning("SIGHUP ignored: reloading the config is not supported yet; "
                    "restart the daemon to apply a new one")

    def stop(self) -> None:
        """Ask a running daemon to stop (from the loop's thread)."""
        if self._stopping is not None:
            self._stopping.set()

    async def _shutdown(self) -> None:
        log.info("stopping: %d session(s)", len(self.sessions))
        # tell clients we are going, give them a moment to answer
        now = time.monotonic()
        for session_id in list(self.sessions if self.responder else ()):
            self._guard(self.responder.delete_ike_sa, session_id, now)
        # the clients were told: nothing to resume at the next start
        if self.responder is not None:
            self._guard(self._persist)
        self._flush()
        if self.sessions:
            await asyncio.sleep(0.3)
        for session in list(self.sessions.values()):
            self._teardown(session, "daemon stopping")
        for session_id in list(self._leases):
            self._guard(self._dhcp_release, session_id)
        for relay in self._relays.values():
            relay.close()
        if self._timer is not None:
            self._timer.cancel()
        if self._seq_timer is not None:
            self._seq_timer.cancel()
        if self.engine is not None:
            self.engine.stop()
        if self._transport500 is not None:
            self._transport500.close()
        if self._sock4500 is not None:
            self._sock4500.close()
        if self._ctl_server is not None:
            self._ctl_server.close()
            await self._ctl_server.wait_closed()
            path = Path(self.config.server.control_socket)
            # remove the socket only if it is still ours
            with contextlib.suppress(OSError):
                if path.lstat().st_ino == self._ctl_inode:
                    path.unlink()
        log.info("stopped")

    def _check_forwarding(self) -> None:
        try:
            forwarding = Path("/proc/sys/net/ipv4/ip_forward").read_text().strip()
        except OSError:
            return
        if forwarding != "1":
            log.warning("net.ipv4.ip_forward is 0: traffic will not leave the headend")

    # -- datagrams in ------------------------------------------------------

    def _on_port500(self, data: bytes, addr: Address) -> None:
        self.counters["ike_rx_500"] += 1
        self._receive(data, addr, self.config.server.ike_port)

    def _on_port4500_thread(self, data: bytes, addr: tuple[str, int]) -> None:
        # called on the engine's worker thread
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._on_port4500, data, addr)

    def _on_port4500(self, data: bytes, addr: Address) -> None:
        self.counters["ike_rx_4500"] += 1
        self._receive(data, addr, self.config.server.natt_port)

    def _receive(self, data: bytes, remote: Address, port: int) -> None:
        local = (self._local_address(remote[0]), port)
        self._guard(
            self.responder.datagram_received, data, local, remote, time.monotonic()
        )
        self._after_step()

    def _local_address(self, remote_ip: str) -> str:
        listen = self.config.server.listen
        if not ipaddress.ip_address(listen).is_unspecified:
            return listen
        cached = self._local_cache.get(remote_ip)
        if cached is None:
            # the source address the kernel would use towards this peer
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
                probe.connect((remote_ip, 9))
                cached = probe.getsockname()[0]
            self._local_cache[remote_ip] = cached
        return cached

    # -- after each responder step: send, apply events, re-arm the timer ----

    def _after_step(self) -> None:
        # SAs and routes go in before the response that lets the client send
        while (event := self._guard(self.responder.next_event)) is not None:
            self._guard(self._apply, event)
        # stored before the datagrams leave: a stored message ID is never
        # behind a response the peer may have seen
        self._guard(self._persist)
        self._flush()
        self._arm_timer()

    def _flush(self) -> None:
        if self.responder is None:
            return
        for dgram in self.responder.datagrams_to_send():
            self.counters["ike_tx"] += 1
            try:
                if dgram.local[1] == self.config.server.natt_port:
                    self.engine.send_ike(dgram.data, dgram.remote)
                else:
                    assert self._transport500 is not None
                    self._transport500.sendto(dgram.data, dgram.remote)
            except OSError as exc:
                log.error("sending IKE to %s failed: %s", dgram.remote, exc)

    def _arm_timer(self) -> None:
        assert self._loop is not None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        deadline = self.responder.get_timer()
        if deadline is None:
            return
        delay = max(0.0, deadline - time.monotonic())
        self._timer = self._loop.call_later(delay, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._guard(self.responder.handle_timer, time.monotonic())
        self._after_step()

    def _poll_child_bytes(self, now: float) -> None:
        # RFC 4301 section 4.4.2.1: a byte lifetime per SA; at the soft limit
        # (the profile's child_rekey_bytes, either direction) rekey the CHILD SA
        for session in list(self.sessions.values()):
            if not session.rekey_bytes:
                continue
            for spi_in, spi_out in list(session.children):
                if spi_in in session.bytes_rekeyed:
                    continue
                try:
                    used = max(
                        int(self.engine.sa_counters(spi_in, True)["bytes"]),
                        int(self.engine.sa_counters(spi_out, False)["bytes"]),
                    )
                except KeyError:
                    continue
                if used < session.rekey_bytes:
                    continue
                sid = session.session_id
                if not self._guard(self.responder.rekey_child_soon, sid, spi_in, now):
                    continue
                session.bytes_rekeyed.add(spi_in)
                self.counters["child_bytes_rekeys"] = (
                    self.counters.get("child_bytes_rekeys", 0) + 1
                )
                log.info(
                    "child sa %08x/%08x carried %d bytes (limit %d): rekeying",
                    spi_in, spi_out, used, session.rekey_bytes,
                )  # fmt: skip

    def _poll_seq_events(self) -> None:
        # SeqExhausting from the reserver: rekey the CHILD SA now (RFC 4303
        # 3.3.3: the counter never cycles); delete it if no rekey can start
        assert self._loop is not None
        self._seq_timer = self._loop.call_later(SEQ_POLL, self._poll_seq_events)
        now = time.monotonic()
        self._poll_child_bytes(now)
        reserver = getattr(self.engine, "reserver", None)
        if reserver is None:
            self._after_step()
            return
        for event in reserver.events():
            for session in list(self.sessions.values()):
                pair = next((c for c in session.children if c[1] == event.spi), None)
                if pair is None:
                    continue
                sid = session.session_id
                if self._guard(self.responder.rekey_child_soon, sid, pair[0], now):
                    action = "seq_exhaustion_rekeys"
                else:
                    action = "seq_exhaustion_deletes"
                    self._guard(self.responder.delete_child_sa, sid, pair[0], now)
                self.counters[action] = self.counters.get(action, 0) + 1
                log.info(
                    "child sa %08x/%08x at seq %d of %d: %s before exhaustion",
                    *pair,
                    event.next_seq,
                    event.hard_end,
                    "rekeying" if action.endswith("rekeys") else "deleting",
                )
        self._after_step()

    def _guard(self, func: Callable[..., Any], *args: Any) -> Any:
        try:
            return func(*args)
        except Exception:
            self.counters["handler_errors"] += 1
            log.exception("error in %s", getattr(func, "__name__", func))
            return None

    # -- events ------------------------------------------------------------

    def _apply(self, event: Any) -> None:
        from control.ike import responder as ike

        if isinstance(event, ike.IkeSAUp):
            up = self._session(event.session_id, event.identity, event.remote)
            up.rekey_bytes = self._rekey_bytes_of.get(event.profile, 0)
            log.info(
                "ike sa %s up: %s from %s:%d (profile %s)",
                event.session_id,
                event.identity,
                *event.remote,
                event.profile,
            )
        elif isinstance(event, ike.ChildSAUp):
            self._child_up(event)
        elif isinstance(event, ike.ChildSADown):
            self._child_down(event.session_id, event.spi_in, event.spi_out)
        elif isinstance(event, ike.PeerMoved):
            moved = self.sessions.get(event.session_id)
            if moved is not None and moved.remote != tuple(event.remote):
                log.info(
                    "session %s moved %s:%d -> %s:%d",
                    moved.session_id,
                    *moved.remote,
                    *event.remote,
                )
                moved.remote = (event.remote[0], event.remote[1])
                if moved.tun_fd is not None:
                    self.engine.set_peer(moved.index, moved.remote)
        elif isinstance(event, ike.AaaRequest):
            self._aaa_start(event)
        elif isinstance(event, ike.IkeSADown):
            for client in self.radius.values():
                client.forget(event.session_id)
            self._guard(self._dhcp_release, event.session_id)
            session = self.sessions.get(event.session_id)
            if session is not None:
                self._teardown(session, event.reason)

    # -- AAA: RADIUS exchanges run as tasks, answers go back into the core ---

    def _aaa_start(self, event: Any) -> None:
        task = asyncio.ensure_future(self._aaa_run(event))
        self._aaa_tasks.add(task)
        task.add_done_callback(self._aaa_tasks.discard)

    async def _aaa_run(self, event: Any) -> None:
        from control.ike.responder import AaaResult

        if event.kind == "dhcp":
            result = await self._dhcp_lease(event)
            self._guard(
                self.responder.aaa_result, event.session_id, result, time.monotonic()
            )
            self._after_step()
            return
        if event.kind == "authorize":
            try:
                result = await self.authorizer.authorize(event)
            except Exception:
                self.counters["handler_errors"] += 1
                log.exception("authorization failed")
                result = AaaResult("reject")
            self._guard(
                self.responder.aaa_result, event.session_id, result, time.monotonic()
            )
            self._after_step()
            return
        group = self._aaa_of.get((event.profile, event.kind))
        client = self.radius.get(group) if group else None
        if client is None:
            log.error("profile %s: no RADIUS group for %s", event.profile, event.kind)
            result = AaaResult("error")
        else:
            try:
                if event.kind == "psk":
                    result = await client.psk(event)
                else:
                    result = await client.eap(event)
                if not self._cached_of.get(event.profile, True):
                    # authorization_cached = false: the answer authorizes nothing
                    result = dataclasses.replace(result, policy=None)
            except Exception:
                self.counters["handler_errors"] += 1
                log.exception("radius exchange failed")
                result = AaaResult("error")
        self._guard(
            self.responder.aaa_result, event.session_id, result, time.monotonic()
        )
        self._after_step()

    # -- DHCP: leases through our relay, renewed at T1, released at the end ---

    async def _dhcp_lease(self, event: Any) -> Any:
        from control.dhcp import DhcpRelay
        from control.ike.profiles import SessionPolicy
        from control.ike.responder import AaaResult

        profile = next(p for p in self.config.profiles if p.name == event.profile)
        assert profile.dhcp_server and profile.dhcp_giaddr
        key = (profile.dhcp_server, profile.dhcp_giaddr)
        relay = self._relays.get(key)
        try:
            if relay is None:
                relay = DhcpRelay(*key, timeout=profile.dhcp_timeout / 3)
                await relay.start()
                self._relays[key] = relay
            lease = await relay.lease(event.session_id)
        except Exception:
            self.counters["handler_errors"] += 1
            log.exception("dhcp relay failed")
            return AaaResult("error")
        if lease is None:
            return AaaResult("error")
        log.info("session %s: dhcp lease %s for %d s", event.session_id,
                 lease.address, lease.lease_time)  # fmt: skip
        renewal = asyncio.ensure_future(self._dhcp_renew(relay, lease))
        self._leases[event.session_id] = (relay, lease, renewal)
        dns = [str(a) for a in lease.dns]
        return AaaResult("accept", policy=SessionPolicy(address=lease.address, dns=dns))

    async def _dhcp_renew(self, relay: Any, lease: Any) -> None:
        # RFC 2131 4.4.5: renew at T1 for as long as the session lasts
        while True:
            await asyncio.sleep(lease.renew_after)
            renewed = await relay.renew(lease)
            if renewed is None or renewed.address != lease.address:
                log.warning("session %s: dhcp renewal of %s failed",
                            lease.session_id, lease.address)  # fmt: skip
                return
            lease = renewed
            entry = self._leases.get(lease.session_id)
            if entry is not None:
                self._leases[lease.session_id] = (entry[0], lease, entry[2])

    def _dhcp_release(self, session_id: str) -> None:
        entry = self._leases.pop(session_id, None)
        if entry is None:
            return
        relay, lease, renewal = entry
        renewal.cancel()
        relay.release(lease)
        log.info("session %s: dhcp lease %s released", session_id, lease.address)

    def _session(self, session_id: str, identity: str, remote: Address) -> Session:
        session = self.sessions.get(session_id)
        if session is None:
            remote = (remote[0], remote[1])
            session = Session(session_id, self._next_index, identity, remote)
            self._next_index += 1
            self.sessions[session_id] = session
            self.counters["sessions_up"] += 1
        return session

    def _child_up(self, ev: Any, *, resume: bool = False) -> None:
        from fastpath import SAParams, open_tun

        session = self._session(ev.session_id, ev.identity, ev.remote)
        session.remote = tuple(ev.remote)
        if session.tun_fd is None:
            fd, name = open_tun(f"egs{session.index}", self.config.engine.tun_mtu)
            session.tun_fd, session.tun_name = fd, name
            self.engine.add_session(session.index, fd)
        if ev.inside_address and session.inside_address != str(ev.inside_address):
            session.inside_address = str(ev.inside_address)
            assert session.tun_name is not None
            add_route(session.tun_name, f"{ev.inside_address}/32")
        six = getattr(ev, "inside_address6", None)
        if six is not None and session.inside_address6 != str(six):
            # the client's IPv6 prefix goes into its TUN as well
            session.inside_address6 = str(six)
            assert session.tun_name is not None
            add_route(session.tun_name, str(six.network))
        # RFC 3948: ESP in UDP only when NAT was detected, raw ESP otherwise
        # RFC 4301 section 4.4.1: both directions carry the negotiated selectors
        # (ours = TSr, the client's = TSi); the engine picks the outbound SA
        common = {"session": session.index, "peer": tuple(ev.remote), "esn": ev.esn,
                  "encap": ev.udp_encap, "local_ts": tuple(ev.local_ts),
                  "remote_ts": tuple(ev.remote_ts)}
        first_in = 1
        if resume:
            top = self.engine.inbound_top(ev.spi_in)
            if top is None:
                raise UntrustedState(f"No stored window for SPI 0x{ev.spi_in:08x}")
            # FIXME: a replay of a packet received after the last store of
            # the window top (at most about a second's worth) is accepted once
            first_in = top + 1
        self.engine.install_sa(
            SAParams(
                spi=ev.spi_in,
                inbound=True,
                key=ev.key_in,
                salt=ev.salt_in,
                next_seq=first_in,
                **common,
            )
        )
        out = SAParams(
            spi=ev.spi_out, inbound=False, key=ev.key_out, salt=ev.salt_out, **common
        )
        if resume:
            try:
                self.engine.install_sa(out, resume=True)
            except UntrustedState:
                self.engine.remove_sa(ev.spi_in, True)
                raise
        else:
            self.engine.install_sa(out)
        session.children.append((ev.spi_in, ev.spi_out))
        session.child_state[ev.spi_in] = {
            "spi_in": ev.spi_in,
            "spi_out": ev.spi_out,
            "key_in": ev.key_in.hex(),
            "salt_in": ev.salt_in.hex(),
            "key_out": ev.key_out.hex(),
            "salt_out": ev.salt_out.hex(),
            "esn": ev.esn,
            "local_ts": list(ev.local_ts),
            "remote_ts": list(ev.remote_ts),
            "udp_encap": ev.udp_encap,
            "inside_address": str(ev.inside_address),
        }
        log.info(
            "child sa %08x/%08x up for %s, inside %s via %s",
            ev.spi_in,
            ev.spi_out,
            session.identity,
            ev.inside_address,
            session.tun_name,
        )

    def _child_down(self, session_id: str, spi_in: int, spi_out: int) -> None:
        session = self.sessions.get(session_id)
        if session is None or (spi_in, spi_out) not in session.children:
            return
        session.children.remove((spi_in, spi_out))
        session.child_state.pop(spi_in, None)
        session.bytes_rekeyed.discard(spi_in)
        self.engine.remove_sa(spi_in, True)
        self.engine.remove_sa(spi_out, False)
        log.info("child sa %08x/%08x down for %s", spi_in, spi_out, session.identity)

    def _teardown(self, session: Session, reason: str) -> None:
        for spi_in, spi_out in list(session.children):
            self._child_down(session.session_id, spi_in, spi_out)
        if session.tun_fd is not None:
            self.engine.remove_session(session.index)
            os.close(session.tun_fd)  # the kernel removes the device and route
            session.tun_fd = None
        self.sessions.pop(session.session_id, None)
        self.counters["sessions_down"] += 1
        log.info(
            "session %s (%s) down: %s", session.session_id, session.identity, reason
        )

    # -- whole-daemon restart: session records (control.ike.persist) --------

    def _persist(self) -> None:
        """Store every resumable session whose state changed; drop the others."""
        if self._store is None:
            return
        from control.ike.persist import RECORD_KIND, RECORD_VERSION, dumps, export_ike

        # FIXME: every session is exported after every step; fine for tens of
        # sessions, wants a dirty flag per IKE SA for thousands
        current: dict[str, bytes] = {}
        for ike in self.responder.established():
            session = self.sessions.get(ike.session_id)
            if session is None:
                continue
            daemon = {
                "index": session.index,
                "identity": session.identity,
                "remote": list(session.remote),
                "children": [session.child_state[i] for i, _ in session.children
                             if i in session.child_state],
            }  # fmt: skip
            record = {"ike": export_ike(ike), "daemon": daemon}
            current[self._scope + ike.session_id] = dumps(record)
        for name, body in current.items():
            if self._stored.get(name) != body:
                self._store.put_record(RECORD_KIND, name, RECORD_VERSION, body)
        for name in set(self._stored) - set(current):
            self._store.delete_record(RECORD_KIND, name)
        self._stored = current

    def _resume_sessions(self) -> None:
        """Rebuild the stored sessions: IKE SA, TUN, route, SAs at their marks."""
        from control.ike.persist import RECORD_KIND, RECORD_VERSION, import_ike, loads

        now = time.monotonic()
        gone: set[int] = set()
        for name, (version, body) in self._store.records(RECORD_KIND).items():
            if not name.startswith(self._scope):
                continue
            try:
                if version != RECORD_VERSION:
                    raise UntrustedState(f"record version {version}")
                record = loads(body)
                ike = import_ike(record["ike"], self.responder, now)
            except (UntrustedState, KeyError) as exc:
                # no usable keys: nothing to tell the peer, forget it
                log.warning("session %s not resumed: %s", name, exc)
                self._store.delete_record(RECORD_KIND, name)
                gone |= _record_spis(body)
                continue
            try:
                self._claim_lease(ike.inside_address, ike.session_id)
                self.responder.adopt(ike)
                self._rebuild(ike, record["daemon"])
            except (UntrustedState, KeyError, OSError, ValueError) as exc:
                log.warning("session %s not resumed, deleting it: %s", name, exc)
                self._store.delete_record(RECORD_KIND, name)
                gone |= _record_spis(body)
                if not self.responder.delete_ike_sa(ike.session_id, now):
                    self._forget_session(ike.session_id)

        # marks and windows of the SAs not resumed: their keys are never used again
        from control.dataplane import INBOUND_KIND

        live = {spi for s in self.sessions.values() for pair in s.children
                for spi in pair}  # fmt: skip
        for spi in gone - live:
            self._store.forget(spi)
            self._store.delete_record(INBOUND_KIND, f"{self._scope}{spi:08x}")

    def _rebuild(self, ike: Any, daemon: dict[str, Any]) -> None:
        from control.ike.events import ChildSAUp

        index = int(daemon["index"])
        session = Session(ike.session_id, index, ike.identity, tuple(ike.remote))
        if ike.profile is not None:
            session.rekey_bytes = self._rekey_bytes_of.get(ike.profile.name, 0)
        self.sessions[ike.session_id] = session
        self._next_index = max(self._next_index, index + 1)
        for child in daemon["children"]:
            event = ChildSAUp(
                session_id=ike.session_id,
                identity=ike.identity,
                remote=tuple(ike.remote),
                inside_address=ipaddress.IPv4Address(child["inside_address"]),
                spi_in=int(child["spi_in"]),
                spi_out=int(child["spi_out"]),
                key_in=bytes.fromhex(child["key_in"]),
                salt_in=bytes.fromhex(child["salt_in"]),
                key_out=bytes.fromhex(child["key_out"]),
                salt_out=bytes.fromhex(child["salt_out"]),
                esn=bool(child["esn"]),
                local_ts=list(child["local_ts"]),
                remote_ts=list(child["remote_ts"]),
                udp_encap=bool(child["udp_encap"]),
            )
            self._child_up(event, resume=True)
        log.info(
            "session %s (%s) resumed from stored state: %d child sa(s), inside %s",
            session.session_id,
            session.identity,
            len(session.children),
            session.inside_address,
        )

    def _claim_lease(self, address: Any, session_id: str) -> None:
        if address is None:
            return
        for pool in self.pools.values():
            if pool.first <= int(address) <= pool.last:
                if not pool.claim(address, session_id):
                    holder = pool.holder(address)
                    raise UntrustedState(f"{address} is leased to {holder}")
                return
        raise UntrustedState(f"{address} is in no configured pool")

    def _forget_session(self, session_id: str) -> None:
        session = self.sessions.get(session_id)
        if session is not None:
            self._teardown(session, "stored state not trusted")

    # -- control socket ----------------------------------------------------

    async def _start_control_socket(self) -> None:
        path = Path(self.config.server.control_socket)
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        _claim_socket_path(path)
        old = os.umask(0o177)
        try:
            self._ctl_server = await asyncio.start_unix_server(
                self._control_client, path=str(path)
            )
        finally:
            os.umask(old)
        os.chmod(path, 0o600)
        self._ctl_inode = path.lstat().st_ino

    async def _control_client(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), 5.0)
            try:
                request = json.loads(line or b"{}")
                answer = self.control(str(request.get("cmd", "")), request)
            except (ValueError, AttributeError) as exc:
                answer = {"error": f"bad request: {exc}"}
            writer.write(json.dumps(answer).encode() + b"\n")
            await writer.drain()
        except (TimeoutError, ConnectionError):
            pass
        except ValueError:
            # a request line over the stream limit
            with contextlib.suppress(ConnectionError):
                writer.write(b'{"error": "request too long"}\n')
        finally:
            writer.close()

    def control(
        self, cmd: str, request: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """Answer one control-socket command."""
        if cmd == "delete-session":
            return self._delete_session(str((request or {}).get("session", "")))
        if cmd == "show-sessions":
            return {"sessions": [self._describe(s) for s in self.sessions.values()]}
        if cmd == "show-counters":
            return {
                "daemon": dict(self.counters),
                "ike": dict(self.responder.counters),
                "engine": self.engine.counters(),
                "radius": {n: dict(c.stats) for n, c in self.radius.items()},
                "pools": {
                    n: {"size": p.size, "in_use": p.in_use}
                    for n, p in self.pools.items()
                },
            }
        if cmd == "show-ipsec-sa":
            return {"sas": self._ipsec_sas()}
        if cmd == "debug-power-cut":
            if not hasattr(self.engine, "power_cut") or os.environ.get(
                POWER_CUT_ENV
            ) != "1":
                return {"error": f"power cuts need {POWER_CUT_ENV}=1"}
            return {"cut": self.engine.power_cut()}
        if cmd == "reload-dataplane":
            if not hasattr(self.engine, "reload"):
                return {"error": "engine.dataplane is inline: nothing to reload"}
            return {"dataplane_pid": self.engine.reload()}
        return {"error": f"unknown command {cmd!r}"}

    def _delete_session(self, session_id: str) -> dict[str, Any]:
        # RFC 7296 1.4.1: an INFORMATIONAL Delete of the IKE SA; the session
        # goes when the client answers or the retransmissions give up
        now = time.monotonic()
        if not self._guard(self.responder.delete_ike_sa, session_id, now):
            return {"error": f"no session {session_id!r}"}
        self._after_step()
        log.info("session %s: delete requested on the control socket", session_id)
        return {"deleting": session_id}
    def _ipsec_sas(self) -> list[dict[str, Any]]:
        """Describe every SA: spi, direction, engine, next seq, reserved mark."""
        engine = "process" if hasattr(self.engine, "reload") else "inline"
        out = []
        for session in self.sessions.values():
            for spi_in, spi_out in session.children:
                for spi, inbound in ((spi_in, True), (spi_out, False)):
                    try:
                        c = dict(self.engine.sa_counters(spi, inbound))
                    except KeyError:
                        continue
                    out.append(
                        {
                            "spi": f"{spi:08x}",
                            "direction": "in" if inbound else "out",
                            "engine": engine,
                            "identity": session.identity,
                            "next_seq": c.pop("next_seq", None),
                            "highest_seq": c.pop("highest_seq", None),
                            "seq_reserved": c.pop("seq_reserved", None),
                            "counters": c,
                        }
                    )
        return out

    def _describe(self, session: Session) -> dict[str, Any]:
        children = []
        for spi_in, spi_out in session.children:
            rx = self.engine.sa_counters(spi_in, True)
            tx = self.engine.sa_counters(spi_out, False)
            children.append(
                {
                    "spi_in": f"{spi_in:08x}",
                    "spi_out": f"{spi_out:08x}",
                    "engine": "userspace",
                    "packets_in": rx["packets"],
                    "bytes_in": rx["bytes"],
                    "packets_out": tx["packets"],
                    "bytes_out": tx["bytes"],
                    "drops_in": rx.get("drops", {}),
                    "next_seq_out": tx.get("next_seq"),
                    "seq_reserved": tx.get("seq_reserved"),
                }
            )
        return {
            "session": session.session_id,
            "identity": session.identity,
            "outside": f"{session.remote[0]}:{session.remote[1]}",
            "inside": session.inside_address,
            "inside6": session.inside_address6,
            "tun": session.tun_name,
            "up_seconds": round(time.time() - session.created, 1),
            "children": children,
        }


def _record_spis(body: bytes) -> set[int]:
    """Return the CHILD SPIs named in a session record (empty if unreadable)."""
    try:
        children = json.loads(body)["daemon"]["children"]
        return {int(c[k]) for c in children for k in ("spi_in", "spi_out")}
    except (ValueError, KeyError, TypeError):
        return set()


class StartupError(RuntimeError):
    """The daemon cannot start: a socket is taken or cannot be bound."""


def _claim_socket_path(path: Path) -> None:
    """Remove a stale control socket; refuse anything else at ``path``."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise StartupError(f"control socket path {path} exists and is not a socket")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(path))
        except ConnectionRefusedError:
            path.unlink()  # left behind by a daemon that is gone
            return
        except OSError:
            pass
    raise StartupError(f"another daemon is serving the control socket {path}")


def serve(config: Config) -> None:
    """Run the daemon on uvloop until it is stopped."""
    import uvloop

    uvloop.run(Headend(config).run())
