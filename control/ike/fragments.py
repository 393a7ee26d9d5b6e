"""IKE message fragmentation (RFC 7383): reassembly limits and fragment sizes.

Theory of operation: fragmentation is negotiated in IKE_SA_INIT (both sides
send IKEV2_FRAGMENTATION_SUPPORTED) and then applies to every encrypted
message of the IKE SA. Each fragment is protected on its own, so the
responder verifies and decrypts a fragment as it arrives
(`control.ike.crypto.open_fragment`) and hands only the plaintext chunk to a
`Reassembly`, one per IKE SA and direction (requests, responses):

    empty --fragment of message M--> collecting(M, total)
    collecting --all numbers 1..total present--> message (chunks joined)
    collecting --fragment of a newer M, or a larger total--> collecting anew
    collecting --older than REASSEMBLY_TIMEOUT, or past the limits--> empty

A fragment with a smaller total than the one being collected is dropped
(RFC 7383 2.6: a sender only ever shrinks its fragments, which raises the
total). The limits bound what an authenticated but hostile peer can make us
hold: MAX_FRAGMENTS fragments and MAX_MESSAGE plaintext bytes per message.

Our own fragment size is `ResponderConfig.fragment_size`, a whole IP
datagram as strongSwan and the RFC count it (1280 by default). A peer that
fragments smaller than that (the Windows client uses 576-byte IPv4
datagrams) gets fragments no larger than its own, but never below
MIN_FRAGMENT_SIZE.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = [
    "DEFAULT_FRAGMENT_SIZE",
    "MAX_FRAGMENTS",
    "MAX_MESSAGE",
    "MIN_FRAGMENT_SIZE",
    "REASSEMBLY_TIMEOUT",
    "Reassembly",
    "datagram_budget",
]

# RFC 7383 2.5.1: 1280 octets fit any IPv6 path and most IPv4 ones
DEFAULT_FRAGMENT_SIZE = 1280
# RFC 791: every IPv4 host takes 576-octet datagrams; the Windows client's size
MIN_FRAGMENT_SIZE = 576
MAX_FRAGMENT_SIZE = 65535
MAX_FRAGMENTS = 64
MAX_MESSAGE = 64 * 1024
REASSEMBLY_TIMEOUT = 30.0
UDP_HEADER = 8
NON_ESP_MARKER = 4


def datagram_budget(fragment_size: int, local_ip: str) -> int:
    """Return the IKE bytes one UDP datagram may carry in `fragment_size`."""
    ip_header = 40 if ":" in local_ip else 20
    # the marker is only there on the NAT-T port; count it always, to be safe
    return fragment_size - ip_header - UDP_HEADER - NON_ESP_MARKER


def ip_size(ike_bytes: int, local_ip: str) -> int:
    """Return the IP datagram size of an IKE message of `ike_bytes`, marker counted."""
    return ike_bytes - datagram_budget(0, local_ip)


@dataclass
class Reassembly:
    """The fragments of one message being collected (RFC 7383 2.6)."""

    message_id: int = -1
    total: int = 0
    first_payload: int = 0
    started: float = 0.0
    chunks: dict[int, bytes] = field(default_factory=dict, repr=False)

    @property
    def size(self) -> int:
        return sum(len(c) for c in self.chunks.values())

    def expired(self, now: float) -> bool:
        return bool(self.chunks) and now - self.started >= REASSEMBLY_TIMEOUT

    def clear(self) -> None:
        self.message_id, self.total, self.first_payload = -1, 0, 0
        self.chunks = {}

    def add(
        self,
        message_id: int,
        number: int,
        total: int,
        first_payload: int,
        chunk: bytes,
        now: float,
    ) -> tuple[int, bytes] | None:
        """Store a verified fragment; return (first payload, plaintext) when whole.

        Raises ValueError for a fragment that must be dropped (limits, an
        outdated total); the stored fragments then stay as they are, except
        when a limit is broken, which forgets the message.
        """
        if self.expired(now):
            self.clear()
        if total > MAX_FRAGMENTS:
            raise ValueError(f"{total} fragments exceed {MAX_FRAGMENTS}")
        if message_id != self.message_id or total > self.total:
            # RFC 7383 2.6: a new message, or the sender shrank its fragments
            # and resent them all: start over
            self.clear()
            self.message_id, self.total, self.started = message_id, total, now
        elif total < self.total:
            raise ValueError(f"total {total} below the {self.total} collected")
        if number in self.chunks:
            return None
        if self.size + len(chunk) > MAX_MESSAGE:
            self.clear()
            raise ValueError(f"message grows beyond {MAX_MESSAGE} bytes")
        self.chunks[number] = chunk
        if number == 1:
            self.first_payload = first_payload
        if len(self.chunks) < self.total:
            return None
        out = self.first_payload, b"".join(self.chunks[n] for n in range(1, total + 1))
        self.clear()
        return out
