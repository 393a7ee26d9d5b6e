"""The `bench packets` kernel mode: XFRM at both ends of the tunnel, no daemon.

Theory of operation: the same manual SA pair as the espgate mode (fresh random
AES-128 keys and salts, the same SPIs, no IKE) goes into the kernel of the cli
and hub namespaces instead of a userspace engine::

    cli  198.18.128.2 (lo)                    hub
         out  198.18.128.2/32 -> 198.19.1.0/24 out  198.19.1.0/24 -> 198.18.128.0/24
         in   198.19.1.0/24 -> 198.18.128.2/32 in+fwd 198.18.128.0/24 -> 198.19.1.0/24
         ESP-in-UDP 198.18.1.2:4500  <------>  198.18.1.1:4500

Both ends are driven from the benchmark process with
:class:`fastpath.kernel.KernelEngine` (netlink XFRM, rfc4106(gcm(aes)) 128,
tunnel mode, UDP encapsulation), which also holds the connected
``UDP_ENCAP_ESPINUDP`` socket on 4500 at each end: without one the kernel drops
ESP-in-UDP silently.  Routes carry the inner traffic to the outer link (cli:
198.19.1.0/24 via the hub, source 198.18.128.2; hub: the pool via cli) and the
policies turn it into ESP there; a packet without its SA is dropped, never sent
in the clear, so the mode cannot fall back to plain routing unnoticed.

On the way out :func:`kernel_tunnel` reads the kernel's per-SA counters into
the report, deletes every SA and policy of ours (the reqid range of
``fastpath.kernel``), closes the sockets, removes the routes and the inner
address, and records what ``ip xfrm state`` and ``ip xfrm policy`` still list
in each namespace (empty when all went well).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

log = logging.getLogger("espgate.bench")

__all__ = ["KernelEnd", "kernel_tunnel", "sa_pair", "xfrm_listing"]

SESSION = 1
SPI_CLI_TO_HUB = 0x0EB0C001
SPI_HUB_TO_CLI = 0x0EB0C002


class _Topo(Protocol):
    cli: str
    hub: str
    pool: str
    inside_net: str
    cli_outer_ip: str
    hub_outer_ip: str

    def run(self, ns: str | None, argv: list[str], check: bool = True) -> Any: ...


def sa_pair() -> tuple[dict[str, Any], dict[str, Any]]:
    """Return fresh (cli->hub, hub->cli) SAs: SPI, AES-128 key and salt in hex."""

    def sa(spi: int) -> dict[str, Any]:
        return {"spi": spi, "key": os.urandom(16).hex(), "salt": os.urandom(4).hex()}

    return sa(SPI_CLI_TO_HUB), sa(SPI_HUB_TO_CLI)


@dataclass(frozen=True)
class KernelEnd:
    """One tunnel end: its namespace, addresses, selectors and SA pair."""

    name: str
    ns: str
    local: str
    peer: str
    local_ts: str
    remote_ts: str
    sa_out: dict[str, Any]
    sa_in: dict[str, Any]


def xfrm_listing(topo: _Topo, ns: str) -> dict[str, str]:
    """Return what `ip xfrm state` and `ip xfrm policy` list in a namespace."""
    out = {}
    for kind in ("state", "policy"):
        res = topo.run(ns, ["ip", "xfrm", kind, "list"], check=False)
        out[kind] = (res.stdout + res.stderr).strip()
    return out


def _params(d: dict[str, Any], inbound: bool, end: KernelEnd) -> Any:
    from fastpath import SAParams

    return SAParams(
        spi=int(d["spi"]),
        inbound=inbound,
        key=bytes.fromhex(d["key"]),
        salt=bytes.fromhex(d["salt"]),
        session=SESSION,
        peer=(end.peer, 4500),
        local=(end.local, 4500),
        local_ts=(end.local_ts,),
        remote_ts=(end.remote_ts,),
        engine="kernel",
    )


def _install(end: KernelEnd) -> Any:
    from fastpath.kernel import KernelEngine

    engine = KernelEngine(netns=end.ns)
    try:
        # inbound first: it opens the encap socket before anything is sent
        engine.install_sa(_params(end.sa_in, True, end))
        engine.install_sa(_params(end.sa_out, False, end))
        engine.install_policies(
            SESSION,
            local=end.local,
            peer=end.peer,
            local_ts=(end.local_ts,),
            remote_ts=(end.remote_ts,),
        )
    except BaseException:
        engine.cleanup()
        engine.close()
        raise
    return engine


def _counters(engine: Any, end: KernelEnd) -> dict[str, Any]:
    return {
        "sa_out": engine.sa_counters(int(end.sa_out["spi"]), False),
        "sa_in": engine.sa_counters(int(end.sa_in["spi"]), True),
    }


@contextlib.contextmanager
def kernel_tunnel(
    topo: _Topo, inner: str, reports: dict[str, Any]
) -> Iterator[list[KernelEnd]]:
    """Set up XFRM at cli and hub for the lab topology; undo it all on exit.

    ``inner`` becomes the cli's tunnel address (the benchmark's source);
    reports receives ``kernel-cli``/``kernel-hub`` (SA counters) and
    ``kernel-cleanup`` ({ns: {state, policy}} left after the clean-up).
    """
    c2h, h2c = sa_pair()
    ends = [
        KernelEnd("cli", topo.cli, topo.cli_outer_ip, topo.hub_outer_ip,
                  f"{inner}/32", topo.inside_net, c2h, h2c),
        KernelEnd("hub", topo.hub, topo.hub_outer_ip, topo.cli_outer_ip,
                  topo.inside_net, topo.pool, h2c, c2h),
    ]  # fmt: skip
    undo: list[tuple[str, list[str]]] = []
    engines: dict[str, Any] = {}
    try:
        # the inner address and routes that lead the inner traffic to the policies
        steps = [
            (topo.cli, ["ip", "addr", "add", f"{inner}/32", "dev", "lo"],
             ["ip", "addr", "del", f"{inner}/32", "dev", "lo"]),
            (topo.cli, ["ip", "route", "add", topo.inside_net, "via",
                        topo.hub_outer_ip, "src", inner],
             ["ip", "route", "del", topo.inside_net]),
            (topo.hub, ["ip", "route", "add", topo.pool, "via", topo.cli_outer_ip],
             ["ip", "route", "del", topo.pool]),
        ]  # fmt: skip
        for ns, do, back in steps:
            topo.run(ns, do)
            undo.append((ns, back))

        # SAs, policies and encap sockets at both ends
        for end in ends:
            engines[end.name] = _install(end)
        log.info("kernel tunnel up between %s and %s", topo.cli, topo.hub)
        yield ends
    finally:
        for end in ends:
            engine = engines.get(end.name)
            if engine is None:
                continue
            try:
                reports[f"kernel-{end.name}"] = _counters(engine, end)
            except (KeyError, OSError) as exc:
                reports[f"kernel-{end.name}"] = {"error": str(exc)}
            engine.cleanup()
            engine.close()
        for ns, back in reversed(undo):
            topo.run(ns, back, check=False)
        reports["kernel-cleanup"] = {ns: xfrm_listing(topo, ns) for ns in
                                     (topo.cli, topo.hub)}  # fmt: skip
