"""Sampling which peers a node reads and fetches, so its cost per round is O(J), not O(N) (issue 14).

A node trains on J external groups per round. Reading every peer's manifest and fetching every fresh payload
costs O(N) per node and O(N²) swarm-wide. Instead (protocols/PROTOCOL.md, "Sampled reads"):

1. `ShardSampler`: each poll reads k of the S shard keys, walking a fresh random permutation of the shards (so
   every shard is read once per sweep of ceil(S/k) polls and a newcomer is seen within one sweep). k adapts to
   the swarm: k = ceil(target / r) with r the running mean of records per shard read, clamped to
   [1, min(S, max_reads)]. A small swarm is read whole; a large one costs about `target` records per poll.
2. `fetch_budget`: payloads fetched per round, B = max(fetches_per_round, ceil(fetch_margin · J / G)) with G the
   mean groups per announced payload: enough to fill J with margin, and enough fetches over the swarm that every
   fresh payload is fetched by some node (with B uniform-ish fetches per node per round, a payload is missed by
   all N nodes with probability about e^-B: B = 6 leaves 0.25 %).
3. `choose_fetches`: which of the new manifests to fetch: per slot, with probability `explore_share` a uniformly
   random newcomer (a peer that has not delivered valid data yet), otherwise a known-good peer drawn with weight
   usefulness / (1 + failures); when one kind is missing the other is used. Known-good peers are preferred, and
   newcomers are still found.

Everything here is pure (an injected `random.Random`), so `benchmarks/swarm_sim.py` drives the same code.
"""

from __future__ import annotations

import math
import random
from typing import Callable, Sequence, TypeVar

T = TypeVar("T")

RECORDS_PER_SHARD = 32  # the shard-count rule's target (`shard_count_for`): about 32 manifests per DHT value


def shard_count_for(num_peers: int, records_per_shard: int = RECORDS_PER_SHARD, minimum: int = 8) -> int:
    """The rule for `num_shards`: the smallest power of two >= num_peers / records_per_shard, at least `minimum`.

    A manifest record as read (owner marker + msgpack manifest) is about 610 bytes (measured by
    benchmarks/many_peers.py), so a shard's DHT value stays near 32 x 0.6 KB = 20 KB at the swarm size the shard
    count was chosen for, and under 40 KB up to twice it.
    """
    if num_peers <= minimum * records_per_shard:
        return minimum
    return 1 << math.ceil(math.log2(num_peers / records_per_shard))


class ShardSampler:
    """Chooses the shards one poll reads (see the module docstring, point 1).

    Args:
        num_shards: S, the swarm's shard count.
        max_reads: most shard keys read per poll.
        target_records: records (manifests) a poll aims to read.
        rng: random source.
        smoothing: weight of the newest observation in the running mean of records per shard.
    """

    def __init__(self, num_shards: int, max_reads: int, target_records: int, rng: random.Random,
                 smoothing: float = 0.3):
        self.num_shards, self.max_reads, self.target_records, self.rng = num_shards, max_reads, target_records, rng
        self.smoothing = smoothing
        self.records_per_shard: float | None = None  # unknown until the first poll: read as many as allowed
        self._order: list[int] = []

    @property
    def reads_per_poll(self) -> int:
        cap = max(1, min(self.num_shards, self.max_reads))
        if not self.records_per_shard:
            return cap
        return max(1, min(cap, math.ceil(self.target_records / self.records_per_shard)))

    def next_shards(self) -> list[int]:
        """The shards to read in this poll: the next k of a random permutation, refilled when used up."""
        out: list[int] = []
        k = self.reads_per_poll
        while len(out) < k:
            if not self._order:
                self._order = list(range(self.num_shards))
                self.rng.shuffle(self._order)
                self._order = [s for s in self._order if s not in out]
                if not self._order:
                    break
            out.append(self._order.pop())
        return out

    def observe(self, shards_read: int, records: int) -> None:
        """Update the running mean of records per shard after a poll read `records` records from `shards_read` keys."""
        if shards_read <= 0:
            return
        r = records / shards_read
        self.records_per_shard = r if self.records_per_shard is None else (
            (1 - self.smoothing) * self.records_per_shard + self.smoothing * r)

    def swarm_size_estimate(self) -> float:
        """N ≈ records per shard × S (the node's own record included)."""
        return (self.records_per_shard or 0.0) * self.num_shards


def fetch_budget(fetches_per_round: int, fetch_margin: float, num_external_groups: int,
                 groups_per_payload: Sequence[int]) -> int:
    """B, payloads a node fetches per round (module docstring, point 2). `groups_per_payload`: announced group
    counts of candidate manifests (their mean is G; none: G = 1)."""
    mean = sum(groups_per_payload) / len(groups_per_payload) if groups_per_payload else 1.0
    return max(fetches_per_round, math.ceil(fetch_margin * num_external_groups / max(1.0, mean)))


def choose_fetches(candidates: Sequence[T], budget: int, rng: random.Random, peer_of: Callable[[T], str],
                   is_good: Callable[[str], bool], weight: Callable[[str], float], explore_share: float) -> list[T]:
    """Pick at most `budget` candidates, at most one per peer (module docstring, point 3).

    Args:
        candidates: new, fetchable manifests (or anything `peer_of` maps to a peer ID).
        budget: most candidates returned.
        rng: random source.
        peer_of: a candidate's peer ID.
        is_good: whether a peer delivered valid data before.
        weight: a known-good peer's preference weight (> 0), e.g. usefulness / (1 + failures).
        explore_share: probability that a slot goes to a uniformly random newcomer.
    """
    good: dict[str, T] = {}
    new: dict[str, T] = {}
    for c in candidates:
        p = peer_of(c)
        (good if is_good(p) else new).setdefault(p, c)
    chosen: list[T] = []
    new_ids = list(new)
    good_ids = list(good)
    good_w = [max(1e-9, weight(p)) for p in good_ids]
    while len(chosen) < budget and (new_ids or good_ids):
        explore = (rng.random() < explore_share and new_ids) or not good_ids
        if explore:
            p = new_ids.pop(rng.randrange(len(new_ids)))
            chosen.append(new[p])
        else:
            i = rng.choices(range(len(good_ids)), weights=good_w)[0]
            p = good_ids.pop(i)
            good_w.pop(i)
            chosen.append(good[p])
    return chosen
