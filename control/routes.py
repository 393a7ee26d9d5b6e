"""Session routes over rtnetlink, synchronously and without an event loop.

pyroute2's ``IPRoute`` drives an asyncio loop of its own and cannot be used
from inside ours, so the daemon encodes the one message it needs (a host
route into a session's TUN) with pyroute2's ``rtmsg`` class and sends it on a
plain blocking netlink socket; the kernel's ack comes back in microseconds.

Routes a client announced (route accept) carry a metric, the policy's
distance (RTA_PRIORITY). Linux routes have no tag: the daemon keeps the
route-accept tag with the session and only shows it.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
import struct

from pyroute2.netlink import NLM_F_ACK, NLM_F_CREATE, NLM_F_REPLACE, NLM_F_REQUEST
from pyroute2.netlink.rtnl import RTM_DELROUTE, RTM_NEWROUTE
from pyroute2.netlink.rtnl.rtmsg import rtmsg

NLMSG_ERROR = 2
RT_TABLE_MAIN = 254
RTPROT_STATIC = 4
RT_SCOPE_LINK = 253
RTN_UNICAST = 1


def _request(
    msg_type: int, flags: int, ifname: str, prefix: str, metric: int | None = None
) -> None:
    net = ipaddress.ip_network(prefix)
    msg = rtmsg()
    msg["family"] = socket.AF_INET if net.version == 4 else socket.AF_INET6
    msg["dst_len"] = net.prefixlen
    msg["table"] = RT_TABLE_MAIN
    msg["proto"] = RTPROT_STATIC
    msg["scope"] = RT_SCOPE_LINK
    msg["type"] = RTN_UNICAST
    msg["attrs"] = [
        ("RTA_DST", str(net.network_address)),
        ("RTA_OIF", socket.if_nametoindex(ifname)),
    ]
    if metric is not None:
        msg["attrs"].append(("RTA_PRIORITY", metric))
    msg["header"]["type"] = msg_type
    msg["header"]["flags"] = NLM_F_REQUEST | NLM_F_ACK | flags
    msg["header"]["sequence_number"] = 1
    msg.encode()
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE) as s:
        s.settimeout(2.0)
        s.sendto(msg.data, (0, 0))
        reply = s.recv(65536)
    _length, kind = struct.unpack_from("=IH", reply)
    if kind == NLMSG_ERROR:
        (code,) = struct.unpack_from("=i", reply, 16)
        if code:
            raise OSError(-code, f"{errno.errorcode.get(-code, code)}: route {prefix}"
                          f" dev {ifname}")


def add_route(ifname: str, prefix: str, metric: int | None = None) -> None:
    """Route ``prefix`` into the interface ``ifname`` (replacing any route).

    ``metric`` tells routes to one prefix apart: the replaced one is the
    route of the same prefix and metric.
    """
    _request(RTM_NEWROUTE, NLM_F_CREATE | NLM_F_REPLACE, ifname, prefix, metric)


def del_route(ifname: str, prefix: str, metric: int | None = None) -> None:
    """Remove the route of ``prefix`` (with ``metric``, if given) into ``ifname``."""
    _request(RTM_DELROUTE, 0, ifname, prefix, metric)
