"""Bounded per-peer state: every map keyed by something a peer chooses (its peer ID, a record, a manifest).

Peer IDs are free (issue 15, hole 6: 100k fake IDs grew the collector's and the trust tracker's maps without
bound). Every such map here is a `cachetools.TTLCache`: an entry lives at most `ttl_s` after it was last written,
and when `maxsize` entries are held the least recently used is evicted first. Forgetting is always safe: a
forgotten peer is a newcomer again (lowest admission priority, no strikes, no ban; bans are cheap to re-earn and
fresh keys are free anyway), a forgotten manifest may be fetched once more (its groups are then deduped), and a
forgotten bad record is counted once more.
"""

from __future__ import annotations

import hashlib
import time
from collections import Counter

from cachetools import TTLCache


class PeerMap(TTLCache):
    """A TTL + LRU bounded dict. `ttl_s` in seconds of `time.monotonic` (or the injected clock)."""

    def __init__(self, maxsize: int, ttl_s: float, clock=time.monotonic):
        super().__init__(maxsize=maxsize, ttl=ttl_s, timer=clock)


class PeerCounter(PeerMap):
    """A bounded Counter: a missing key reads as 0, so `c[peer] += 1` works."""

    def __missing__(self, key):
        return 0


class PeerCounters(PeerMap):
    """A bounded map of Counters (peer -> reason -> count); a missing key gets a new Counter."""

    def __missing__(self, key):
        value = Counter()
        self[key] = value
        return value


class BoundedSet:
    """A set with the same bounds (membership of keys a peer chooses: manifests, records, content digests)."""

    def __init__(self, maxsize: int, ttl_s: float, clock=time.monotonic):
        self._map = PeerMap(maxsize, ttl_s, clock)

    def add(self, item) -> None:
        if item not in self._map:
            self._map[item] = True

    def __contains__(self, item) -> bool:
        return item in self._map

    def __len__(self) -> int:
        return len(self._map)

    def __iter__(self):
        return iter(list(self._map))

    def prune(self) -> None:
        self._map.expire()


def content_digest(key) -> bytes:
    """A 16-byte digest of a group's content key (spec key, completion texts), so dedupe memory holds no texts."""
    spec_key, completions = key
    h = hashlib.blake2b(spec_key.encode(), digest_size=16)
    for c in completions:
        h.update(len(c).to_bytes(4, "big"))
        h.update(c.encode("utf-8", "surrogatepass"))
    return h.digest()


def manifest_digest(manifest) -> bytes:
    """A 16-byte digest of a manifest's (peer ID, round, payload sha256): what "already seen" remembers."""
    h = hashlib.blake2b(manifest.peer_id.encode(), digest_size=16)
    h.update(manifest.round.to_bytes(8, "big", signed=True) if -2**63 <= manifest.round < 2**63 else b"?")
    h.update(manifest.payload_sha256)
    return h.digest()
