"""``python -m control.guest -- CMD...``: run one command in the qemu guest.

The guest's stdout and stderr are copied to ours and its exit code becomes ours;
a guest that cannot be had exits 77 with the reason on stderr.
"""

from __future__ import annotations

import argparse
import sys

from control.guest.runner import GuestError, GuestUnavailable, run_in_guest


def main(argv: list[str] | None = None) -> int:
    """Parse the command line, run the command in the guest, relay its output."""
    parser = argparse.ArgumentParser(prog="python -m control.guest")
    parser.add_argument("--timeout", type=float, default=300.0)
    parser.add_argument("--cwd", default=None, help="directory to run in (default .)")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command given")
    try:
        rc, out, err = run_in_guest(command, args.timeout, cwd=args.cwd)
    except GuestUnavailable as exc:
        print(f"guest unavailable: {exc}", file=sys.stderr)
        return 77
    except (GuestError, TimeoutError) as exc:
        print(f"guest failed: {exc}", file=sys.stderr)
        return 125
    sys.stdout.write(out)
    sys.stderr.write(err)
    return rc


if __name__ == "__main__":
    sys.exit(main())
