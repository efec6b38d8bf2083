"""When a node merges: `every_k`, `late` or `off` (merge_schedule), for the params and diloco modes.

Rounds are each node's own counter. Peers that started together reach round r at about the same time, and a
merge only needs a group to form within the matchmaking window, so no global round number is needed.
"""

from __future__ import annotations

import math


def late_merge_rounds(total_rounds: int, num_merges: int) -> list[int]:
    """Rounds of a `late` schedule: `num_merges` merges, denser toward the end, the last in the final round.

    Merge j of M lands at round ceil(T * sqrt(j / M)), so the gaps shrink toward the end (for T = 20 and M = 4:
    rounds 10, 15, 18, 20). This follows "A Single Merging Suffices: Recovering Server-based Learning
    Performance in Decentralized Learning" (Zhu, Zhang, Wang, Zhou and Wang, 2025, arXiv 2507.06542; v3 is
    titled "On the Surprising Effectiveness of a Single Global Merging in Decentralized Learning"). Its
    findings: concentrating the communication budget in the later stages of decentralized training improves
    the merged model, and one global merge at the final step matches server-based training. The square-root
    spacing is our choice of "denser toward the end"; the paper does not prescribe this exact curve.
    """
    if total_rounds < 1 or num_merges < 1:
        return []
    rounds = {max(1, math.ceil(total_rounds * math.sqrt(j / num_merges) - 1e-9)) for j in range(1, num_merges + 1)}
    return sorted(rounds)


class MergeSchedule:
    """Decides whether a node's round ends with a merge.

    Args:
        kind: every_k, late or off.
        every_rounds: K.
        total_rounds: the run's length (0 = open-ended; `late` needs it, which the config checks).

    `every_k` counts rounds since the node's last merge (or since it joined the group), not its round number:
    peers' round counters are unrelated (late joiners, restarts), and rounds take different times on different
    peers. A node whose K rounds are up starts a merge; a node that ends a round while same-model peers are
    looking for a group joins them (see WeightMerger.maybe_merge). Either way its count restarts, so the peers
    that merged together stay in step.
    """

    def __init__(self, kind: str, every_rounds: int, total_rounds: int):
        self.kind, self.every_rounds, self.total_rounds = kind, every_rounds, total_rounds
        self._late = set(late_merge_rounds(total_rounds, max(1, total_rounds // every_rounds))) if kind == "late" else set()

    def is_due(self, round_: int, rounds_since_merge: int) -> bool:
        if self.kind == "every_k":
            return rounds_since_merge >= self.every_rounds
        if self.kind == "late":
            return round_ in self._late
        return False

    @property
    def joins_peers(self) -> bool:
        """Whether a node joins a merge that peers started before its own is due (every_k only: `late` merges
        happen at fixed rounds of each node's run)."""
        return self.kind == "every_k"

    def is_final(self, round_: int) -> bool:
        """The last merge of a `late` run: the global merge, which gets a longer matchmaking window."""
        return self.kind == "late" and round_ == self.total_rounds
