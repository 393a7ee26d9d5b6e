"""The ESP engine in its own process, behind a proxy with the Engine API.

Theory of operation::

    control plane (daemon)                    dataplane child
    DataplaneProxy ----- SOCK_SEQPACKET -----> python -m control.dataplane FD
      keeps: UDP 4500 fd, TUN fds,              Engine(udp dup) + TUN dups
             every SA, the SeqReserver          ("ike", data, addr) back up
      supervisor: waitpid -> respawn, re-push

The proxy owns the originals of the UDP socket and the TUN fds and hands dups
over with SCM_RIGHTS, so a dataplane that dies (or is reloaded on purpose)
loses no device and no socket: packets wait in the kernel's queues.  Every
call is one pickled ``(op, args)`` message answered by ``("reply", ...)``;
IKE datagrams the engine receives come up unsolicited as ``("ike", ...)``.
The socket pair is private to the two processes, so pickle is safe here.

Outbound SAs run under a :class:`control.seqstore.SeqReserver`: installed
with ``seq_limit`` at the durably reserved end, raised by a ticker thread
every ``tick`` seconds, only after the store committed.  When the child is
restarted the supervisor re-adds every session and SA; outbound SAs resume at
the stored end (strictly above anything sent), inbound ones with the replay
window the ticker last polled (``replay_window``, every tick).  While the child
is down mutators are recorded and replayed, queries return the last known
counters; packet and byte counters, per SA and engine-wide (``udp_rx``,
``rx_esp``, ...), carry their totals across a restart: the new child counts
from zero and the proxy adds what the old one last reported, polled every tick
and once more just before a ``reload`` (a crash loses at most one tick).

Stopping: the child ignores SIGTERM and SIGINT (blocked from before its exec,
so none is lost to the start-up window): a signal to the whole process group,
as systemd sends it, reaches the daemon, which still needs the child to send
its Deletes on port 4500 and then stops it itself.  ``begin_stop`` ends the
restarts; an IKE datagram sent while no child runs goes out on the proxy's own
copy of the socket.

Live moves (control/daemon.py ``move_sa``): ``set_seq_limit`` from the daemon is
a *cap*, the end of what the engine may send before the kernel takes over; the
proxy keeps it and every later raise (the ticker's, a restart's) stays below it,
so a moved-out SA never reaches the kernel's numbers.  A move that fails puts the
cap back with ``lift_seq_cap``; while a cap stands, ``sa_counters`` shows it as
``seq_cap`` and counts what it held back under the drop reason ``seq_cap``.  An
outbound SA installed
with ``next_seq > 1`` (a move back in) has ``next_seq`` reserved in the store
before the engine gets it, so reload-safety holds across the move; an inbound
one installed with ``replay`` starts with the source engine's window.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import pickle
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from control.seqstore import SeqReserver, SeqStore, SnapshotStore

__all__ = ["DataplaneDown", "DataplaneProxy", "child_main"]

log = logging.getLogger("espgate.dataplane")

MAX_MSG = 256 * 1024
MAX_FDS = 4
INBOUND_KIND = "inbound"
# an outbound SA's last polled next_seq: how far ahead a whole-daemon resume is
OUTBOUND_KIND = "outbound"
INBOUND_EVERY = 20
# the daemon's stop signals, which the child ignores
STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}


class DataplaneDown(RuntimeError):
    """The dataplane process is not running (it is being restarted)."""


def _send(sock: socket.socket, obj: object, fds: tuple[int, ...] = ()) -> None:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    if fds:
        socket.send_fds(sock, [data], list(fds))
    else:
        sock.send(data)


def _recv(sock: socket.socket) -> tuple[Any, list[int]]:
    data, fds, _flags, _addr = socket.recv_fds(sock, MAX_MSG, MAX_FDS)
    if not data:
        for fd in fds:
            os.close(fd)
        raise EOFError("peer closed")
    return pickle.loads(data), fds


# ---------------------------------------------------------------- child


def child_main(fd: int) -> int:
    """Run the dataplane on the control socket fd until the parent goes away."""
    from fastpath import Engine

    sock = socket.socket(fileno=fd)
    send_lock = threading.Lock()
    (op, kwargs), fds = _recv(sock)
    assert op == "init" and len(fds) == 1, f"Bad first message {op!r}"
    engine = Engine(fds[0], **kwargs)
    tuns: dict[int, int] = {}

    def on_ike(data: bytes, addr: tuple[str, int]) -> None:
        with send_lock, contextlib.suppress(OSError):
            _send(sock, ("ike", data, addr))

    engine.start(on_ike)
    with send_lock:
        _send(sock, ("reply", ("ok", os.getpid())))
    while True:
        try:
            (op, args), fds = _recv(sock)
        except (EOFError, OSError):
            break
        try:
            if op == "add_session":
                engine.add_session(args[0], fds[0], vnet_hdr=args[1])
                tuns[args[0]] = fds[0]
                result: Any = None
            elif op == "remove_session":
                engine.remove_session(*args)
                os.close(tuns.pop(args[0]))
                result = None
            else:
                result = getattr(engine, op)(*args)
            reply = ("ok", result)
        except Exception as exc:  # the caller gets it back, the loop goes on
            reply = ("err", exc)
        with send_lock:
            _send(sock, ("reply", reply))
    engine.stop()
    return 0


# ---------------------------------------------------------------- proxy


class _Child:
    def __init__(self, proc: subprocess.Popen[bytes], sock: socket.socket):
        self.proc = proc
        self.sock = sock
        self.replies: queue.Queue[tuple[str, Any]] = queue.Queue()
        self.alive = True
        self.reader: threading.Thread | None = None


class DataplaneProxy:
    """Drive an Engine in a child process; same methods as :class:`Engine`.

    ``store`` enables durable sequence numbers (a SeqStore or, in tests, a
    SnapshotStore); without it outbound SAs are installed as given.
    """

    def __init__(
        self,
        udp_fd: int,
        *,
        batch: int = 64,
        crypto: str = "ipsec-mb",
        store: SeqStore | SnapshotStore | None = None,
        tick: float = 0.05,
        argv: list[str] | None = None,
        reserver_kwargs: dict[str, Any] | None = None,
        record_scope: str = "",
        **engine_kwargs: Any,
    ):
        self.udp_fd = udp_fd
        self.engine_kwargs = {"batch": batch, "crypto": crypto, **engine_kwargs}
        self.argv = argv or [sys.executable, "-m", "control.dataplane"]
        self.tick = tick
        # prefixes this daemon's records in a state file others may share
        self.record_scope = record_scope
        self.reserver = (
            None
            if store is None
            else SeqReserver(store, self._set_limit, **(reserver_kwargs or {}))
        )
        self.counters_: dict[str, int] = {"power_cuts": 0}
        self.counters_.update({"restarts": 0, "sa_resumed": 0})
        self._sessions: dict[int, tuple[int, bool | None]] = {}
        self._sas: dict[tuple[int, bool], Any] = {}
        self._last: dict[tuple[int, bool], dict[str, Any]] = {}
        # outbound caps set by a move out (never lifted) and the last known
        # replay window of every inbound SA (what a restart reinstalls)
        self._caps: dict[int, int] = {}
        # seq_blocked of a capped SA when its cap came: what it held back since
        # is counted as the drop reason "seq_cap"
        self._cap_blocked: dict[int, int] = {}
        self._windows: dict[int, tuple[int, int]] = {}
        self._lock = threading.RLock()
        self._child: _Child | None = None
        self._ike_callback: Callable[[bytes, tuple[str, int]], object] | None = None
        self._stopping = threading.Event()
        # set by begin_stop: a child that exits now is not restarted
        self._no_restart = threading.Event()
        self._threads: list[threading.Thread] = []
        # totals of the children before the running one (per SA, engine-wide)
        self._base: dict[tuple[int, bool], dict[str, Any]] = {}
        self._engine_base: dict[str, int] = {}
        self._engine_last: dict[str, int] = {}
        self._restarted = threading.Condition()

    # -- lifecycle ---------------------------------------------------------

    def start(self, ike_callback: Callable[[bytes, tuple[str, int]], object]) -> None:
        """Spawn the dataplane and the supervisor and ticker threads."""
        self._ike_callback = ike_callback
        with self._lock:
            self._spawn()
        for target in (self._supervise, self._ticker):
            t = threading.Thread(target=target, daemon=True, name=target.__name__)
            t.start()
            self._threads.append(t)

    def begin_stop(self) -> None:
        """Restart the dataplane no more: the daemon is stopping."""
        self._no_restart.set()

    def stop(self) -> None:
        """Stop the dataplane for good (the SAs' marks stay in the store)."""
        self._no_restart.set()
        self._stopping.set()
        with self._lock:
            child = self._child
            self._child = None
        if child is not None:
            self._end(child)
        for t in self._threads:
            t.join(timeout=5.0)

    def reload(self) -> int:
        """Restart the dataplane on purpose; return the new child's pid."""
        with self._lock:
            child = self._child
            if child is not None:
                # the old child's last counts, so a planned restart loses none
                self._poll_totals()
                self._end(child)
                self._child = None
            self._respawn("reload")
            assert self._child is not None
            return self._child.proc.pid

    def dataplane_pid(self) -> int | None:
        """Return the running child's pid (None while it is down)."""
        child = self._child
        return child.proc.pid if child is not None and child.alive else None

    def wait_restarted(self, restarts: int, timeout: float) -> bool:
        """Wait until at least `restarts` restarts happened; return whether so."""
        with self._restarted:
            return self._restarted.wait_for(
                lambda: self.counters_["restarts"] >= restarts, timeout
            )

    def power_cut(self, wait: float = 3.0) -> str:
        """Simulate a power cut of the dataplane and its SnapshotStore.

        The cut comes at the next reservation, between its write and its
        fsync (the block being reserved is lost), or after ``wait`` seconds
        with none in flight.  Either way the child is killed first, then
        every unsynced write is dropped, and the supervisor resumes the SAs
        from what survived.  Return "in-flight" or "idle".
        """
        assert self.reserver is not None, "power_cut needs a store"
        snapshot = self.reserver.store
        assert isinstance(snapshot, SnapshotStore), "power_cut needs a SnapshotStore"
        fired = threading.Event()

        def cut(spi: int, value: int) -> None:
            snapshot.before_sync = None
            self._cut(snapshot)
            fired.set()

        snapshot.before_sync = cut
        if fired.wait(wait):
            return "in-flight"
        with self.reserver._lock:
            if snapshot.before_sync is None:
                return "in-flight"
            snapshot.before_sync = None
            self._cut(snapshot)
        return "idle"

    def _cut(self, snapshot: SnapshotStore) -> None:
        # nothing sends after this; then only the fsync'ed marks survive,
        # read back through a real SQLite file into a fresh snapshot
        assert self.reserver is not None
        child = self._child
        if child is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child.proc.pid, signal.SIGKILL)
        survived = snapshot.cut()
        fresh = SnapshotStore(snapshot.path)
        fresh.durable = survived.marks()
        fresh.volatile = dict(fresh.durable)
        survived.close()
        self.reserver.store = fresh
        self.counters_["power_cuts"] += 1

    def _spawn(self) -> None:
        parent, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        # the child inherits this thread's mask: SIGTERM and SIGINT stay blocked
        # until its main() has set them to be ignored
        old = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            proc = subprocess.Popen(
                [*self.argv, str(child_end.fileno())],
                pass_fds=(child_end.fileno(),),
                start_new_session=False,
            )
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)
            child_end.close()
        child = _Child(proc, parent)
        child.reader = threading.Thread(
            target=self._read, args=(child,), daemon=True, name="dataplane-reader"
        )
        child.reader.start()
        _send(parent, ("init", self.engine_kwargs), (self.udp_fd,))
        self._wait_reply(child)
        self._child = child
        log.debug("dataplane pid %d up", proc.pid)

    def _end(self, child: _Child) -> None:
        child.alive = False
        with contextlib.suppress(OSError):
            child.sock.shutdown(socket.SHUT_RDWR)
        try:
            child.proc.wait(timeout=3.0)
        except subprocess.TimeoutExpired:
            child.proc.send_signal(signal.SIGKILL)
            child.proc.wait()
        child.sock.close()

    def _supervise(self) -> None:
        while not self._stopping.is_set():
            child = self._child
            if child is None:
                time.sleep(0.02)
                continue
            code = child.proc.wait()
            with self._lock:
                if self._stopping.is_set() or self._child is not child:
                    continue
                if self._no_restart.is_set():
                    log.info(
                        "dataplane pid %d exited (%s) while stopping",
                        child.proc.pid,
                        code,
                    )
                    child.alive = False
                    child.sock.close()
                    self._child = None
                    continue
                log.warning(
                    "dataplane pid %d exited (%s), restarting", child.proc.pid, code
                )
                child.alive = False
                child.sock.close()
                self._child = None
                self._respawn("crash")

    def _respawn(self, why: str) -> None:
        # every session and SA again; outbound ones from the store's marks; the
        # new child counts from zero, so what the old one counted is carried
        for key in self._sas:
            self._base[key] = _totals(self._last.get(key, {}))
        self._engine_base = dict(self._engine_last)
        backoff = 0.05
        while not self._stopping.is_set():
            try:
                self._spawn()
                break
            except (OSError, DataplaneDown) as exc:
                log.error("dataplane restart failed: %s", exc)
                time.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
        for session, (tun_fd, vnet) in self._sessions.items():
            self._call("add_session", session, vnet, fds=(tun_fd,))
        for (spi, inbound), params in list(self._sas.items()):
            resumed = self._resume_params(spi, inbound, params)
            self._call(
                "install_sa", resumed, self._windows.get(spi) if inbound else None
            )
        with self._restarted:
            self.counters_["restarts"] += 1
            self._restarted.notify_all()
        log.info(
            "dataplane restarted (%s): %d session(s), %d sa(s)",
            why,
            len(self._sessions),
            len(self._sas),
        )

    def _resume_params(self, spi: int, inbound: bool, params: Any) -> Any:
        last = self._last.get((spi, inbound), {})
        if inbound:
            # FIXME: the window comes back as the ticker last polled it, so a
            # replay of a packet that arrived in the last tick is accepted once.
            top = int(last.get("highest_seq", params.next_seq - 1))
            return dataclasses.replace(params, next_seq=max(top + 1, params.next_seq))
        if self.reserver is None:
            # without a store only a guess is possible: refuse to resume it
            raise DataplaneDown(f"SA 0x{spi:08x} cannot resume without a store")
        self.reserver.detach_sa(spi)
        start = self.reserver.open_sa(spi, esn=params.esn, resume=True)
        self.reserver.resume_report(spi, last.get("next_seq"))
        self.counters_["sa_resumed"] += 1
        return dataclasses.replace(params, next_seq=start, seq_limit=self._limit(spi))

    # -- messages ----------------------------------------------------------

    def _read(self, child: _Child) -> None:
        while True:
            try:
                msg, fds = _recv(child.sock)
            except (EOFError, OSError):
                break
            for fd in fds:
                os.close(fd)
            if msg[0] == "ike":
                if self._ike_callback is not None:
                    try:
                        self._ike_callback(msg[1], msg[2])
                    except Exception:
                        log.exception("ike callback failed")
            else:
                child.replies.put(msg[1])
        child.alive = False
        child.replies.put(("down", None))

    def _wait_reply(self, child: _Child) -> Any:
        try:
            status, value = child.replies.get(timeout=10.0)
        except queue.Empty:
            raise DataplaneDown("Dataplane did not answer") from None
        if status == "down":
            raise DataplaneDown("Dataplane went away")
        if status == "err":
            raise value
        return value

    def _call(self, op: str, *args: Any, fds: tuple[int, ...] = ()) -> Any:
        with self._lock:
            child = self._child
            if child is None or not child.alive:
                raise DataplaneDown("Dataplane is restarting")
            try:
                _send(child.sock, (op, args), fds)
            except OSError:
                raise DataplaneDown("Dataplane went away") from None
            return self._wait_reply(child)

    def _try(self, op: str, *args: Any, fds: tuple[int, ...] = ()) -> Any:
        # a mutator while the child is down is replayed by the restart
        with contextlib.suppress(DataplaneDown):
            return self._call(op, *args, fds=fds)
        return None

    # -- the Engine API ----------------------------------------------------

    def add_session(self, session: int, tun_fd: int, *, vnet_hdr: Any = None) -> None:
        """Attach a session and its TUN fd (the proxy keeps the original)."""
        if vnet_hdr is None:
            from fastpath import tun_vnet_hdr

            vnet_hdr = tun_vnet_hdr(tun_fd)
        with self._lock:
            if session in self._sessions:
                raise ValueError(f"Session {session} already exists")
            self._sessions[session] = (tun_fd, bool(vnet_hdr))
            self._try("add_session", session, bool(vnet_hdr), fds=(tun_fd,))

    def remove_session(self, session: int) -> None:
        """Detach a session and forget its SAs."""
        with self._lock:
            if self._sessions.pop(session, None) is None:
                raise KeyError(f"No session {session}")
            for key, params in list(self._sas.items()):
                if params.session == session:
                    self._forget(key)
            self._try("remove_session", session)

    def install_sa(
        self,
        params: Any,
        replay: tuple[int, int] | None = None,
        *,
        resume: bool = False,
    ) -> None:
        """Install one SA; outbound SAs get a durably reserved limit first.

        ``resume`` continues an outbound SA at its stored mark (after a whole
        daemon restart) and raises UntrustedState when there is none.  An
        outbound SA with ``next_seq > 1`` (moved back from the kernel) has that
        number reserved before the engine may send it.  ``replay`` (inbound)
        is a window as ``Engine.replay_window`` returns it, marked before the
        first packet.
        """
        with self._lock:
            key = (params.spi, bool(params.inbound))
            if key in self._sas:
                raise ValueError(f"SA 0x{params.spi:08x} already installed")
            if not params.inbound and self.reserver is not None:
                if not resume and params.next_seq > 1:
                    # RFC 4303 section 3.3.3: numbers below next_seq may have been
                    # sent by the kernel; a resume must start at or above it
                    self.reserver.store.reserve(params.spi, params.next_seq)
                start = self.reserver.open_sa(params.spi, esn=params.esn, resume=resume)
                if resume:
                    stored = self._stored_next(params.spi)
                    self.reserver.resume_report(params.spi, stored)
                params = dataclasses.replace(
                    params,
                    next_seq=max(start, params.next_seq),
                    seq_limit=self.reserver.limit(params.spi),
                )
            self._sas[key] = params
            if params.inbound and replay is not None:
                self._windows[params.spi] = (int(replay[0]), int(replay[1]))
            self._try("install_sa", params, replay)
            if params.inbound:
                top = max(params.next_seq - 1, replay[0] if replay else 0)
                self._put_inbound(params.spi, top)

    def remove_sa(self, spi: int, inbound: bool) -> None:
        """Remove one SA (and its reserved mark: the key is gone)."""
        with self._lock:
            if (spi, bool(inbound)) not in self._sas:
                raise KeyError(f"No SA 0x{spi:08x} inbound={inbound}")
            self._forget((spi, bool(inbound)))
            self._try("remove_sa", spi, inbound)

    def inbound_top(self, spi: int) -> int | None:
        """Return the stored highest seq of an inbound SA (None if not stored)."""
        store = self.reserver.store if self.reserver else None
        if not isinstance(store, SeqStore):
            return None
        found = store.records(INBOUND_KIND).get(f"{self.record_scope}{spi:08x}")
        return None if found is None else int(found[1].decode())

    def _stored_next(self, spi: int) -> int | None:
        # the next_seq the ticker last stored for spi (before a daemon restart)
        store = self.reserver.store if self.reserver else None
        if not isinstance(store, SeqStore):
            return None
        found = store.records(OUTBOUND_KIND).get(f"{self.record_scope}{spi:08x}")
        return None if found is None else int(found[1].decode())

    def _put_outbound(self, spi: int, next_seq: int) -> None:
        store = self.reserver.store if self.reserver else None
        if isinstance(store, SeqStore):
            name = f"{self.record_scope}{spi:08x}"
            store.put_record(OUTBOUND_KIND, name, 1, str(next_seq).encode())

    def _put_inbound(self, spi: int, top: int) -> None:
        # a whole-daemon restart reopens the window just above this
        store = self.reserver.store if self.reserver else None
        if isinstance(store, SeqStore):
            name = f"{self.record_scope}{spi:08x}"
            store.put_record(INBOUND_KIND, name, 1, str(top).encode())

    def _forget(self, key: tuple[int, bool]) -> None:
        self._sas.pop(key, None)
        self._last.pop(key, None)
        if key[1]:
            self._windows.pop(key[0], None)
        else:
            self._caps.pop(key[0], None)
            self._cap_blocked.pop(key[0], None)
        store = self.reserver.store if self.reserver else None
        if isinstance(store, SeqStore):
            kind = INBOUND_KIND if key[1] else OUTBOUND_KIND
            store.delete_record(kind, f"{self.record_scope}{key[0]:08x}")
        if not key[1] and self.reserver is not None:
            self.reserver.close_sa(key[0])

    def set_peer(self, session: int, addr: tuple[str, int]) -> None:
        """Point every SA of a session at a new peer."""
        with self._lock:
            for key, params in list(self._sas.items()):
                if params.session == session:
                    self._sas[key] = dataclasses.replace(params, peer=tuple(addr))
            self._try("set_peer", session, tuple(addr))

    def set_seq_limit(self, spi: int, limit: int) -> None:
        """Cap an outbound SA at limit for good (a move hands it to the kernel).

        Neither the ticker's raises nor a restart lift a cap; a lower one wins.
        """
        with self._lock:
            if (spi, False) not in self._sas:
                raise KeyError(f"No SA 0x{spi:08x} inbound=False")
            if spi not in self._caps:
                blocked = self._last.get((spi, False), {}).get("seq_blocked", 0)
                with contextlib.suppress(DataplaneDown):
                    blocked = self.sa_counters(spi, False).get("seq_blocked", 0)
                self._cap_blocked[spi] = int(blocked)
            self._caps[spi] = min(limit, self._caps.get(spi, limit))
            self._try("set_seq_limit", spi, self._limit(spi))

    def lift_seq_cap(self, spi: int, cap: int | None = None) -> None:
        """Put an outbound SA's cap back to ``cap`` (None: no cap), as before a move.

        A move that fails undoes its cap with this; the limit goes back to the
        durably reserved end and the ticker raises it again.  An SA that is gone
        (the move removed it) is left alone.
        """
        with self._lock:
            if cap is None:
                self._caps.pop(spi, None)
                self._cap_blocked.pop(spi, None)
            else:
                self._caps[spi] = cap
            if (spi, False) in self._sas:
                self._try("set_seq_limit", spi, self._limit(spi))

    def seq_cap(self, spi: int) -> int | None:
        """Return an outbound SA's cap from a move, None when it has none."""
        return self._caps.get(spi)

    def _limit(self, spi: int) -> int:
        # the reserved limit, under the SA's cap if a move set one
        limits = [self._caps[spi]] if spi in self._caps else []
        end = self.reserver.reserved_end(spi) if self.reserver else None
        if end is not None:
            limits.append(end - 1)
        return min(limits, default=(1 << 64) - 1)

    def _set_limit(self, spi: int, limit: int) -> None:
        # the reserver calls this outside its lock: a restart (or a power
        # cut) may have reopened spi meanwhile, never exceed its mark now
        with self._lock:
            assert self.reserver is not None
            if self.reserver.reserved_end(spi) is None:
                return
            self._try("set_seq_limit", spi, min(limit, self._limit(spi)))

    def replay_window(self, spi: int) -> tuple[int, int]:
        """Return an inbound SA's replay window (top, seen) from the engine."""
        window = self._call("replay_window", spi)
        with self._lock:
            if (spi, True) in self._sas:
                self._windows[spi] = window
        return (int(window[0]), int(window[1]))

    def set_replay_window(self, spi: int, top: int, seen: int) -> None:
        """Mark a window (top, seen) as received in an inbound SA (merged)."""
        with self._lock:
            if (spi, True) not in self._sas:
                raise KeyError(f"No SA 0x{spi:08x} inbound=True")
            self._try("set_replay_window", spi, top, seen)
            # what a restart reinstalls; the next poll gives the merged window
            old = self._windows.get(spi)
            if old is None or old[0] <= top:
                self._windows[spi] = (top, seen)

    def sa_counters(self, spi: int, inbound: bool) -> dict[str, Any]:
        """Return one SA's counters plus its reserved mark (last known if down).

        Packets, bytes and drops are totals over every dataplane child.
        """
        key = (spi, bool(inbound))
        try:
            out = _add(dict(self._call("sa_counters", spi, inbound)),
                       self._base.get(key))  # fmt: skip
        except DataplaneDown:
            if key not in self._sas:
                raise KeyError(f"No SA 0x{spi:08x} inbound={inbound}") from None
            out = dict(self._last.get(key, {"packets": 0, "bytes": 0}))
        if key in self._sas:
            self._last[key] = out
        if not inbound and self.reserver is not None:
            out["seq_reserved"] = self.reserver.reserved_end(spi)
        if not inbound and spi in self._caps:
            # a packet the cap held back is a drop, and the cap is shown (not in
            # _last: a restart carries seq_blocked, this is derived from it)
            out = dict(out)
            out["seq_cap"] = self._caps[spi]
            held = int(out.get("seq_blocked", 0)) - self._cap_blocked.get(spi, 0)
            out["drops"] = {**(out.get("drops") or {}), "seq_cap": max(0, held)}
        return out

    def counters(self) -> dict[str, int]:
        """Return the engine's counters (totals over every child), restarts, resumes.

        While the child is down the last known totals stand.
        """
        try:
            raw = dict(self._call("counters"))
            out = {k: int(v) + self._engine_base.get(k, 0) for k, v in raw.items()}
            self._engine_last = dict(out)
        except DataplaneDown:
            out = dict(self._engine_last)
        out.update({f"dataplane_{k}": v for k, v in self.counters_.items()})
        return out

    def features(self) -> dict[str, bool]:
        """Return the child engine's offloads."""
        return dict(self._call("features"))

    def send_ike(self, data: bytes, addr: tuple[str, int]) -> None:
        """Send an IKE message on 4500, from the proxy's own socket while down."""
        try:
            self._call("send_ike", data, addr)
            return
        except DataplaneDown:
            pass
        # a Delete at shutdown must not wait for a child that is gone
        with socket.socket(fileno=os.dup(self.udp_fd)) as sock:
            # RFC 3948 section 2.2: the non-ESP marker before the IKE header
            sock.sendto(bytes(4) + data, addr)

    def _poll_totals(self) -> None:
        # refresh the last known engine and SA counters a restart carries on
        with contextlib.suppress(DataplaneDown):
            self.counters()
        with self._lock:
            keys = list(self._sas)
        for spi, inbound in keys:
            with contextlib.suppress(KeyError, DataplaneDown):
                self.sa_counters(spi, inbound)

    # -- reservation -------------------------------------------------------

    def _ticker(self) -> None:
        ticks = 0
        while not self._stopping.wait(self.tick):
            # engine-wide totals each tick, as the SAs' below: a crash loses at
            # most one tick of counts
            with contextlib.suppress(DataplaneDown):
                self.counters()
            if self.reserver is None:
                continue
            with self._lock:
                outbound = [spi for spi, inbound in self._sas if not inbound]
                inbound = [spi for spi, inb in self._sas if inb]
            for spi in outbound:
                if spi in self._caps:
                    continue  # moved out: nothing more to reserve for it
                try:
                    value = self.sa_counters(spi, False).get("next_seq")
                except (KeyError, DataplaneDown):
                    continue
                if value is not None and self._child is not None:
                    self.reserver.tick(spi, int(value))
                    if ticks % INBOUND_EVERY == 0:
                        self._put_outbound(spi, int(value))
            ticks += 1
            for spi in inbound:
                # the window for a restart each tick; the top for a whole-daemon
                # restart about once a second
                with contextlib.suppress(KeyError, DataplaneDown):
                    top = self.sa_counters(spi, True).get("highest_seq")
                    self.replay_window(spi)
                    if top is not None and ticks % INBOUND_EVERY == 0:
                        self._put_inbound(spi, int(top))


def _totals(counters: dict[str, Any]) -> dict[str, Any]:
    # the counting fields of an SA's counters (not its sequence state)
    out: dict[str, Any] = {
        k: int(counters.get(k, 0)) for k in ("packets", "bytes", "seq_blocked")
    }
    out["drops"] = {k: int(v) for k, v in (counters.get("drops") or {}).items()}
    return out


def _add(counters: dict[str, Any], base: dict[str, Any] | None) -> dict[str, Any]:
    # a fresh child's SA counters plus what earlier children counted
    if not base:
        return counters
    for k in ("packets", "bytes", "seq_blocked"):
        if k in counters:
            counters[k] = int(counters[k]) + base.get(k, 0)
    drops = dict(counters.get("drops") or {})
    for k, v in base.get("drops", {}).items():
        drops[k] = int(drops.get(k, 0)) + v
    if drops:
        counters["drops"] = drops
    return counters


def main(argv: list[str] | None = None) -> int:
    """Run `python -m control.dataplane FD` (started by DataplaneProxy)."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or not argv[0].isdigit():
        print("usage: espgate dataplane FD (started by espgate serve)", file=sys.stderr)
        return 2
    # the daemon stops us (after its Deletes went out through us); a signal to
    # the whole group must not: ignore, then take the ones held since the fork
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    return child_main(int(argv[0]))


if __name__ == "__main__":
    sys.exit(main())
