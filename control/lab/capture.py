"""Packet capture with tcpdump and a small pcap reader that classifies it.

Theory of operation: `Capture` runs `tcpdump -i IFACE -U -w PATH -s 256` in a
namespace (its PID recorded by a private `ProcessSet`), waits until tcpdump
says it is listening, and stops it by that PID on exit. `summary()` reads the
classic pcap file in Python: Ethernet (with 802.1Q tags skipped), raw IPv4
and Linux cooked captures; IPv4 UDP to or from port 4500 is "udp4500" (IKE
after NAT-T, ESP-in-UDP, keepalives), port 500 "udp500", IP protocol 50
"esp", and everything else "other" with a short example line. Every captured
byte of every record is searched for the transfer marker, so plaintext that
leaked past the tunnel shows up as `plaintext_marker_seen`.
"""

from __future__ import annotations

import logging
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from control.lab.procs import ProcessSet, wait_for
from control.lab.transfer import MARKER

log = logging.getLogger("espgate.lab")

__all__ = ["Capture", "PcapRecord", "classify", "read_pcap", "summarize_pcap"]

SNAPLEN = 256
_MAX_EXAMPLES = 10

_LINKTYPE_ETHERNET = 1
_LINKTYPE_RAW = 101
_LINKTYPE_LINUX_SLL = 113
_LINKTYPE_IPV4 = 228

_ETH_IPV4 = 0x0800
_ETH_VLAN = (0x8100, 0x88A8)
_IPPROTO_UDP = 17
_IPPROTO_ESP = 50


@dataclass(frozen=True)
class PcapRecord:
    """One captured packet: link type, timestamp, captured bytes, wire length."""

    linktype: int
    ts: float
    data: bytes
    orig_len: int


def read_pcap(path: Path) -> Iterator[PcapRecord]:
    """Yield the records of a classic pcap file; a torn last record is skipped."""
    raw = Path(path).read_bytes()
    if len(raw) < 24:
        return

    #  0: magic  4: version major/minor  8: thiszone  12: sigfigs
    # 16: snaplen  20: link type
    magic = raw[:4]
    if magic in (b"\xd4\xc3\xb2\xa1", b"\x4d\x3c\xb2\xa1"):
        endian = "<"
    elif magic in (b"\xa1\xb2\xc3\xd4", b"\xa1\xb2\x3c\x4d"):
        endian = ">"
    else:
        raise ValueError(f"Not a pcap file: magic {magic.hex()}")
    frac = 1e-9 if magic in (b"\x4d\x3c\xb2\xa1", b"\xa1\xb2\x3c\x4d") else 1e-6
    (linktype,) = struct.unpack_from(endian + "I", raw, 20)
    linktype &= 0x0FFFFFFF

    # records: ts_sec, ts_frac, incl_len, orig_len, then incl_len bytes
    off = 24
    header = struct.Struct(endian + "IIII")
    while off + header.size <= len(raw):
        sec, sub, incl, orig = header.unpack_from(raw, off)
        off += header.size
        if off + incl > len(raw):
            break
        yield PcapRecord(linktype, sec + sub * frac, raw[off : off + incl], orig)
        off += incl


def classify(rec: PcapRecord) -> tuple[str, str]:
    """Return (class, description) of one record; class as in `summary()`."""
    data = rec.data
    if rec.linktype == _LINKTYPE_ETHERNET:
        if len(data) < 14:
            return "other", "truncated ethernet frame"
        (ethertype,) = struct.unpack_from("!H", data, 12)
        off = 14
        while ethertype in _ETH_VLAN and len(data) >= off + 4:
            (ethertype,) = struct.unpack_from("!H", data, off + 2)
            off += 4
        if ethertype != _ETH_IPV4:
            return "other", f"ethertype 0x{ethertype:04x}"
        return _classify_ipv4(data[off:])
    if rec.linktype == _LINKTYPE_LINUX_SLL:
        if len(data) < 16:
            return "other", "truncated cooked frame"
        (proto,) = struct.unpack_from("!H", data, 14)
        if proto != _ETH_IPV4:
            return "other", f"ethertype 0x{proto:04x}"
        return _classify_ipv4(data[16:])
    if rec.linktype in (_LINKTYPE_RAW, _LINKTYPE_IPV4):
        return _classify_ipv4(data)
    return "other", f"link type {rec.linktype}"


def _classify_ipv4(pkt: bytes) -> tuple[str, str]:
    #  0: version/IHL  1: TOS  2: total length  4: id  6: flags/fragment offset
    #  8: TTL  9: protocol  10: checksum  12: source  16: destination
    if len(pkt) < 20 or pkt[0] >> 4 != 4:
        return "other", "not ipv4"
    ihl = (pkt[0] & 0x0F) * 4
    proto = pkt[9]
    src = ".".join(str(b) for b in pkt[12:16])
    dst = ".".join(str(b) for b in pkt[16:20])
    (frag,) = struct.unpack_from("!H", pkt, 6)
    if frag & 0x1FFF:
        return "other", f"ipv4 fragment proto {proto} {src} > {dst}"
    if proto == _IPPROTO_ESP:
        return "esp", f"esp {src} > {dst}"
    if proto == _IPPROTO_UDP and len(pkt) >= ihl + 8:
        sport, dport = struct.unpack_from("!HH", pkt, ihl)
        desc = f"udp {src}:{sport} > {dst}:{dport}"
        if 4500 in (sport, dport):
            return "udp4500", desc
        if 500 in (sport, dport):
            return "udp500", desc
        return "other", desc
    if proto in (6, 17) and len(pkt) >= ihl + 4:
        sport, dport = struct.unpack_from("!HH", pkt, ihl)
        name = "tcp" if proto == 6 else "udp"
        return "other", f"{name} {src}:{sport} > {dst}:{dport}"
    return "other", f"ipv4 proto {proto} {src} > {dst}"


def summarize_pcap(path: Path, marker: bytes = MARKER) -> dict[str, Any]:
    """Count the records of a pcap file by class and look for the marker."""
    by_proto = {"udp4500": 0, "udp500": 0, "esp": 0, "other": 0}
    examples: list[str] = []
    packets = 0
    marked = 0
    for rec in read_pcap(path):
        packets += 1
        kind, desc = classify(rec)
        by_proto[kind] += 1
        if kind == "other" and desc not in examples and len(examples) < _MAX_EXAMPLES:
            examples.append(desc)
        if marker in rec.data:
            marked += 1
    return {
        "packets": packets,
        "by_proto": by_proto,
        "plaintext_marker_seen": marked > 0,
        "plaintext_marker_packets": marked,
        "other_examples": examples,
    }


class Capture:
    """Run tcpdump on one interface of a namespace for the life of the block."""

    def __init__(
        self, ns: str | None, iface: str, path: Path, *, snaplen: int = SNAPLEN
    ) -> None:
        self.ns = ns
        self.iface = iface
        self.path = Path(path).resolve()
        self.snaplen = snaplen
        self._procs = ProcessSet(self.path.parent)
        self.pid: int | None = None

    def __enter__(self) -> Capture:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self, timeout: float = 5.0) -> None:
        """Start tcpdump and wait until it is listening."""
        assert self.pid is None, "capture already started"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.unlink(missing_ok=True)

        # --immediate-mode: without it libpcap hands packets over in blocks
        # and those still in the ring when tcpdump stops are lost; -Z root:
        # Debian's tcpdump would otherwise drop to a user that may not write
        # into the work directory
        proc = self._procs.start(
            f"tcpdump-{self.path.stem}",
            ["tcpdump", "-i", self.iface, "-U", "--immediate-mode", "-n",
             "-s", str(self.snaplen), "-Z", "root", "-w", str(self.path)],
            ns=self.ns,
        )  # fmt: skip
        self.pid = proc.pid
        try:
            wait_for(
                lambda: "listening on" in proc.stderr_text() or not proc.alive(),
                timeout,
                what="tcpdump",
            )
            if not proc.alive():
                raise RuntimeError(f"tcpdump failed: {proc.stderr_text().strip()}")
        except BaseException:
            self.stop()
            raise
        log.debug("capturing on %s in %s to %s", self.iface, self.ns, self.path)

    def stop(self, settle: float = 0.3, max_wait: float = 3.0) -> None:
        """Stop tcpdump by its recorded PID; the file stays for `summary()`.

        Wait first until the file has not grown for `settle` seconds (at most
        `max_wait`), so packets still in flight are written.
        """
        if self.pid is not None and self._procs.procs[0].alive():
            last = -1
            stable_since = deadline = time.monotonic()
            deadline += max_wait
            while time.monotonic() < deadline:
                size = self.path.stat().st_size if self.path.exists() else 0
                now = time.monotonic()
                if size != last:
                    last, stable_since = size, now
                elif now - stable_since >= settle:
                    break
                time.sleep(0.05)
        self._procs.stop_all()

    def summary(self, marker: bytes = MARKER) -> dict[str, Any]:
        """Return packets, by_proto, plaintext_marker_seen and other_examples."""
        return summarize_pcap(self.path, marker)
