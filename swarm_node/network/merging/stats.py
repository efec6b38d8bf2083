"""Merge counters and the `merge_*` fields of the node's per-round metrics line."""

from __future__ import annotations

import collections
import dataclasses
from typing import Any

# Outcomes of a scheduled merge (metrics `merge_outcome`; None in rounds without a scheduled merge):
OUTCOMES = (
    "merged",         # averaged with a group and verified
    "repaired",       # the first round failed verification; a re-average or a state download fixed it
    "alone",          # no same-model peer online: skipped at once
    "no_group",       # peers online, but no group formed within merge_matchmaking_timeout_s: skipped
    "failed",         # the round and its repair failed: weights left as they were (local training goes on)
)


@dataclasses.dataclass
class MergeResult:
    """What one scheduled merge did."""

    outcome: str
    group_size: int = 0
    seconds: float = 0.0
    mismatch: float | None = None  # worst checksum error / tolerance of the applied result (<= 1 passes)
    detail: str = ""
    joined: bool = False  # the merge was not due here: this node joined peers that had started one


@dataclasses.dataclass
class MergeStats:
    """Cumulative counters of one node's merges."""

    mode: str
    merges: int = 0          # applied and verified (including repaired)
    failed: int = 0          # rounds that failed verification or errored, before repair
    repairs: int = 0         # failed rounds fixed by a re-average or a state download
    skipped: int = 0         # alone or no group
    state_loads: int = 0     # states downloaded from peers (start-up and repairs)
    last: MergeResult | None = None
    # merge results and states rejected before touching the model, by reason (guard.py, weights.py): bad_gather,
    # unaveraged, checksum, non_finite, trust_region, anchor, bad_state_info, bad_state, no_state_majority, ...
    rejected: collections.Counter = dataclasses.field(default_factory=collections.Counter)

    def reject(self, reason: str) -> None:
        self.rejected[reason] += 1

    def record(self, result: MergeResult, failed_rounds: int) -> None:
        self.last = result
        self.failed += failed_rounds
        if result.outcome in ("merged", "repaired"):
            self.merges += 1
        if result.outcome == "repaired":
            self.repairs += 1
        if result.outcome in ("alone", "no_group"):
            self.skipped += 1

    def metrics(self, result: MergeResult | None, bytes_sent: int, bytes_received: int,
                checksum: float | None) -> dict[str, Any]:
        """The `merge_*` fields of one metrics.jsonl line (`result` is None in rounds without a merge)."""
        return {
            "merge_mode": self.mode,
            "merge_outcome": result.outcome if result else None,
            "merge_joined": result.joined if result else False,
            "merge_group_size": result.group_size if result else 0,
            "merge_s": round(result.seconds, 3) if result else 0.0,
            "merge_mismatch": result.mismatch if result else None,
            "merges": self.merges,
            "merges_failed": self.failed,
            "merge_repairs": self.repairs,
            "merges_skipped": self.skipped,
            "merge_state_loads": self.state_loads,
            "merge_rejected": dict(self.rejected),
            "merge_bytes_out": bytes_sent,
            "merge_bytes_in": bytes_received,
            "merge_checksum": checksum,
        }
