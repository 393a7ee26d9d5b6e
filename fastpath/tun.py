"""TUN devices for sessions: create, size and bring up, nothing more.

Theory of operation: one TUN per session carries that session's inner packets.
``open_tun`` opens ``/dev/net/tun`` non-blocking, attaches it to a layer-3 device
without the packet-information prefix (``IFF_TUN | IFF_NO_PI``), sets the MTU and
the UP flag with the classic interface ioctls and hands back the fd.  Addresses
and routes belong to the control plane; the engine only reads and writes the fd.
"""

from __future__ import annotations

import fcntl
import os
import socket
import struct

__all__ = ["open_tun"]

TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
SIOCSIFMTU = 0x8922
IFF_UP = 0x1
IFNAMSIZ = 16


def open_tun(name: str, mtu: int = 1400) -> tuple[int, str]:
    """Create a TUN device (or attach to ``name``), set its MTU, bring it up.

    Return ``(fd, ifname)``; the fd is non-blocking and owned by the caller.
    A name ending in ``%d`` lets the kernel pick the number.
    """
    raw = name.encode()
    assert 0 < len(raw) < IFNAMSIZ, f"Bad interface name {name!r}"
    assert 68 <= mtu <= 65535, f"Bad MTU {mtu}"
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        ifr = fcntl.ioctl(
            fd, TUNSETIFF, struct.pack("16sH22x", raw, IFF_TUN | IFF_NO_PI)
        )
        ifname = ifr[:IFNAMSIZ].rstrip(b"\0").decode()
        key = ifname.encode()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            fcntl.ioctl(s, SIOCSIFMTU, struct.pack("16si20x", key, mtu))
            ifr = fcntl.ioctl(s, SIOCGIFFLAGS, struct.pack("16sH22x", key, 0))
            flags = struct.unpack("16sH", ifr[:18])[1] | IFF_UP
            fcntl.ioctl(s, SIOCSIFFLAGS, struct.pack("16sH22x", key, flags))
    except BaseException:
        os.close(fd)
        raise
    return fd, ifname
