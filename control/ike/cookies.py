"""Stateless COOKIE challenges and half-open limits for IKE_SA_INIT (RFC 7296 2.6).

Theory of operation: every IKE_SA_INIT that would create a half-open SA costs
the responder a key exchange and state for `half_open_timeout` seconds, and
its source address may be forged. `InitGuard.admit` is asked before that work
is done and answers one of three verdicts:

    ACCEPT    go on: no challenge needed, or the request returned a valid cookie
    CHALLENGE answer with a COOKIE notify only (nothing is kept)
    DROP      say nothing (per-source limit reached, or a wrong cookie)

Cookies are demanded once the number of half-open SAs reaches
`cookie_threshold` (0 demands them always). A cookie is

    version (4 bytes) | SHA-256(secret | Ni | IPi | SPIi)

so only a peer that receives our answer at its claimed address can return
it. The secret is replaced every `secret_lifetime` seconds; cookies made with
the previous secret stay valid, so a client that was challenged just before
a change still gets in. After the cookie (or without one when none is
needed), a source address may hold at most `per_source` half-open SAs.
Nothing here reads a clock or the network: `now` and the counts come in.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import ipaddress
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass

from control.ike.messages import (
    Message,
    NoncePayload,
    NotifyPayload,
    NotifyType,
)

__all__ = ["COOKIE_LENGTH", "GuardConfig", "InitGuard", "Verdict"]

logger = logging.getLogger("espgate.ike.cookies")

# 4-byte secret version and a 32-byte digest; RFC 7296 2.6 allows 1..64 bytes
COOKIE_LENGTH = 36


class Verdict(enum.Enum):
    ACCEPT = "accept"
    CHALLENGE = "challenge"
    DROP = "drop"


@dataclass(frozen=True)
class GuardConfig:
    """Limits on half-open IKE SAs; see the module docstring."""

    # half-open SAs from which on cookies are demanded; 0: always
    cookie_threshold: int = 50
    # half-open SAs one source address may hold; 0: no limit
    per_source: int = 10
    # seconds a cookie secret is used before it is replaced
    secret_lifetime: float = 120.0


class InitGuard:
    """Decide which IKE_SA_INIT requests may create a half-open SA."""

    def __init__(
        self, config: GuardConfig, rng: Callable[[int], bytes] = os.urandom
    ) -> None:
        self.config = config
        self.rng = rng
        self._version = 0
        self._secret = rng(32)
        self._previous: bytes | None = None
        self._changed_at: float | None = None

    def admit(
        self,
        message: Message,
        remote_ip: str,
        half_open: int,
        from_source: int,
        now: float,
    ) -> Verdict:
        """Judge one IKE_SA_INIT request; counts are of existing half-open SAs."""
        self._rotate(now)
        cookie = _first_cookie(message)
        if half_open >= self.config.cookie_threshold or cookie is not None:
            if cookie is None:
                return Verdict.CHALLENGE
            # RFC 7296 2.6: a cookie we cannot verify (older secret, other
            # nonce) gets a fresh challenge rather than silence, so a client
            # whose cookie aged out recovers at once
            if not self._valid(cookie, message, remote_ip):
                return Verdict.CHALLENGE
        if self.config.per_source and from_source >= self.config.per_source:
            return Verdict.DROP
        return Verdict.ACCEPT

    def cookie_for(self, message: Message, remote_ip: str) -> bytes:
        """Return the cookie that `message` from `remote_ip` must bring back."""
        return self._make(self._version, self._secret, message, remote_ip)

    def _rotate(self, now: float) -> None:
        if self._changed_at is None:
            self._changed_at = now
            return
        if now - self._changed_at < self.config.secret_lifetime:
            return
        self._previous = self._secret
        self._secret = self.rng(32)
        self._version = (self._version + 1) & 0xFFFFFFFF
        self._changed_at = now
        logger.debug("cookie secret replaced, version %d", self._version)

    def _valid(self, cookie: bytes, message: Message, remote_ip: str) -> bool:
        if len(cookie) != COOKIE_LENGTH:
            return False
        version = int.from_bytes(cookie[:4], "big")
        if version == self._version:
            secret = self._secret
        elif version == (self._version - 1) & 0xFFFFFFFF and self._previous:
            secret = self._previous
        else:
            return False
        expected = self._make(version, secret, message, remote_ip)
        return hmac.compare_digest(cookie, expected)

    @staticmethod
    def _make(version: int, secret: bytes, message: Message, remote_ip: str) -> bytes:
        # RFC 7296 2.6: Cookie = <VersionIDofSecret> | Hash(Ni | IPi | SPIi |
        # <secret>); the secret goes first here, which is just as unguessable
        nonce = next(
            (p.data for p in message.payloads if isinstance(p, NoncePayload)), b""
        )
        digest = hashlib.sha256(
            secret
            + nonce
            + ipaddress.ip_address(remote_ip).packed
            + message.header.spi_i
        ).digest()
        return version.to_bytes(4, "big") + digest


def _first_cookie(message: Message) -> bytes | None:
    # RFC 7296 2.6: the returned COOKIE is the first payload of the request
    payloads = message.payloads
    if (
        payloads
        and isinstance(payloads[0], NotifyPayload)
        and payloads[0].notify_type == NotifyType.COOKIE
    ):
        return payloads[0].data
    return None
