"""A bounded flood of spoofed IKE_SA_INIT requests, for the cookie self-test.

Theory of operation: run inside a lab client namespace, this program sends
`--count` IKE_SA_INIT requests to `--target` over `--seconds` seconds (never
more, never longer), each from a forged source address drawn from
`--source-net` and with a fresh SPIi and nonce. Every request carries a valid
ECP-256 public value (one key pair, made once), so the headend has to do the
full key exchange and keep a half-open SA for it, just as in a real
flood. Packets are built whole (IPv4 and UDP headers included) and sent on a
raw socket with IP_HDRINCL; answers go to addresses nobody holds and are
never read. Usage (as root, in a namespace you made)::

    python -m control.lab.flood --target 198.18.1.1 \\
        --source-net 198.18.1.0/24 --count 2000 --seconds 6
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import random
import socket
import struct
import sys
import time

from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from control.ike.messages import (
    DhGroup,
    EncrId,
    ExchangeType,
    Header,
    HeaderFlag,
    KEPayload,
    Message,
    NoncePayload,
    PrfId,
    Proposal,
    ProtocolId,
    SAPayload,
    Transform,
    TransformType,
    push_message,
)

# hard bounds whatever the arguments say
MAX_COUNT = 20_000
MAX_SECONDS = 30.0


def ike_sa_init(public: bytes) -> bytes:
    """Return one IKE_SA_INIT request with a fresh SPIi and nonce."""
    proposal = Proposal(
        1,
        ProtocolId.IKE,
        b"",
        [
            Transform.make(TransformType.ENCR, EncrId.ENCR_AES_GCM_16, 128),
            Transform.make(TransformType.PRF, PrfId.PRF_HMAC_SHA2_256),
            Transform.make(TransformType.DH, DhGroup.ECP_256),
        ],
    )
    header = Header(
        os.urandom(8),
        bytes(8),
        0,
        0x20,
        ExchangeType.IKE_SA_INIT,
        HeaderFlag.INITIATOR,
        0,
    )
    payloads = [
        SAPayload([proposal]),
        KEPayload(DhGroup.ECP_256, public),
        NoncePayload(os.urandom(32)),
    ]
    return push_message(Message(header, payloads))


def ipv4_udp(src: str, dst: str, sport: int, dport: int, payload: bytes) -> bytes:
    """Return an IPv4 datagram carrying UDP (checksum 0: none, RFC 768)."""
    udp = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload
    header = struct.pack(
        "!BBHHHBBH4s4s",
        0x45,
        0,
        20 + len(udp),
        random.getrandbits(16),
        0,
        64,
        socket.IPPROTO_UDP,
        0,
        ipaddress.IPv4Address(src).packed,
        ipaddress.IPv4Address(dst).packed,
    )
    return _with_checksum(header) + udp


def _with_checksum(header: bytes) -> bytes:
    total = sum(struct.unpack("!10H", header))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return header[:10] + struct.pack("!H", ~total & 0xFFFF) + header[12:]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", required=True)
    parser.add_argument("--port", type=int, default=500)
    parser.add_argument("--source-net", required=True)
    parser.add_argument("--exclude", action="append", default=[])
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args(argv)
    count = max(0, min(args.count, MAX_COUNT))
    seconds = max(0.1, min(args.seconds, MAX_SECONDS))
    net = ipaddress.IPv4Network(args.source_net)
    excluded = {ipaddress.IPv4Address(a) for a in [args.target, *args.exclude]}
    sources = [str(a) for a in net.hosts() if a not in excluded]
    public = (
        ec.generate_private_key(ec.SECP256R1())
        .public_key()
        .public_bytes(Encoding.X962, PublicFormat.UncompressedPoint)[1:]
    )
    sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    sock.setsockopt(socket.IPPROTO_IP, socket.IP_HDRINCL, 1)
    start = time.monotonic()
    sent = 0
    for n in range(count):
        # pace evenly over the run; stop at the time bound regardless
        due = start + seconds * n / max(count, 1)
        now = time.monotonic()
        if now - start >= seconds:
            break
        if due > now:
            time.sleep(due - now)
        packet = ipv4_udp(
            random.choice(sources),
            args.target,
            random.randint(1024, 65535),
            args.port,
            ike_sa_init(public),
        )
        try:
            sock.sendto(packet, (args.target, 0))
            sent += 1
        except OSError:
            pass
    sock.close()
    print(f"sent {sent} spoofed IKE_SA_INIT in {time.monotonic() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
