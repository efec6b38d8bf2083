"""Breakdowns that explain an experiment's headline ratios (issue 11), computed from the same run logs.

- **Own task against the other tasks.** In a preset whose agents each draw their own stream from one task
  (`heterogeneous`), held-out accuracy is split per agent into its own task and the mean of the other tasks
  (`heldout_by_task` of eval.jsonl), then averaged over agents. Cumulative own-completion reward only sees the
  own task; what sharing teaches a specialist shows up in the other tasks.
- **Ablation.** Each ingredient of an arm is measured against the arm without it, paired by seed (the same task
  streams): the arm `local2-ext2` against `local4-ext0` (sharing), `local2-ext2-tis` against `local2-ext2` (TIS),
  `local2-ext2-tis-success` against `local2-ext2-tis` (success gating), `control` against `local4-ext0` (local
  filtering). Ratios of seed means with percentile-bootstrap 95% intervals (stats.py).
"""

from __future__ import annotations

import statistics
from typing import Any

from swarm_node.experiment.stats import paired_bootstrap_ratio

ABLATION_KEYS = {  # per-run value -> its column title in the ablation table
    "cumulative_reward_local": "cumulative reward, own completions",
    "heldout_last": "held-out acc., end",
    "heldout_own_last": "held-out, own task",
    "heldout_other_last": "held-out, other tasks",
    "ood_last": "OOD acc., end",
    "round_s": "round s",
}
SUFFIX_LABELS = {"tis": "TIS", "success": "success gating", "learnability": "learnability selection"}


def own_task_split(agents: list[dict[str, Any]], stream_tasks: list[list[str]] | None, rounds: int
                   ) -> dict[str, float | None]:
    """Held-out accuracy on each agent's own task and on the other tasks, at the first and the last evaluation
    (mean over agents): {"heldout_own_first", "heldout_own_last", "heldout_other_first", "heldout_other_last"}.

    Args:
        agents: a run's agents in node order (records.load_run), each with its `eval` records.
        stream_tasks: per agent, the tasks of its own stream (experiment.json `per_agent`); the split is only
            defined when every agent draws from exactly one task, otherwise every value is None.
        rounds: evaluations after this round are ignored.
    """
    empty = dict.fromkeys(("heldout_own_first", "heldout_own_last", "heldout_other_first", "heldout_other_last"))
    if not stream_tasks or len(stream_tasks) != len(agents) or any(len(t) != 1 for t in stream_tasks):
        return empty
    own: dict[str, list[float]] = {"first": [], "last": []}
    other: dict[str, list[float]] = {"first": [], "last": []}
    for agent, (task,) in zip(agents, stream_tasks):
        evals = [e for e in agent["eval"] if e.round <= rounds and e.heldout_by_task]
        if not evals or any(task not in e.heldout_by_task or len(e.heldout_by_task) < 2 for e in evals):
            return empty
        for when, e in (("first", evals[0]), ("last", evals[-1])):
            own[when].append(e.heldout_by_task[task])
            other[when].append(statistics.fmean(v for k, v in e.heldout_by_task.items() if k != task))
    return {f"heldout_{side}_{when}": statistics.fmean(values[when])
            for side, values in (("own", own), ("other", other)) for when in ("first", "last")}


def parent_arm(name: str, baseline: str) -> tuple[str, str] | None:
    """The arm without `name`'s last ingredient, and that ingredient's label; None for the baseline.

    `local2-ext2-tis-success` -> (`local2-ext2-tis`, "success gating"); `local2-ext2` -> (baseline, "sharing
    (2 of 4 groups from peers)"); `control` -> (baseline, "local filtering (control)")."""
    if name == baseline:
        return None
    if name == "control":
        return baseline, "local filtering (control)"
    parts = name.split("-")  # local2-ext2-tis-success -> ["local2", "ext2", "tis", "success"]
    if len(parts) < 2 or not parts[0].startswith("local") or not parts[1].startswith("ext"):
        return None
    if len(parts) == 2:
        local, external = int(parts[0][5:]), int(parts[1][3:])
        return baseline, f"sharing ({external} of {local + external} groups from peers)"
    return "-".join(parts[:-1]), SUFFIX_LABELS.get(parts[-1], parts[-1])


def ratios_against(arms: dict[str, dict[str, Any]], reference: str, keys) -> dict[str, dict[str, Any]]:
    """Per arm, per key: paired_bootstrap_ratio of the arm's runs to `reference`'s runs over the seeds both
    ran (None where a key is missing). {} if `reference` did not run."""
    if reference not in arms:
        return {}
    return {name: {key: _paired_ratio(arm["runs"], arms[reference]["runs"], key) for key in keys}
            for name, arm in arms.items()}


def _paired_ratio(runs: dict[int, dict[str, Any]], reference: dict[int, dict[str, Any]], key: str
                  ) -> dict[str, float] | None:
    """paired_bootstrap_ratio of `key` over the seeds both run dicts have a value for; None if none."""
    seeds = sorted(s for s in set(runs) & set(reference)
                   if runs[s].get(key) is not None and reference[s].get(key) is not None)
    return paired_bootstrap_ratio([runs[s][key] for s in seeds], [reference[s][key] for s in seeds]) if seeds else None


def ablation(arms: dict[str, dict[str, Any]], baseline: str) -> list[dict[str, Any]]:
    """Rows {"arm", "parent", "ingredient", "seeds", "ratios": {key: paired_bootstrap_ratio over the seeds both
    ran}} for every key of ABLATION_KEYS, one or more per arm but the baseline, the arm's rows in order.

    The first row is against the parent: the arm without the last ingredient (parent_arm); where that arm did not
    run, its own parent, and so on, with the ingredients joined ("TIS + success gating"). Where that parent ran
    on fewer of the arm's seeds, a further row goes up the chain to the nearest ancestor that covers more of
    them, with the ingredients joined, though never up to the baseline (the ratio table has that): so a one-seed
    intermediate arm splits the ingredients on that seed without hiding the joined comparison over every seed.
    """
    rows = []
    for name in sorted(arms):
        mine = arms[name]["runs"]
        parent, ingredients, covered = parent_arm(name, baseline), [], 0
        while parent is not None:
            if covered and (covered == len(mine) or parent[0] == baseline):
                break  # every seed is covered, or only the baseline is left (the ratio table has that)
            ingredients.insert(0, parent[1])
            if parent[0] in arms:
                theirs = arms[parent[0]]["runs"]
                seeds = sorted(set(mine) & set(theirs))
                if len(seeds) > covered:
                    rows.append({"arm": name, "parent": parent[0], "ingredient": " + ".join(ingredients),
                                 "seeds": seeds,
                                 "ratios": {key: _paired_ratio(mine, theirs, key) for key in ABLATION_KEYS}})
                    covered = len(seeds)
            parent = parent_arm(parent[0], baseline)
    return rows
