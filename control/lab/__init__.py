"""The lab harness: namespaces, real strongSwan peers, traffic and captures.

Theory of operation: a `Topology` builds three network namespaces (client,
headend "hub", inside server) joined by veth pairs; a `ProcessSet` starts the
long-running programs in them and stops each by the PID it recorded; a
`StrongSwanClient` (and, for tests and benchmarks, a `StrongSwanResponder`)
runs charon with kernel-libipsec in a namespace of its own; `ping` and
`tcp_transfer` push traffic through the tunnel; a `Capture` on the hub's
outer interface proves that only IKE and ESP-in-UDP crossed it. Used by the
demo, `espgate selftest` and the interop tests::

    with Topology("eg", workdir) as topo, ProcessSet(workdir / "logs") as procs:
        client = StrongSwanClient(topo, workdir / "client")
        client.start(procs)
        with Capture(topo.hub, topo.hub_outer_if, workdir / "outer.pcap") as cap:
            assert client.initiate()
            ping(topo.cli, topo.srv_ip)
            tcp_transfer(topo, src_ns=topo.cli, dst_ns=topo.srv,
                         dst_addr=topo.srv_ip, nbytes=20 << 20)
        cap.summary()
"""

from control.lab.capture import Capture
from control.lab.pki import LabPki
from control.lab.procs import ManagedProcess, ProcessSet
from control.lab.strongswan import (
    StrongSwanClient,
    StrongSwanError,
    StrongSwanResponder,
)
from control.lab.topology import CommandError, Topology, TopologyError, list_netns
from control.lab.traffic import TransferError, ping, tcp_transfer

__all__ = [
    "Capture",
    "CommandError",
    "LabPki",
    "ManagedProcess",
    "ProcessSet",
    "StrongSwanClient",
    "StrongSwanError",
    "StrongSwanResponder",
    "Topology",
    "TopologyError",
    "TransferError",
    "list_netns",
    "ping",
    "tcp_transfer",
]
