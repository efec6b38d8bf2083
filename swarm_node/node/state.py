"""What a checkpoint holds: the state of each stateful part of a node, gathered by name.

Each part owns its state through `state_dict()` / `load_state_dict(state)` (the torch convention); `NodeState` only
gathers them into one dict for swarm_node/checkpoint.py and hands each part its own entry back on resume. The
parts of a node:

- `trainer`: the policy's weights, the optimizer's state and the policy version (`TrainerState`; the configured
  learning rate wins over the saved one on resume);
- `task_stream`: the RNG of the node's own task stream; `sampler`: the RNG that samples J external groups;
- `torch_rng`: torch's global RNG;
- `merger` (with merging on): the merger's own `state_dict` (the anchor and DiLoCo's outer momentum).

Format 2 stores `{"format": 2, "peer_id", "round", "parts": {name: state}}`. Format 1 checkpoints (written before
the parts owned their state: flat keys) load through `_parts_of_format_1`.
"""

from __future__ import annotations

import logging
import random
from typing import Any, Protocol

log = logging.getLogger("swarm_node")
FORMAT = 2


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class RngState:
    """A `random.Random` as a stateful part."""

    def __init__(self, rng: random.Random):
        self.rng = rng

    def state_dict(self) -> dict[str, Any]:
        return {"state": self.rng.getstate()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rng.setstate(state["state"])


class TorchRngState:
    """torch's global CPU RNG as a stateful part."""

    def state_dict(self) -> dict[str, Any]:
        import torch

        return {"state": torch.get_rng_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        import torch

        torch.set_rng_state(state["state"])


class TrainerState:
    """The policy, its optimizer and the policy version of a `learning.trainer.Trainer` as one stateful part.

    Args:
        learning_rate: the configured learning rate, which replaces the saved one on load (an operator may change
            it between runs).
    """

    def __init__(self, policy, trainer, learning_rate: float):
        self.policy, self.trainer, self.learning_rate = policy, trainer, learning_rate

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.policy.model.state_dict(), "optimizer": self.trainer.optimizer.state_dict(),
                "policy_version": self.trainer.policy_version}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Raises RuntimeError, ValueError or KeyError when the state does not fit this model or optimizer."""
        self.policy.model.load_state_dict(state["model"])
        self.trainer.optimizer.load_state_dict(state["optimizer"])
        for group in self.trainer.base_optimizer.param_groups:
            group["lr"] = self.learning_rate
        self.trainer.policy_version = state["policy_version"]


class NodeState:
    """The named stateful parts of a node. `optional` parts (the merger) may refuse a saved state that no longer
    fits the configuration (ValueError): they then start afresh, with a warning, instead of failing the resume."""

    def __init__(self, parts: dict[str, Stateful], optional: frozenset[str] = frozenset()):
        self.parts, self.optional = parts, optional

    def state_dict(self, peer_id: str) -> dict[str, Any]:
        return {"format": FORMAT, "peer_id": peer_id, "parts": {name: p.state_dict() for name, p in self.parts.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Hand each part its saved state. Raises what a required part raises (its state does not fit)."""
        saved = state["parts"] if state.get("format", 1) >= 2 else _parts_of_format_1(state)
        for name, part in self.parts.items():
            if saved.get(name) is None:
                if name not in self.optional:
                    raise KeyError(f"the checkpoint has no state of {name!r}")
                continue
            if name in self.optional:
                try:
                    part.load_state_dict(saved[name])
                except ValueError as e:  # e.g. merging was reconfigured since the checkpoint: start it afresh
                    log.warning("not restoring the %s's state from the checkpoint: %s", name, e)
            else:
                part.load_state_dict(saved[name])


def node_state(policy, trainer, learning_rate: float, task_rng: random.Random, sample_rng: random.Random,
               merger=None) -> NodeState:
    """The stateful parts of a node (see the module doc); the merger only if it has state of its own
    (WeightMerger: anchor and outer momentum; GradMerger's state is the optimizer's)."""
    parts: dict[str, Stateful] = {"trainer": TrainerState(policy, trainer, learning_rate),
                                  "task_stream": RngState(task_rng), "sampler": RngState(sample_rng),
                                  "torch_rng": TorchRngState()}
    if hasattr(merger, "state_dict"):
        parts["merger"] = merger
    return NodeState(parts, optional=frozenset({"merger"}))


def _parts_of_format_1(state: dict[str, Any]) -> dict[str, Any]:
    """The parts of a format 1 checkpoint (flat keys)."""
    return {"trainer": {"model": state["model"], "optimizer": state["optimizer"],
                        "policy_version": state["policy_version"]},
            "task_stream": {"state": state["task_rng"]}, "sampler": {"state": state["sample_rng"]},
            "torch_rng": {"state": state["torch_rng"]}, "merger": state.get("merger")}
