"""`swarm-node experiment sapo`: the SAPO paper's controlled experiment, run as real local swarms, resumable.

Source: "Sharing is Caring" (Gensyn, arXiv 2509.08721), section 5: 8 agents, 8 groups of 8 completions per
agent per round, arms 8/0, 6/2, 4/4 and 2/6 (local/external groups), metric: cumulative reward summed over
agents and rounds. Each (arm, seed) is one `LocalSwarm` of N `swarm-node run` processes on 127.0.0.1 (the same
code path as a user's node), so the only difference between arms is the number of local and external groups.

Fairness additions (docs/results.md):
- a **control** arm: all-local, with zero-advantage filtering of local groups by over-sampling
  (`local_oversample`), which separates the gain from sharing from the gain from filtering;
- reward on each agent's **own** completions (`reward_local_mean`) next to the training-batch reward;
- greedy accuracy on fixed **held-out** sets every M rounds (`eval.jsonl`): in distribution and, in the issue 11
  presets, out of distribution (swarm_node/evaluation.py);
- several seeds (task streams and sampling), reported with paired bootstrap intervals of the ratio to the baseline
  and with accuracy against each node's own compute (swarm_node/experiment/results.py).

Arms and presets live in swarm_node/experiment/presets.py: an arm is a dict of node-setting overrides, and a
preset may give each agent its own settings (the `heterogeneous` preset's one task per agent). Every run records
its settings and the git commit (and whether the code differed from it) of every start in `run.json`, and of the
finish in `done.json`.

Resumable: each run directory holds the nodes' checkpoints while it runs (every `checkpoint_every_rounds`),
so an interrupted experiment restarted with the same command continues every unfinished run from its last
checkpoint; finished runs are marked with `done.json` and their checkpoints are deleted (only the logs stay).
Runs go seed by seed, so a partial experiment already has every arm of the first seeds.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

from rich.console import Console

from swarm_node.config import leaf_fields
from swarm_node.errors import OperatorError
from swarm_node.experiment.presets import (  # noqa: F401  (re-exported)
    LEGACY_VALUES, PRESETS, Arm, ExperimentError, Preset, paper_arms, sharing_arms)
from swarm_node.tools.launcher import LocalSwarm

console = Console(highlight=False)
MAX_ATTEMPTS = 3  # a run whose swarm fails is continued from its checkpoints this many times in all


def git_provenance() -> dict[str, Any]:
    """The code that runs: `git rev-parse HEAD` of the checkout holding swarm_node, and whether its code
    (swarm_node/, pyproject.toml; tracked files only) differs from that commit. Nulls outside a git checkout."""
    repo = Path(__file__).resolve().parents[2]  # swarm_node/experiment/run.py -> the checkout
    try:
        commit = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=30, check=True).stdout.strip()
        status = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no", "--",
                                 "swarm_node", "pyproject.toml"], capture_output=True, text=True, timeout=30,
                                check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return {"git_commit": None, "git_dirty": None}
    return {"git_commit": commit, "git_dirty": bool(status)}


def resolve_settings(arm: Arm) -> dict[str, Any] | str:
    """The arm's settings this build can run: unknown settings at their `LEGACY_VALUES` are dropped (the build
    does that anyway). Returns the settings, or a sentence saying why the arm cannot run here."""
    known = leaf_fields()
    out = {}
    for name, value in arm.settings.items():
        if name in known:
            out[name] = value
        elif LEGACY_VALUES.get(name, object()) != value:
            return f"arm {arm.name} needs the node setting {name}={value!r}, which this build lacks"
    return out


def run_dir(root: Path, arm: str, seed: int) -> Path:
    return root / "runs" / f"{arm}-seed{seed}"


def _arm_order(preset: Preset) -> list[str]:
    table = preset.arms()
    return [n for n in preset.arm_order if n not in preset.optional_arms or isinstance(resolve_settings(table[n]), dict)]


def plan(preset: Preset, arms: list[str] | None, seeds: list[int] | None) -> list[tuple[Arm, int]]:
    """The (arm, seed) runs in execution order: seed by seed, arms in the preset's priority order. Arms may be
    given by name (`local2-ext2-tis`) or short name (`2/2-tis`).

    Raises:
        ExperimentError: an unknown arm.
    """
    table = preset.arms()
    by_short = {a.short_name: a.name for a in table.values()}
    names = [by_short.get(n, n) for n in arms] if arms else _arm_order(preset)
    for name in names:
        if name not in table:
            raise ExperimentError(f"unknown arm {name!r} for preset {preset.name}; choose from "
                                  f"{', '.join(f'{a.name} ({a.short_name})' for a in table.values())}")
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
    if preset.per_agent:  # absent for presets without per-agent settings, so older experiment.json files match
        settings["per_agent"] = [dict(x) for x in preset.per_agent]
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
    for arm in {a.name: a for a, _ in runs}.values():  # fail before the first run, not hours into the plan
        if isinstance(resolve_settings(arm), str):
            raise ExperimentError(resolve_settings(arm) + "; run the other arms (--arms) or update the node")

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
        run_overrides = {**overrides, **resolve_settings(arm), "seed": seed, "task_seed": seed}
        d.mkdir(parents=True, exist_ok=True)
        record = {"arm": arm.name, "label": arm.label, "seed": seed, "settings": run_overrides,
                  "per_agent": [dict(x) for x in preset.per_agent]}
        _record_attempt(d / "run.json", record)
        t0 = time.time()
        for attempt in range(1, MAX_ATTEMPTS + 1):
            swarm = LocalSwarm(preset.agents, settings["rounds"], str(d), None, run_overrides, resume=True,
                               node_overrides=[dict(x) for x in preset.per_agent] or None)
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
                                                 "wall_s": round(time.time() - t0, 1), "finished_at": time.time(),
                                                 **git_provenance()}))
        for node in sorted(d.glob("node*")):  # keep the logs, drop the model checkpoints
            shutil.rmtree(node / "checkpoints", ignore_errors=True)
    from swarm_node.experiment.results import write_results

    md = write_results(root)
    console.print(f"results: {md}")
    return 0


def _record_attempt(path: Path, record: dict[str, Any]) -> None:
    """Write run.json (arm, seed, settings) and append this start's git commit and dirty flag to its `starts`,
    so a run resumed under other code says so."""
    starts = json.loads(path.read_text()).get("starts", []) if path.exists() else []
    starts.append({**git_provenance(), "started_at": time.time()})
    path.write_text(json.dumps({**record, "starts": starts}, indent=1))
