"""Arms and presets of `swarm-node experiment sapo`.

An arm is a name, a label and a dict of node-setting overrides: the only difference between arms. A preset gives
the sizes shared by every arm (agents, rounds, settings), optional per-agent settings, and its arms.

Arms of the `homogeneous` and `heterogeneous` presets (issue 11), with 4 groups per round:
- `local4-ext0` (4/0): plain GRPO, no sharing: the baseline every ratio is taken against;
- `control`: 4/0 with local zero-advantage filtering by over-sampling x2 (separates sharing from filtering);
- `local2-ext2` (2/2): the paper's uniform sampling of external groups, no off-policy correction;
- `local2-ext2-tis`, `local2-ext2-tis-learnability`, `local2-ext2-tis-success`, `local2-ext2-learnability`: 2/2 with
  truncated importance sampling (F-TIS, arXiv 2605.22537) and/or another external selection (learnability p(1-p),
  success-gated), so that the best sharing variant can be chosen and each ingredient's effect read off.
Short names are accepted too: `4/0`, `2/2`, `2/2-tis`, `2/2-tis-learnability`, `2/2-tis-success`, ...

Settings an arm asks for that this build of the node lacks: when the value is what the build does anyway
(`LEGACY_VALUES`, e.g. `off_policy_correction=none`), it is dropped; otherwise the arm cannot run here and says so.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from swarm_node.errors import OperatorError
from swarm_node.learning.tasks import SMOL_TASKS

# What a node without these settings does: the value that reproduces it.
LEGACY_VALUES: dict[str, Any] = {"off_policy_correction": "none", "external_selection": "uniform"}
SHARING_VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {  # suffix -> (label suffix, settings)
    "": (" uniform (paper)", {"off_policy_correction": "none", "external_selection": "uniform"}),
    "-tis": (" + TIS", {"off_policy_correction": "tis", "external_selection": "uniform"}),
    "-learnability": (" + learnability", {"off_policy_correction": "none", "external_selection": "learnability"}),
    "-tis-learnability": (" + TIS + learnability", {"off_policy_correction": "tis",
                                                    "external_selection": "learnability"}),
    "-tis-success": (" + TIS + success-gated", {"off_policy_correction": "tis",
                                                "external_selection": "success_gated"}),
}


class ExperimentError(OperatorError):
    """An experiment that cannot run as asked (unknown preset or arm, a run that failed); says what to do."""


@dataclasses.dataclass(frozen=True)
class Arm:
    """One arm: `settings` are node-setting overrides (flag names without dashes) applied to every agent."""

    name: str
    label: str
    settings: dict[str, Any]

    @property
    def local(self) -> int:
        return self.settings["num_local_groups"]

    @property
    def external(self) -> int:
        return self.settings["num_external_groups"]

    @property
    def oversample(self) -> int:
        return self.settings.get("local_oversample", 1)

    @property
    def short_name(self) -> str:
        """`2/2-tis` for `local2-ext2-tis`; `control` stays `control`."""
        if not self.name.startswith("local"):
            return self.name
        head, _, rest = self.name.partition("-ext")
        external, _, suffix = rest.partition("-")
        return f"{head[5:]}/{external}" + (f"-{suffix}" if suffix else "")


def split_settings(local: int, external: int, oversample: int = 1) -> dict[str, Any]:
    return {"num_local_groups": local, "num_external_groups": external, "local_oversample": oversample}


def paper_arms(groups_per_round: int, oversample: int = 2) -> dict[str, Arm]:
    """The paper's 8/0, 6/2, 4/4, 2/6 scaled to `groups_per_round` (a multiple of 4), plus the control arm.

    Raises:
        ExperimentError: `groups_per_round` is not a multiple of 4.
    """
    if groups_per_round % 4:
        raise ExperimentError(f"groups per round must be a multiple of 4 to scale 8/0, 6/2, 4/4, 2/6 (got {groups_per_round})")
    q, g = groups_per_round // 4, groups_per_round
    arms = [Arm(f"local{g - k * q}-ext{k * q}", f"{g - k * q}/{k * q}", split_settings(g - k * q, k * q))
            for k in range(4)]
    arms.append(Arm("control", f"{g}/0 + local filter (x{oversample})", split_settings(g, 0, oversample)))
    return {a.name: a for a in arms}


def sharing_arms(groups_per_round: int, oversample: int = 2) -> dict[str, Arm]:
    """Issue 11's arms: the baseline, the control, the paper's half-shared arm and its named variants."""
    half = groups_per_round // 2
    base = paper_arms(groups_per_round, oversample)
    arms = {name: base[name] for name in (f"local{groups_per_round}-ext0", "control")}
    for suffix, (label, settings) in SHARING_VARIANTS.items():
        name = f"local{half}-ext{half}{suffix}"
        arms[name] = Arm(name, f"{half}/{half}{label}", {**split_settings(half, half), **settings})
    return arms


@dataclasses.dataclass(frozen=True)
class Preset:
    """Sizes of one experiment preset.

    `overrides` are node settings shared by every arm; `per_agent` (if any) holds one dict of extra settings per
    agent (e.g. each agent's own task); `arm_order` is the default arms in priority order and `extra_arms` the
    ones run only when asked by name; `notes` say what was scaled down and why (written next to the results).
    """

    name: str
    agents: int
    rounds: int
    groups_per_round: int
    seeds: tuple[int, ...]
    arm_order: tuple[str, ...]
    overrides: dict[str, Any]
    notes: tuple[str, ...]
    per_agent: tuple[dict[str, Any], ...] = ()
    arm_family: str = "paper"  # "paper" (paper_arms) or "sharing" (sharing_arms)
    optional_arms: tuple[str, ...] = ()  # in arm_order only where this build has their settings (the tiny preset)

    def arms(self) -> dict[str, Arm]:
        table = sharing_arms if self.arm_family == "sharing" else paper_arms
        return table(self.groups_per_round)


SMOL_NOTES = (
    "4 agents instead of 8 (2 CPU cores; each agent gets 1 torch thread).",
    "SmolLM2-135M-Instruct instead of Qwen2.5-0.5B (the embedded model; it runs on CPU).",
    "4 groups per round instead of 8, so the arms 8/0, 6/2, 4/4, 2/6 become 4/0, 3/1, 2/2, 1/3.",
    "L = 8 completions as in the paper, but 32 new tokens instead of 256 and a two-example few-shot prompt "
    "(the base model never writes <answer> tags otherwise; docs/results.md).",
    "Four easy tasks (chain_sum and basic_arithmetic with 2 one-digit terms, letter_counting, syllogism) "
    "instead of the paper's nine; base reward about 0.17 (benchmarks/results/base_reward.json).",
)
SHARING_ORDER = ("local4-ext0", "local2-ext2", "control", "local2-ext2-tis", "local2-ext2-tis-learnability",
                 "local2-ext2-tis-success")
SMOL_EVAL = dict(eval_num_questions=64, eval_ood_num_questions=32)

PRESETS: dict[str, Preset] = {
    "tiny": Preset(
        name="tiny", agents=2, rounds=2, groups_per_round=4, seeds=(0, 1),
        arm_order=("local4-ext0", "local2-ext2", "control", "local2-ext2-tis-learnability"),
        optional_arms=("local2-ext2-tis-learnability",),
        arm_family="sharing",
        per_agent=({"stream_tasks": ["chain_sum"]}, {"stream_tasks": ["syllogism"]}),
        overrides=dict(model="tiny", num_completions=4, max_new_tokens=8, eval_every_rounds=1, eval_num_questions=8,
                       eval_ood_num_questions=4, filter_zero_advantage=False, collect_timeout_s=20,
                       collect_interval_s=0.5, min_round_interval_s=4.0, checkpoint_every_rounds=1),
        notes=("CI smoke test of the harness, not of the science: a random 2-layer model that never scores, so "
               "zero-advantage filtering is off. Each agent draws from one task (as in `heterogeneous`).",
               "Rounds start at least 4 s apart (min_round_interval_s): a tiny-model round takes about 0.1 s, "
               "faster than one collection cycle, so without pacing a 2/2 agent would finish before a peer's "
               "groups were verified."),
    ),
    "smol": Preset(
        name="smol", agents=4, rounds=24, groups_per_round=4, seeds=(0, 1),
        arm_order=("local4-ext0", "local2-ext2", "control", "local3-ext1", "local1-ext3"),
        overrides=dict(model="smollm2-135m", task_preset="smol", num_completions=8, max_new_tokens=32,
                       eval_every_rounds=6, eval_num_questions=64, checkpoint_every_rounds=4, checkpoint_keep=1,
                       collect_timeout_s=90),
        notes=SMOL_NOTES + ("24 rounds instead of 2000.",),
    ),
    "homogeneous": Preset(
        name="homogeneous", agents=4, rounds=32, groups_per_round=4, seeds=(0, 1, 2),
        arm_order=SHARING_ORDER, arm_family="sharing",
        overrides=dict(model="smollm2-135m", task_preset="smol", num_completions=8, max_new_tokens=32,
                       eval_every_rounds=8, **SMOL_EVAL, checkpoint_every_rounds=4, checkpoint_keep=1,
                       collect_timeout_s=90),
        notes=SMOL_NOTES + ("32 rounds instead of 2000; every agent draws from all four tasks (today's `smol`).",
                            "Held-out: the 64 in-distribution questions of `smol` and 32 out-of-distribution ones "
                            "(swarm_node/evaluation.py), every 8 rounds."),
    ),
    "heterogeneous": Preset(
        name="heterogeneous", agents=4, rounds=48, groups_per_round=4, seeds=(0, 1, 2),
        arm_order=SHARING_ORDER, arm_family="sharing",
        per_agent=tuple({"stream_tasks": [task]} for task in sorted(SMOL_TASKS)),
        overrides=dict(model="smollm2-135m", task_preset="smol", num_completions=8, max_new_tokens=32,
                       eval_every_rounds=12, **SMOL_EVAL, checkpoint_every_rounds=4, checkpoint_keep=1,
                       collect_timeout_s=90),
        notes=SMOL_NOTES + ("Specialists: agent i's own stream draws from one task only (sorted task names: "
                            "basic_arithmetic, chain_sum, letter_counting, syllogism); the held-out sets cover all "
                            "four tasks, so an agent can only improve on the other three through what it learns "
                            "from peers' groups.",
                            "48 rounds instead of 2000. Held-out: 64 in-distribution and 32 out-of-distribution "
                            "questions, every 12 rounds."),
    ),
    "paper": Preset(
        name="paper", agents=8, rounds=2000, groups_per_round=8, seeds=(0, 1, 2),
        arm_order=("local8-ext0", "local4-ext4", "control", "local6-ext2", "local2-ext6"),
        overrides=dict(task_preset="paper", num_completions=8, max_new_tokens=256, eval_every_rounds=50,
                       eval_num_questions=200, checkpoint_every_rounds=20, checkpoint_keep=1),
        notes=("The paper's settings (8 agents, 8 groups of 8, 256 tokens, nine tasks, 2000 rounds); pass "
               "--model PATH to a local Qwen2.5-0.5B directory to match it. Needs GPUs.",),
    ),
}
