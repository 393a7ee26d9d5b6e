"""Make a kept lab directory (``--keep-logs``) private and free of secrets.

Theory of operation: a lab case writes configs, keys, logs and captures into
its work directory; when that directory is kept for a person to read,
:func:`seal_kept` walks it once after the lab is down and

* removes what exists only to hold a secret: private keys (``*.key`` and any
  PEM with a ``PRIVATE KEY`` block) and FreeRADIUS ``users`` files (cleartext
  EAP passwords);
* rewrites text files so every ``<name> = value``, ``<name> := value`` or JSON
  ``"<name>": "value"`` whose name contains psk, secret, password or
  passphrase reads ``"<redacted>"``,
  as does a ``PSK "value"`` line, and every known secret string passed in
  (and its hex spelling) becomes ``<redacted>``;
* makes every directory 0700 and every file 0600, so nothing is readable by
  another user even if the top directory is later opened up.

What it removed is listed in ``REDACTED.txt`` at the top, so a reader knows
why a file the logs mention is missing. Binary files (captures) are kept as
they are, only made private: they never carry the secrets in the clear.
Symbolic links are not followed.
"""

from __future__ import annotations

import logging
import os
import re
import stat
from collections.abc import Iterable
from pathlib import Path

log = logging.getLogger("espgate.lab")

__all__ = ["REDACTED", "redact_text", "seal_kept"]

REDACTED = "<redacted>"
# a name that says its value is secret, an assignment, then the value
_SECRET_ASSIGNMENT = re.compile(
    r"(?i)\b([\w.-]*(?:psk|secret|password|passphrase)[\w.-]*)"
    r"(\s*:?=\s*)"
    r"(\"[^\"\n]*\"|'[^'\n]*'|[^\s,}#]+)"
)
# the same in JSON: "name": "value"
_SECRET_MEMBER = re.compile(
    r'(?i)("[\w.-]*(?:psk|secret|password|passphrase)[\w.-]*"\s*:\s*)("[^"\n]*")'
)
# ipsec.secrets style: ': PSK "value"' or ': PSK 0x...'
_PSK_LINE = re.compile(r'(?i)(\bPSK\s+)("[^"\n]*"|0x[0-9a-f]+)')
_PRIVATE_PEM = re.compile(rb"-----BEGIN [A-Z ]*PRIVATE KEY-----")
# FreeRADIUS users files: one cleartext password per entry
_SECRET_FILE_NAMES = frozenset({"users"})
_NOTE = "REDACTED.txt"


def redact_text(text: str, known: Iterable[str] = ()) -> str:
    """Return text with secret assignments and known secret strings masked."""
    text = _SECRET_ASSIGNMENT.sub(
        lambda m: f'{m.group(1)}{m.group(2)}"{REDACTED}"', text
    )
    text = _SECRET_MEMBER.sub(lambda m: f'{m.group(1)}"{REDACTED}"', text)
    text = _PSK_LINE.sub(lambda m: f'{m.group(1)}"{REDACTED}"', text)
    # longest first, so a secret containing another is masked whole
    for secret in sorted({s for s in known if s}, key=len, reverse=True):
        for spelling in (secret, secret.encode().hex()):
            text = text.replace(spelling, REDACTED)
    return text


def _why_removed(path: Path, data: bytes) -> str | None:
    if path.suffix == ".key":
        return "private key"
    if _PRIVATE_PEM.search(data):
        return "private key (PEM)"
    if path.name in _SECRET_FILE_NAMES:
        return "RADIUS users (cleartext passwords)"
    return None


def _seal_file(path: Path, known: tuple[str, ...], removed: list[str]) -> None:
    data = path.read_bytes()
    why = _why_removed(path, data)
    if why is not None:
        path.unlink()
        removed.append(f"{path}: {why}")
        return
    os.chmod(path, 0o600)
    try:
        text = data.decode()
    except UnicodeDecodeError:
        return  # a capture or other binary file: kept as it is
    clean = redact_text(text, known)
    if clean != text:
        path.write_text(clean)


def seal_kept(root: Path, known: Iterable[str] = ()) -> list[str]:
    """Make `root` private and secret-free; return what was removed and why."""
    root = Path(root)
    secrets = tuple(known)
    removed: list[str] = []
    if not root.is_dir():
        return removed
    os.chmod(root, 0o700)
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        for name in dirnames:
            sub = here / name
            if not sub.is_symlink():
                os.chmod(sub, 0o700)
        for name in filenames:
            path = here / name
            mode = path.lstat().st_mode
            if stat.S_ISREG(mode):
                _seal_file(path, secrets, removed)
            elif not stat.S_ISLNK(mode):
                # a socket or fifo left by a process: nothing to read, private
                os.chmod(path, 0o600)
    if removed:
        note = root / _NOTE
        fd = os.open(note, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        with os.fdopen(fd, "a") as fh:
            fh.write("".join(f"removed {line}\n" for line in removed))
        log.info("kept logs in %s: %d secret file(s) removed", root, len(removed))
    return removed
