"""`espgate bench ...`: the crypto and packets benchmarks behind one command.

Theory of operation: ``control.cli`` hands everything after ``bench`` to
:func:`main`, which parses the subcommand and calls the benchmark module's
``command``; each writes JSON, Markdown and a PNG (see ``bench.common``).
Bad numbers and refused output paths are usage errors (exit 2, checked before
measuring); Ctrl-C prints one line and exits 130 with no output file half
written, also when it comes just after the files were written.
"""

from __future__ import annotations

import argparse
import logging
import sys

__all__ = ["main"]


def main(argv: list[str]) -> int:
    """Run `espgate bench crypto|packets [options]`; return the exit status."""
    from bench import crypto, packets
    from bench.common import interruptible

    parser = argparse.ArgumentParser(prog="espgate bench")
    sub = parser.add_subparsers(dest="bench", required=True)
    crypto.add_arguments(
        sub.add_parser("crypto", help="AES-GCM per packet against the references")
    )
    packets.add_arguments(
        sub.add_parser("packets", help="iperf3 through plain, espgate, strongSwan")
    )
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING, stream=sys.stderr, format="%(name)s: %(message)s"
    )
    module = crypto if args.bench == "crypto" else packets
    # the last step before exit: a Ctrl-C after the files are written is 130 too
    return interruptible(
        f"espgate bench {args.bench}",
        lambda: module.command(args, argv[1:]),
        final=True,
    )
