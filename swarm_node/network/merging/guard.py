"""What a node checks before a merge result or a downloaded state touches its model (issue 16).

**Trust region.** A result is adopted only if it is finite everywhere and its L2 distance from this node's own
contribution is at most

    radius = max(merge_trust_factor * u, merge_trust_min_rel * ||anchor||)

where `u` is the largest of this node's own update norms ||weights - anchor|| (the distance it trained away from
its last verified merge) at this merge and its `history` previous merge attempts. Why this rule: peers that
start from one anchor and train alike each move about `u`; the group mean of n such peers lies within
u * sqrt((n - 1) / n) <= u of each of them (independent directions) and closer when they agree, so an honest
mean passes with a factor of headroom (default 4) for peers that trained more rounds. The floor keeps the
first merges of a fresh node possible. It is measured on what is averaged: the weights (params) or the
pseudo-gradient anchor - weights (diloco), whose difference from our own contribution is the same distance.
The AdamW moments (merge_optimizer_state = average) must be finite and within `factor` times their own norm.

The radius is the largest weight change a group (hostile or not) can cause per merge; an attacker patient
enough to push by just under it every merge can drift the model by that much per merge (docs/security.md).

**Levels.** Merge levels are claims: a merge sets the node's level to the lower median of the group's levels
plus one, so a minority of the group cannot raise it (in a pair, the lower of the two), clamped to
wire.MAX_MERGE_LEVEL so that building the node's own messages never fails.

**Donors by evidence.** `agreeing_states` groups donors whose announced state checksums agree (within the
group's compression tolerance); a state is downloaded only from the largest class that holds at least two
peers and more than half of the donors that answered.
"""

from __future__ import annotations

import collections
import math
from typing import Iterable, Sequence

import torch

from swarm_node.network import wire
from swarm_node.network.merging import checksum


@torch.no_grad()
def distance(result: Sequence[torch.Tensor], own: Iterable[torch.Tensor]) -> float:
    """L2 distance between two tensor lists (float32 per tensor, summed in float64); inf when either holds a
    non-finite value. One pass over both, no copies (torch.dist)."""
    sq = 0.0
    for r, o in zip(result, own):
        sq += float(torch.dist(r.detach(), o.detach().to(r.device, r.dtype))) ** 2
    return math.sqrt(sq) if math.isfinite(sq) else math.inf


@torch.no_grad()
def norm(tensors: Iterable[torch.Tensor]) -> float:
    """L2 norm of a tensor list (float32 per tensor, summed in float64); inf when it holds a non-finite value."""
    sq = sum(float(torch.linalg.vector_norm(t.detach())) ** 2 for t in tensors)
    return math.sqrt(sq) if math.isfinite(sq) else math.inf


class TrustRegion:
    """The radius rule above. `note(u)` records one merge attempt's own update norm."""

    def __init__(self, factor: float, min_rel: float, history: int = 8):
        self.factor, self.min_rel = factor, min_rel
        self._recent: collections.deque[float] = collections.deque(maxlen=history)

    def radius(self, update_norm: float, anchor_norm: float) -> float:
        u = max([update_norm, *self._recent])
        return max(self.factor * u, self.min_rel * anchor_norm)

    def note(self, update_norm: float) -> None:
        if math.isfinite(update_norm):
            self._recent.append(update_norm)


def lower_median(values: Sequence[int]) -> int:
    """The lower median (for two values: the smaller one)."""
    ordered = sorted(values)
    return ordered[(len(ordered) - 1) // 2]


def next_level(levels: Sequence[int]) -> int:
    """A node's merge level after a verified merge of a group with these levels (its own included)."""
    return min(lower_median(levels) + 1, wire.MAX_MERGE_LEVEL)


def agreeing_states(infos: dict[bytes, wire.MergeStateInfo], scale: Sequence[float],
                    compression: str) -> list[bytes]:
    """Donors (peer IDs) of the state that a majority of `infos` agree on, or [] when no such majority exists.

    Two states agree when their checksums match within `compression`'s tolerance, with `scale` (per-segment
    L2 norms of this node's own state) as the tolerance's scale. The winning class must hold >= 2 donors and
    more than half of those that answered: one peer alone is never believed."""
    peers = list(infos)
    best: list[bytes] = []
    for p in peers:
        cls = [q for q in peers if checksum.mismatch(infos[q].sums, infos[p].sums, scale, compression) <= 1.0]
        if len(cls) > len(best):
            best = cls
    if len(best) >= 2 and 2 * len(best) > len(peers):
        return best
    return []


class Strikes:
    """Per-peer strikes (peer ID bytes -> count) and rejections by reason, for metrics and donor choice."""

    LIMIT = 3  # a peer with this many strikes is never asked for state and never counted as evidence

    def __init__(self):
        self.by_peer: collections.Counter[bytes] = collections.Counter()
        self.by_reason: collections.Counter[str] = collections.Counter()

    def strike(self, peers: Iterable[bytes], reason: str) -> None:
        self.by_reason[reason] += 1
        for p in peers:
            self.by_peer[p] += 1
        if len(self.by_peer) > 10_000:  # bounded memory against peer-ID churn: keep the worst offenders
            self.by_peer = collections.Counter(dict(self.by_peer.most_common(1000)))

    def banned(self, peer: bytes) -> bool:
        return self.by_peer[peer] >= self.LIMIT


def same_anchor(own: Sequence[float], reference: Sequence[float]) -> bool:
    """Do two anchor digests ([sum, L2 norm], checksum.digest) agree within 1e-4 of the larger norm?"""
    if len(reference) != 2:
        return False
    return abs(own[0] - reference[0]) <= 1e-4 * max(own[1], reference[1]) + 1e-9


def anchor_agreed(own: Sequence[float], members: Sequence[Sequence[float]]) -> bool:
    """Does our anchor digest match the anchor of at least half of the group (ourselves included)? A pair that
    disagrees therefore keeps its own anchors; nobody follows one peer's claim."""
    return 2 * sum(same_anchor(own, m) for m in members) >= len(members)
