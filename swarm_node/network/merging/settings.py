"""The settings the mergers read (same names, units and meaning as the merge section of the node config (config.py))."""

from __future__ import annotations

import dataclasses

from swarm_node.learning.settings import pick


@dataclasses.dataclass(frozen=True)
class MergeSettings:
    """What `WeightMerger` and `GradMerger` read; built from the node's merge section by `MergeSettings.pick`."""

    merge_mode: str
    merge_schedule: str
    merge_every_rounds: int
    merge_compression: str
    merge_optimizer_state: str
    merge_aggregation: str
    merge_min_group_size: int
    merge_target_group_size: int
    merge_matchmaking_timeout_s: float
    merge_allreduce_timeout_s: float
    merge_state_load_timeout_s: float
    merge_trust_factor: float
    merge_trust_min_rel: float
    diloco_outer_lr: float
    diloco_outer_momentum: float
    grad_target_batch_size: int

    @classmethod
    def pick(cls, section) -> MergeSettings:
        """The fields read by name from a config section (learning/settings.py); a MergeSettings is returned as is."""
        return pick(cls, section)
