"""Kernel XFRM as an ESP engine: install, read back and remove SAs and policies.

Theory of operation: :class:`KernelEngine` offers the userspace Engine's SA calls
(``install_sa`` / ``remove_sa`` / ``sa_counters``) on top of netlink XFRM
(:mod:`fastpath.xfrm`), plus what migration needs: ``sa_state`` (GETAE) and
``set_sa_state`` (NEWAE) for the outbound counter and the inbound replay window.

Ownership: every SA and policy we create carries a reqid in
``[REQID_BASE, REQID_BASE + REQID_SPAN)``, one reqid per session (so a rekeyed
pair with the same reqid takes over the policies: the kernel picks the newest
matching outbound state, make before break).  :meth:`KernelEngine.cleanup` dumps
states and policies and deletes exactly those in that range; nothing else is
touched.  Marks are not used for ownership because they change which packets a
policy matches.

Traffic reaches the kernel path by policy: ``install_policies`` adds out, in and
fwd policies for the session's selectors with a tunnel-mode template.  ESP-in-UDP
needs a UDP socket with ``UDP_ENCAP_ESPINUDP`` on the receiving port or the
kernel drops the packets silently; :func:`open_encap_socket` makes one.  A socket
*connected* to one peer wins the port lookup over the daemon's unconnected 4500
socket, so one session can be in the kernel while others stay in userspace; IKE
from that peer then arrives on the connected socket (non-ESP marker) and must be
read from :meth:`KernelEngine.encap_sockets`.

Sequence numbers (RFC 4303 section 3.3.3): ``SAParams.next_seq`` is the next
number to send; the kernel keeps the last one sent (``oseq``), so an SA is
installed with ``oseq = next_seq - 1`` and read back as ``next_seq = oseq + 1``.

Live migration of one CHILD SA pair (the daemon drives it)::

    userspace -> kernel                     kernel -> userspace
    1 k.install_sa(in, replay=               1 Engine.install_sa(in), add TUN
      ReplayState.closed_below(top, w))        route for the inside address
      top = Engine.sa_counters(in)           2 k.remove_policies(s, ("out",))
            ["highest_seq"]                  3 n = k.sa_counters(out)["next_seq"]
    2 n = Engine.sa_counters(out)            4 Engine.install_sa(out,
          ["next_seq"]                         next_seq=n + MARGIN)
    3 k.install_sa(out, next_seq=n+MARGIN)   5 k.remove_sa(in/out); close_encap
    4 k.install_policies(s, ("out",))        6 reserve n + MARGIN in the store
      (the switch)
    5 Engine.remove_sa(out), (in) last
    6 k.install_policies(s, ("in", "fwd"))
      (after 5: they drop what the userspace engine decrypted)

MARGIN covers packets the source may still send between the read and the
switch (a batch in flight); the sequence store must reserve above it first.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import errno
import ipaddress
import logging
import os
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from fastpath import xfrm as X
from fastpath.sa import SAParams
from fastpath.xfrm import ReplayState, XfrmError, XfrmSocket

__all__ = [
    "KernelEngine",
    "MAX_SELECTORS",
    "POLICY_PRIORITY",
    "REQID_BASE",
    "REQID_SPAN",
    "is_ours",
    "kernel_selectors",
    "open_encap_socket",
    "probe_kernel",
    "reqid_for",
    "set_udp_encap",
]

log = logging.getLogger("espgate.kernel")

REQID_BASE = 0xE5600000
REQID_SPAN = 1 << 20
POLICY_PRIORITY = 0x3000
# selectors (policies per direction) one SA may need; beyond, it stays in userspace
MAX_SELECTORS = 64
NATT_PORT = 4500
_CLONE_NEWNET = 0x40000000
_DIRS = {"in": X.XFRM_POLICY_IN, "out": X.XFRM_POLICY_OUT, "fwd": X.XFRM_POLICY_FWD}


def reqid_for(session: int) -> int:
    """Return the reqid that marks a session's SAs and policies as ours."""
    assert 0 <= session < REQID_SPAN, f"session {session} outside the reqid range"
    return REQID_BASE + session


def is_ours(reqid: int) -> bool:
    """Say whether a reqid lies in espgate's range."""
    return REQID_BASE <= reqid < REQID_BASE + REQID_SPAN


# -- sockets and namespaces -----------------------------------------------------


def set_udp_encap(sock: socket.socket) -> None:
    """Turn a UDP socket into an ESP-in-UDP receiver (UDP_ENCAP_ESPINUDP)."""
    # RFC 3948 section 2.2: a zero non-ESP marker means IKE, anything else ESP;
    # the kernel decapsulates the latter and hands the former to the socket
    sock.setsockopt(X.SOL_UDP, X.UDP_ENCAP, X.UDP_ENCAP_ESPINUDP)


def open_encap_socket(
    local: tuple[str, int], peer: tuple[str, int] | None = None
) -> socket.socket:
    """Return a UDP socket bound to local (and connected to peer) with ESP encap.

    SO_REUSEADDR lets it share the port with the daemon's own socket; connected,
    it receives only that peer's datagrams.
    """
    family = X.family_of(local[0])
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(local)
        if peer is not None:
            sock.connect(peer)
        set_udp_encap(sock)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


_libc: Any = None


def _setns(fd: int) -> None:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    if _libc.setns(fd, _CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns failed: {os.strerror(err)}")


@contextlib.contextmanager
def in_netns(name: str | None) -> Iterator[None]:
    """Run the body with this thread in network namespace name (None: stay)."""
    if name is None:
        yield
        return
    back = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(f"/run/netns/{name}", os.O_RDONLY)
    try:
        _setns(target)
        try:
            yield
        finally:
            _setns(back)
    finally:
        os.close(target)
        os.close(back)


def _source_for(peer: str) -> str:
    # the address the kernel would send from towards peer
    with socket.socket(X.family_of(peer), socket.SOCK_DGRAM) as probe:
        probe.connect((peer, 9))
        return str(probe.getsockname()[0])


def _template(src: str, dst: str, reqid: int) -> dict[str, Any]:
    # struct xfrm_user_tmpl: ESP in tunnel mode between src and dst, any algorithm
    return {
        "daddr": X.pack_address(dst),
        "spi": 0,
        "proto": X.IPPROTO_ESP,
        "family": X.family_of(src),
        "saddr": X.pack_address(src),
        "reqid": reqid,
        "mode": X.XFRM_MODE_TUNNEL,
        "aalgos": 0xFFFFFFFF,
        "ealgos": 0xFFFFFFFF,
        "calgos": 0xFFFFFFFF,
    }


def _encap_attr(sport: int, dport: int) -> dict[str, Any]:
    # struct xfrm_encap_tmpl; the original address (oa) is unused in tunnel mode
    return {"type": X.UDP_ENCAP_ESPINUDP, "sport": sport, "dport": dport, "oa": b""}


def kernel_selectors(
    local_ts: tuple[str, ...], remote_ts: tuple[str, ...]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Return the (outbound, inbound) XFRM selectors covering a session's traffic.

    Each IKE selector pair becomes one XFRM selector per address prefix and port
    block (:func:`fastpath.xfrm.policy_selectors`).  Raise ValueError when a
    selector has no XFRM form or a direction needs more than MAX_SELECTORS.
    """
    outs: list[dict[str, Any]] = []
    ins: list[dict[str, Any]] = []
    for lts in local_ts:
        for rts in remote_ts:
            outs.extend(X.policy_selectors(lts, rts))
            ins.extend(X.policy_selectors(rts, lts))
    if len(outs) > MAX_SELECTORS:
        raise ValueError(
            f"selectors {list(local_ts)} === {list(remote_ts)} need {len(outs)} "
            f"kernel policies per direction, more than {MAX_SELECTORS}"
        )
    return outs, ins


@contextlib.contextmanager
def _gone_ok() -> Iterator[None]:
    # deleting what expired or was flushed meanwhile is not an error
    try:
        yield
    except XfrmError as exc:
        if exc.errno not in (errno.ENOENT, errno.ESRCH):
            raise


# -- the engine -----------------------------------------------------------------


@dataclass
class _SA:
    src: str
    dst: str
    family: int
    reqid: int
    replay_window: int
    esn: bool
    params: SAParams
    encap: tuple[int, int] | None  # (sport, dport) of ESP-in-UDP
    # what earlier incarnations counted: a MIGRATE clones the state and the
    # clone's lifetime counters start from zero
    base_packets: int = 0
    base_bytes: int = 0


@dataclass
class _Policies:
    reqid: int
    installed: list[tuple[dict[str, Any], int]] = field(default_factory=list)


class KernelEngine:
    """Install ESP SAs and policies in the kernel's XFRM; touch only our own.

    All calls are synchronous netlink requests (a few hundred microseconds), made
    from one thread.  With ``netns`` the netlink and encap sockets are created in
    that namespace, which is where every SA and policy then lives.
    """

    def __init__(self, *, netns: str | None = None):
        self.netns = netns
        with in_netns(netns):
            self.nl = XfrmSocket()
        self._sas: dict[tuple[int, bool], _SA] = {}
        self._policies: dict[int, _Policies] = {}
        self._encap: dict[tuple[tuple[str, int], tuple[str, int]], socket.socket] = {}
        self._lock = threading.Lock()

    def close(self) -> None:
        """Close the netlink and encap sockets (kernel state stays; see cleanup)."""
        for sock in self._encap.values():
            sock.close()
        self._encap.clear()
        self.nl.close()

    # -- SAs -------------------------------------------------------------------

    def install_sa(
        self,
        params: SAParams,
        *,
        replay: ReplayState | None = None,
        udp_encap: bool = True,
        replace: bool = False,
    ) -> None:
        """Install one direction of an ESP tunnel-mode SA (rfc4106(gcm(aes))).

        The outbound counter starts at ``params.next_seq`` (or ``replay.oseq + 1``
        when replay is given); an inbound SA takes replay's window and bitmap.
        With udp_encap the SA sends and expects ESP-in-UDP between the local and
        peer ports, and an inbound SA gets a connected encap socket.
        """
        peer_ip, peer_port = params.peer
        if params.local is not None:
            local_ip, local_port = params.local
        else:
            with in_netns(self.netns):
                local_ip = _source_for(peer_ip)
            local_port = NATT_PORT
        src, dst = (peer_ip, local_ip) if params.inbound else (local_ip, peer_ip)
        if replay is None:
            replay = ReplayState(params.next_seq - 1, 0, params.replay_window)
        assert replay.replay_window == params.replay_window, "window mismatch"
        encap = None
        if udp_encap:
            encap = (
                (peer_port, local_port) if params.inbound else (local_port, peer_port)
            )
        msg = self._sa_message(params, src, dst, replay, encap)
        kind = X.XFRM_MSG_UPDSA if replace else X.XFRM_MSG_NEWSA
        flags = X.NLM_F_ACK | (0 if replace else X.NLM_F_CREATE | X.NLM_F_EXCL)
        with self._lock:
            self.nl.request(msg, kind, flags)
            self._sas[(params.spi, params.inbound)] = _SA(
                src,
                dst,
                X.family_of(src),
                reqid_for(params.session),
                params.replay_window,
                params.esn,
                params,
                encap,
            )

        # ESP-in-UDP is dropped unless a socket on the port asks for it
        if udp_encap and params.inbound:
            self._ensure_encap((local_ip, local_port), (peer_ip, peer_port))
        log.debug(
            "kernel sa %08x %s installed, reqid %08x",
            params.spi,
            "in" if params.inbound else "out",
            reqid_for(params.session),
        )

    def _sa_message(
        self,
        params: SAParams,
        src: str,
        dst: str,
        replay: ReplayState,
        encap: tuple[int, int] | None,
    ) -> X.xfrm_usersa_info:
        # struct xfrm_usersa_info: tunnel mode, any inner selector
        family = X.family_of(src)
        msg = X.xfrm_usersa_info()
        any_net = "::/0" if family == socket.AF_INET6 else "0.0.0.0/0"
        msg.update(X.selector(any_net, any_net))
        msg.update(X.LIFETIME_INFINITE)
        msg["id_daddr"] = X.pack_address(dst)
        msg["id_spi"] = params.spi
        msg["id_proto"] = X.IPPROTO_ESP
        msg["saddr"] = X.pack_address(src)
        msg["reqid"] = reqid_for(params.session)
        msg["family"] = family
        msg["mode"] = X.XFRM_MODE_TUNNEL
        msg["replay_window"] = 0  # the ESN attribute carries the window
        msg["flags"] = X.XFRM_STATE_ESN if params.esn else 0
        attrs: list[tuple[str, Any]] = [
            ("XFRMA_ALG_AEAD", X.push_aead(params.key, params.salt)),
            ("XFRMA_REPLAY_ESN_VAL", X.push_replay_esn(replay)),
        ]
        if encap is not None:
            attrs.append(("XFRMA_ENCAP", _encap_attr(*encap)))
        msg["attrs"] = attrs
        return msg

    def _ensure_encap(self, local: tuple[str, int], peer: tuple[str, int]) -> None:
        if (local, peer) in self._encap:
            return
        with in_netns(self.netns):
            self._encap[(local, peer)] = open_encap_socket(local, peer)

    def encap_sockets(self) -> dict[tuple[tuple[str, int], tuple[str, int]], int]:
        """Return {(local, peer): fd} of the connected encap sockets (IKE arrives)."""
        return {key: sock.fileno() for key, sock in self._encap.items()}

    def close_encap(self, local: tuple[str, int], peer: tuple[str, int]) -> None:
        """Close the encap socket for one peer (after its last inbound SA left)."""
        sock = self._encap.pop((local, peer), None)
        if sock is not None:
            sock.close()

    def _sa(self, spi: int, inbound: bool) -> _SA:
        sa = self._sas.get((spi, inbound))
        if sa is None:
            raise KeyError(f"No kernel SA 0x{spi:08x} inbound={inbound}")
        return sa

    def _usersa_id(self, spi: int, sa: _SA) -> X.xfrm_usersa_id:
        msg = X.xfrm_usersa_id()
        msg["daddr"] = X.pack_address(sa.dst)
        msg["spi"] = spi
        msg["family"] = sa.family
        msg["proto"] = X.IPPROTO_ESP
        return msg

    def remove_sa(self, spi: int, inbound: bool) -> None:
        """Delete one SA; an SA the kernel already dropped is not an error."""
        with self._lock:
            sa = self._sas.pop((spi, inbound), None)
            if sa is None:
                raise KeyError(f"No kernel SA 0x{spi:08x} inbound={inbound}")
            try:
                self.nl.request(self._usersa_id(spi, sa), X.XFRM_MSG_DELSA, X.NLM_F_ACK)
            except XfrmError as exc:
                if exc.errno != errno.ESRCH:  # expired or flushed meanwhile
                    raise

    def sa_counters(self, spi: int, inbound: bool) -> dict[str, object]:
        """Return one SA's counters, lifetimes and sequence state from the kernel.

        Keys match the userspace Engine where they mean the same: packets, bytes,
        next_seq (outbound) or highest_seq (inbound), drops; plus add_time,
        use_time (seconds since the epoch, 0 if unused) and replay_window.
        """
        with self._lock:
            sa = self._sa(spi, inbound)
            (reply,) = self.nl.request(self._usersa_id(spi, sa), X.XFRM_MSG_GETSA, 0)
        raw = reply.get_attr("XFRMA_REPLAY_ESN_VAL")
        state = X.pull_replay_esn(raw) if raw is not None else ReplayState()
        out: dict[str, object] = {
            "packets": reply["curlft_packets"] + sa.base_packets,
            "bytes": reply["curlft_bytes"] + sa.base_bytes,
            "add_time": reply["curlft_add_time"],
            "use_time": reply["curlft_use_time"],
            "replay_window": state.replay_window,
            "reqid": reply["reqid"],
        }
        if inbound:
            out["highest_seq"] = state.seq
        else:
            out["next_seq"] = state.oseq + 1
        out["drops"] = {
            "replay": reply["stats_replay"],
            "auth": reply["stats_integrity_failed"],
            "replay_window": reply["stats_replay_window"],
        }
        return out

    def sa_state(self, spi: int, inbound: bool) -> ReplayState:
        """Return the SA's sequence counter and replay window (XFRM_MSG_GETAE)."""
        with self._lock:
            sa = self._sa(spi, inbound)
            msg = self._aevent(spi, sa, X.XFRM_AE_RVAL | X.XFRM_AE_LVAL)
            (reply,) = self.nl.request(msg, X.XFRM_MSG_GETAE, 0)
        raw = reply.get_attr("XFRMA_REPLAY_ESN_VAL")
        if raw is None:
            raise XfrmError(22, f"SA 0x{spi:08x} has no ESN replay state")
        return X.pull_replay_esn(raw)

    def set_sa_state(self, spi: int, inbound: bool, state: ReplayState) -> None:
        """Overwrite the SA's counter and replay window (XFRM_MSG_NEWAE).

        Only ever move an outbound counter forward: RFC 4303 section 3.3.3 never
        lets a sequence number repeat under one key.
        """
        with self._lock:
            sa = self._sa(spi, inbound)
            assert state.replay_window == sa.replay_window, "window mismatch"
            msg = self._aevent(spi, sa, X.XFRM_AE_RVAL)
            msg["attrs"] = [("XFRMA_REPLAY_ESN_VAL", X.push_replay_esn(state))]
            self.nl.request(msg, X.XFRM_MSG_NEWAE, X.NLM_F_ACK | X.NLM_F_REPLACE)

    def _aevent(self, spi: int, sa: _SA, flags: int) -> X.xfrm_aevent_id:
        msg = X.xfrm_aevent_id()
        msg["daddr"] = X.pack_address(sa.dst)
        msg["spi"] = spi
        msg["family"] = sa.family
        msg["proto"] = X.IPPROTO_ESP
        msg["saddr"] = X.pack_address(sa.src)
        msg["flags"] = flags
        msg["reqid"] = sa.reqid
        return msg

    # -- policies --------------------------------------------------------------

    def install_policies(
        self,
        session: int,
        *,
        local: str,
        peer: str,
        local_ts: tuple[str, ...] = ("0.0.0.0/0",),
        remote_ts: tuple[str, ...] = ("0.0.0.0/0",),
        dirs: tuple[str, ...] = ("out", "in", "fwd"),
        priority: int = POLICY_PRIORITY,
    ) -> None:
        """Route a session's selectors through its SAs (tunnel local <-> peer).

        out: local_ts -> remote_ts sealed towards peer; in and fwd: remote_ts ->
        local_ts must have arrived through an SA of the session's reqid.  Pairs of
        selectors with different families are skipped.
        """
        reqid = reqid_for(session)
        entry = self._policies.setdefault(session, _Policies(reqid))
        family = X.family_of(local)
        outs, ins = kernel_selectors(local_ts, remote_ts)
        for name in dirs:
            d = _DIRS[name]
            inward = d != X.XFRM_POLICY_OUT
            tsrc, tdst = (peer, local) if inward else (local, peer)
            for sel in ins if inward else outs:
                if sel["sel_family"] != family:
                    continue
                msg = X.xfrm_userpolicy_info()
                msg.update(sel)
                msg.update(X.LIFETIME_INFINITE)
                msg["priority"] = priority
                msg["dir"] = d
                msg["action"] = X.XFRM_POLICY_ALLOW
                msg["attrs"] = [("XFRMA_TMPL", _template(tsrc, tdst, reqid))]
                with self._lock:
                    self.nl.request(
                        msg, X.XFRM_MSG_UPDPOLICY, X.NLM_F_ACK | X.NLM_F_CREATE
                    )
                entry.installed.append((sel, d))

    def remove_policies(self, session: int, dirs: tuple[str, ...] | None = None) -> int:
        """Remove a session's policies (all, or those of dirs); return how many."""
        entry = self._policies.get(session)
        if entry is None:
            return 0
        wanted = {_DIRS[n] for n in dirs} if dirs is not None else set(_DIRS.values())
        kept: list[tuple[dict[str, Any], int]] = []
        removed = 0
        for sel, d in entry.installed:
            if d not in wanted:
                kept.append((sel, d))
                continue
            msg = X.xfrm_userpolicy_id()
            msg.update(sel)
            msg["dir"] = d
            with self._lock, _gone_ok():
                self.nl.request(msg, X.XFRM_MSG_DELPOLICY, X.NLM_F_ACK)
                removed += 1
        entry.installed = kept
        if not kept:
            del self._policies[session]
        return removed

    # -- NAT rebinding -----------------------------------------------------------

    def migrate_peer(
        self, session: int, old: tuple[str, int], new: tuple[str, int]
    ) -> int:
        """Move a session's SAs, policies and encap socket to the peer's new address.

        RFC 7296 section 2.23: after an authenticated message from a new NAT
        mapping, ESP follows it.  A new port alone is an UPDSA with a new
        XFRMA_ENCAP (the kernel keeps the state, its counters and replay window);
        a new address is an XFRM_MSG_MIGRATE per policy, which also rewrites the
        templates and clones each state with its sequence state.  SPIs and keys
        stay; returns how many SAs moved.
        """
        reqid = reqid_for(session)
        mine = [
            (key, sa)
            for key, sa in self._sas.items()
            if sa.reqid == reqid and old[0] in (sa.src, sa.dst)
        ]
        if not mine:
            return 0
        if old[0] == new[0]:
            for (spi, inbound), sa in mine:
                self._update_port(spi, inbound, sa, new)
        else:
            self._migrate_address(session, mine, old, new)

        # a connected encap socket hears only its peer: reconnect to the new one
        for local, peer in list(self._encap):
            if peer == old:
                self._ensure_encap(local, new)
                self.close_encap(local, old)
        log.debug("kernel sas of reqid %08x follow the peer to %s:%d", reqid, *new)
        return len(mine)

    def _update_port(
        self, spi: int, inbound: bool, sa: _SA, new: tuple[str, int]
    ) -> None:
        params = dataclasses.replace(sa.params, peer=new)
        if sa.encap is None:
            sa.params = params
            return
        encap = (new[1], sa.encap[1]) if inbound else (sa.encap[0], new[1])
        # the replay attribute is required but ignored: the kernel keeps the
        # existing state's sequence numbers and window on an update
        replay = ReplayState(params.next_seq - 1, 0, params.replay_window)
        msg = self._sa_message(params, sa.src, sa.dst, replay, encap)
        with self._lock:
            self.nl.request(msg, X.XFRM_MSG_UPDSA, X.NLM_F_ACK)
        sa.params, sa.encap = params, encap

    def _migrate_address(
        self,
        session: int,
        mine: list[tuple[tuple[int, bool], _SA]],
        old: tuple[str, int],
        new: tuple[str, int],
    ) -> None:
        reqid = reqid_for(session)
        entry = self._policies.get(session)
        if entry is None or not entry.installed:
            raise KeyError(f"No kernel policies for session {session}")
        local = next(sa.dst if sa.src == old[0] else sa.src for _, sa in mine)
        # carry the lifetime counters: the clones start theirs from zero
        for (spi, inbound), sa in mine:
            counters = self.sa_counters(spi, inbound)
            sa.base_packets = int(counters["packets"])  # type: ignore[call-overload]
            sa.base_bytes = int(counters["bytes"])  # type: ignore[call-overload]
        ports = [
            sa.encap[1] if inbound else sa.encap[0]
            for (_, inbound), sa in mine
            if sa.encap is not None
        ]
        local_port = ports[0] if ports else None
        self.migrate_policies(session, local, old[0], new, local_port)

        # what moved: the kernel's own list, by SPI
        where = {
            (st["spi"], st["dst"] == local): st
            for st in self.dump_states()
            if st["reqid"] == reqid
        }
        for (spi, inbound), sa in mine:
            st = where.get((spi, inbound))
            if st is None or new[0] not in (st["src"], st["dst"]):
                log.debug("kernel sa %08x kept the old peer address", spi)
                continue
            sa.src, sa.dst = st["src"], st["dst"]
            sa.params = dataclasses.replace(sa.params, peer=new)
            if sa.encap is not None:
                sa.encap = (new[1], sa.encap[1]) if inbound else (sa.encap[0], new[1])

    def migrate_policies(
        self,
        session: int,
        local: str,
        old_peer: str,
        new: tuple[str, int],
        local_port: int | None,
    ) -> int:
        """Send XFRM_MSG_MIGRATE for each of a session's policies; return how many.

        Templates (and the states found) between local and old_peer move to
        new; with local_port the cloned states get ESP-in-UDP between
        local_port and the new port.
        """
        reqid = reqid_for(session)
        entry = self._policies.get(session)
        installed = list(entry.installed) if entry is not None else []
        # one message per policy: the kernel finds the policy by its exact
        # selector, clones the first state (newest first) still matching each
        # entry's old addresses, rewrites the matching templates and deletes
        # the old states; a policy whose template moved already refuses a
        # second message (ENODATA), so an older state beyond the policies of
        # its direction (a rekey in flight) stays behind and dies with the rekey
        for sel, d in installed:
            outward = d == X.XFRM_POLICY_OUT
            if outward:
                move = X.Migration(local, old_peer, local, new[0], reqid)
            else:
                move = X.Migration(old_peer, local, new[0], local, reqid)
            msg = X.xfrm_userpolicy_id()
            msg.update(sel)
            msg["dir"] = d
            attrs: list[tuple[str, Any]] = [("XFRMA_MIGRATE", X.push_migrate([move]))]
            if local_port is not None:
                ports = (local_port, new[1]) if outward else (new[1], local_port)
                attrs.append(("XFRMA_ENCAP", _encap_attr(*ports)))
            msg["attrs"] = attrs
            with self._lock:
                self.nl.request(msg, X.XFRM_MSG_MIGRATE, X.NLM_F_ACK)
        return len(installed)

    # -- ownership -------------------------------------------------------------

    def dump_states(self) -> list[dict[str, Any]]:
        """Return every SA in the namespace as {spi, src, dst, family, reqid}."""
        with self._lock:
            replies = self.nl.request(
                X.xfrm_usersa_id(), X.XFRM_MSG_GETSA, X.NLM_F_DUMP
            )
        return [
            {
                "spi": r["id_spi"],
                "src": X.unpack_address(r["saddr"], r["family"]),
                "dst": X.unpack_address(r["id_daddr"], r["family"]),
                "family": r["family"],
                "proto": r["id_proto"],
                "reqid": r["reqid"],
            }
            for r in replies
        ]

    def dump_policies(self) -> list[dict[str, Any]]:
        """Return every policy as {index, dir, priority, reqids}."""
        with self._lock:
            replies = self.nl.request(
                X.xfrm_userpolicy_id(), X.XFRM_MSG_GETPOLICY, X.NLM_F_DUMP
            )
        out = []
        for r in replies:
            reqids = [t.get("reqid") for t in r.get_attrs("XFRMA_TMPL")]
            out.append(
                {
                    "index": r["index"],
                    "dir": r["dir"],
                    "priority": r["priority"],
                    "reqids": reqids,
                }
            )
        return out

    def cleanup(self) -> tuple[int, int]:
        """Delete every SA and policy in our reqid range; return (sas, policies).

        Used at exit and after a crash: states and policies of other key managers
        (reqid outside the range, or policies without a template of ours) stay.
        """
        states = 0
        for st in self.dump_states():
            if not is_ours(st["reqid"]):
                continue
            msg = X.xfrm_usersa_id()
            msg["daddr"] = X.pack_address(st["dst"])
            msg["spi"] = st["spi"]
            msg["family"] = st["family"]
            msg["proto"] = st["proto"]
            with self._lock, _gone_ok():
                self.nl.request(msg, X.XFRM_MSG_DELSA, X.NLM_F_ACK)
                states += 1
        policies = 0
        for pol in self.dump_policies():
            if not pol["reqids"] or not all(is_ours(r) for r in pol["reqids"]):
                continue
            msg = X.xfrm_userpolicy_id()
            msg["index"] = pol["index"]
            msg["dir"] = pol["dir"]
            with self._lock, _gone_ok():
                self.nl.request(msg, X.XFRM_MSG_DELPOLICY, X.NLM_F_ACK)
                policies += 1
        self._sas.clear()
        self._policies.clear()
        if states or policies:
            log.info(
                "removed %d kernel sa(s) and %d policy(ies) of ours", states, policies
            )
        return states, policies


# -- probe -----------------------------------------------------------------------


def _probe_in_scratch_netns(result: list[tuple[bool, str]]) -> None:
    # runs on its own thread: unshare gives this thread a private, nameless
    # namespace that vanishes with its last socket, so nothing is left behind
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(_CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        result.append((False, f"cannot make a scratch namespace: {os.strerror(err)}"))
        return
    try:
        nl = XfrmSocket()
    except OSError as exc:
        result.append((False, f"no NETLINK_XFRM socket (xfrm_user): {exc.strerror}"))
        return
    try:
        # an ESP-in-UDP tunnel SA with the only algorithm we use
        params = SAParams(
            spi=0x100,
            inbound=False,
            key=bytes(16),
            salt=bytes(4),
            session=0,
            peer=("198.18.0.2", NATT_PORT),
            local=("198.18.0.1", NATT_PORT),
        )
        eng = KernelEngine.__new__(KernelEngine)
        eng.netns, eng.nl = None, nl
        eng._sas, eng._policies, eng._encap = {}, {}, {}
        eng._lock = threading.Lock()
        try:
            eng.install_sa(params)
        except XfrmError as exc:
            text = str(exc.strerror)
            if "type" in text.lower() or exc.errno == errno.EPROTONOSUPPORT:
                why = "ESP (esp4) not available"
            elif "algorithm" in text.lower() or exc.errno == errno.ENOSYS:
                why = f"{X.AEAD_GCM} not available"
            else:
                why = "ESP SA with AES-GCM refused"
            result.append((False, f"{why}: {text}"))
            return

        # the socket option the kernel needs to take ESP out of UDP
        try:
            with open_encap_socket(("127.0.0.1", 0)):
                pass
        except OSError as exc:
            result.append((False, f"UDP_ENCAP_ESPINUDP socket refused: {exc}"))
            return
        result.append((True, f"ESP, {X.AEAD_GCM} and UDP encapsulation available"))
    finally:
        nl.close()


def probe_kernel() -> tuple[bool, str]:
    """Check that this kernel can run our SAs; return (ok, reason).

    Tries, in a scratch network namespace that disappears afterwards: a
    NETLINK_XFRM socket, an ESP tunnel SA with rfc4106(gcm(aes)) and UDP
    encapsulation, and a UDP_ENCAP_ESPINUDP socket.
    """
    result: list[tuple[bool, str]] = []
    worker = threading.Thread(
        target=_probe_in_scratch_netns, args=(result,), name="xfrm-probe"
    )
    worker.start()
    worker.join()
    if not result:
        return False, "probe failed unexpectedly"
    return result[0]


def local_address_for(peer: str) -> str:
    """Return the source address this namespace would use towards peer."""
    ipaddress.ip_address(peer)
    return _source_for(peer)
