"""The espgate command line.

espgate serve [--config FILE]          run the headend (embedded default
                                       without --config)
espgate check-config [FILE]            parse and check, print a summary
espgate show sessions|counters|engines ask a running daemon
espgate show ipsec sa                  per SA: next seq, reserved mark, counters
espgate clear session ID               delete a session (the client is told)
espgate reload dataplane               restart the ESP engine process
espgate sa move SPI kernel|userspace   move a live CHILD SA to the other
                                       ESP engine (SPI in or out, hex)
espgate demo [--json PATH]             the main job: a real strongSwan
                                       client through the headend in a lab
espgate selftest [--json PATH] [--cases A,B]
                                       real peers in namespaces, a JSON
                                       verdict per case
espgate --version                      print the version

Every command prints its answer on stdout and its errors on stderr; exit
status 0 on success, 1 when the daemon refused or cannot be reached, 2 for a
config or usage error.  Output cut short by a closed pipe (``| head``) ends
the command quietly.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import socket
import stat
import sys
from pathlib import Path
from typing import Any

from control import config as configmod
from control.seqstore import StateDirError, check_state_dir

DEFAULT_SOCKET = configmod.ServerConfig().control_socket
# exit status of a command whose reader went away (128 + SIGPIPE, as for cat)
EXIT_PIPE = 141


def main(argv: list[str] | None = None) -> int:
    """Run the command line; return the exit status."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        return _main(argv)
    except BrokenPipeError:
        # the reader (head, less) is gone: nothing left to say, no traceback;
        # stdout points at /dev/null so the flush at exit cannot fail again
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, sys.stdout.fileno())
        os.close(null)
        return EXIT_PIPE


def _main(argv: list[str]) -> int:
    if argv[:1] == ["bench"]:
        # the benchmarks parse their own options, --help included
        from bench.cli import main as bench_main

        code = int(bench_main(argv[1:]) or 0)
        sys.stdout.flush()
        return code
    parser = _parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        parser.print_help()
        return 2
    try:
        code = int(args.func(args) or 0)
        sys.stdout.flush()
        return code
    except configmod.ConfigError as exc:
        print(f"espgate: config error: {exc}", file=sys.stderr)
        return 2
    except StateDirError as exc:
        print(f"espgate: config error: server.state_dir: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("espgate")
    except PackageNotFoundError:
        return "unknown (not installed)"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="espgate", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--version", action="version", version=f"espgate {_version()}"
    )
    sub = parser.add_subparsers(metavar="COMMAND")

    p = sub.add_parser("serve", help="run the headend daemon")
    p.add_argument("--config", "-c", help="TOML config (default: embedded)")
    p.add_argument("--control-socket", help="override server.control_socket")
    p.add_argument("--listen", help="override server.listen")
    p.add_argument("--state-dir", help="override server.state_dir")
    p.add_argument("--log-level", choices=configmod.LOG_LEVELS)
    p.set_defaults(func=_cmd_serve)

    p = sub.add_parser("reload", help="restart a part of a running daemon")
    p.add_argument("what", choices=["dataplane"])
    p.add_argument("--socket", default=DEFAULT_SOCKET)
    p.add_argument("--json", action="store_true", help="print raw JSON")
    p.set_defaults(func=_cmd_reload)

    p = sub.add_parser("dataplane", help="the ESP dataplane (started by serve)")
    p.add_argument("fd", help="control socket fd handed over by espgate serve")
    p.set_defaults(
        func=lambda a: __import__("control.dataplane").dataplane.main([a.fd])
    )

    p = sub.add_parser("check-config", help="check a config file")
    p.add_argument("file", nargs="?", help="TOML config (default: embedded)")
    p.set_defaults(func=_cmd_check)

    p = sub.add_parser("show", help="ask a running daemon")
    p.add_argument("what", choices=["sessions", "counters", "engines", "ipsec"])
    p.add_argument("sub", nargs="?", choices=["sa"], help="with ipsec: sa")
    p.add_argument("--socket", default=DEFAULT_SOCKET)
    p.add_argument("--json", action="store_true", help="print raw JSON")
    p.set_defaults(func=_cmd_show, parser=p)

    p = sub.add_parser("clear", help="tell a running daemon to delete a session")
    p.add_argument("what", choices=["session"])
    p.add_argument("id", help="session id as `espgate show sessions` prints it")
    p.add_argument("--socket", default=DEFAULT_SOCKET)
    p.add_argument("--json", action="store_true", help="print raw JSON")
    p.set_defaults(func=_cmd_clear)

    p = sub.add_parser("sa", help="act on a running daemon's CHILD SAs")
    sa_sub = p.add_subparsers(metavar="ACTION")
    p = sa_sub.add_parser("move", help="move a live CHILD SA to another engine")
    p.add_argument("spi", help="inbound or outbound SPI, hex (as in show)")
    p.add_argument("to", choices=["kernel", "userspace"])
    p.add_argument("--socket", default=DEFAULT_SOCKET)
    p.set_defaults(func=_cmd_sa_move)

    p = sub.add_parser("demo", help="run the main job in a lab of namespaces")
    p.add_argument("--json", default="results/run.json", help="results file")
    p.add_argument(
        "--bytes",
        type=_positive,
        default=128 * 1024 * 1024,
        help="size of the checked TCP transfer",
    )
    p.add_argument("--esp", default="aes128gcm16", choices=configmod.ESP_PROPOSALS)
    p.add_argument("--keep-logs", help="directory to keep the lab's logs in")
    p.set_defaults(func=_cmd_demo)

    sub.add_parser("bench", help="benchmarks (espgate bench --help)")

    p = sub.add_parser("selftest", help="real peers in namespaces, JSON verdicts")
    p.add_argument("--json", default="results/selftest.json", help="results file")
    p.add_argument("--cases", help="comma-separated case names (default: all)")
    p.add_argument("--list", action="store_true", help="list the cases")
    p.add_argument("--keep-logs", help="directory to keep the lab's logs in")
    p.set_defaults(func=_cmd_selftest)
    return parser


def _positive(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, not {value}")
    return value


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )


def _cmd_serve(args: argparse.Namespace) -> int:
    from control.daemon import StartupError, serve

    config = configmod.load(args.config)
    overrides: dict[str, Any] = {}
    if args.control_socket:
        overrides["control_socket"] = args.control_socket
    if args.listen:
        overrides["listen"] = args.listen
    if args.state_dir is not None:
        # "" keeps leases in memory, even when the config names a directory
        overrides["state_dir"] = args.state_dir
    if args.log_level:
        overrides["log_level"] = args.log_level
    if overrides:
        config = configmod.replace_server(config, **overrides)
    if config.server.state_dir:
        # made if missing; a file there, or no way to make it, is a config error
        try:
            check_state_dir(config.server.state_dir, create=True)
        except StateDirError as exc:
            where = "--state-dir" if args.state_dir else _state_dir_at(config)
            print(f"espgate: config error: {where}: {exc}", file=sys.stderr)
            return 2
    _setup_logging(config.server.log_level)
    try:
        serve(config)
    except StartupError as exc:
        print(f"espgate: {exc}", file=sys.stderr)
        return 1
    return 0


def _cmd_check(args: argparse.Namespace) -> int:
    config = configmod.load(args.file)
    if config.server.state_dir:
        try:
            check_state_dir(config.server.state_dir)
        except StateDirError as exc:
            print(f"espgate: config error: {_state_dir_at(config)}: {exc}",
                  file=sys.stderr)  # fmt: skip
            return 2
    print(configmod.describe(config))
    return 0


def _state_dir_at(config: configmod.Config) -> str:
    # "file:line: server.state_dir" as config errors say it (the line of the
    # key in [server]; none for the embedded default)
    line = None
    with contextlib.suppress(OSError, UnicodeDecodeError):
        table = ""
        text = Path(config.source).read_text()
        for number, raw in enumerate(text.splitlines(), 1):
            stripped = raw.strip()
            if stripped.startswith("["):
                table = stripped
            elif table == "[server]" and re.match(r"state_dir\s*=", stripped):
                line = number
    at = f"{config.source}:{line}" if line else config.source
    return f"{at}: server.state_dir"


def request(
    path: str, cmd: str, timeout: float = 5.0, **fields: Any
) -> dict[str, Any]:
    """Send one command to a daemon's control socket and return its answer."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(path)
        sock.sendall(json.dumps({"cmd": cmd, **fields}).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    answer: dict[str, Any] = json.loads(data)
    return answer


def _cmd_dataplane(args: argparse.Namespace) -> int:
    from control.dataplane import main as dataplane_main

    return dataplane_main([args.fd])


def _ask(
    args: argparse.Namespace, cmd: str, action: str, **fields: Any
) -> dict[str, Any] | None:
    # one request; None (said on stderr) when the daemon cannot be reached or
    # answers with an error
    problem = _not_a_socket(args.socket)
    if problem:
        print(f"espgate: cannot reach the daemon at {args.socket}: {problem}",
              file=sys.stderr)  # fmt: skip
        return None
    try:
        answer = request(args.socket, cmd, **fields)
    except OSError as exc:
        print(
            f"espgate: cannot reach the daemon at {args.socket}: {exc}", file=sys.stderr
        )
        return None
    except ValueError:
        print(f"espgate: no answer from the daemon at {args.socket}", file=sys.stderr)
        return None
    if "error" in answer:
        print(f"espgate: {action} failed: {answer['error']}", file=sys.stderr)
        return None
    return answer


def _not_a_socket(path: str) -> str:
    # connect() says "Connection refused" for a file or a directory: say what
    # the path is instead (nothing for a socket or a path that is not there)
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return ""
    if stat.S_ISSOCK(mode):
        return ""
    return "a directory, not a socket" if stat.S_ISDIR(mode) else "not a socket"


def _cmd_reload(args: argparse.Namespace) -> int:
    answer = _ask(args, f"reload-{args.what}", f"reload {args.what}")
    if answer is None:
        return 1
    if args.json:
        print(json.dumps(answer, indent=2))
    else:
        print(f"dataplane restarted: pid {answer.get('dataplane_pid')}")
    return 0


def _cmd_clear(args: argparse.Namespace) -> int:
    answer = _ask(args, "delete-session", "clear session", session=args.id)
    if answer is None:
        return 1
    if args.json:
        print(json.dumps(answer, indent=2))
    else:
        print(f"session {answer.get('deleting')}: Delete sent to the client")
    return 0


def _cmd_show(args: argparse.Namespace) -> int:
    # `show ipsec` takes `sa`, nothing else takes a second word
    if args.what == "ipsec" and args.sub != "sa":
        args.parser.error("show ipsec needs 'sa'")
    if args.what != "ipsec" and args.sub is not None:
        args.parser.error(f"show {args.what} takes no {args.sub!r}")
    what = "ipsec-sa" if args.what == "ipsec" else args.what
    answer = _ask(args, f"show-{what}", f"show {args.what}")
    if answer is None:
        return 1
    if args.json:
        print(json.dumps(answer, indent=2))
    elif args.what == "sessions":
        print(format_sessions(answer["sessions"]))
    elif args.what == "ipsec":
        print(format_ipsec_sas(answer.get("sas", [])))
    elif args.what == "engines":
        print(format_engines(answer))
    else:
        print(format_counters(answer))
    return 0


def _cmd_sa_move(args: argparse.Namespace) -> int:
    try:
        int(args.spi, 16)
    except ValueError:
        print(f"espgate: not a hex SPI: {args.spi!r}", file=sys.stderr)
        return 2
    answer = _ask(args, "sa-move", "sa move", timeout=30, spi=args.spi, to=args.to)
    if answer is None:
        return 1
    if not answer.get("moved"):
        print(f"sa {answer['spi']} already in the {answer['engine']} engine")
        return 0
    print(
        f"sa {answer['spi_in']}/{answer['spi_out']} moved to the {answer['engine']} "
        f"engine in {answer['ms']} ms, out seq {answer['source_next_seq']} -> "
        f"{answer['dest_next_seq']}"
    )
    return 0


def format_counters(answer: dict[str, Any], prefix: str = "") -> str:
    """Render nested counters as ``area.name  value`` lines, values in one column."""
    flat = _flatten(answer, prefix)
    width = max((len(name) for name, _ in flat), default=0)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in flat)


def _flatten(answer: dict[str, Any], prefix: str) -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    for key, value in answer.items():
        if isinstance(value, dict):
            out.extend(_flatten(value, f"{prefix}{key}."))
        else:
            out.append((f"{prefix}{key}", value))
    return out


def format_engines(answer: dict[str, Any]) -> str:
    """Render `show engines`: each profile's engine, the kernel's availability."""
    lines = [f"profile {name}: {mode}" for name, mode in answer["profiles"].items()]
    kind = answer.get("dataplane")
    if kind:
        lines.append(f"userspace engine: runs {_WHERE.get(kind, kind)}")
    reason = answer.get("kernel_reason") or ""
    if answer.get("kernel_available") is None:
        lines.append(f"kernel engine: {reason or 'not probed'}")
    elif answer["kernel_available"]:
        lines.append(f"kernel engine: available ({reason})")
    else:
        lines.append(f"kernel engine: unavailable ({reason})")
    return "\n".join(lines)


_WHERE = {"process": "in its own process", "inline": "inside the daemon"}


def format_sessions(sessions: list[dict[str, Any]]) -> str:
    """Render sessions as an aligned table, one row per CHILD SA.

    The first column is the session ID `espgate clear session` takes.
    """
    header = (
        "session",
        "identity",
        "outside",
        "inside",
        "mtu",
        "spi in/out",
        "engine",
        "pkts in/out",
        "bytes in/out",
    )
    rows = [header]
    for s in sessions:
        mtu = str(s.get("mtu") or "-")
        sid = str(s.get("session") or "-")
        for c in s["children"] or [None]:
            if c is None:
                inside = str(s["inside"] or "-")
                rows.append(
                    (sid, s["identity"], s["outside"], inside, mtu, "-",
                     s.get("engine", "-"), "-", "-")  # fmt: skip
                )
                continue
            rows.append(
                (
                    sid,
                    s["identity"],
                    s["outside"],
                    str(s["inside"] or "-"),
                    mtu,
                    f"{c['spi_in']}/{c['spi_out']}",
                    str(c.get("engine", "userspace")),
                    f"{c['packets_in']}/{c['packets_out']}",
                    f"{c['bytes_in']}/{c['bytes_out']}",
                )
            )
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = [
        "  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip()
        for r in rows
    ]
    for s in sessions:
        # networks the client announced and we route to it (route accept)
        for r in s.get("accepted_routes") or []:
            lines.append(
                f"{s['identity']}: route {r['prefix']} metric {r['metric']}"
                f" tag {r['tag']}"
            )
    lines.append(f"{len(sessions)} session(s)")
    return "\n".join(lines)


def format_ipsec_sas(sas: list[dict[str, Any]]) -> str:
    """Render SAs as an aligned table: spi, direction, engine, seqs, counters."""
    header = ("spi", "dir", "engine", "next seq", "reserved", "cap", "packets",
              "bytes", "drops")  # fmt: skip
    rows = [header]
    for sa in sas:
        c = sa["counters"]
        seq = sa["next_seq"] if sa["direction"] == "out" else sa["highest_seq"]
        drops = sum((c.get("drops") or {}).values())
        mark = sa["seq_reserved"]
        # the last number an outbound SA may send, set by a move (else none)
        cap = sa.get("seq_cap")
        rows.append(
            (sa["spi"], sa["direction"], sa["engine"], "-" if seq is None else str(seq),
             "-" if mark is None else str(mark), "-" if cap is None else str(cap),
             str(c.get("packets", 0)), str(c.get("bytes", 0)), str(drops))
        )  # fmt: skip
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = [
        "  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip()
        for r in rows
    ]
    lines.append(f"{len(sas)} sa(s); inbound rows show the highest seq received")
    capped = [sa for sa in sas if sa.get("seq_cap") is not None]
    for sa in capped:
        held = (sa["counters"].get("drops") or {}).get("seq_cap", 0)
        lines.append(f"sa {sa['spi']}: capped at seq {sa['seq_cap']} by a move, "
                     f"{held} packet(s) held back")  # fmt: skip
    return "\n".join(lines)


def _cmd_demo(args: argparse.Namespace) -> int:
    from control.demo import run_demo

    _setup_logging("info")
    result = run_demo(
        Path(args.json), nbytes=args.bytes, esp=args.esp, keep_logs=args.keep_logs
    )
    ok = (
        result.get("ike_established")
        and result.get("transfer_sha256_match")
        and result.get("ping_loss_pct") == 0
    )
    return 0 if ok else 1


def _cmd_selftest(args: argparse.Namespace) -> int:
    from control import selftest, selftest_kernel

    if args.list:
        for name, case in selftest.CASES.items():
            print(f"{name:24} {case.summary}")
        return 0
    _setup_logging("info")
    names = [n for n in (args.cases or "").split(",") if n.strip()] or None
    if args.cases is not None and names is None:
        print("espgate: --cases names no case", file=sys.stderr)
        return 2
    # the guest cases share one qemu boot
    selftest_kernel.prefetch(names)
    results = selftest.run(names, Path(args.json), keep_logs=args.keep_logs)
    return 0 if all(r["passed"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
