"""Netlink XFRM messages on pyroute2's base classes, and a small synchronous socket.

Theory of operation: pyroute2 knows NETLINK_XFRM but none of its messages, so the
kernel structures from ``<linux/xfrm.h>`` are declared here as :class:`nlmsg`
subclasses with their nested structures flattened into fields in wire order
(explicit padding where the C compiler inserts it; SPIs and ports in network
order, everything else native).  Attributes with a fixed layout (encap template,
policy template, mark) are :class:`nla` subclasses; the two variable-length ones
(``XFRMA_ALG_AEAD`` key, ``XFRMA_REPLAY_ESN_VAL`` bitmap) travel as raw bytes built
by the ``push_``/``pull_`` pairs below.

:class:`XfrmSocket` is a plain blocking ``AF_NETLINK`` socket, not pyroute2's
asyncio machinery, so it can be called from inside the daemon's running event
loop.  Each request is answered by an ACK, one reply, or a dump ended by
``NLMSG_DONE``; a kernel error becomes :class:`XfrmError` with the errno and the
extended-ack text.  Messages are never logged: they carry keys.

Sizes on x86_64 (checked by the unit tests against the kernel's layout)::

    xfrm_selector 56, xfrm_usersa_info 224, xfrm_usersa_id 24,
    xfrm_userpolicy_info 168, xfrm_userpolicy_id 64, xfrm_user_tmpl 64,
    xfrm_aevent_id 48, xfrm_encap_tmpl 24
"""

from __future__ import annotations

import errno
import ipaddress
import os
import re
import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from pyroute2.netlink import NETLINK_XFRM, nla, nlmsg

__all__ = [
    "AEAD_GCM",
    "IPPROTO_ESP",
    "UDP_ENCAP_ESPINUDP",
    "Migration",
    "XfrmError",
    "XfrmSocket",
    "ReplayState",
    "pack_address",
    "parse_ts",
    "policy_selectors",
    "port_blocks",
    "pull_aead",
    "pull_migrate",
    "pull_replay_esn",
    "push_aead",
    "push_migrate",
    "push_replay_esn",
    "selector",
    "unpack_address",
]

# <linux/xfrm.h> message types
XFRM_MSG_NEWSA = 0x10
XFRM_MSG_DELSA = 0x11
XFRM_MSG_GETSA = 0x12
XFRM_MSG_NEWPOLICY = 0x13
XFRM_MSG_DELPOLICY = 0x14
XFRM_MSG_GETPOLICY = 0x15
XFRM_MSG_UPDPOLICY = 0x19
XFRM_MSG_UPDSA = 0x1A
XFRM_MSG_NEWAE = 0x1E
XFRM_MSG_GETAE = 0x1F
XFRM_MSG_MIGRATE = 0x21

# attribute numbers (enum xfrm_attr_type_t)
XFRMA_ENCAP = 4
XFRMA_TMPL = 5
XFRMA_LTIME_VAL = 9
XFRMA_REPLAY_VAL = 10
XFRMA_MIGRATE = 17
XFRMA_ALG_AEAD = 18
XFRMA_MARK = 21
XFRMA_REPLAY_ESN_VAL = 23
XFRMA_SA_EXTRA_FLAGS = 24
XFRMA_IF_ID = 31

# state flags, policy directions and actions, aevent flags
XFRM_STATE_NOECN = 1
XFRM_STATE_ESN = 128
XFRM_POLICY_IN = 0
XFRM_POLICY_OUT = 1
XFRM_POLICY_FWD = 2
XFRM_POLICY_ALLOW = 0
XFRM_AE_RVAL = 2
XFRM_AE_LVAL = 4
XFRM_MODE_TUNNEL = 1
XFRM_INF = 0xFFFFFFFFFFFFFFFF

IPPROTO_ESP = 50
SOL_UDP = 17
UDP_ENCAP = 100
UDP_ENCAP_ESPINUDP = 2
AEAD_GCM = "rfc4106(gcm(aes))"

# netlink header flags and control messages
NLM_F_REQUEST = 0x1
NLM_F_MULTI = 0x2
NLM_F_ACK = 0x4
NLM_F_DUMP = 0x300
NLM_F_REPLACE = 0x100
NLM_F_EXCL = 0x200
NLM_F_CREATE = 0x400
NLMSG_ERROR = 2
NLMSG_DONE = 3
NLM_F_CAPPED = 0x100
NETLINK_CAP_ACK = 10
NETLINK_EXT_ACK = 11
NLMSGERR_ATTR_MSG = 1


class XfrmError(OSError):
    """The kernel refused an XFRM request (errno plus the extended-ack text)."""


# -- addresses and selectors ---------------------------------------------------


def pack_address(addr: str) -> bytes:
    """Return an address as xfrm_address_t (16 octets, IPv4 in the first 4)."""
    return ipaddress.ip_address(addr).packed.ljust(16, b"\x00")


def unpack_address(raw: bytes, family: int) -> str:
    """Return the text form of an xfrm_address_t for family."""
    if family == socket.AF_INET:
        return str(ipaddress.IPv4Address(raw[:4]))
    return str(ipaddress.IPv6Address(raw[:16]))


def family_of(addr: str) -> int:
    """Return AF_INET or AF_INET6 for an address or network text."""
    net = ipaddress.ip_network(addr, strict=False)
    return socket.AF_INET if net.version == 4 else socket.AF_INET6


def selector(
    src: str,
    dst: str,
    prefix: str = "sel_",
    *,
    proto: int = 0,
    sport: tuple[int, int] = (0, 0),
    dport: tuple[int, int] = (0, 0),
) -> dict[str, Any]:
    """Return the selector fields matching src and dst networks.

    proto 0 is any protocol; sport and dport are (port, mask) as from
    :func:`port_blocks`, (0, 0) being any port.
    """
    s = ipaddress.ip_network(src, strict=False)
    d = ipaddress.ip_network(dst, strict=False)
    assert s.version == d.version, f"mixed families in selector {src} -> {dst}"
    return {
        f"{prefix}daddr": pack_address(str(d.network_address)),
        f"{prefix}saddr": pack_address(str(s.network_address)),
        f"{prefix}dport": dport[0],
        f"{prefix}dport_mask": dport[1],
        f"{prefix}sport": sport[0],
        f"{prefix}sport_mask": sport[1],
        f"{prefix}family": family_of(src),
        f"{prefix}prefixlen_d": d.prefixlen,
        f"{prefix}prefixlen_s": s.prefixlen,
        f"{prefix}proto": proto,
    }


def port_blocks(start: int, end: int) -> list[tuple[int, int]]:
    """Return the fewest (port, mask) blocks whose union is exactly start..end.

    An XFRM selector matches port p when ``(p ^ port) & mask == 0``, so each
    block is an aligned power-of-two run; the whole range 0..65535 is (0, 0).
    """
    assert 0 <= start <= end <= 0xFFFF, f"bad port range {start}-{end}"
    blocks: list[tuple[int, int]] = []
    lo = start
    while lo <= end:
        # the largest aligned run starting at lo that stays inside the range
        size = lo & -lo if lo else 1 << 16
        while lo + size - 1 > end:
            size >>= 1
        blocks.append((lo, ~(size - 1) & 0xFFFF))
        lo += size
    return blocks


_TS = re.compile(r"^(?P<addr>[^\[\]]+)(?:\[(?P<proto>\d+)/(?P<lo>\d+)-(?P<hi>\d+)\])?$")
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_ts(text: str) -> tuple[list[Network], int, tuple[int, int]]:
    """Return (prefixes, protocol, port range) of a selector as IKE renders it.

    The text is a CIDR or ``start-end`` address range, optionally followed by
    ``[protocol/first-last]`` (control.ike.trafficsel.ts_to_string).
    """
    m = _TS.match(text.strip())
    if m is None:
        raise ValueError(f"Unreadable traffic selector {text!r}")
    addr = m["addr"]
    if "-" in addr:
        first, last = (ipaddress.ip_address(a) for a in addr.split("-", 1))
        if first.version != last.version or int(first) > int(last):
            raise ValueError(f"Bad address range in selector {text!r}")
        nets: list[Network] = list(
            ipaddress.summarize_address_range(first, last)
        )
    else:
        nets = [ipaddress.ip_network(addr)]
    proto, lo, hi = 0, 0, 0xFFFF
    if m["proto"] is not None:
        proto, lo, hi = int(m["proto"]), int(m["lo"]), int(m["hi"])
    # RFC 4301 section 4.4.1.1: start port above end port is OPAQUE, which a
    # kernel selector cannot express
    if proto > 255 or hi > 0xFFFF or lo > hi:
        raise ValueError(f"Selector {text!r} has no XFRM form")
    return nets, proto, (lo, hi)


def policy_selectors(
    src_ts: str, dst_ts: str, prefix: str = "sel_"
) -> list[dict[str, Any]]:
    """Return the XFRM selectors that together match src_ts -> dst_ts exactly.

    One per source prefix, destination prefix, source port block and
    destination port block; none when the families or protocols cannot meet.
    """
    src_nets, src_proto, src_ports = parse_ts(src_ts)
    dst_nets, dst_proto, dst_ports = parse_ts(dst_ts)
    if src_proto and dst_proto and src_proto != dst_proto:
        return []
    proto = src_proto or dst_proto
    out: list[dict[str, Any]] = []
    for s in src_nets:
        for d in dst_nets:
            if s.version != d.version:
                continue
            for sport in port_blocks(*src_ports):
                for dport in port_blocks(*dst_ports):
                    out.append(
                        selector(
                            str(s),
                            str(d),
                            prefix,
                            proto=proto,
                            sport=sport,
                            dport=dport,
                        )
                    )
    return out


# struct xfrm_selector, flattened under a prefix
def _selector_fields(p: str) -> tuple[tuple[str, str], ...]:
    return (
        (f"{p}daddr", "16s"),
        (f"{p}saddr", "16s"),
        (f"{p}dport", ">H"),
        (f"{p}dport_mask", ">H"),
        (f"{p}sport", ">H"),
        (f"{p}sport_mask", ">H"),
        (f"{p}family", "H"),
        (f"{p}prefixlen_d", "B"),
        (f"{p}prefixlen_s", "B"),
        (f"{p}proto", "B"),
        ("__pad", "3x"),
        (f"{p}ifindex", "i"),
        (f"{p}user", "I"),
    )


def _lifetime_cfg_fields() -> tuple[tuple[str, str], ...]:
    return tuple(
        (f"lft_{n}", "Q")
        for n in (
            "soft_byte_limit",
            "hard_byte_limit",
            "soft_packet_limit",
            "hard_packet_limit",
            "soft_add_expires_seconds",
            "hard_add_expires_seconds",
            "soft_use_expires_seconds",
            "hard_use_expires_seconds",
        )
    )


_CURLFT = (
    ("curlft_bytes", "Q"),
    ("curlft_packets", "Q"),
    ("curlft_add_time", "Q"),
    ("curlft_use_time", "Q"),
)

# no limit: XFRM_INF for byte and packet limits, but 0 for the expiry times (a
# time of XFRM_INF is taken as already past and the entry dies within a second)
LIFETIME_INFINITE = {
    name: 0 if name.endswith("_seconds") else XFRM_INF
    for name, _ in _lifetime_cfg_fields()
}


# -- attributes ---------------------------------------------------------------


class _XfrmAttrs:
    """The attribute table shared by SA, policy and aevent messages."""

    class encap_tmpl(nla):
        # struct xfrm_encap_tmpl
        fields = (
            ("type", "H"),
            ("sport", ">H"),
            ("dport", ">H"),
            ("__pad", "2x"),
            ("oa", "16s"),
        )

    class user_tmpl(nla):
        # struct xfrm_user_tmpl, one template (we never stack transforms)
        fields = (
            ("daddr", "16s"),
            ("spi", ">I"),
            ("proto", "B"),
            ("__pad", "3x"),
            ("family", "H"),
            ("__pad", "2x"),
            ("saddr", "16s"),
            ("reqid", "I"),
            ("mode", "B"),
            ("share", "B"),
            ("optional", "B"),
            ("__pad", "1x"),
            ("aalgos", "I"),
            ("ealgos", "I"),
            ("calgos", "I"),
        )

    class mark(nla):
        fields = (("value", "I"), ("mask", "I"))

    class lifetime_cur(nla):
        fields = (
            ("bytes", "Q"),
            ("packets", "Q"),
            ("add_time", "Q"),
            ("use_time", "Q"),
        )

    class replay_state(nla):
        fields = (("oseq", "I"), ("seq", "I"), ("bitmap", "I"))

    nla_map = (
        (0, "XFRMA_UNSPEC", "none"),
        (XFRMA_ENCAP, "XFRMA_ENCAP", "encap_tmpl"),
        (XFRMA_TMPL, "XFRMA_TMPL", "user_tmpl"),
        (XFRMA_LTIME_VAL, "XFRMA_LTIME_VAL", "lifetime_cur"),
        (XFRMA_REPLAY_VAL, "XFRMA_REPLAY_VAL", "replay_state"),
        (XFRMA_MIGRATE, "XFRMA_MIGRATE", "cdata"),
        (XFRMA_ALG_AEAD, "XFRMA_ALG_AEAD", "cdata"),
        (XFRMA_MARK, "XFRMA_MARK", "mark"),
        (XFRMA_REPLAY_ESN_VAL, "XFRMA_REPLAY_ESN_VAL", "cdata"),
        (XFRMA_SA_EXTRA_FLAGS, "XFRMA_SA_EXTRA_FLAGS", "uint32"),
        (XFRMA_IF_ID, "XFRMA_IF_ID", "uint32"),
    )


# -- messages -----------------------------------------------------------------


class xfrm_usersa_info(_XfrmAttrs, nlmsg):
    """XFRM_MSG_NEWSA / UPDSA / GETSA reply: struct xfrm_usersa_info (224)."""

    fields = (
        *_selector_fields("sel_"),
        # struct xfrm_id
        ("id_daddr", "16s"),
        ("id_spi", ">I"),
        ("id_proto", "B"),
        ("__pad", "3x"),
        ("saddr", "16s"),
        *_lifetime_cfg_fields(),
        *_CURLFT,
        # struct xfrm_stats
        ("stats_replay_window", "I"),
        ("stats_replay", "I"),
        ("stats_integrity_failed", "I"),
        ("seq", "I"),
        ("reqid", "I"),
        ("family", "H"),
        ("mode", "B"),
        ("replay_window", "B"),
        ("flags", "B"),
        ("__pad", "7x"),
    )


class xfrm_usersa_id(_XfrmAttrs, nlmsg):
    """XFRM_MSG_DELSA / GETSA request: struct xfrm_usersa_id (24)."""

    fields = (
        ("daddr", "16s"),
        ("spi", ">I"),
        ("family", "H"),
        ("proto", "B"),
        ("__pad", "1x"),
    )


class xfrm_userpolicy_info(_XfrmAttrs, nlmsg):
    """XFRM_MSG_NEWPOLICY / dump reply: struct xfrm_userpolicy_info (168)."""

    fields = (
        *_selector_fields("sel_"),
        *_lifetime_cfg_fields(),
        *_CURLFT,
        ("priority", "I"),
        ("index", "I"),
        ("dir", "B"),
        ("action", "B"),
        ("flags", "B"),
        ("share", "B"),
        ("__pad", "4x"),
    )


class xfrm_userpolicy_id(_XfrmAttrs, nlmsg):
    """XFRM_MSG_DELPOLICY request: struct xfrm_userpolicy_id (64)."""

    fields = (*_selector_fields("sel_"), ("index", "I"), ("dir", "B"), ("__pad", "3x"))


class xfrm_aevent_id(_XfrmAttrs, nlmsg):
    """XFRM_MSG_NEWAE / GETAE: struct xfrm_aevent_id (48)."""

    fields = (
        # struct xfrm_usersa_id
        ("daddr", "16s"),
        ("spi", ">I"),
        ("family", "H"),
        ("proto", "B"),
        ("__pad", "1x"),
        ("saddr", "16s"),
        ("flags", "I"),
        ("reqid", "I"),
    )


def _zero_bytes(cls: type[Any]) -> None:
    # pyroute2 fills unset fields with 0, which "16s" cannot take
    cls.defaults = {name: b"" for name, fmt in cls.fields if fmt.endswith("s")}


for _cls in (
    xfrm_usersa_info,
    xfrm_usersa_id,
    xfrm_userpolicy_info,
    xfrm_userpolicy_id,
    xfrm_aevent_id,
    _XfrmAttrs.encap_tmpl,
    _XfrmAttrs.user_tmpl,
):
    _zero_bytes(_cls)


MSG_CLASSES: dict[int, type[nlmsg]] = {
    XFRM_MSG_NEWSA: xfrm_usersa_info,
    XFRM_MSG_UPDSA: xfrm_usersa_info,
    XFRM_MSG_GETSA: xfrm_usersa_id,
    XFRM_MSG_DELSA: xfrm_usersa_id,
    XFRM_MSG_NEWPOLICY: xfrm_userpolicy_info,
    XFRM_MSG_UPDPOLICY: xfrm_userpolicy_info,
    XFRM_MSG_DELPOLICY: xfrm_userpolicy_id,
    XFRM_MSG_GETPOLICY: xfrm_userpolicy_id,
    XFRM_MSG_NEWAE: xfrm_aevent_id,
    XFRM_MSG_GETAE: xfrm_aevent_id,
    XFRM_MSG_MIGRATE: xfrm_userpolicy_id,
}

# replies carry a different structure than some requests
REPLY_CLASSES: dict[int, type[nlmsg]] = {
    **MSG_CLASSES,
    XFRM_MSG_GETSA: xfrm_usersa_info,
    XFRM_MSG_NEWSA: xfrm_usersa_info,
    XFRM_MSG_GETPOLICY: xfrm_userpolicy_info,
}


# -- variable-length attributes -------------------------------------------------

#  0                   1                   2                   3
#  0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1
# +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
# |            alg_name: "rfc4106(gcm(aes))" NUL padded (64)     |
# +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
# |                  alg_key_len (bits, key + salt)               |
# |                  alg_icv_len (bits)                           |
# |                  key || salt ...                              |
# +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
_AEAD = struct.Struct("=64sII")


def push_aead(key: bytes, salt: bytes, icv_bits: int = 128) -> bytes:
    """Return struct xfrm_algo_aead for rfc4106(gcm(aes)) with key and salt."""
    # RFC 4106 section 8.1: the keying material is the AES key then a 4 octet salt
    assert len(key) in (16, 32) and len(salt) == 4, "AES-GCM key 16/32 + salt 4"
    material = key + salt
    return _AEAD.pack(AEAD_GCM.encode(), len(material) * 8, icv_bits) + material


def pull_aead(raw: bytes) -> tuple[str, bytes, int]:
    """Return (algorithm, key material, icv bits) from struct xfrm_algo_aead."""
    if len(raw) < _AEAD.size:
        raise ValueError(f"Short xfrm_algo_aead {len(raw)}")
    name, key_bits, icv_bits = _AEAD.unpack_from(raw)
    material = raw[_AEAD.size : _AEAD.size + key_bits // 8]
    if len(material) * 8 != key_bits:
        raise ValueError(f"Truncated AEAD key {len(material)}")
    return name.rstrip(b"\x00").decode(), material, icv_bits


@dataclass
class ReplayState:
    """Sequence and replay state of one SA (struct xfrm_replay_state_esn).

    ``oseq`` is the last outbound number used (the next packet gets oseq + 1),
    ``seq`` the highest inbound number accepted; both are 64-bit here and split
    into low and high halves on the wire.  ``bitmap`` is the kernel's ring of
    32-bit words: sequence number s has arrived when bit (s - 1) mod window is
    set, for s within the window below ``seq``.
    """

    oseq: int = 0
    seq: int = 0
    replay_window: int = 1024
    bitmap: list[int] = field(default_factory=list)

    @classmethod
    def closed_below(cls, seq: int, replay_window: int, oseq: int = 0) -> ReplayState:
        """Return a state where everything up to seq counts as already seen.

        Used when the source engine can report only its highest number: a late
        packet inside the old window is dropped rather than risk a replay.
        """
        words = (replay_window + 31) // 32
        return cls(oseq, seq, replay_window, [0xFFFFFFFF] * words)

    def seen(self, seq: int) -> bool:
        """Say whether inbound sequence number seq counts as already received."""
        if seq > self.seq:
            return False
        if seq <= self.seq - self.replay_window or seq == 0:
            return True
        bit = (seq - 1) % self.replay_window
        words = self.bitmap + [0] * (bit // 32 + 1)
        return bool(words[bit // 32] >> (bit % 32) & 1)


#  0                   1                   2                   3
# +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
# |  bmp_len  |  oseq  |  seq  |  oseq_hi  |  seq_hi  |  window    |
# +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
# |  bmp[bmp_len] (32-bit words)                                   |
# +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
_ESN = struct.Struct("=6I")


def push_replay_esn(state: ReplayState) -> bytes:
    """Return struct xfrm_replay_state_esn for state."""
    words = (state.replay_window + 31) // 32
    bitmap = list(state.bitmap[:words]) + [0] * (words - len(state.bitmap[:words]))
    head = _ESN.pack(
        words,
        state.oseq & 0xFFFFFFFF,
        state.seq & 0xFFFFFFFF,
        state.oseq >> 32,
        state.seq >> 32,
        state.replay_window,
    )
    return head + struct.pack(f"={words}I", *bitmap)


def pull_replay_esn(raw: bytes) -> ReplayState:
    """Return the ReplayState in a struct xfrm_replay_state_esn."""
    if len(raw) < _ESN.size:
        raise ValueError(f"Short xfrm_replay_state_esn {len(raw)}")
    words, oseq, seq, oseq_hi, seq_hi, window = _ESN.unpack_from(raw)
    if len(raw) < _ESN.size + 4 * words:
        raise ValueError(f"Truncated replay bitmap of {words} words")
    bitmap = list(struct.unpack_from(f"={words}I", raw, _ESN.size))
    return ReplayState(oseq_hi << 32 | oseq, seq_hi << 32 | seq, window, bitmap)


#  0                   1                   2                   3
# +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
# |  old_daddr (16)  |  old_saddr (16)  |  new_daddr (16)  |  new_saddr |
# +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
# |  proto  |  mode  |  reserved (16)  |  reqid (32)                   |
# |  old_family (16)  |  new_family (16)                                |
# +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
_MIGRATE = struct.Struct("=16s16s16s16sBBHIHH")


@dataclass(frozen=True)
class Migration:
    """One struct xfrm_user_migrate: move states and templates to new addresses."""

    old_src: str
    old_dst: str
    new_src: str
    new_dst: str
    reqid: int
    proto: int = IPPROTO_ESP
    mode: int = XFRM_MODE_TUNNEL


def push_migrate(entries: list[Migration]) -> bytes:
    """Return the XFRMA_MIGRATE payload: struct xfrm_user_migrate per entry."""
    return b"".join(
        _MIGRATE.pack(
            pack_address(m.old_dst),
            pack_address(m.old_src),
            pack_address(m.new_dst),
            pack_address(m.new_src),
            m.proto,
            m.mode,
            0,
            m.reqid,
            family_of(m.old_src),
            family_of(m.new_src),
        )
        for m in entries
    )


def pull_migrate(raw: bytes) -> list[Migration]:
    """Return the entries of an XFRMA_MIGRATE payload."""
    if len(raw) % _MIGRATE.size:
        raise ValueError(f"XFRMA_MIGRATE length {len(raw)} is not a multiple of 76")
    out = []
    for off in range(0, len(raw), _MIGRATE.size):
        od, os_, nd, ns, proto, mode, _, reqid, of, nf = _MIGRATE.unpack_from(raw, off)
        out.append(
            Migration(
                unpack_address(os_, of),
                unpack_address(od, of),
                unpack_address(ns, nf),
                unpack_address(nd, nf),
                reqid,
                proto,
                mode,
            )
        )
    return out


# -- the socket -----------------------------------------------------------------


def encode(msg: nlmsg, msg_type: int, flags: int, seq: int = 0) -> bytes:
    """Return the wire form of msg under a netlink header."""
    msg["header"]["type"] = msg_type
    msg["header"]["flags"] = flags
    msg["header"]["sequence_number"] = seq
    msg["header"]["pid"] = 0
    msg.encode()
    return bytes(msg.data)


def decode(data: bytes) -> Iterator[tuple[int, int, bytes]]:
    """Yield (type, sequence, message bytes) for each message in a datagram."""
    offset = 0
    while offset + 16 <= len(data):
        length, msg_type, _flags, seq, _pid = struct.unpack_from("=IHHII", data, offset)
        if length < 16 or offset + length > len(data):
            raise ValueError(f"Bad netlink message length {length}")
        yield msg_type, seq, data[offset : offset + length]
        offset += (length + 3) & ~3


def _error_text(raw: bytes) -> str:
    # extended ack: TLVs after the echoed request, which NETLINK_CAP_ACK cuts
    # down to its header (so keys in a refused NEWSA are not echoed back)
    flags = struct.unpack_from("=H", raw, 6)[0]
    echoed = 16 if flags & NLM_F_CAPPED else struct.unpack_from("=I", raw, 20)[0]
    offset = 16 + 4 + ((echoed + 3) & ~3)
    while offset + 4 <= len(raw):
        length, kind = struct.unpack_from("=HH", raw, offset)
        if length < 4:
            break
        if kind == NLMSGERR_ATTR_MSG:
            text = raw[offset + 4 : offset + length].rstrip(b"\x00")
            return text.decode(errors="replace")
        offset += (length + 3) & ~3
    return ""


class XfrmSocket:
    """A blocking NETLINK_XFRM socket that sends one request at a time."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_XFRM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        self.sock.setsockopt(270, NETLINK_CAP_ACK, 1)  # SOL_NETLINK
        self.sock.setsockopt(270, NETLINK_EXT_ACK, 1)
        self.sock.bind((0, 0))
        self._seq = 0

    def close(self) -> None:
        """Close the socket."""
        self.sock.close()

    def request(self, msg: nlmsg, msg_type: int, flags: int) -> list[nlmsg]:
        """Send msg and return the decoded replies; raise XfrmError on refusal."""
        self._seq = (self._seq + 1) & 0xFFFFFFFF or 1
        self.sock.send(encode(msg, msg_type, flags | NLM_F_REQUEST, self._seq))
        dump = flags & NLM_F_DUMP == NLM_F_DUMP
        want_ack = bool(flags & NLM_F_ACK)
        replies: list[nlmsg] = []
        while True:
            data = self.sock.recv(1 << 20)
            for kind, seq, raw in decode(data):
                if seq != self._seq:
                    continue  # a stale answer to an earlier, abandoned request
                if kind == NLMSG_DONE:
                    return replies
                if kind == NLMSG_ERROR:
                    code = -struct.unpack_from("=i", raw, 16)[0]
                    if code:
                        text = _error_text(raw)
                        detail = f": {text}" if text else ""
                        raise XfrmError(code, os.strerror(code) + detail)
                    return replies
                cls = REPLY_CLASSES.get(kind)
                if cls is None:
                    continue
                reply = cls(raw)
                reply.decode()
                replies.append(reply)
                if not dump and not want_ack:
                    return replies

    def __enter__(self) -> XfrmSocket:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def errno_name(code: int) -> str:
    """Return the symbolic name of an errno value (for reasons and logs)."""
    return errno.errorcode.get(code, str(code))
