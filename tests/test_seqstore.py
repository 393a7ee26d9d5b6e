"""Sequence-number reservation: the store, the reserver and the engine's limit.

The invariant under test everywhere: a number the engine sends is below the end
that was durable when it was sent, so a resume at the stored end never repeats
an (SPI, sequence number) pair, hence never an AES-GCM nonce under one key.
"""

from __future__ import annotations

import random
import socket
import stat
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from control.seqstore import (
    SEQ_MAX_32,
    SeqReserver,
    SeqStore,
    SnapshotStore,
    UntrustedState,
)
from fastpath import (
    BATCH_HEADROOM,
    BATCH_TAILROOM,
    Engine,
    SAHandle,
    SAParams,
    encrypt_batch,
)

SPI = 0x0C0D0001


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FakeEngine:
    """The engine's per-SA sequence allocation, with its lock, in Python."""

    def __init__(self, store: SeqStore | SnapshotStore) -> None:
        self.lock = threading.Lock()
        self.store = store
        self.next_seq: dict[int, int] = {}
        self.limit: dict[int, int] = {}
        self.sent: list[tuple[int, int]] = []
        self.violations: list[tuple[int, int, int | None]] = []
        self.blocked = 0

    def set_limit(self, spi: int, limit: int) -> None:
        with self.lock:
            self.limit[spi] = limit

    def take(self, spi: int) -> int | None:
        with self.lock:
            seq = self.next_seq[spi]
            if seq > self.limit[spi]:
                self.blocked += 1
                return None
            self.next_seq[spi] = seq + 1
            # what a power cut right now would leave on disk
            durable = self.store.reserved(spi)
            if durable is None or seq >= durable:
                self.violations.append((spi, seq, durable))
            self.sent.append((spi, seq))
            return seq


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SeqStore]:
    s = SeqStore(tmp_path / "state" / "state.sqlite")
    yield s
    s.close()


def _open(reserver: SeqReserver, engine: FakeEngine, spi: int, **kw: bool) -> int:
    start = reserver.open_sa(spi, **kw)
    engine.next_seq[spi] = start
    engine.limit[spi] = reserver.limit(spi)
    return start


# ---------------------------------------------------------------- store


def test_reserve_persists_across_reopen(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite"
    s = SeqStore(path)
    assert s.reserve(SPI, 5000) == 5000
    s.close()
    s = SeqStore(path)
    assert s.reserved(SPI) == 5000
    assert s.reserved(SPI + 1) is None
    s.close()


def test_reserve_lower_end_keeps_higher(store: SeqStore) -> None:
    store.reserve(SPI, 9000)
    assert store.reserve(SPI, 100) == 9000
    assert store.marks() == {SPI: 9000}


def test_reserve_esn_top_bit_round_trips(store: SeqStore) -> None:
    end = (1 << 63) + 12345
    store.reserve(SPI, end)
    assert store.reserved(SPI) == end


def test_forget_removes_mark(store: SeqStore) -> None:
    store.reserve(SPI, 10)
    store.forget(SPI)
    assert store.reserved(SPI) is None


def test_store_file_mode_owner_only(store: SeqStore) -> None:
    assert stat.S_IMODE(store.path.stat().st_mode) == 0o600
    assert stat.S_IMODE(store.path.parent.stat().st_mode) == 0o700
    for suffix in ("-wal", "-shm"):
        side = Path(f"{store.path}{suffix}")
        if side.exists():
            assert stat.S_IMODE(side.stat().st_mode) & 0o077 == 0


def test_store_journal_is_wal_full_sync(store: SeqStore) -> None:
    db = store._db
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    # 2 = FULL: the WAL is fsync'ed at every commit
    assert db.execute("PRAGMA synchronous").fetchone()[0] == 2


def test_delete_record_wipes_bytes(store: SeqStore) -> None:
    secret = bytes.fromhex("5ec12e7b") * 8
    store.put_record("ike", "s1", 1, secret)
    assert store.records("ike") == {"s1": (1, secret)}
    store.delete_record("ike", "s1")
    store._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    assert store.records("ike") == {}
    assert secret not in store.path.read_bytes()


# ---------------------------------------------------------------- reserver


def test_open_sa_new_starts_at_one_with_min_block(store: SeqStore) -> None:
    r = SeqReserver(store, lambda spi, limit: None, min_block=1024)
    assert r.open_sa(SPI) == 1
    assert store.reserved(SPI) == 1 + 2 * 1024
    assert r.limit(SPI) == 2 * 1024


def test_resume_starts_at_stored_end(store: SeqStore) -> None:
    store.reserve(SPI, 777_000)
    r = SeqReserver(store, lambda spi, limit: None)
    assert r.open_sa(SPI, resume=True) == 777_000
    assert (store.reserved(SPI) or 0) > 777_000
    assert r.counters["sa_resumed"] == 1


def test_resume_without_mark_untrusted(store: SeqStore) -> None:
    r = SeqReserver(store, lambda spi, limit: None)
    with pytest.raises(UntrustedState):
        r.open_sa(SPI, resume=True)


def test_tick_limit_raised_only_after_commit(store: SeqStore) -> None:
    seen: list[tuple[int, int | None]] = []

    def set_limit(spi: int, limit: int) -> None:
        seen.append((limit, store.reserved(spi)))

    clock = FakeClock()
    r = SeqReserver(store, set_limit, min_block=100, clock=clock)
    r.open_sa(SPI)
    for seq in range(1, 2000, 37):
        clock.now += 0.01
        r.tick(SPI, seq)
    assert seen
    for limit, durable in seen:
        assert durable is not None and limit < durable


def test_tick_block_boundary(store: SeqStore) -> None:
    limits: list[int] = []
    clock = FakeClock()
    r = SeqReserver(
        store,
        lambda s, lim: limits.append(lim),
        min_block=100,
        max_block=100,
        clock=clock,
    )
    r.open_sa(SPI)
    end = store.reserved(SPI)
    assert end == 201
    # exactly one block left: no raise yet
    r.tick(SPI, end - 100)
    assert limits == []
    # one number under a block left: raise to next_seq + 2 blocks
    r.tick(SPI, end - 99)
    assert limits == [end - 99 + 200 - 1]
    assert store.reserved(SPI) == end - 99 + 200


def test_tick_at_limit_raises(store: SeqStore) -> None:
    limits: list[int] = []
    r = SeqReserver(
        store, lambda s, lim: limits.append(lim), min_block=64, clock=FakeClock()
    )
    r.open_sa(SPI)
    r.tick(SPI, r.limit(SPI) + 1)
    assert limits and limits[-1] > 129


def test_block_size_adapts_to_rate(store: SeqStore) -> None:
    clock = FakeClock()
    r = SeqReserver(
        store,
        lambda s, lim: None,
        horizon=1.0,
        min_block=1024,
        max_block=1 << 22,
        clock=clock,
    )
    r.open_sa(SPI)
    seq = 1
    # 500 kpps for a second in 100 ms ticks
    for _ in range(10):
        clock.now += 0.1
        seq += 50_000
        r.tick(SPI, seq)
    assert r._marks[SPI].block == pytest.approx(500_000, rel=0.01)
    assert (r.reserved_end(SPI) or 0) - seq >= 500_000
    # an idle SA decays back to the minimum block
    for _ in range(200):
        clock.now += 0.1
        r.tick(SPI, seq)
    assert r._marks[SPI].block == 1024


def test_block_size_capped_at_max(store: SeqStore) -> None:
    clock = FakeClock()
    r = SeqReserver(
        store, lambda s, lim: None, min_block=10, max_block=5000, clock=clock
    )
    r.open_sa(SPI)
    clock.now += 0.001
    r.tick(SPI, 10_000)
    assert r._marks[SPI].block == 5000
    assert store.reserved(SPI) == 10_000 + 10_000


def test_exhaustion_32bit_event_and_no_wrap(store: SeqStore) -> None:
    store.reserve(SPI, SEQ_MAX_32 - 3000)
    limits: list[int] = []
    r = SeqReserver(
        store, lambda s, lim: limits.append(lim), min_block=1024, clock=FakeClock()
    )
    start = r.open_sa(SPI, resume=True)
    r.tick(SPI, start + 2500)
    events = r.events()
    assert [e.spi for e in events] == [SPI]
    assert r.events() == []
    # RFC 4303 section 3.3.3: never past 2^32 - 1 without ESN
    assert limits[-1] == SEQ_MAX_32
    assert store.reserved(SPI) == SEQ_MAX_32 + 1
    # a mark at the very end cannot be resumed: rekey instead
    r2 = SeqReserver(store, lambda s, lim: None, clock=FakeClock())
    with pytest.raises(UntrustedState):
        r2.open_sa(SPI, resume=True)


def test_exhaustion_esn_soft_limit(store: SeqStore) -> None:
    limits: list[int] = []
    r = SeqReserver(
        store,
        lambda s, lim: limits.append(lim),
        min_block=1024,
        esn_soft_limit=10_000,
        rekey_at=0.5,
        clock=FakeClock(),
    )
    r.open_sa(SPI, esn=True)
    r.tick(SPI, 4000)
    assert r.events() == []
    r.tick(SPI, 9500)
    assert len(r.events()) == 1
    assert limits[-1] == 10_000


def test_concurrent_workers_never_send_unreserved(tmp_path: Path) -> None:
    store = SeqStore(tmp_path / "c.sqlite")
    engine = FakeEngine(store)
    r = SeqReserver(store, engine.set_limit, min_block=64, max_block=512)
    spis = [SPI, SPI + 1, SPI + 2]
    for spi in spis:
        _open(r, engine, spi)
    stop = threading.Event()

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        done = 0
        while done < 3000:
            # a blocked take is a drop in the engine; here the worker retries
            if engine.take(rng.choice(spis)) is not None:
                done += 1
            else:
                time.sleep(0)

    def reserver() -> None:
        while not stop.is_set():
            r.tick_all(lambda spi: engine.next_seq[spi])

    workers = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    ticker = threading.Thread(target=reserver)
    ticker.start()
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    stop.set()
    ticker.join()
    store.close()
    assert engine.violations == []
    assert len(engine.sent) == len(set(engine.sent))
    assert len(engine.sent) == 4 * 3000


class PowerCut(Exception):
    pass


def test_power_cut_never_reuses_numbers(tmp_path: Path) -> None:
    rng = random.Random(4)
    snap = SnapshotStore(tmp_path / "p.sqlite")
    sent: set[int] = set()
    cuts_between_write_and_sync = 0
    for cycle in range(30):
        engine = FakeEngine(snap)
        r = SeqReserver(snap, engine.set_limit, min_block=16, max_block=256)
        _open(r, engine, SPI, resume=cycle > 0)
        cut_at = len(sent) + rng.randrange(50, 2000)
        between = rng.random() < 0.5

        def before_sync(
            spi: int, end: int, between: bool = between, cut_at: int = cut_at
        ) -> None:
            # the new end is written but not fsync'ed: the power goes now
            if between and len(sent) >= cut_at:
                raise PowerCut

        snap.before_sync = before_sync
        try:
            while len(sent) < cut_at + 5000:
                seq = engine.take(SPI)
                if seq is not None:
                    assert seq not in sent, f"cycle {cycle} reused {seq}"
                    sent.add(seq)
                if len(sent) >= cut_at and not between:
                    break
                r.tick(SPI, engine.next_seq[SPI])
        except PowerCut:
            cuts_between_write_and_sync += 1
        snap.before_sync = None
        assert engine.violations == []
        # only fsync'ed ends survive; a real SQLite file is rebuilt from them
        real = snap.cut()
        assert (real.reserved(SPI) or 0) > max(sent)
        real.close()
    assert cuts_between_write_and_sync > 5
    assert len(sent) > 10_000


# ---------------------------------------------------------------- engine


def _params(**kw: object) -> SAParams:
    base: dict[str, object] = {
        "spi": SPI,
        "inbound": False,
        "key": bytes(16),
        "salt": bytes(4),
        "session": 3,
        "peer": ("127.0.0.1", 4500),
    }
    base.update(kw)
    return SAParams(**base)  # type: ignore[arg-type]


def test_saparams_bad_seq_limit_rejected() -> None:
    with pytest.raises(ValueError):
        _params(seq_limit=-1)
    with pytest.raises(ValueError):
        _params(seq_limit=SEQ_MAX_32 + 1)


def test_encrypt_batch_stops_at_seq_limit() -> None:
    import numpy as np

    handle = SAHandle(_params(seq_limit=5), backend="openssl")
    assert handle.seq_limit == 5
    rows = np.zeros((8, BATCH_HEADROOM + 64 + BATCH_TAILROOM), dtype=np.uint8)
    rows[:, BATCH_HEADROOM] = 0x45
    lengths = np.full(8, 64, dtype=np.int32)
    assert encrypt_batch(handle, rows, lengths) == 5
    assert handle.next_seq == 6
    handle.set_seq_limit(SEQ_MAX_32 + 50)
    assert handle.seq_limit == SEQ_MAX_32


def _ipv4(ident: int) -> bytes:
    head = struct.pack(
        "!BBHHHBBH4s4s",
        0x45,
        0,
        28,
        ident,
        0,
        64,
        17,
        0,
        socket.inet_aton("198.19.9.1"),
        socket.inet_aton("198.19.8.1"),
    )
    return head + struct.pack("!HHHH", 1000, 2000, 8, 0)


def test_engine_set_seq_limit_blocks_then_releases() -> None:
    peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    peer.bind(("127.0.0.1", 0))
    peer.settimeout(10.0)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    udp.setblocking(False)
    tun_engine, tun_test = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    tun_engine.setblocking(False)
    engine = Engine(udp.fileno(), batch=8, crypto="openssl")
    try:
        engine.add_session(3, tun_engine.fileno(), vnet_hdr=False)
        engine.install_sa(_params(peer=peer.getsockname(), seq_limit=3))
        engine.start(lambda data, addr: None)
        for i in range(3):
            tun_test.send(_ipv4(i))
        seqs = [struct.unpack("!II", peer.recv(2048)[:8])[1] for _ in range(3)]
        assert seqs == [1, 2, 3]
        # the fourth packet meets the limit and is counted, not sent
        tun_test.send(_ipv4(3))
        for _ in range(200):
            if engine.sa_counters(SPI, False)["seq_blocked"]:
                break
            threading.Event().wait(0.01)
        counters = engine.sa_counters(SPI, False)
        assert counters["seq_blocked"] == 1
        assert counters["seq_exhausted"] == 0
        assert counters["seq_limit"] == 3
        engine.set_seq_limit(SPI, 10)
        tun_test.send(_ipv4(4))
        assert struct.unpack("!II", peer.recv(2048)[:8])[1] == 4
        with pytest.raises(KeyError):
            engine.set_seq_limit(SPI + 1, 10)
    finally:
        engine.stop()
        for s in (peer, udp, tun_engine, tun_test):
            s.close()


def test_reservation_overhead_unblocked_with_reserver() -> None:
    from bench.packets import reservation_overhead

    out = reservation_overhead(rounds=2, seconds=0.1, warmup=0.1, size=256)
    # the reserver keeps ahead of a core sealing flat out
    assert out["blocked_packets"] == 0
    assert out["store_commits"] >= 2
    assert out["pps_on"] > 0 and out["pps_off"] > 0
