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
``{"cmd": "sa-move", "spi": "c0de0001", "to": "kernel"}``.

Engines: each session's CHILD SAs live either in the userspace ``Engine`` or in
the kernel's XFRM (:class:`fastpath.kernel.KernelEngine`), chosen per profile
(``engine``, else ``[engine] mode``).  ``auto`` is decided once at start by
:func:`fastpath.kernel.probe_kernel`, with one info line giving the reason.
Either way the session keeps its TUN device and the /32 route to it: in kernel
mode the session's XFRM out policy catches the packets before they reach the
TUN, so switching engines is installing or removing that policy.  Inbound ESP
from a kernel-mode peer is taken by the kernel through a UDP socket connected to
that peer (ESP-in-UDP encap); IKE from the peer then arrives on that socket and
is read here and fed to the responder like any port 4500 datagram.

Moving a live CHILD SA (``espgate sa move``) follows the sequence documented in
:mod:`fastpath.kernel`: the destination's outbound counter starts ``MARGIN``
above the source's last reading, so no (SPI, sequence number) is used twice.
All kernel state we create carries a reqid of ours; it is removed at exit, and
whatever a crashed run left is removed at start.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import fcntl
import hashlib
import ipaddress
import json
import logging
import os
import shutil
import signal
import socket
import stat
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from control.aaa.attributes import configure_routes, session_mtu
from control.aaa.authorize import Authorizer
from control.config import Config
from control.ikebind import build_radius_clients, build_responder_config
from control.pool import UNKNOWN_POOLS, AddressPool, LeaseStore
from control.routes import add_route, del_route
from control.seqstore import StateDirError, UntrustedState, check_state_dir
from fastpath.sa import SAParams

log = logging.getLogger("espgate.daemon")

# seconds a rekey's new outbound SA waits at most for the old pair's delete
DEFER_OUT_MAX = 2.0

Address = tuple[str, int]
SEQ_POLL = 1.0
POWER_CUT_ENV = "ESPGATE_POWER_CUT_MODEL"

# in state_dir, flock'ed for the daemon's life: one daemon per state directory
LOCK_FILE = "daemon.lock"

# lowest sequence-number gap left between the source and destination engine
MIN_MARGIN = 256
# a moved SA's source engine counts as drained after DRAIN_QUIET s without a
# packet; the event loop waits at most DRAIN_MAX s for that
DRAIN_QUIET = 0.05
DRAIN_MAX = 1.0


@dataclass
class Session:
    """What the daemon keeps per IKE SA beyond the responder's own state."""

    session_id: str
    index: int
    identity: str
    remote: Address
    tun_fd: int | None = None
    tun_name: str | None = None
    # the TUN's MTU: authorization's interface mtu, else engine.tun_mtu
    mtu: int | None = None
    inside_address: str | None = None
    inside_address6: str | None = None
    children: list[tuple[int, int]] = field(default_factory=list)
    created: float = field(default_factory=time.time)
    # per CHILD SA (by inbound SPI) what a whole-daemon restart reinstalls
    child_state: dict[int, dict[str, Any]] = field(default_factory=dict, repr=False)
    profile: str | None = None
    local_ts: tuple[str, ...] = ()
    engine: str = "userspace"
    params: dict[tuple[int, bool], SAParams] = field(default_factory=dict, repr=False)
    policies: bool = False
    # the profile's child_rekey_bytes (0 = off) and the inbound SPIs whose
    # rekey the byte count already started
    rekey_bytes: int = 0
    bytes_rekeyed: set[int] = field(default_factory=set, repr=False)
    # a rekey's new outbound SA, held back until the old pair goes (by the old
    # inbound SPI), so we never send on an SA the client has not installed yet
    deferred_out: dict[int, SAParams] = field(default_factory=dict, repr=False)
    # route accept: the client's networks routed into the TUN (metric =
    # distance); the tag is only shown, Linux routes carry none
    accepted_routes: list[str] = field(default_factory=list)
    route_tag: int | None = None
    route_metric: int | None = None


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
        # route set (access lists, our inside address), route accept (pools)
        configure_routes(
            {name: list(nets) for name, nets in config.access_lists.items()},
            [
                ipaddress.ip_address(a)
                for a in (config.server.inside_address, config.server.inside_address6)
                if a
            ],
            [str(n) for p in config.pools.values() for n in _pool_networks(p)],
        )
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
        # the private state directory used when server.state_dir is empty
        self._scratch: str | None = None
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
        # DHCP for sessions not yet up: the lease task in flight, and the IKE
        # SA each was asked for (until its ChildSAUp); see _reap_half_open
        self._dhcp_pending: dict[str, asyncio.Task[None]] = {}
        self._dhcp_open: dict[str, Any] = {}
        self.kernel: Any = None
        self.kernel_ok: bool | None = None
        self.kernel_reason = "not probed"
        self.profile_engine: dict[str, str] = {}
        self._encap_readers: dict[int, Address] = {}

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
            # a daemon that never served says only why (StartupError)
            await self._shutdown(started=False)
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
        for name, mode in self.profile_engine.items():
            log.debug("profile %s: sas go to the %s engine", name, mode)
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

        # engines after the socket: crash recovery must not run beside a live
        # daemon, whose kernel state it would take for stale
        self._choose_engines()

        # sockets: 500 in the loop, 4500 to the engine
        try:
            self._transport500, _ = await loop.create_datagram_endpoint(
                lambda: _IkeProtocol(self._on_port500),
                local_addr=(srv.listen, srv.ike_port),
            )
        except OSError as exc:
            raise StartupError(
                f"cannot bind UDP {srv.listen}:{srv.ike_port}: {_reason(exc)}"
            ) from None
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._sock4500 = sock
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
        try:
            sock.bind((srv.listen, srv.natt_port))
        except OSError as exc:
            raise StartupError(
                f"cannot bind UDP {srv.listen}:{srv.natt_port}: {_reason(exc)}"
            ) from None
        sock.setblocking(False)
        self._share_natt_port()

        # engine and responder
        eng = self.config.engine
        if eng.dataplane == "process":
            from control.dataplane import DataplaneProxy
            from control.seqstore import SeqStore

            # no state directory: the reservations go to a private directory
            # removed at exit (never the working directory), and nothing is
            # resumed at the next start
            state_dir = srv.state_dir
            if not state_dir:
                self._scratch = tempfile.mkdtemp(prefix="espgate-state-")
                state_dir = self._scratch
            store: Any = SeqStore.in_dir(state_dir)
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

    async def _shutdown(self, started: bool = True) -> None:
        if started:
            log.info("stopping: %d session(s)", len(self.sessions))
        # the dataplane sends the Deletes on port 4500: if it goes now (a
        # signal to the whole group) it is not restarted, the proxy sends
        if self.engine is not None and hasattr(self.engine, "begin_stop"):
            self.engine.begin_stop()
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
        # lease requests still in flight: cancelled, they release what the
        # server may have bound before the relay closes
        pending = list(self._dhcp_pending.values())
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
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
        if self.kernel is not None:
            for fd in list(self._encap_readers):
                self._loop_remove_reader(fd)
            self.kernel.cleanup()
            self.kernel.close()
            self.kernel = None
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
        if self._scratch is not None:
            shutil.rmtree(self._scratch, ignore_errors=True)
            self._scratch = None
        if started:
            log.info("stopped")

    # -- engines -----------------------------------------------------------

    def _choose_engines(self) -> None:
        """Resolve each profile's engine; probe the kernel once if any may use it."""
        from fastpath.kernel import probe_kernel

        default = self.config.engine.mode
        modes = {p.name: p.engine or default for p in self.config.profiles}
        if set(modes.values()) & {"kernel", "auto"}:
            self.kernel_ok, self.kernel_reason = probe_kernel()
        else:
            self.kernel_reason = "not probed: every profile uses the userspace engine"
        auto = sorted(name for name, mode in modes.items() if mode == "auto")
        if auto:
            chosen = "kernel" if self.kernel_ok else "userspace"
            log.info(
                "engine auto for profile(s) %s: %s (%s)",
                ", ".join(auto),
                chosen,
                self.kernel_reason,
            )
        forced = sorted(name for name, mode in modes.items() if mode == "kernel")
        if forced and not self.kernel_ok:
            raise StartupError(
                f"engine kernel for profile(s) {', '.join(forced)} but the kernel "
                f"cannot: {self.kernel_reason}"
            )
        self.profile_engine = {
            name: ("kernel" if self.kernel_ok else "userspace")
            if mode == "auto"
            else mode
            for name, mode in modes.items()
        }
        self._recover_kernel_state()
        if "kernel" in self.profile_engine.values():
            self._kernel()

    def _recover_kernel_state(self) -> None:
        # crash recovery: a previous run may have left SAs and policies of ours
        from fastpath.kernel import KernelEngine

        try:
            kernel = KernelEngine()
        except OSError as exc:
            log.debug("no xfrm netlink, nothing to recover: %s", exc)
            return
        try:
            states, policies = kernel.cleanup()
            if states or policies:
                log.info("removed stale kernel state of an earlier run")
        except OSError as exc:
            log.debug("xfrm clean-up at start failed: %s", exc)
        finally:
            kernel.close()

    def _kernel(self) -> Any:
        """Return the KernelEngine, opening it on first use (after a probe)."""
        from fastpath.kernel import KernelEngine, probe_kernel

        if self.kernel is None:
            if self.kernel_ok is None:
                self.kernel_ok, self.kernel_reason = probe_kernel()
            if not self.kernel_ok:
                raise RuntimeError(f"kernel engine unavailable: {self.kernel_reason}")
            self.kernel = KernelEngine()
            self._share_natt_port()
        return self.kernel

    def _share_natt_port(self) -> None:
        # the kernel path binds connected encap sockets to our port 4500: the
        # kernel lets a second UDP bind through only when both sockets have
        # SO_REUSEADDR, checked at that bind, so setting it late is enough
        if self.kernel is not None and self._sock4500 is not None:
            self._sock4500.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)

    def _sync_encap_readers(self) -> None:
        # IKE from a kernel-mode peer arrives on its connected encap socket
        if self.kernel is None or self._loop is None:
            return
        live = {fd: key[1] for key, fd in self.kernel.encap_sockets().items()}
        for fd in [fd for fd in self._encap_readers if fd not in live]:
            self._loop_remove_reader(fd)
        for fd, peer in live.items():
            if fd not in self._encap_readers:
                self._encap_readers[fd] = peer
                self._loop.add_reader(fd, self._on_encap_readable, fd)

    def _loop_remove_reader(self, fd: int) -> None:
        self._encap_readers.pop(fd, None)
        if self._loop is not None:
            self._loop.remove_reader(fd)

    def _on_encap_readable(self, fd: int) -> None:
        peer = self._encap_readers.get(fd)
        for _ in range(64):
            try:
                data = os.read(fd, 65535)
            except BlockingIOError:
                return
            except OSError as exc:
                log.debug("encap socket for %s: %s", peer, exc)
                return
            # RFC 3948 section 2.2: IKE follows a zero non-ESP marker; 0xff is a
            # NAT keepalive
            if peer is None or len(data) < 4 or data[:4] != bytes(4):
                continue
            self.counters["ike_rx_4500"] += 1
            self._receive(data[4:], peer, self.config.server.natt_port)

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
        if self._dhcp_open:
            self._guard(self._reap_half_open)
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
            up.profile = event.profile
            up.engine = self.profile_engine.get(event.profile, "userspace")
            up.rekey_bytes = self._rekey_bytes_of.get(event.profile, 0)
            log.info(
                "ike sa %s up: %s from %s:%d (profile %s)",
                event.session_id,
                event.identity,
                *event.remote,
                event.profile,
            )
        elif isinstance(event, ike.ChildSAUp):
            # the IKE SA is up with its addresses: a DHCP lease is the session's
            self._dhcp_open.pop(event.session_id, None)
            if event.mtu is None:
                event = dataclasses.replace(event, mtu=self._policy_mtu(event))
            try:
                self._child_up(event)
            except Exception:
                self.counters["handler_errors"] += 1
                log.exception(
                    "session %s: child sa %08x/%08x not set up",
                    event.session_id,
                    event.spi_in,
                    event.spi_out,
                )
                self._abort_child(event)
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
                old_remote = moved.remote
                moved.remote = (str(event.remote[0]), int(event.remote[1]))
                if moved.tun_fd is not None:
                    self.engine.set_peer(moved.index, tuple(event.remote))
                if moved.engine == "kernel":
                    self._kernel_follow(moved, old_remote)
        elif isinstance(event, ike.AaaRequest):
            self._aaa_start(event)
        elif isinstance(event, ike.IkeSADown):
            for client in self.radius.values():
                client.forget(event.session_id)
            self._guard(self._dhcp_abandon, event.session_id)
            session = self.sessions.get(event.session_id)
            if session is not None:
                self._teardown(session, event.reason)

    # -- AAA: RADIUS exchanges run as tasks, answers go back into the core ---

    def _aaa_start(self, event: Any) -> None:
        task = asyncio.ensure_future(self._aaa_run(event))
        self._aaa_tasks.add(task)
        task.add_done_callback(self._aaa_tasks.discard)
        if event.kind == "dhcp":
            sid = event.session_id
            self._dhcp_pending[sid] = task
            self._dhcp_open[sid] = self.responder.session_sa(sid)
            task.add_done_callback(lambda t: self._dhcp_task_done(sid, t))

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
        # a DHCP server from authorization (policy or RADIUS) wins
        info = getattr(event, "info", None) or {}
        server = info.get("dhcp_server") or profile.dhcp_server
        giaddr = info.get("dhcp_giaddr") or profile.dhcp_giaddr
        timeout = info.get("dhcp_timeout") or profile.dhcp_timeout
        if not server or not giaddr:
            log.warning("session %s: dhcp without server or giaddr", event.session_id)
            return AaaResult("error")
        key = (server, giaddr)
        relay = self._relays.get(key)
        try:
            if relay is None:
                relay = DhcpRelay(*key, timeout=timeout / 3)
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
        if event.session_id in self._dhcp_open and self._dhcp_dead(event.session_id):
            # the session died while the server was answering
            self._dhcp_pending.pop(event.session_id, None)
            self._dhcp_abandon(event.session_id)
            return AaaResult("error")
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

    def _dhcp_task_done(self, session_id: str, task: asyncio.Task[None]) -> None:
        if self._dhcp_pending.get(session_id) is task:
            del self._dhcp_pending[session_id]

    def _dhcp_abandon(self, session_id: str) -> None:
        """Drop a session's DHCP state: cancel its request, release its lease."""
        self._dhcp_open.pop(session_id, None)
        task = self._dhcp_pending.pop(session_id, None)
        if task is not None and not task.done():
            # DhcpRelay.lease releases what the server may have bound
            task.cancel()
            self.counters["dhcp_cancelled"] = self.counters.get("dhcp_cancelled", 0) + 1
        self._dhcp_release(session_id)

    def _dhcp_dead(self, session_id: str) -> bool:
        # the IKE SA a lease was asked for is gone (killed, or never rekeyed
        # into a successor that serves the session)
        from control.ike.sa import IkeState

        ike = self._dhcp_open.get(session_id)
        if ike is not None and ike.state != IkeState.DEAD and not ike.superseded:
            return False
        current = self.responder.session_sa(session_id)
        if current is not None:
            self._dhcp_open[session_id] = current
            return False
        return True

    def _reap_half_open(self) -> None:
        """Release the DHCP leases of sessions that died before their CHILD SA.

        A half-open IKE SA dies without an IkeSADown (IKE_AUTH timeout, the
        client gone, authentication or authorization failing after the
        lease): its lease, or its request in flight, would leak.
        """
        for session_id in list(self._dhcp_open):
            if self._dhcp_dead(session_id):
                log.info("session %s: died before its child sa, dropping its "
                         "dhcp lease", session_id)  # fmt: skip
                self.counters["dhcp_half_open"] = (
                    self.counters.get("dhcp_half_open", 0) + 1
                )
                self._dhcp_abandon(session_id)

    def _session(self, session_id: str, identity: str, remote: Address) -> Session:
        session = self.sessions.get(session_id)
        if session is None:
            remote = (remote[0], remote[1])
            session = Session(session_id, self._next_index, identity, remote)
            self._next_index += 1
            self.sessions[session_id] = session
            self.counters["sessions_up"] += 1
        return session

    def _policy_mtu(self, ev: Any) -> int | None:
        # the interface mtu of the session's merged authorization, if any
        ike = self.responder.session_sa(ev.session_id) if self.responder else None
        return getattr(getattr(ike, "policy", None), "mtu", None)

    def _accepted_routes(self, session: Session, ev: Any) -> None:
        """Route the client's accepted networks (route accept) into its TUN."""
        ike = self.responder.session_sa(ev.session_id) if self.responder else None
        policy = getattr(ike, "policy", None)
        accept = getattr(policy, "route_accept", None)
        routes = list(getattr(policy, "accepted_routes", None) or [])
        if accept is None or not routes or session.accepted_routes:
            return
        assert session.tun_name is not None
        tag, distance = accept
        for prefix in routes:
            try:
                add_route(session.tun_name, prefix, metric=distance)
            except OSError as exc:
                self.counters["route_errors"] = self.counters.get("route_errors", 0) + 1
                log.error("route %s into %s: %s", prefix, session.tun_name, exc)
                continue
            session.accepted_routes.append(prefix)
        session.route_tag, session.route_metric = tag, distance
        log.info("session %s: %d accepted routes via %s, metric %d",
                 session.session_id, len(session.accepted_routes),
                 session.tun_name, distance)  # fmt: skip

    def _restore_routes(self, session: Session, routes: dict[str, Any]) -> None:
        """Route a resumed session's accepted networks into its new TUN again."""
        prefixes = [str(p) for p in routes.get("prefixes") or []]
        if not prefixes or session.tun_name is None:
            return
        metric = routes.get("metric")
        for prefix in prefixes:
            try:
                add_route(session.tun_name, prefix, metric=metric)
            except OSError as exc:
                self.counters["route_errors"] = self.counters.get("route_errors", 0) + 1
                log.error("route %s into %s: %s", prefix, session.tun_name, exc)
                continue
            session.accepted_routes.append(prefix)
        session.route_tag, session.route_metric = routes.get("tag"), metric

    def _remove_accepted_routes(self, session: Session) -> None:
        # before the TUN goes (which would take its routes along anyway)
        for prefix in session.accepted_routes:
            try:
                assert session.tun_name is not None
                del_route(session.tun_name, prefix, metric=session.route_metric)
            except OSError as exc:
                log.debug("route %s already gone: %s", prefix, exc)
        session.accepted_routes = []

    def _child_up(self, ev: Any, *, resume: bool = False) -> None:
        from fastpath import open_tun

        session = self._session(ev.session_id, ev.identity, ev.remote)
        session.remote = tuple(ev.remote)
        if session.tun_fd is None:
            six = getattr(ev, "inside_address6", None)
            mtu = session_mtu(getattr(ev, "mtu", None), self.config.engine.tun_mtu,
                              ipv6=six is not None)  # fmt: skip
            fd, name = open_tun(f"egs{session.index}", mtu)
            session.tun_fd, session.tun_name, session.mtu = fd, name, mtu
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
        self._accepted_routes(session, ev)
        first_in = 1
        if resume:
            top = self.engine.inbound_top(ev.spi_in)
            if top is None:
                raise UntrustedState(f"No stored window for SPI 0x{ev.spi_in:08x}")
            # FIXME: everything up to the stored top counts as seen (below),
            # but a replay of a packet received after that store (about a
            # second's worth) is accepted once; storing a mark ahead of the top
            # refused that much fresh traffic and made clients rekey here
            first_in = top + 1
        local = (self._local_address(ev.remote[0]), self.config.server.natt_port)
        # RFC 3948: ESP in UDP only when NAT was detected, raw ESP otherwise
        common = {
            "session": session.index,
            "peer": tuple(ev.remote),
            "local": local,
            "esn": ev.esn,
            "remote_ts": tuple(ev.remote_ts),
            # RFC 4301 section 4.4.1: both directions carry the negotiated
            # selectors (ours = TSr, the client's = TSi); the engine picks the
            # outbound SA by them
            "local_ts": tuple(ev.local_ts),
            "encap": ev.udp_encap,
            "replay_window": self.config.engine.replay_window,
        }
        sa_in = SAParams(
            spi=ev.spi_in, inbound=True, key=ev.key_in, salt=ev.salt_in,
            next_seq=first_in, **common,
        )  # fmt: skip
        sa_out = SAParams(
            spi=ev.spi_out, inbound=False, key=ev.key_out, salt=ev.salt_out, **common
        )
        session.local_ts = tuple(ev.local_ts)
        why = _kernel_unfit(session.local_ts, sa_in.remote_ts)
        if session.engine == "kernel" and (resume or why):
            log.info(
                "session %s: %s, using the userspace engine",
                session.session_id,
                "resumed from stored state" if resume else why,
            )
            session.engine = "userspace"
        session.params[(ev.spi_in, True)] = sa_in
        session.params[(ev.spi_out, False)] = sa_out
        replaces = None if resume else _rekeyed(session, ev)
        if session.engine == "kernel":
            try:
                self._kernel_install(session, sa_in, sa_out,
                                     outbound=replaces is None)  # fmt: skip
            except OSError as exc:
                if session.children:
                    raise  # a rekey: the older pair keeps the session in the kernel
                log.error(
                    "session %s: kernel refused the sa (%s), using the userspace "
                    "engine",
                    session.session_id,
                    exc,
                )
                self._kernel_remove_pair(session, ev.spi_in, ev.spi_out)
                self._kernel_release(session)
                session.engine = "userspace"
        if session.engine != "kernel":
            if resume:
                # RFC 4303 3.4.3: every number up to the stored mark counts as
                # received, not only those below the window
                seen = (1 << self.config.engine.replay_window) - 1
                self.engine.install_sa(sa_in, (first_in - 1, seen))
            else:
                self.engine.install_sa(sa_in)
            if replaces is not None:
                pass  # the outbound SA waits below
            elif resume:
                try:
                    self.engine.install_sa(sa_out, resume=True)
                except UntrustedState:
                    self.engine.remove_sa(ev.spi_in, True)
                    raise
            else:
                self.engine.install_sa(sa_out)
        if replaces is not None:
            # the client installs its inbound SA only when our answer reaches
            # it: keep sending on the old SA until it deletes that (or briefly)
            session.deferred_out[replaces] = sa_out
            assert self._loop is not None
            self._loop.call_later(
                DEFER_OUT_MAX, self._release_out, session.session_id, replaces
            )
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
            "child sa %08x/%08x up for %s, inside %s via %s, %s engine",
            ev.spi_in,
            ev.spi_out,
            session.identity,
            ev.inside_address,
            session.tun_name,
            session.engine,
        )

    def _abort_child(self, ev: Any) -> None:
        """Undo what a failed ChildSAUp left behind; delete the session's IKE SA.

        The client has the CHILD SA already: a half-built one would be a dead
        tunnel it knows nothing about, so it is told with a Delete (RFC 7296
        section 1.4.1) and the session goes here at once.
        """
        session = self.sessions.get(ev.session_id)
        if session is not None and (ev.spi_in, ev.spi_out) not in session.children:
            for spi, inbound in ((ev.spi_in, True), (ev.spi_out, False)):
                with contextlib.suppress(Exception):
                    self.engine.remove_sa(spi, inbound)
                if session.engine == "kernel" and self.kernel is not None:
                    with contextlib.suppress(Exception):
                        self.kernel.remove_sa(spi, inbound)
                session.params.pop((spi, inbound), None)
            for key in [k for k, sa in session.deferred_out.items()
                        if sa.spi == ev.spi_out]:  # fmt: skip
                del session.deferred_out[key]
        if session is not None:
            self._guard(self._teardown, session, "child sa setup failed")
        now = time.monotonic()
        if not self._guard(self.responder.delete_ike_sa, ev.session_id, now):
            log.warning("session %s: no ike sa left to delete", ev.session_id)

    def _kernel_install(
        self,
        session: Session,
        sa_in: SAParams,
        sa_out: SAParams,
        *,
        top_in: int = 0,
        next_out: int | None = None,
        dirs: tuple[str, ...] = ("out", "in", "fwd"),
        outbound: bool = True,
        replay: Any = None,
    ) -> None:
        """Install a CHILD SA pair in the kernel, and the session's policies once.

        ``replay`` (a ReplayState) is the inbound window a move carries over;
        without it everything up to ``top_in`` counts as seen.
        """
        from fastpath.xfrm import ReplayState

        kernel = self._kernel()
        if replay is None and top_in:
            replay = ReplayState.closed_below(top_in, sa_in.replay_window)
        kernel.install_sa(sa_in, replay=replay)
        if next_out is not None:
            sa_out = dataclasses.replace(sa_out, next_seq=next_out)
        if outbound:
            kernel.install_sa(sa_out)
        if not session.policies:
            self._kernel_policies(session, sa_in, dirs)
        self._sync_encap_readers()

    def _kernel_policies(
        self, session: Session, sa: SAParams, dirs: tuple[str, ...]
    ) -> None:
        assert sa.local is not None
        self._kernel().install_policies(
            session.index,
            local=sa.local[0],
            peer=sa.peer[0],
            local_ts=session.local_ts,
            remote_ts=sa.remote_ts,
            dirs=dirs,
        )
        session.policies = True

    def _kernel_remove_pair(self, session: Session, spi_in: int, spi_out: int) -> None:
        kernel = self._kernel()
        for spi, inbound in ((spi_out, False), (spi_in, True)):
            try:
                kernel.remove_sa(spi, inbound)
            except KeyError:
                pass

    def _kernel_release(self, session: Session) -> None:
        # the session leaves the kernel: policies, encap socket, reader
        if self.kernel is None:
            return
        self.kernel.remove_policies(session.index)
        session.policies = False
        local = (self._local_address(session.remote[0]), self.config.server.natt_port)
        self.kernel.close_encap(local, tuple(session.remote))
        self._sync_encap_readers()

    def _kernel_follow(self, session: Session, old: tuple[str, int]) -> None:
        """Move a kernel-mode session's SAs to its peer's new outer address.

        RFC 7296 section 2.23: the responder accepted an authenticated message
        from a new NAT mapping; the kernel SAs, policy templates and the
        connected encap socket follow it, keeping SPIs and sequence numbers.
        """
        new = session.remote
        for key, sa in list(session.params.items()):
            session.params[key] = dataclasses.replace(sa, peer=new)
        for spi, held in list(session.deferred_out.items()):
            session.deferred_out[spi] = dataclasses.replace(held, peer=new)
        try:
            moved = self._kernel().migrate_peer(session.index, old, new)
        except (OSError, KeyError) as exc:
            log.error(
                "session %s: kernel sas cannot follow %s:%d: %s",
                session.session_id,
                *new,
                exc,
            )
            return
        self._sync_encap_readers()
        log.info(
            "session %s: %d kernel sa(s) follow the peer to %s:%d",
            session.session_id,
            moved,
            *new,
        )

    def _release_out(self, session_id: str, old_spi_in: int) -> None:
        """Install a rekey's held-back outbound SA (make before break)."""
        session = self.sessions.get(session_id)
        if session is None:
            return
        sa_out = session.deferred_out.pop(old_spi_in, None)
        if sa_out is None:
            return
        if session.engine == "kernel":
            self._kernel().install_sa(sa_out)
        else:
            self.engine.install_sa(sa_out)
        log.debug("child sa out %08x now sends for %s", sa_out.spi, session.identity)

    def _child_down(self, session_id: str, spi_in: int, spi_out: int) -> None:
        session = self.sessions.get(session_id)
        if session is None or (spi_in, spi_out) not in session.children:
            return
        # the old pair goes: its successor's outbound SA takes over first
        self._release_out(session_id, spi_in)
        held = [k for k, sa in session.deferred_out.items() if sa.spi == spi_out]
        for key in held:
            # a new pair deleted before it ever sent: nothing installed outbound
            del session.deferred_out[key]
        session.children.remove((spi_in, spi_out))
        session.child_state.pop(spi_in, None)
        session.bytes_rekeyed.discard(spi_in)
        if session.engine == "kernel":
            self._kernel_remove_pair(session, spi_in, spi_out)
        else:
            self.engine.remove_sa(spi_in, True)
            if not held:
                self.engine.remove_sa(spi_out, False)
        session.params.pop((spi_in, True), None)
        session.params.pop((spi_out, False), None)
        log.info("child sa %08x/%08x down for %s", spi_in, spi_out, session.identity)

    def _teardown(self, session: Session, reason: str) -> None:
        for spi_in, spi_out in list(session.children):
            self._child_down(session.session_id, spi_in, spi_out)
        if session.engine == "kernel":
            self._kernel_release(session)
        if session.tun_fd is not None:
            self._remove_accepted_routes(session)
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
                "mtu": session.mtu,
                "routes": {"prefixes": session.accepted_routes,
                           "tag": session.route_tag, "metric": session.route_metric},
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
        from control.dataplane import INBOUND_KIND, OUTBOUND_KIND

        live = {spi for s in self.sessions.values() for pair in s.children
                for spi in pair}  # fmt: skip
        for spi in gone - live:
            self._store.forget(spi)
            for kind in (INBOUND_KIND, OUTBOUND_KIND):
                self._store.delete_record(kind, f"{self._scope}{spi:08x}")

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
                mtu=daemon.get("mtu"),
            )
            self._child_up(event, resume=True)
        self._restore_routes(session, daemon.get("routes") or {})
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

    # -- live migration ------------------------------------------------------

    def _margin(self) -> int:
        # packets the source may still seal between the read and the switch: a
        # batch being sealed plus the next; RFC 4303 section 3.3.3 forbids reuse
        return max(MIN_MARGIN, 4 * self.config.engine.batch)

    def move_sa(self, spi_text: str, to: str) -> dict[str, Any]:
        """Move the CHILD SA with this SPI (either direction) to engine ``to``."""
        if to not in ("kernel", "userspace"):
            raise ValueError(f"unknown engine {to!r}")
        spi = int(spi_text, 16)
        for session in self.sessions.values():
            for spi_in, spi_out in session.children:
                if spi in (spi_in, spi_out):
                    break
            else:
                continue
            break
        else:
            raise KeyError(f"no CHILD SA with SPI {spi:08x}")
        if session.engine == to:
            # "spi" is the one asked for (either direction), so the answer
            # names what the user typed; both SPIs of the pair beside it
            return {
                "moved": False,
                "engine": to,
                "spi": f"{spi:08x}",
                "spi_in": f"{spi_in:08x}",
                "spi_out": f"{spi_out:08x}",
            }
        if len(session.children) != 1:
            raise RuntimeError("session is rekeying, try again when it has one SA")
        # preconditions before anything is touched: a refused move changes nothing
        self._kernel()
        sa_in = session.params[(spi_in, True)]
        sa_out = session.params[(spi_out, False)]
        margin = self._margin()
        started = time.monotonic()
        if to == "kernel":
            info = self._move_to_kernel(session, sa_in, sa_out, margin)
        else:
            info = self._move_to_userspace(session, sa_in, sa_out, margin)
        session.engine = to
        info.update(
            moved=True,
            engine=to,
            spi_in=f"{spi_in:08x}",
            spi_out=f"{spi_out:08x}",
            margin=margin,
            ms=round((time.monotonic() - started) * 1000, 2),
        )
        log.info(
            "child sa %08x/%08x of %s moved to the %s engine, out seq %d -> %d",
            spi_in,
            spi_out,
            session.identity,
            to,
            info["source_next_seq"],
            info["dest_next_seq"],
        )
        return info

    @staticmethod
    def _window_of(state: Any, size: int) -> tuple[int, int]:
        # the kernel's replay state (xfrm bitmap: bit (s - 1) mod window) as an
        # engine window (bit i: top - i); older than the kernel's window = seen
        top, seen = int(state.seq), 0
        for i in range(min(size, top)):
            if state.seen(top - i):
                seen |= 1 << i
        return top, seen

    @staticmethod
    def _state_of(window: tuple[int, int], size: int, replay_window: int) -> Any:
        # an engine window as xfrm replay state; beyond the engine's size = seen
        from fastpath.xfrm import ReplayState

        top, seen = window
        bitmap = [0] * ((replay_window + 31) // 32)
        for i in range(min(replay_window, top)):
            if i >= size or seen >> i & 1:
                bit = (top - i - 1) % replay_window
                bitmap[bit // 32] |= 1 << (bit % 32)
        return ReplayState(0, top, replay_window, bitmap)

    def _move_to_kernel(
        self, session: Session, sa_in: SAParams, sa_out: SAParams, margin: int
    ) -> dict[str, Any]:
        from fastpath._engine import ReplayWindow

        kernel = self._kernel()
        size = sa_in.replay_window
        undo = _Rollback(f"move of {sa_in.spi:08x} to the kernel")
        try:
            # inbound first: the connected encap socket takes the peer's ESP from
            # here on, with the engine's window (RFC 4303 section 3.4.3)
            window = self.engine.replay_window(sa_in.spi)
            before = self.engine.sa_counters(sa_out.spi, False)
            n = int(before["next_seq"])
            # RFC 4303 section 3.3.3: the engine may not reach the kernel's range;
            # the cap is for good once the move succeeds, lifted if it fails
            old_cap = self._seq_cap(sa_out.spi)
            undo.push(self._lift_cap, sa_out.spi, old_cap, before.get("seq_limit"))
            self.engine.set_seq_limit(sa_out.spi, n + margin - 1)
            undo.push(self._kernel_unwind, session, sa_in.spi, sa_out.spi)
            self._kernel_install(
                session,
                sa_in,
                sa_out,
                next_out=n + margin,
                dirs=("out",),
                replay=self._state_of(window, size, size),
            )

            # the out policy is the switch: the engine's out SA goes at once,
            # since what it sent from here on would reach the peer behind the
            # kernel's higher numbers and die in its replay window (packets still
            # queued in the TUN are dropped instead)
            last = int(self.engine.sa_counters(sa_out.spi, False)["next_seq"])
            self.engine.remove_sa(sa_out.spi, False)
            undo.push(self._engine_out_back, sa_out, max(last, n + margin))

            # inbound ESP now reaches the kernel; what port 4500 still holds goes
            # through the engine before its SA goes, and what it accepted
            # meanwhile is merged into the kernel's window
            self._drain_engine(sa_in.spi)
            late = self.engine.replay_window(sa_in.spi)
            self.engine.remove_sa(sa_in.spi, True)
            undo.push(self._engine_in_back, sa_in, late)
            state = kernel.sa_state(sa_in.spi, True)
            merged = ReplayWindow(size, sa_in.esn)
            merged.merge(*self._window_of(state, size))
            merged.merge(*late)
            if merged.state() != self._window_of(state, size):
                carried = self._state_of(merged.state(), size, size)
                kernel.set_sa_state(sa_in.spi, True, carried)
            if last > n + margin:
                log.error("move overran the sequence margin: %d > %d", last, n + margin)

            # in and fwd last: they drop what the userspace engine decrypted before
            self._kernel_policies(session, sa_in, ("in", "fwd"))
        except BaseException:
            undo.run()
            raise
        return {
            "source_next_seq": last,
            "dest_next_seq": n + margin,
            "top_in": window[0],
            "late_top_in": late[0],
        }

    # -- undoing a failed move (each step's inverse) ---------------------------

    def _seq_cap(self, spi: int) -> int | None:
        seq_cap = getattr(self.engine, "seq_cap", None)
        return None if seq_cap is None else seq_cap(spi)

    def _lift_cap(self, spi: int, cap: int | None, limit: Any) -> None:
        # the process dataplane keeps caps itself; the inline engine gets its
        # limit from before the move back
        lift = getattr(self.engine, "lift_seq_cap", None)
        if lift is not None:
            lift(spi, cap)
            return
        with contextlib.suppress(KeyError):
            self.engine.set_seq_limit(spi, int(limit) if limit is not None else 0)

    def _kernel_unwind(self, session: Session, spi_in: int, spi_out: int) -> None:
        # policies, SAs and the encap socket a move to the kernel installed
        self._kernel_release(session)
        self._kernel_remove_pair(session, spi_in, spi_out)

    def _engine_out_back(self, sa_out: SAParams, floor: int) -> None:
        # RFC 4303 section 3.3.3: the engine resumes above anything the kernel
        # may have sent under the same SPI
        start = floor
        if self.kernel is not None:
            with contextlib.suppress(KeyError, OSError):
                sent = self.kernel.sa_counters(sa_out.spi, False)["next_seq"]
                start = max(start, int(sent))
        self.engine.install_sa(dataclasses.replace(sa_out, next_seq=start))

    def _engine_in_back(self, sa_in: SAParams, late: tuple[int, int]) -> None:
        # the engine's window again, with what the kernel accepted merged in
        from fastpath._engine import ReplayWindow

        size = sa_in.replay_window
        merged = ReplayWindow(size, sa_in.esn)
        merged.merge(*late)
        if self.kernel is not None:
            with contextlib.suppress(KeyError, OSError):
                merged.merge(*self._window_of(self.kernel.sa_state(sa_in.spi, True),
                                              size))  # fmt: skip
        self.engine.install_sa(sa_in, merged.state())

    def _engine_drop(self, spi: int, inbound: bool) -> None:
        with contextlib.suppress(KeyError):
            self.engine.remove_sa(spi, inbound)

    def _kernel_back(
        self, session: Session, sa_in: SAParams, sa_out: SAParams, dirs: tuple[str, ...]
    ) -> None:
        # a move to userspace that failed: the kernel's out counter above what
        # the engine sent meanwhile, its encap socket, then its policies
        kernel = self._kernel()
        with contextlib.suppress(KeyError):
            sent = int(self.engine.sa_counters(sa_out.spi, False)["next_seq"])
            state = kernel.sa_state(sa_out.spi, False)
            if sent - 1 > state.oseq:
                kernel.set_sa_state(
                    sa_out.spi, False, dataclasses.replace(state, oseq=sent - 1)
                )
        if "in" in dirs:
            # re-adding the inbound SA reopens the peer's connected encap socket
            kernel.install_sa(
                sa_in, replay=kernel.sa_state(sa_in.spi, True), replace=True
            )
            self._sync_encap_readers()
        kernel.remove_policies(session.index, dirs)
        self._kernel_policies(session, sa_in, dirs)

    def _drain_engine(self, spi_in: int) -> None:
        """Wait (at most DRAIN_MAX s) until the engine's inbound SA stops counting."""

        def reading() -> object:
            return self.engine.sa_counters(spi_in, True)["packets"]

        deadline = time.monotonic() + DRAIN_MAX
        before = reading()
        while time.monotonic() < deadline:
            time.sleep(DRAIN_QUIET)
            now = reading()
            if now == before:
                return
            before = now
        log.debug("engine sa %08x still receiving after the move", spi_in)

    def _move_to_userspace(
        self, session: Session, sa_in: SAParams, sa_out: SAParams, margin: int
    ) -> dict[str, Any]:
        kernel = self._kernel()
        size = sa_in.replay_window
        undo = _Rollback(f"move of {sa_in.spi:08x} to userspace")
        try:
            # both engine SAs first: the inbound one with the kernel's window
            # (GETAE), the outbound one above the kernel's last number plus the
            # margin, reserved in the seq store before its first packet
            n = int(kernel.sa_counters(sa_out.spi, False)["next_seq"])
            window = self._window_of(kernel.sa_state(sa_in.spi, True), size)
            undo.push(self._engine_drop, sa_in.spi, True)
            self.engine.install_sa(sa_in, window)
            undo.push(self._engine_drop, sa_out.spi, False)
            self.engine.install_sa(dataclasses.replace(sa_out, next_seq=n + margin))
            reserved = self.engine.sa_counters(sa_out.spi, False).get("seq_reserved")

            # outbound: the engine's SA sends once the out policy goes
            undo.push(self._kernel_back, session, sa_in, sa_out, ("out",))
            kernel.remove_policies(session.index, ("out",))
            last = int(kernel.sa_counters(sa_out.spi, False)["next_seq"])
            if last > n + margin:
                log.error("move overran the sequence margin: %d > %d", last, n + margin)

            # inbound: closing the connected encap socket hands ESP back to port
            # 4500; what the kernel accepted since the first read is merged in
            undo.push(self._kernel_back, session, sa_in, sa_out, ("in", "fwd"))
            self._kernel_release(session)
            late = self._window_of(kernel.sa_state(sa_in.spi, True), size)
            self.engine.set_replay_window(sa_in.spi, *late)
        except BaseException:
            undo.run()
            raise

        # committed: the kernel's pair is only state left behind now
        try:
            self._kernel_remove_pair(session, sa_in.spi, sa_out.spi)
        except OSError as exc:
            log.error("kernel sas %08x/%08x stay after the move: %s",
                      sa_in.spi, sa_out.spi, exc)  # fmt: skip
        return {
            "source_next_seq": last,
            "dest_next_seq": n + margin,
            "seq_reserved": reserved,
            "top_in": window[0],
            "late_top_in": late[0],
        }

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
                if not isinstance(request, dict):
                    kind = type(request).__name__
                    raise ValueError(f"expected a JSON object, got a {kind}")
                answer = self.control(str(request.get("cmd", "")), request)
            except ValueError as exc:
                answer = {"error": f"bad request: {exc}"}
            except Exception:
                self.counters["handler_errors"] += 1
                log.exception("control request failed")
                answer = {"error": "internal error (see the daemon's log)"}
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
        if cmd == "sa-move":
            request = request or {}
            try:
                return self.move_sa(str(request.get("spi", "")), str(request.get("to")))
            except OSError as exc:
                # a move that failed half way was rolled back: nothing changed
                return {"error": exc.strerror or str(exc)}
            except (KeyError, ValueError, RuntimeError) as exc:
                # str() of a KeyError is its repr: the message alone
                return {"error": str(exc.args[0]) if exc.args else str(exc)}
        if cmd == "show-engines":
            return {
                "profiles": dict(self.profile_engine),
                "dataplane": self._dataplane_kind(),
                "kernel_available": self.kernel_ok,
                "kernel_reason": self.kernel_reason,
            }
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
                # pools authorization named that the config doesn't have
                "unknown_pools": dict(UNKNOWN_POOLS),
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
        # goes when the client answers or the retransmissions give up.  IDs
        # are shown in lower case; an upper-case copy names the same session
        now = time.monotonic()
        asked = session_id.strip()
        for session_id in dict.fromkeys((asked, asked.lower())):
            if self._guard(self.responder.delete_ike_sa, session_id, now):
                break
        else:
            return {"error": f"no session {asked!r}"}
        self._after_step()
        log.info("session %s: delete requested on the control socket", session_id)
        return {"deleting": session_id}

    def _dataplane_kind(self) -> str:
        # where the userspace engine runs: its own process or the daemon's
        return "process" if hasattr(self.engine, "reload") else "inline"

    def _ipsec_sas(self) -> list[dict[str, Any]]:
        """Describe every SA: spi, direction, engine, next seq, reserved mark."""
        userspace = f"userspace ({self._dataplane_kind()})"
        out = []
        for session in self.sessions.values():
            kernel = session.engine == "kernel" and self.kernel is not None
            source = self.kernel if kernel else self.engine
            engine = "kernel" if kernel else userspace
            for spi_in, spi_out in session.children:
                for spi, inbound in ((spi_in, True), (spi_out, False)):
                    try:
                        c = dict(source.sa_counters(spi, inbound))
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
                            "seq_cap": c.pop("seq_cap", None),
                            "counters": c,
                        }
                    )
        return out

    def _describe(self, session: Session) -> dict[str, Any]:
        children = []
        source = self.kernel if session.engine == "kernel" else self.engine
        for spi_in, spi_out in session.children:
            rx = source.sa_counters(spi_in, True)
            tx = source.sa_counters(spi_out, False)
            children.append(
                {
                    "spi_in": f"{spi_in:08x}",
                    "spi_out": f"{spi_out:08x}",
                    "engine": session.engine,
                    "highest_seq_in": rx.get("highest_seq"),
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
            "mtu": session.mtu,
            "profile": session.profile,
            "engine": session.engine,
            "up_seconds": round(time.time() - session.created, 1),
            "children": children,
            # route accept; Linux routes have no tag: it is only recorded here
            "accepted_routes": [
                {"prefix": p, "metric": session.route_metric, "tag": session.route_tag}
                for p in session.accepted_routes
            ],
        }


class _Rollback:
    """Inverses of a move's steps, run newest first when a later step fails.

    Each step pushes its inverse before it acts, so a step that fails half way
    is undone as well; an inverse that fails is logged and the rest still run.
    """

    def __init__(self, what: str):
        self.what = what
        self.steps: list[tuple[Callable[..., object], tuple[Any, ...]]] = []

    def push(self, step: Callable[..., object], *args: Any) -> None:
        """Record the inverse of the step about to run."""
        self.steps.append((step, args))

    def run(self) -> None:
        """Run every recorded inverse, newest first."""
        log.warning("%s failed, rolling back %d step(s)", self.what, len(self.steps))
        while self.steps:
            step, args = self.steps.pop()
            try:
                step(*args)
            except Exception:
                log.exception("%s: undoing %s failed", self.what, step.__name__)


def _reason(exc: OSError) -> str:
    """Return the system's reason for a failed bind (uvloop keeps it inside)."""
    for err in (exc, exc.__cause__, exc.__context__):
        if isinstance(err, OSError) and err.strerror:
            return str(err.strerror)
    return str(exc)


def _pool_networks(
    pool: Any,
) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    """Return the networks that cover a configured pool's addresses."""
    step = 1 << (pool.first.max_prefixlen - pool.client_prefix)
    last = ipaddress.ip_address(int(pool.last) + step - 1)
    return list(ipaddress.summarize_address_range(pool.first, last))


def _record_spis(body: bytes) -> set[int]:
    """Return the CHILD SPIs named in a session record (empty if unreadable)."""
    try:
        children = json.loads(body)["daemon"]["children"]
        return {int(c[k]) for c in children for k in ("spi_in", "spi_out")}
    except (ValueError, KeyError, TypeError):
        return set()


def _rekeyed(session: Session, ev: Any) -> int | None:
    """Return the inbound SPI of the CHILD SA ``ev`` rekeys, if it is one.

    A new pair with the same traffic selectors as a live one replaces it
    (several CHILD SAs of one session differ in their selectors).
    """
    for spi_in, _ in session.children:
        state = session.child_state.get(spi_in)
        if state is None or spi_in in session.deferred_out:
            continue
        if (list(state["local_ts"]) == list(ev.local_ts)
                and list(state["remote_ts"]) == list(ev.remote_ts)):
            return spi_in
    return None


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
    """Run the daemon on uvloop until it is stopped.

    The state directory is made if missing (StateDirError when it cannot be)
    and locked for the daemon's life before anything in it is read: a second
    daemon on it stops here with a StartupError, before it touches leases,
    kernel state or TUN devices.
    """
    import uvloop

    state = config.server.state_dir
    lock = StateLock(state) if state else None
    try:
        uvloop.run(Headend(config).run())
    finally:
        if lock is not None:
            lock.release()


class StateLock:
    """An exclusive flock on ``state_dir/LOCK_FILE``, held until release()."""

    def __init__(self, state_dir: str | os.PathLike[str]):
        directory = check_state_dir(state_dir, create=True)
        self.path = directory / LOCK_FILE
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise StateDirError(f"cannot open {self.path}: {exc.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise StartupError(
                f"state directory {directory} is in use by another daemon "
                f"(pid {holder})"
            ) from None
        # the holder's pid, for the message above
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd: int | None = fd

    def release(self) -> None:
        """Unlock (closing the file drops the lock); idempotent."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _kernel_unfit(local_ts: tuple[str, ...], remote_ts: tuple[str, ...]) -> str:
    """Say why kernel policies cannot express these selectors ("" if they can)."""
    from fastpath.kernel import kernel_selectors

    try:
        kernel_selectors(local_ts, remote_ts)
    except ValueError as exc:
        return str(exc)
    return ""
