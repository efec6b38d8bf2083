"""Which J external groups a node trains on: selection strategies and per-peer usefulness. Pure, no network.

Strategies (config `external_selection`), applied after SAPO's zero-advantage filter:
- uniform: J groups uniformly without replacement (SAPO, arXiv 2509.08721, section 3).
- learnability: sampling weight p(1 - p) with p the group's verified pass rate (mean local reward), which
  peaks at p = 0.5 (Foster and Foerster, "Learning to Reason at the Frontier of Learnability", arXiv 2502.12272;
  for binary rewards it is the reward variance, the quantity PODS (arXiv 2504.13818) maximises).
- success_gated: only groups with at least one verified success (reward 1), uniformly. "Mutual RL" (arXiv
  2605.07244) finds that gating transfer on verified successes beats pooling raw rollouts, whose importance-
  variance cost grows with the gap between policies; a group whose best completion failed teaches only what
  not to do, from another policy's mistakes.

Per-peer usefulness (config `peer_usefulness`): a running mean, per peer, of the effective-sample-size fraction
(Kish) of the truncated importance weights of that peer's trained tokens, times the share of its tokens that
survived the extreme-ratio filter (trainer StepStats.peer_ess). It is 1 for a peer whose policy equals ours and
falls towards 0 as its groups become off-policy for us, i.e. as their gradient is dominated by a few tokens.
It multiplies the strategy's weight, floored so that no peer is starved of a chance to recover.
"""

from __future__ import annotations

import math
import random
from collections import OrderedDict
from typing import Callable, Sequence

SUCCESS = 1.0 - 1e-9


def pass_rate(rewards: Sequence[float]) -> float:
    """Verified pass rate p of a group: its mean local reward (rewards in [0, 1])."""
    return sum(rewards) / len(rewards)


def strategy_weight(rewards: Sequence[float], strategy: str) -> float:
    """Sampling weight of a group under `strategy` ("uniform", "learnability", "success_gated"); 0 excludes it."""
    if strategy == "uniform":
        return 1.0
    if strategy == "learnability":
        p = pass_rate(rewards)
        return p * (1.0 - p)
    if strategy == "success_gated":
        return 1.0 if max(rewards) >= SUCCESS else 0.0
    raise ValueError(f"unknown external selection strategy {strategy!r}")


def weighted_sample(items: Sequence, weights: Sequence[float], k: int, rng: random.Random) -> list:
    """k items without replacement, each draw proportional to weight (Efraimidis and Spirakis 2006, A-Res keys
    u^(1/w)); items of weight <= 0 are never drawn. Returns fewer than k when fewer have positive weight."""
    keyed = [(math.log(rng.random() or 1e-300) / w, i) for i, w in enumerate(weights) if w > 0]
    keyed.sort(reverse=True)
    return [items[i] for _, i in keyed[:k]]


class PeerUsefulness:
    """Running usefulness per peer in [floor, 1]: exponential mean of the per-step ESS fractions (unknown peers: 1).

    Bounded memory: at most `max_peers` peers, least recently updated forgotten first.
    """

    def __init__(self, decay: float = 0.8, floor: float = 0.05, max_peers: int = 1024):
        self.decay, self.floor, self.max_peers = decay, floor, max_peers
        self._score: OrderedDict[str, float] = OrderedDict()

    def update(self, peer_ess: dict[str, float]) -> None:
        for peer, ess in peer_ess.items():
            ess = min(max(float(ess), 0.0), 1.0) if math.isfinite(ess) else 0.0
            old = self._score.pop(peer, 1.0)
            self._score[peer] = self.decay * old + (1 - self.decay) * ess
        while len(self._score) > self.max_peers:
            self._score.popitem(last=False)

    def __call__(self, peer_id: str) -> float:
        return max(self.floor, self._score.get(peer_id, 1.0))

    def snapshot(self) -> dict[str, float]:
        return {p: round(s, 4) for p, s in self._score.items()}


def select(pool: Sequence, num_groups: int, rng: random.Random, strategy: str = "uniform",
           peer_weight: Callable[[str], float] | None = None, min_weight: float = 0.0) -> list:
    """J groups from `pool` (objects with `.rewards` and `.peer_id`) by strategy weight times peer weight.

    uniform without peer weights is exactly `rng.sample` (the paper's selection, reproducible per seed).
    `min_weight` > 0 lets groups the strategy excludes fill up the remaining slots (drawn after all others with
    overwhelming probability); used when zero-advantage filtering is off.
    """
    if strategy == "uniform" and peer_weight is None:
        return list(pool) if len(pool) <= num_groups else rng.sample(list(pool), num_groups)
    weights = [max(min_weight, strategy_weight(g.rewards, strategy)) * (peer_weight(g.peer_id) if peer_weight else 1.0)
               for g in pool]
    return weighted_sample(pool, weights, num_groups, rng)
