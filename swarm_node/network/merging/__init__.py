"""Merging with peers that run the same model: weights (params), DiLoCo outer steps (diloco), gradients (grad).

- `fingerprint`: the model fingerprint and the DHT prefix that keeps other models out of our groups.
- `schedule`: when params/diloco merges happen (every_k, late, off).
- `guard`: the trust region, level and donor rules and strikes: what is checked before anything is adopted.
- `registry`: the signed registry of a merge group's members (who is online, who is merging now).
- `checksum`: linear checksums exchanged in each round's gather, and the check of the result against them.
- `averager`: hivemind's DecentralizedAverager with byte counters, failure signals and a chosen shared state.
- `weights`: `WeightMerger`, one verified merge (or a quick skip) per scheduled round, repairs, state loading.
- `grad`: `GradMerger`, hivemind.Optimizer around the node's AdamW for shared-gradient training.
- `stats`: the counters and the `merge_*` metrics fields.

hivemind runs averagers in child processes; they must be created in the main thread after the DHT exists
and before any training thread touches the model, which `create_merger` is for.
"""

from __future__ import annotations

from typing import Any

from swarm_node.config import MergeConfig, NodeConfig


def param_copies(config: MergeConfig) -> int:
    """fp32 copies of the weights a merger keeps besides the model (for the start-up memory estimate)."""
    if config.merge_mode == "off":
        return 0
    if config.merge_mode == "grad":
        return 2  # gradient accumulators and the averaged-gradient buffer
    copies = 2 if config.merge_mode == "params" else 3  # buffer + anchor (+ DiLoCo momentum)
    return copies + (2 if config.merge_optimizer_state == "average" else 0)


def create_merger(config: NodeConfig, dht, policy, trainer, private_key) -> Any:
    """The merger for `config.merge.merge_mode` (None when off). Call in the main thread, DHT running.
    `private_key` is the node's identity key (it signs the DHT records of grad mode's progress tracker)."""
    mode = config.merge.merge_mode
    if mode == "off":
        return None
    if mode == "grad":
        from swarm_node.network.merging.grad import GradMerger

        return GradMerger(config.merge, dht, policy.model, trainer, config.network.swarm_name, private_key,
                          config.network.dht_timeout_s)
    from swarm_node.network.merging.weights import WeightMerger

    return WeightMerger(config.merge, dht, policy.model, trainer.optimizer, config.network.swarm_name,
                        config.rounds, config.network.dht_timeout_s, private_key=private_key)
