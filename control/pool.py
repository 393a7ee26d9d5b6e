"""Local IPv4 address pools for config mode.

A pool hands out the lowest free address of its range and remembers which
session holds it.  An identity that comes back while it still holds an
address (a reconnect before the old session was torn down) gets a fresh one;
INITIAL_CONTACT handling, which frees the old lease first, lives above this.
"""

from __future__ import annotations

import ipaddress
import logging

from control.config import PoolConfig

log = logging.getLogger("espgate.pool")


class AddressPool:
    """Allocate and release addresses from one configured range."""

    def __init__(self, config: PoolConfig):
        self.name = config.name
        self.first = int(config.first)
        self.last = int(config.last)
        self._leases: dict[int, str] = {}
        self._next = self.first

    @property
    def size(self) -> int:
        return self.last - self.first + 1

    @property
    def in_use(self) -> int:
        return len(self._leases)

    def allocate(self, session_id: str) -> ipaddress.IPv4Address | None:
        """Lease a free address to ``session_id``; None when the pool is empty."""
        if len(self._leases) >= self.size:
            log.warning("pool %s exhausted (%d addresses)", self.name, self.size)
            return None
        # round-robin from the last allocation, so a just-released address is
        # not handed straight to the next client
        candidate = self._next
        while candidate in self._leases:
            candidate = self.first if candidate >= self.last else candidate + 1
        self._leases[candidate] = session_id
        self._next = self.first if candidate >= self.last else candidate + 1
        address = ipaddress.IPv4Address(candidate)
        log.debug("pool %s: %s -> %s", self.name, address, session_id)
        return address

    def release(self, address: ipaddress.IPv4Address) -> bool:
        """Return ``address`` to the pool; False if it was not leased."""
        holder = self._leases.pop(int(address), None)
        if holder is None:
            return False
        log.debug("pool %s: %s released by %s", self.name, address, holder)
        return True

    def holder(self, address: ipaddress.IPv4Address) -> str | None:
        return self._leases.get(int(address))
