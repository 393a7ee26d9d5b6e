"""TUN devices for sessions: create, size, bring up and negotiate offloads.

Theory of operation: one TUN per session carries that session's inner packets.
``open_tun`` opens ``/dev/net/tun`` non-blocking, attaches it to a layer-3 device
without the packet-information prefix (``IFF_TUN | IFF_NO_PI``), sets the MTU and
the UP flag with the classic interface ioctls and hands back the fd.  Addresses
and routes belong to the control plane; the engine only reads and writes the fd.

With ``offload`` (the default) the device also gets ``IFF_VNET_HDR``: every read
and write carries a 10-byte ``virtio_net_hdr`` in front of the packet, and
``TUNSETOFFLOAD`` lets the kernel hand over TCP/UDP super-packets of up to 64 KB
with a partial checksum.  The engine segments those itself (and coalesces TCP on
the way back), which saves most of the per-packet cost of the TUN.  Offload
flags the kernel refuses are dropped one group at a time; a kernel without the
vnet header at all gets a plain TUN.  ``tun_vnet_hdr`` tells the engine which
kind an fd is.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import struct

__all__ = ["open_tun", "tun_vnet_hdr", "VNET_HDR_LEN"]

TUNSETIFF = 0x400454CA
TUNGETIFF = 0x800454D2
TUNSETOFFLOAD = 0x400454D0
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
SIOCSIFMTU = 0x8922
IFF_UP = 0x1
IFNAMSIZ = 16
VNET_HDR_LEN = 10

# linux/if_tun.h offload bits, richest set first; UFO is deprecated and left out
TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02
TUN_F_TSO6 = 0x04
TUN_F_TSO_ECN = 0x08
TUN_F_USO4 = 0x20
TUN_F_USO6 = 0x40
_TSO = TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN
OFFLOAD_STEPS = (_TSO | TUN_F_USO4 | TUN_F_USO6, _TSO, TUN_F_CSUM, 0)


def _set_offload(fd: int) -> int:
    for flags in OFFLOAD_STEPS:
        try:
            fcntl.ioctl(fd, TUNSETOFFLOAD, flags)
            return flags
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
    return 0


def open_tun(name: str, mtu: int = 1400, *, offload: bool = True) -> tuple[int, str]:
    """Create a TUN device (or attach to ``name``), set its MTU, bring it up.

    Return ``(fd, ifname)``; the fd is non-blocking and owned by the caller.
    A name ending in ``%d`` lets the kernel pick the number.  With ``offload``
    the fd carries virtio-net headers and super-packets when the kernel allows.
    """
    raw = name.encode()
    assert 0 < len(raw) < IFNAMSIZ, f"Bad interface name {name!r}"
    assert 68 <= mtu <= 65535, f"Bad MTU {mtu}"
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        base = IFF_TUN | IFF_NO_PI
        try:
            flags = base | (IFF_VNET_HDR if offload else 0)
            ifr = fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH22x", raw, flags))
        except OSError as exc:
            if not offload or exc.errno != errno.EINVAL:
                raise
            flags = base
            ifr = fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH22x", raw, flags))
        if flags & IFF_VNET_HDR:
            _set_offload(fd)
        ifname = ifr[:IFNAMSIZ].rstrip(b"\0").decode()
        key = ifname.encode()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            fcntl.ioctl(s, SIOCSIFMTU, struct.pack("16si20x", key, mtu))
            ifr = fcntl.ioctl(s, SIOCGIFFLAGS, struct.pack("16sH22x", key, 0))
            up = struct.unpack("16sH", ifr[:18])[1] | IFF_UP
            fcntl.ioctl(s, SIOCSIFFLAGS, struct.pack("16sH22x", key, up))
    except BaseException:
        os.close(fd)
        raise
    return fd, ifname


def tun_vnet_hdr(fd: int) -> bool:
    """Return whether fd is a TUN whose reads and writes carry a vnet header."""
    try:
        ifr = fcntl.ioctl(fd, TUNGETIFF, bytes(40))
    except OSError:
        return False
    return bool(struct.unpack_from("H", ifr, IFNAMSIZ)[0] & IFF_VNET_HDR)
