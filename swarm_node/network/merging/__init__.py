"""Merging with peers that run the same model: weights (params), DiLoCo outer steps (diloco), gradients (grad).

- `fingerprint`: the model fingerprint and the DHT prefix that keeps other models out of our groups.
- `schedule`: when params/diloco merges happen (every_k, late, off).
- `guard`: the trust region, level and donor rules and strikes: what is checked before anything is adopted.
- `registry`: the signed registry of a merge group's members (who is online, who is merging now).
- `checksum`: linear checksums exchanged in each round's gather, and the check of the result against them.
- `averager`: hivemind's DecentralizedAverager with byte counters, failure signals and a chosen shared state.
- `weights`: `WeightMerger`, one verified merge (or a quick skip) per scheduled round, repairs, state loading.
- `grad`: `GradMerger`, hivemind.Optimizer around the node's AdamW for shared-gradient training.
- `moments`: averaging AdamW's moments with the weights (merge_optimizer_state = average).
- `settings`: `MergeSettings`, the merge settings the mergers read.
- `stats`: the counters and the `merge_*` metrics fields.

hivemind runs averagers in child processes; they must be created in the main thread after the DHT exists
and before any training thread touches the model, which `create_merger` is for.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from swarm_node.network.merging.settings import MergeSettings


@runtime_checkable
class Merger(Protocol):
    """What a node calls on its merger (`WeightMerger`, `GradMerger`), all from a worker thread but `shutdown`.

    A merger with state of its own (WeightMerger: the anchor and DiLoCo's outer momentum) also has
    `state_dict`/`load_state_dict`, which the node checkpoints (swarm_node/node/state.py).
    """

    def join(self, completed_rounds: int) -> bool:
        """Before the first round: catch up with the merge group (download its state if it is ahead). Returns
        whether state was loaded."""

    def maybe_merge(self, round_: int) -> dict[str, Any]:
        """After the round's training step: merge if this round is scheduled; returns the round's `merge_*`
        metrics fields (stats.MergeStats.metrics)."""

    def shutdown(self) -> None:
        """Leave the group and stop the averagers' processes."""


def param_copies(config) -> int:
    """fp32 copies of the weights a merger keeps besides the model (for the start-up memory estimate).
    `config`: anything with `merge_mode` and `merge_optimizer_state` (the node's merge section)."""
    if config.merge_mode == "off":
        return 0
    if config.merge_mode == "grad":
        return 2  # gradient accumulators and the averaged-gradient buffer
    copies = 2 if config.merge_mode == "params" else 3  # buffer + anchor (+ DiLoCo momentum)
    return copies + (2 if config.merge_optimizer_state == "average" else 0)


def create_merger(merge, dht, policy, trainer, private_key, *, swarm_name: str, total_rounds: int = 0,
                  dht_timeout_s: float = 10.0) -> Merger | None:
    """The merger for `merge.merge_mode` (None when off). Call in the main thread, DHT running.

    Args:
        merge: `MergeSettings` or the node's merge section.
        private_key: the node's identity key (it signs the DHT records of grad mode's progress tracker).
        swarm_name: namespace of the DHT keys; total_rounds: the run's length (0: open-ended), for `late`;
        dht_timeout_s: deadline of one DHT call, seconds.
    """
    settings = MergeSettings.pick(merge)
    if settings.merge_mode == "off":
        return None
    if settings.merge_mode == "grad":
        from swarm_node.network.merging.grad import GradMerger

        return GradMerger(settings, dht, policy.model, trainer, swarm_name, private_key, dht_timeout_s)
    from swarm_node.network.merging.weights import WeightMerger

    return WeightMerger(settings, dht, policy.model, trainer.optimizer, swarm_name, total_rounds, dht_timeout_s,
                        private_key=private_key)
