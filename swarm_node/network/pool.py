"""The pool of verified external groups that background collection fills and each round's training takes from.

Collection (swarm_node/network/collector.py) runs continuously; a round never waits for it. At training time the
node takes J groups from what is already verified, within two staleness bounds (IMPALA, arXiv 1802.01561, and
AsyncFlow/LlamaRL bound the policy lag of off-policy data the same way):

- `max_staleness_s`: a group published (manifest `created_at_s`, DHT clock) longer ago than this is dropped,
  counted as `max_staleness_s`;
- `max_policy_lag`: a group whose generator has since announced a policy version more than this many optimizer
  steps newer is dropped, counted as `max_policy_lag`. Policy versions of different nodes are independent counters
  (nodes join at different times), so the lag is measured against the *generator's own* newest version.

Drops are counted by the setting that caused them (`PeerPool.dropped`), never as a peer's fault.
"""

from __future__ import annotations

import dataclasses
import random
from collections import Counter

from hivemind.utils import get_dht_time

from swarm_node.learning.sapo import Group, select_external


@dataclasses.dataclass
class PoolEntry:
    """One peer payload's verified groups."""

    created_at_s: float  # the manifest's DHT time
    policy_version: int
    groups: list[Group]


class GroupPool:
    """Verified external groups keyed by (peer ID, round), with the staleness bounds applied on every take.

    Args:
        max_staleness_s: oldest publication time (DHT clock) a usable group may have, seconds.
        max_policy_lag: largest lag, in the generator's policy versions, of a usable group behind its generator's
            newest announced version.
        max_entries: most payloads held; the oldest publication is dropped first (counted as `pool_full`).
    """

    def __init__(self, max_staleness_s: float, max_policy_lag: int, max_entries: int = 256):
        self.max_staleness_s, self.max_policy_lag, self.max_entries = max_staleness_s, max_policy_lag, max_entries
        self._entries: dict[tuple[str, int], PoolEntry] = {}
        self._newest_version: dict[str, int] = {}  # peer -> newest policy version it announced (pool peers only)
        self._used: set[tuple] = set()  # content keys of pooled groups already trained on
        self.dropped: Counter[str] = Counter()  # groups dropped unused, by the setting that dropped them

    def __len__(self) -> int:
        return len(self._entries)

    def note_version(self, peer_id: str, policy_version: int) -> None:
        """Record a peer's announced policy version (from any of its fresh manifests) for the lag bound."""
        if peer_id in self._newest_version or any(p == peer_id for p, _ in self._entries):
            self._newest_version[peer_id] = max(self._newest_version.get(peer_id, policy_version), policy_version)

    def add(self, peer_id: str, round_: int, created_at_s: float, policy_version: int, groups: list[Group]) -> None:
        """Pool one payload's verified groups."""
        self._entries[peer_id, round_] = PoolEntry(created_at_s, policy_version, groups)
        self._newest_version[peer_id] = max(self._newest_version.get(peer_id, policy_version), policy_version)
        while len(self._entries) > self.max_entries:
            oldest = min(self._entries, key=lambda k: self._entries[k].created_at_s)
            self._drop(oldest, "pool_full")

    def _drop(self, key: tuple[str, int], reason: str) -> None:
        entry = self._entries.pop(key)
        self.dropped[reason] += sum(g.content_key() not in self._used for g in entry.groups)
        self._used.difference_update(g.content_key() for g in entry.groups)

    def prune(self) -> None:
        """Drop entries over either staleness bound; forget versions of peers with nothing pooled."""
        now = get_dht_time()
        for key, entry in list(self._entries.items()):
            if now - entry.created_at_s > self.max_staleness_s:
                self._drop(key, "max_staleness_s")
            elif self._newest_version.get(key[0], entry.policy_version) - entry.policy_version > self.max_policy_lag:
                self._drop(key, "max_policy_lag")
        pooled = {p for p, _ in self._entries}
        self._newest_version = {p: v for p, v in self._newest_version.items() if p in pooled}

    def usable(self, filter_zero_advantage: bool) -> list[Group]:
        """Verified, not yet used groups within both bounds (with signal, if the zero-advantage filter is on)."""
        self.prune()
        return [g for e in self._entries.values() for g in e.groups
                if (g.has_signal or not filter_zero_advantage) and g.content_key() not in self._used]

    def take(self, num_groups: int, rng: random.Random, filter_zero_advantage: bool, strategy: str = "uniform",
             peer_weight=None) -> tuple[list[Group], int]:
        """Sample `num_groups` usable groups by `strategy` (uniform: SAPO; see learning/selection.py), optionally
        weighted by `peer_weight(peer_id)`, and mark them used. Returns (groups, usable before)."""
        usable = self.usable(filter_zero_advantage)
        chosen = select_external(usable, num_groups, rng, filter_zero_advantage, strategy, peer_weight)
        self._used.update(g.content_key() for g in chosen)
        return chosen, len(usable)

    def peers(self) -> set[str]:
        """Peers with at least one pooled payload within the bounds (they delivered verified groups)."""
        return {p for p, _ in self._entries}
