"""`swarm-node experiment sapo`: the SAPO paper's controlled experiment, run as real local swarms, resumable.

Source: "Sharing is Caring" (Gensyn, arXiv 2509.08721), section 5: 8 agents, 8 groups of 8 completions per
agent per round, arms 8/0, 6/2, 4/4 and 2/6 (local/external groups), metric: cumulative reward summed over
agents and rounds. Each (arm, seed) is one `LocalSwarm` of N `swarm-node run` processes on 127.0.0.1 (the same
code path as a user's node), so the only difference between arms is the number of local and external groups.

Fairness additions (shared/SAPO.md, "weak points"):
- a **control** arm: all-local, with zero-advantage filtering of local groups by over-sampling
  (`local_oversample`), which separates the gain from sharing from the gain from filtering;
- reward on each agent's **own** completions (`reward_local_mean`) next to the training-batch reward;
- greedy accuracy on a fixed **held-out** set every M rounds (`eval.jsonl`);
- several seeds (task streams and sampling), reported as mean and spread.

Resumable: each run directory holds the nodes' checkpoints while it runs (every `checkpoint_every_rounds`),
so an interrupted experiment restarted with the same command continues every unfinished run from its last
checkpoint; finished runs are marked with `done.json` and their checkpoints are deleted (only the logs stay).
Runs go seed by seed, so a partial experiment already has every arm of the first seeds.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import signal
import time
from pathlib import Path
from typing import Any

from rich.console import Console

from swarm_node.errors import OperatorError
from swarm_node.launcher import LocalSwarm

console = Console(highlight=False)
MAX_ATTEMPTS = 3  # a run whose swarm fails is continued from its checkpoints this many times in all


class ExperimentError(OperatorError):
    """An experiment that cannot run as asked (unknown preset or arm, a run that failed); says what to do."""


@dataclasses.dataclass(frozen=True)
class Arm:
    """One arm: `local` groups from the agent's own stream and `external` groups from the swarm per round.

    `oversample` > 1 is the control arm: it generates local x oversample questions and keeps `local` of them,
    those with non-zero advantage first.
    """

    name: str
    local: int
    external: int
    oversample: int = 1

    @property
    def label(self) -> str:
        base = f"{self.local}/{self.external}"
        return f"{base} + local filter (x{self.oversample})" if self.oversample > 1 else base

    def overrides(self) -> dict[str, Any]:
        return {"num_local_groups": self.local, "num_external_groups": self.external,
                "local_oversample": self.oversample}


def paper_arms(groups_per_round: int, oversample: int = 2) -> dict[str, Arm]:
    """The paper's 8/0, 6/2, 4/4, 2/6 scaled to `groups_per_round` (a multiple of 4), plus the control arm."""
    if groups_per_round % 4:
        raise ExperimentError(f"groups per round must be a multiple of 4 to scale 8/0, 6/2, 4/4, 2/6 (got {groups_per_round})")
    q = groups_per_round // 4
    arms = [Arm(f"local{groups_per_round - k * q}-ext{k * q}", groups_per_round - k * q, k * q) for k in range(4)]
    arms.append(Arm("control", groups_per_round, 0, oversample))
    return {a.name: a for a in arms}


@dataclasses.dataclass(frozen=True)
class Preset:
    """Sizes of one experiment preset. `overrides` are node settings shared by every arm; `notes` says what was
    scaled down and why (written next to the results)."""

    name: str
    agents: int
    rounds: int
    groups_per_round: int
    seeds: tuple[int, ...]
    arm_order: tuple[str, ...]
    overrides: dict[str, Any]
    notes: tuple[str, ...]


PRESETS: dict[str, Preset] = {
    "tiny": Preset(
        name="tiny", agents=2, rounds=2, groups_per_round=4, seeds=(0, 1),
        arm_order=("local4-ext0", "local2-ext2", "control"),
        overrides=dict(model="tiny", num_completions=4, max_new_tokens=8, eval_every_rounds=1, eval_num_questions=8,
                       filter_zero_advantage=False, collect_timeout_s=20, checkpoint_every_rounds=1),
        notes=("CI smoke test of the harness, not of the science: a random 2-layer model that never scores, so "
               "zero-advantage filtering is off.",),
    ),
    "smol": Preset(
        name="smol", agents=4, rounds=24, groups_per_round=4, seeds=(0, 1),
        arm_order=("local4-ext0", "local2-ext2", "control", "local3-ext1", "local1-ext3"),
        overrides=dict(model="smollm2-135m", task_preset="smol", num_completions=8, max_new_tokens=32,
                       eval_every_rounds=6, eval_num_questions=64, checkpoint_every_rounds=4, checkpoint_keep=1,
                       collect_timeout_s=90),
        notes=(
            "4 agents instead of 8 (2 CPU cores; each agent gets 1 torch thread).",
            "SmolLM2-135M-Instruct instead of Qwen2.5-0.5B (the embedded model; it runs on CPU).",
            "4 groups per round instead of 8, so the arms 8/0, 6/2, 4/4, 2/6 become 4/0, 3/1, 2/2, 1/3.",
            "L = 8 completions as in the paper, but 32 new tokens instead of 256 and a two-example few-shot prompt "
            "(the base model never writes <answer> tags otherwise; shared/SAPO.md).",
            "Four easy tasks (chain_sum and basic_arithmetic with 2 one-digit terms, letter_counting, syllogism) "
            "instead of the paper's nine; base reward about 0.17 (benchmarks/results/base_reward.json).",
            "24 rounds instead of 2000.",
        ),
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


def run_dir(root: Path, arm: str, seed: int) -> Path:
    return root / "runs" / f"{arm}-seed{seed}"


def plan(preset: Preset, arms: list[str] | None, seeds: list[int] | None) -> list[tuple[Arm, int]]:
    """The (arm, seed) runs in execution order: seed by seed, arms in the preset's priority order."""
    table = paper_arms(preset.groups_per_round)
    names = arms or list(preset.arm_order)
    for name in names:
        if name not in table:
            raise ExperimentError(f"unknown arm {name!r} for preset {preset.name}; choose from {', '.join(table)}")
    return [(table[name], seed) for seed in (seeds or list(preset.seeds)) for name in names]


def run_experiment(preset_name: str, root: Path, arms: list[str] | None = None, seeds: list[int] | None = None,
                   rounds: int | None = None, extra_overrides: dict[str, Any] | None = None) -> int:
    """Run (or continue) every (arm, seed) of an experiment, then write the results. Returns an exit status.

    Raises:
        ExperimentError: unknown preset or arm, a settings file that contradicts the command, a failed run.
    """
    if preset_name not in PRESETS:
        raise ExperimentError(f"unknown preset {preset_name!r}; choose from {', '.join(PRESETS)}")
    preset = PRESETS[preset_name]
    overrides = {**preset.overrides, **(extra_overrides or {})}
    settings = {"preset": preset.name, "agents": preset.agents, "rounds": rounds or preset.rounds,
                "groups_per_round": preset.groups_per_round, "overrides": overrides, "notes": list(preset.notes)}
    root.mkdir(parents=True, exist_ok=True)
    settings_path = root / "experiment.json"
    if settings_path.exists():
        saved = json.loads(settings_path.read_text())
        if {k: saved.get(k) for k in settings} != settings:
            raise ExperimentError(f"{root} holds an experiment with other settings ({settings_path}); pass another "
                                  "--name or delete that directory to start over")
    else:
        settings_path.write_text(json.dumps(settings, indent=1))
    runs = plan(preset, arms, seeds)

    def interrupt(signum, frame):  # SIGTERM (and SIGINT, which background shells ignore) stop like Ctrl-C
        raise KeyboardInterrupt

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, interrupt)
    console.print(f"[bold]experiment {root.name}[/]: preset {preset.name}, {len(runs)} runs of {preset.agents} agents "
                  f"x {settings['rounds']} rounds")
    for arm, seed in runs:
        d = run_dir(root, arm.name, seed)
        if (d / "done.json").exists():
            console.print(f"{arm.name} seed {seed}: done")
            continue
        console.print(f"[bold]{arm.name} ({arm.label}) seed {seed}[/] in {d}")
        run_overrides = {**overrides, **arm.overrides(), "seed": seed, "task_seed": seed}
        t0 = time.time()
        for attempt in range(1, MAX_ATTEMPTS + 1):
            swarm = LocalSwarm(preset.agents, settings["rounds"], str(d), None, run_overrides, resume=True)
            try:
                status = swarm.run("interrupted: the next start continues from the last checkpoints")
            except OperatorError as e:  # a node that failed to start
                console.print(f"[red]{e}[/]")
                status = 1
            if status in (0, 130):
                break
            if attempt < MAX_ATTEMPTS:  # e.g. an agent killed by the OOM killer: continue from the checkpoints
                console.print(f"[yellow]run {arm.name} seed {seed} failed (attempt {attempt} of {MAX_ATTEMPTS}); "
                              "continuing from the last checkpoints[/]")
        if status == 130:
            return status
        if status:
            raise ExperimentError(f"run {arm.name} seed {seed} failed {MAX_ATTEMPTS} times; see the node logs in {d} "
                                  "(rerun the same command to continue from the last checkpoints)")
        (d / "done.json").write_text(json.dumps({"arm": arm.name, "label": arm.label, "seed": seed,
                                                 "wall_s": round(time.time() - t0, 1), "finished_at": time.time()}))
        for node in sorted(d.glob("node*")):  # keep the logs, drop the model checkpoints
            shutil.rmtree(node / "checkpoints", ignore_errors=True)
    from swarm_node.results import write_results

    md = write_results(root)
    console.print(f"results: {md}")
    return 0
