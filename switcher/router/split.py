"""Which client goes where besides the live color: the canary split and the preview token.

A canary step sends a share of *clients* to a color that is not live yet. A client is a
key (:func:`client_key`): its address, or behind a trusted proxy the hop that proxy saw.
The key's bucket is ``blake2b(key, key=blake2b(seed)) mod CANARY_BUCKETS``; the client goes
to the canary color when the bucket is below ``percent * 100``::

    bucket 0 ───────── percent×100 ───────────────────────── CANARY_BUCKETS
           canary color │ serving color

The same key with the same seed always lands in the same bucket, so growing ``percent``
only moves more clients over, never one back; another seed (another deploy) moves another
first share. The hash is keyed so a client cannot pick its bucket without the seed.

A preview sends a request carrying ``Alive-Switch-Preview: <token>`` to its color; the token
is compared in constant time and never leaves this object (no ``repr``, no log line).
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Callable
from typing import Generic, TypeVar

from switcher.model import CANARY_BUCKETS, Canary

Target = TypeVar("Target")
# 16-128 characters of a URL-safe alphabet: what secrets.token_urlsafe gives.
TOKEN = re.compile(r"[A-Za-z0-9_-]{16,128}")


def bucket(seed_key: bytes, client: bytes) -> int:
    """The client's bucket, in 0 .. CANARY_BUCKETS - 1."""
    digest = hashlib.blake2b(client, digest_size=8, key=seed_key).digest()
    return int.from_bytes(digest, "big") % CANARY_BUCKETS


def seed_key(seed: str) -> bytes:
    """blake2b takes a key of at most 64 bytes; a seed may be longer."""
    return hashlib.blake2b(seed.encode(), digest_size=32).digest()


class Split(Generic[Target]):
    """A running canary step: ``canary`` as the router applies it to ``target``."""

    __slots__ = ("canary", "key", "target", "threshold")

    def __init__(self, canary: Canary, target: Target) -> None:
        self.canary = canary
        self.target = target
        self.key = seed_key(canary.seed)
        self.threshold = canary.percent * (CANARY_BUCKETS // 100)

    def takes(self, client: bytes) -> bool:
        """Whether the client with this key goes to the canary color."""
        return bucket(self.key, client) < self.threshold


class Preview(Generic[Target]):
    """Requests carrying the token go to ``target``."""

    __slots__ = ("target", "token")

    def __init__(self, token: str, target: Target) -> None:
        self.token = token.encode()
        self.target = target

    def __repr__(self) -> str:
        return "Preview(<token>)"  # never the token

    def matches(self, value: bytes | None) -> bool:
        return value is not None and hmac.compare_digest(value.strip(), self.token)


def client_key(peer: str, xff: bytes | None, trusts: Callable[[str], bool]) -> bytes:
    """The client a request stands for: the peer's address, or when the peer is a trusted
    proxy (``xff`` is given only then), the rightmost X-Forwarded-For hop that is not
    trusted itself (all trusted: the leftmost). A hop that is not an address is the
    client's own claim: it is the key."""
    if not xff:
        return peer.encode()
    hops = [hop.strip() for hop in xff.split(b",")]
    for hop in reversed(hops):
        if hop and not trusts(_address(hop)):
            return hop
    return hops[0] or peer.encode()


def _address(hop: bytes) -> str:
    """The address of a hop as proxies write it (``1.2.3.4``, ``1.2.3.4:5678``,
    ``[::1]:5678``, ``::1``); anything else as it is (no proxy trusts it)."""
    text = hop.decode("latin-1")
    if text.startswith("["):
        return text[1:].partition("]")[0]
    if text.count(":") == 1:
        return text.partition(":")[0]
    return text

