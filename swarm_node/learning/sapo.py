"""SAPO's training-set construction: I local groups plus J groups sampled from the swarm.

Source: "Sharing is Caring" (Gensyn, arXiv 2509.08721), section 3. External groups whose advantages are all
zero (every completion got the same reward) carry no GRPO signal, so they are dropped from the external
pool before J groups are sampled uniformly without replacement. Local groups are always kept (the paper's
8/0 baseline trains on them unfiltered).
"""

from __future__ import annotations

import dataclasses
import random
from typing import Callable, Sequence

from swarm_node.learning.tasks import TaskSpec


@dataclasses.dataclass
class Group:
    """One question and L completions with their (locally computed) rewards.

    Attributes:
        spec: the task spec the question is re-created from.
        completions: L completion texts.
        rewards: L rewards from the local verifier (never a peer's claim).
        peer_id: base58 peer ID of the node that generated the completions.
        round: the generating node's round.
        policy_version: the generating node's policy version (optimizer steps taken).
        model: name of the model that generated them.
        logprobs: optional generator per-token log-probs, one list per completion (empty list: unknown), aligned
            with the tokenisation of the completion text by the tokenizer named `tokenizer` (plus a final EOS
            when the generator stopped). Used for truncated importance sampling (learning/offpolicy.py).
        tokenizer: sha256 identity of the generator's tokenizer (generation.tokenizer_identity), "" if unknown.
    """

    spec: TaskSpec
    completions: list[str]
    rewards: list[float]
    peer_id: str
    round: int
    policy_version: int
    model: str
    logprobs: list[list[float]] | None = None
    tokenizer: str = ""

    @property
    def has_signal(self) -> bool:
        """False when all rewards are equal, i.e. every GRPO advantage is zero."""
        return max(self.rewards) - min(self.rewards) > 1e-9

    def content_key(self) -> tuple[str, tuple[str, ...]]:
        """Identity of the group's content, for dedupe across re-publication and copying between peers."""
        return self.spec.key(), tuple(self.completions)


def select_external(pool: Sequence[Group], num_groups: int, rng: random.Random,
                    filter_zero_advantage: bool = True, strategy: str = "uniform",
                    peer_weight: Callable[[str], float] | None = None) -> list[Group]:
    """Drop zero-advantage groups (unless disabled) and sample `num_groups` without replacement by `strategy`
    ("uniform": the paper; "learnability", "success_gated": learning/selection.py), optionally weighted by
    `peer_weight(peer_id)` (per-peer usefulness). Returns fewer than `num_groups` when the pool is smaller.
    """
    from swarm_node.learning.selection import select

    candidates = [g for g in pool if g.has_signal or not filter_zero_advantage]
    return select(candidates, num_groups, rng, strategy, peer_weight, 0.0 if filter_zero_advantage else 1e-9)


def select_local(groups: Sequence[Group], num_groups: int) -> list[Group]:
    """The control arm's local filter: keep `num_groups` of the over-sampled local groups, those with signal first
    (in generation order), then zero-advantage ones to fill up.

    This is "8/0 with local zero-advantage filtering" (docs/algorithm.md, last section): it gives an all-local node the
    same filtering that SAPO's external pool gets, by generating more questions than it trains on, so an
    experiment can separate the gain from sharing from the gain from filtering.
    """
    with_signal = [g for g in groups if g.has_signal]
    without = [g for g in groups if not g.has_signal]
    return (with_signal + without)[:num_groups]
