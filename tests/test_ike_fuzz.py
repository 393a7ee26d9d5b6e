"""Fuzzing the IKEv2 decoder and the responder's receive path (hypothesis).

Theory of operation: the decoder must raise nothing but `DecodeError` on any
input (and the responder must swallow even that, counting no internal
error). Three generators feed it: random bytes as each payload's body, chains
of payloads whose generic headers are right but whose bodies are random, and
valid messages with random bytes overwritten. Every input that once broke
the decoder is kept as one hex line in `tests/corpus/ike_decoder/` and is
replayed by `test_corpus_input_raises_only_decode_error_*`; add new finds
there (the failing example hypothesis prints, in hex). Long hunts:
``ESPGATE_FUZZ_EXAMPLES=20000 pytest tests/test_ike_fuzz.py``.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from control.ike.messages import (
    PAYLOAD_CLASSES,
    Buffer,
    DecodeError,
    PayloadType,
    pull_message,
    pull_payloads,
)
from tests.ikeclient import IkeClient
from tests.test_ike_responder import exchange, make_responder

CORPUS = Path(__file__).with_name("corpus") / "ike_decoder"
PAYLOAD_TYPES = sorted(PAYLOAD_CLASSES) + [PayloadType.SK, PayloadType.SKF, 1, 255]
# ESPGATE_FUZZ_EXAMPLES=20000 for a long hunt; the suite's default is quick
FUZZ = settings(
    max_examples=int(os.environ.get("ESPGATE_FUZZ_EXAMPLES", "400")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


def corpus() -> list[tuple[str, bytes]]:
    """Return (name, bytes) for every line of every corpus file."""
    out = []
    for path in sorted(CORPUS.glob("*.hex")):
        for n, line in enumerate(path.read_text().splitlines(), start=1):
            line = line.split("#", 1)[0].strip()
            if line:
                out.append((f"{path.stem}:{n}", bytes.fromhex(line)))
    return out


def decode_all_ways(data: bytes) -> None:
    """Feed `data` to every decoder entry point; only DecodeError may escape."""
    for entry in [pull_message] + [
        (lambda d, t=t: pull_payloads(d, t)) for t in PAYLOAD_TYPES
    ]:
        try:
            entry(data)
        except DecodeError:
            pass
    for cls in PAYLOAD_CLASSES.values():
        try:
            cls.pull_body(Buffer(data))
        except DecodeError:
            pass


def chain(items: list[tuple[int, bytes]], last_next: int = 0) -> bytes:
    """Return a payload chain with correct generic headers around `items`."""
    out = b""
    for i, (_, body) in enumerate(items):
        next_type = items[i + 1][0] if i + 1 < len(items) else last_next
        out += struct.pack("!BBH", next_type, 0, 4 + len(body)) + body
    return out


@pytest.mark.parametrize("name,data", corpus(), ids=[n for n, _ in corpus()])
def test_corpus_input_raises_only_decode_error(name: str, data: bytes) -> None:
    decode_all_ways(data)


def test_corpus_present() -> None:
    assert corpus(), f"regression corpus missing under {CORPUS}"


@FUZZ
@given(st.binary(max_size=300))
def test_payload_body_on_random_bytes_raises_only_decode_error(data: bytes) -> None:
    decode_all_ways(data)


@FUZZ
@given(
    st.lists(
        st.tuples(st.sampled_from(PAYLOAD_TYPES), st.binary(max_size=80)),
        min_size=1,
        max_size=6,
    )
)
def test_payload_chain_with_random_bodies_raises_only_decode_error(
    items: list[tuple[int, bytes]],
) -> None:
    data = chain(items)
    try:
        pull_payloads(data, items[0][0])
    except DecodeError:
        pass


INIT_REQUEST = IkeClient().init_request()


@FUZZ
@given(st.lists(st.tuples(st.integers(0, 4000), st.binary(min_size=1, max_size=8))))
def test_responder_on_mutated_init_counts_no_internal_error(
    edits: list[tuple[int, bytes]],
) -> None:
    r = make_responder()
    data = bytearray(INIT_REQUEST)
    for position, chunk in edits:
        at = position % len(data)
        data[at : at + len(chunk)] = chunk
    exchange(r, bytes(data))
    assert r.counters["internal_error"] == 0


@FUZZ
@given(st.binary(max_size=200))
def test_responder_on_random_datagram_counts_no_internal_error(data: bytes) -> None:
    r = make_responder()
    # a real IKE header so the bytes reach the payload parsers
    header = INIT_REQUEST[:24] + struct.pack("!I", 28 + len(data))
    exchange(r, header + data)
    assert r.counters["internal_error"] == 0
