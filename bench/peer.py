"""One end of the `bench packets` espgate tunnel: TUN, UDP 4500 and manual SAs.

Theory of operation: ``python -m bench.peer CONFIG`` runs inside a namespace.
CONFIG is a JSON file (mode 0600, it holds the SA keys) naming the local outer
address, the peer's, the inner address and routes for the TUN, and the two SAs
(outbound and inbound).  The peer opens a TUN, gives it the address and the
routes, binds UDP 4500, starts an :class:`fastpath.Engine` with one session and
the SA pair, touches the ready file and sleeps until SIGTERM or SIGINT.  On the
way out it stops the engine and prints its counters (global and per SA, no key
material) as one JSON line on stdout.  No IKE: the benchmark installs the same
keys at both ends.  With ``state_dir`` in CONFIG the outbound SA runs under a
:class:`control.seqstore.SeqReserver` (SQLite in that directory, ticked every
50 ms), the production path for durable sequence numbers.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

log = logging.getLogger("espgate.bench")

__all__ = ["main", "write_config"]

SESSION = 1


def write_config(path: Path, cfg: dict[str, Any]) -> None:
    """Write a peer configuration readable by its owner only (it holds keys)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(cfg, fh)


def _sa(
    d: dict[str, Any], inbound: bool, peer: tuple[str, int], seq_limit: int = 0
) -> Any:
    from fastpath import SAParams

    return SAParams(
        spi=int(d["spi"]),
        inbound=inbound,
        key=bytes.fromhex(d["key"]),
        salt=bytes.fromhex(d["salt"]),
        session=SESSION,
        peer=peer,
        seq_limit=seq_limit,
    )


def _ticker(engine: Any, reserver: Any, spi: int, stop: threading.Event) -> None:
    def next_seq(_spi: int) -> int | None:
        try:
            return int(engine.sa_counters(_spi, False)["next_seq"])
        except KeyError:
            return None

    while not stop.wait(0.05):
        reserver.tick_all(next_seq)


def run(cfg: dict[str, Any]) -> dict[str, Any]:
    """Run the peer until SIGTERM/SIGINT; return the engine's counters."""
    from fastpath import Engine, open_tun

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())

    # the TUN, its inner address and the routes into the tunnel
    fd, ifname = open_tun(cfg.get("tun", "egbt%d"), int(cfg.get("mtu", 1400)))
    if cfg.get("inner"):
        subprocess.run(
            ["ip", "addr", "add", f"{cfg['inner']}/32", "dev", ifname], check=True
        )
    for net in cfg.get("routes", []):
        argv = ["ip", "route", "add", net, "dev", ifname]
        if cfg.get("inner"):
            argv += ["src", cfg["inner"]]
        subprocess.run(argv, check=True)

    # ESP-in-UDP socket and the engine with one session and the SA pair
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    udp.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
    udp.bind((cfg["local"], 4500))
    udp.setblocking(False)
    peer = (cfg["peer"], 4500)
    engine = Engine(
        udp.fileno(),
        batch=int(cfg.get("batch", 64)),
        crypto=cfg.get("crypto", "ipsec-mb"),
    )
    engine.add_session(SESSION, fd)
    spi_out = int(cfg["sa_out"]["spi"])
    reserver = None
    if cfg.get("state_dir"):
        from control.seqstore import SeqReserver, SeqStore

        reserver = SeqReserver(SeqStore.in_dir(cfg["state_dir"]), engine.set_seq_limit)
        reserver.open_sa(spi_out)
        limit = reserver.limit(spi_out)
        engine.install_sa(_sa(cfg["sa_out"], False, peer, limit))
    else:
        engine.install_sa(_sa(cfg["sa_out"], False, peer))
    engine.install_sa(_sa(cfg["sa_in"], True, peer))
    engine.start(lambda data, addr: None)
    if reserver is not None:
        threading.Thread(
            target=_ticker, args=(engine, reserver, spi_out, stop), daemon=True
        ).start()
    log.info("bench peer up on %s (%s)", ifname, cfg["local"])
    if cfg.get("ready"):
        Path(cfg["ready"]).write_text(ifname + "\n")

    # sleep until told to stop, then report
    while not stop.wait(0.5):
        pass
    engine.stop()
    report = {
        "ifname": ifname,
        "counters": engine.counters(),
        "sa_out": _plain(engine.sa_counters(int(cfg["sa_out"]["spi"]), False)),
        "sa_in": _plain(engine.sa_counters(int(cfg["sa_in"]["spi"]), True)),
    }
    if reserver is not None:
        report["seqstore"] = dict(reserver.counters)
        report["seqstore"]["commits"] = reserver.store.commits
    udp.close()
    os.close(fd)
    return report


def _plain(value: object) -> Any:
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, int | float | str | bool) or value is None:
        return value
    return str(value)


def main(argv: list[str] | None = None) -> int:
    """Run `python -m bench.peer CONFIG`."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m bench.peer CONFIG.json", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s"
    )
    cfg = json.loads(Path(argv[0]).read_text())
    report = run(cfg)
    print(json.dumps(report), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
