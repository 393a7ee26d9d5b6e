"""Local address pools for config mode, with leases kept across restarts.

A pool hands out the next free address of its range round-robin and
remembers which session (and identity) holds it. IPv4 pools are ranges;
IPv6 pools are a prefix cut into per-client prefixes of `client_prefix`
bits, of which the client gets the first address; with /128 clients the
prefix's all-zero address (the subnet-router anycast address) is left out,
so a /126 pool handing out /128s serves 3 clients.

Allocation order, for a session of identity I:

1. I's own lease found in the store at start (a crash left its session row);
2. I's last address, released since and still free;
3. a free address no identity remembers (never used, or forgotten), lowest
   first after a restart, round-robin from the last one within a run;
4. a free address another identity remembers, least recently released first
   (that identity's memory of it ends);
5. a lease held from before a restart for an identity that has not come
   back, oldest first.

With a `LeaseStore` (SQLite under the daemon's state directory) every lease
and every release is written through, and the order above is rebuilt from it
at start (rows in write order), so it holds across SIGTERM and kill -9
restarts alike: a released lease stays as a row with no session, naming its
last holder; a release with no identity deletes the row (the address is
forgotten). Only the last address of each identity is remembered. An identity
that comes back while it still holds an address in a live session gets a
fresh one; INITIAL_CONTACT handling, which frees the old lease first, lives
above this. The lease file maps identities to addresses, so it (and SQLite's
-wal and -shm beside it) is readable by its owner only.

Config checking makes sure every pool a profile or local policy names
exists with the right IP version; a pool named by RADIUS authorization
(ipsec:addr-pool) is only known at run time. `find_pool` looks a name up,
counts each miss in `UNKNOWN_POOLS` and warns once per name.
"""

from __future__ import annotations

import collections
import ipaddress
import logging
import os
import sqlite3
import time
from collections.abc import Mapping
from pathlib import Path

from control.config import PoolConfig

log = logging.getLogger("espgate.pool")

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
# lookups of a pool that is not configured (or of the other IP version), by
# name; at most UNKNOWN_NAMES names, the rest counted under OTHER_NAME
UNKNOWN_POOLS: collections.Counter[str] = collections.Counter()
UNKNOWN_NAMES = 64
OTHER_NAME = "(other)"
LEASE_FILES = ("", "-wal", "-shm", "-journal")


class LeaseStore:
    """Leases of all pools in one SQLite file; every change is committed."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        # the file and SQLite's companions are created 0600 (SQLite gives
        # -wal and -shm the mode of the database file); older files are fixed
        old = os.umask(0o177)
        try:
            os.close(os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600))
            self.db = sqlite3.connect(str(self.path))
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute(
                "CREATE TABLE IF NOT EXISTS leases (pool TEXT, address TEXT, "
                "session TEXT, identity TEXT, updated REAL, "
                "PRIMARY KEY (pool, address))"
            )
            self.db.commit()
        finally:
            os.umask(old)
        for suffix in LEASE_FILES:
            companion = self.path.with_name(self.path.name + suffix)
            if companion.exists():
                os.chmod(companion, 0o600)

    def load(self, pool: str) -> list[tuple[str, str, str]]:
        """Return (address, session, identity) of the leases of `pool`, oldest first."""
        rows = self.db.execute(
            "SELECT address, session, identity FROM leases WHERE pool = ? "
            "ORDER BY updated, rowid",
            (pool,),
        )
        return [(str(a), str(s), str(i)) for a, s, i in rows]

    def put(self, pool: str, address: str, session: str, identity: str) -> None:
        self.db.execute(
            "INSERT OR REPLACE INTO leases VALUES (?, ?, ?, ?, ?)",
            (pool, address, session, identity, time.time()),
        )
        self.db.commit()

    def free(self, pool: str, address: str, identity: str) -> None:
        """Mark a lease released, keeping its last holder's identity."""
        self.put(pool, address, "", identity)

    def delete(self, pool: str, address: str) -> None:
        self.db.execute(
            "DELETE FROM leases WHERE pool = ? AND address = ?", (pool, address)
        )
        self.db.commit()

    def close(self) -> None:
        self.db.close()


def find_pool(
    pools: Mapping[str, AddressPool], name: str, version: int
) -> AddressPool | None:
    """Return the IPv``version`` pool called ``name``; count and warn if none."""
    pool = pools.get(name)
    if pool is not None and pool.version == version:
        return pool
    key = name
    if name not in UNKNOWN_POOLS and len(UNKNOWN_POOLS) >= UNKNOWN_NAMES:
        key = OTHER_NAME
    UNKNOWN_POOLS[key] += 1
    if UNKNOWN_POOLS[key] == 1:
        what = "not configured" if pool is None else f"not an IPv{version} pool"
        log.warning("pool %.64r named by authorization is %s; sessions that "
                    "need it get no address", name, what)  # fmt: skip
    return None


class AddressPool:
    """Allocate and release addresses from one configured range or prefix."""

    def __init__(self, config: PoolConfig, store: LeaseStore | None = None):
        self.name = config.name
        self.version = config.first.version
        self.step = 1 << (128 - config.client_prefix) if self.version == 6 else 1
        self.first = int(config.first)
        self.last = int(config.last)
        self.client_prefix = config.client_prefix
        self.store = store
        self._leases: dict[int, str] = {}
        self._identity: dict[int, str] = {}
        # leases found in the store at start: address -> identity
        self._held: dict[int, str] = {}
        # free addresses and their last holder, both ways (sticky addresses)
        self._last: dict[int, str] = {}
        self._last_of: dict[str, int] = {}
        self._next = self.first
        if store is not None:
            for text, session, identity in store.load(self.name):
                address = int(ipaddress.ip_address(text))
                if not self.first <= address <= self.last:
                    continue
                if session:
                    self._held[address] = identity
                elif identity:
                    self._remember(address, identity)
            if self._held:
                log.info("pool %s: %d lease(s) kept from before", self.name,
                         len(self._held))  # fmt: skip

    @property
    def size(self) -> int:
        return (self.last - self.first) // self.step + 1

    @property
    def in_use(self) -> int:
        return len(self._leases) + len(self._held)

    def allocate(self, session_id: str, identity: str = "") -> Address | None:
        """Lease a free address to ``session_id``; None when the pool is empty."""
        # the identity's own lease from before a restart
        for address, holder in list(self._held.items()):
            if identity and holder == identity:
                del self._held[address]
                return self._lease(address, session_id, identity)
        # its last address, released since and still free
        last = self._last_of.get(identity) if identity else None
        if last is not None:
            return self._lease(last, session_id, identity)
        # an address nobody remembers; round-robin from the last one handed
        # out, so a forgotten address is not handed straight to the next client
        unremembered = self.size - len(self._leases) - len(self._held) - len(self._last)
        if unremembered > 0:
            candidate = self._next
            while (
                candidate in self._leases
                or candidate in self._held
                or candidate in self._last
            ):
                candidate = self._after(candidate)
            self._next = self._after(candidate)
            return self._lease(candidate, session_id, identity)
        # someone else's free address, least recently released first
        if self._last:
            return self._lease(next(iter(self._last)), session_id, identity)
        # reclaim the oldest lease kept for an identity that did not return
        if self._held:
            address = next(iter(self._held))
            del self._held[address]
            return self._lease(address, session_id, identity)
        log.warning("pool %s exhausted (%d addresses)", self.name, self.size)
        return None

    def _after(self, value: int) -> int:
        return self.first if value >= self.last else value + self.step

    def _remember(self, value: int, identity: str) -> None:
        old = self._last_of.pop(identity, None)
        if old is not None:
            self._last.pop(old, None)
        self._last[value] = identity
        self._last_of[identity] = value

    def _forget_last(self, value: int) -> None:
        who = self._last.pop(value, None)
        if who is not None and self._last_of.get(who) == value:
            del self._last_of[who]

    def _lease(self, value: int, session_id: str, identity: str) -> Address:
        self._forget_last(value)
        self._leases[value] = session_id
        self._identity[value] = identity
        address = ipaddress.ip_address(value)
        if self.store is not None:
            self.store.put(self.name, str(address), session_id, identity)
        log.debug("pool %s: %s -> %s", self.name, address, session_id)
        return address

    def claim(self, address: Address, session_id: str) -> bool:
        """Lease ``address`` to a session resumed from stored state.

        False when another live session holds it or it is not in the range.
        """
        value = int(address)
        if not self.first <= value <= self.last:
            return False
        holder = self._leases.get(value)
        if holder not in (None, session_id):
            return False
        identity = self._held.pop(value, "")
        self._lease(value, session_id, identity)
        return True

    def release(self, address: Address) -> bool:
        """Return ``address`` to the pool; False if it was not leased."""
        holder = self._leases.pop(int(address), None)
        if holder is None:
            return False
        identity = self._identity.pop(int(address), "")
        if identity:
            self._remember(int(address), identity)
        if self.store is not None:
            if identity:
                self.store.free(self.name, str(address), identity)
            else:
                self.store.delete(self.name, str(address))
        log.debug("pool %s: %s released by %s", self.name, address, holder)
        return True

    def holder(self, address: Address) -> str | None:
        return self._leases.get(int(address))
