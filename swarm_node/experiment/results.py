"""Results of a `swarm-node experiment`: tables (markdown and JSON) and plots, computed only from the run logs.

`swarm-node experiment report DIR` re-creates everything here from the committed `metrics.jsonl` and
`eval.jsonl` files, so the numbers in docs/results.md can be reproduced without re-running anything.

Metrics (per agent per round, from `metrics.jsonl`):
- `reward_local_mean`: mean strict-verifier reward of the completions the agent generated itself that round
  (all of them, including the control arm's over-sampled ones): the fair headline metric.
- `reward_train_mean`: mean reward of the training batch (local plus external groups), what the paper plots.
- cumulative reward: the paper's metric, a reward summed over agents and rounds; here the per-round means
  above are summed, so an arm's value is comparable whatever its group counts.
Held-out accuracy (from `eval.jsonl`): greedy accuracy on a fixed question set no agent trains on, averaged
over agents; the out-of-distribution set's (`ood_accuracy`) where logged (swarm_node/evaluation.py).
Ratios to the baseline (4/0) are paired by seed, with percentile-bootstrap 95% intervals, and held-out accuracy
is also compared at equal node compute (tokens, seconds): swarm_node/experiment/stats.py.
"""

from __future__ import annotations

import json
import os
import statistics
from pathlib import Path
from typing import Any

from swarm_node.records import load_run
from swarm_node.experiment.breakdown import ABLATION_KEYS, ablation, own_task_split, ratios_against
from swarm_node.experiment.stats import accuracy_at, compute_curve

RATIO_KEYS = {  # per-run value -> its column title in the ratio table
    "cumulative_reward_local": "cumulative reward, own completions",
    "heldout_last": "held-out acc., end",
    "ood_last": "OOD acc., end",
    "heldout_at_equal_tokens": "held-out acc. at equal tokens",
    "heldout_at_equal_seconds": "held-out acc. at equal seconds",
    "ood_at_equal_tokens": "OOD acc. at equal tokens",
    "heldout_own_last": "held-out acc., own task, end",  # only in presets of one-task specialists (breakdown.py)
    "heldout_other_last": "held-out acc., other tasks, end",
    "round_s": "round s",
}
CONTROL_KEYS = ("heldout_last", "heldout_at_equal_tokens", "heldout_at_equal_seconds", "ood_last",
                "ood_at_equal_tokens")  # also compared with the control arm (issue 11's target)


def _spread(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values), "n": len(values)}


def summarize_run(run: dict[str, Any], rounds: int, stream_tasks: list[list[str]] | None = None) -> dict[str, Any]:
    """Cumulative rewards (sum over agents and rounds 1..rounds), held-out accuracy per evaluation round
    (mean over agents), external groups used and round time; with `stream_tasks` (one task per agent), held-out
    accuracy on the agents' own task and on the others (breakdown.own_task_split)."""
    rows = [m for a in run["agents"] for m in a["metrics"] if m.round <= rounds]
    evals: dict[int, list[float]] = {}
    for a in run["agents"]:
        for e in a["eval"]:
            evals.setdefault(e.round, []).append(e.heldout_accuracy)
    heldout = {r: statistics.fmean(v) for r, v in sorted(evals.items())}
    ood_curve = compute_curve(run["agents"], rounds, "ood_accuracy")
    return {
        "curve_heldout": compute_curve(run["agents"], rounds),
        "curve_ood": ood_curve,
        "ood_first": ood_curve[0]["accuracy"] if ood_curve else None,
        "ood_last": ood_curve[-1]["accuracy"] if ood_curve else None,
        "tokens_per_agent": sum(m.tokens_generated + m.train_tokens for m in rows)
        / max(1, len(run["agents"])),
        "cumulative_reward_local": sum(m.reward_local_mean for m in rows),
        "cumulative_reward_train": sum(m.reward_train_mean for m in rows),
        "mean_reward_local": statistics.fmean(m.reward_local_mean for m in rows) if rows else 0.0,
        "heldout_by_round": heldout,
        "heldout_first": heldout[min(heldout)] if heldout else None,
        "heldout_last": heldout[max(heldout)] if heldout else None,
        "external_used_per_round": statistics.fmean(m.external_groups_used for m in rows) if rows else 0.0,
        "round_s": statistics.fmean(m.round_s for m in rows) if rows else 0.0,
        "agent_rounds": len(rows),
        **own_task_split(run["agents"], stream_tasks, rounds),
    }


def collect(root: Path) -> dict[str, Any]:
    """Every finished run of an experiment directory, grouped by arm, with per-arm mean and spread over seeds."""
    settings = json.loads((root / "experiment.json").read_text())
    rounds = settings["rounds"]
    stream_tasks = [agent.get("stream_tasks") for agent in settings.get("per_agent", [])] or None
    arms: dict[str, dict[str, Any]] = {}
    pending = []
    for d in sorted((root / "runs").glob("*-seed*")):
        run = load_run(d)
        if run["done"] is None:
            pending.append(d.name)
            continue
        arm = arms.setdefault(run["done"]["arm"], {"label": run["done"]["label"], "runs": {}})
        arm["runs"][run["done"]["seed"]] = {**summarize_run(run, rounds, stream_tasks), "wall_s": run["done"]["wall_s"],
                                            "git_commit": run["done"].get("git_commit"),
                                            "git_dirty": run["done"].get("git_dirty")}
    budgets = _equal_compute(arms)
    for arm in arms.values():
        runs = list(arm["runs"].values())
        arm["summary"] = {key: _spread([r[key] for r in runs]) for key in
                          ("cumulative_reward_local", "cumulative_reward_train", "mean_reward_local")}
        for key in ("heldout_first", "heldout_last", "ood_first", "ood_last", "heldout_own_first",
                    "heldout_own_last", "heldout_other_first", "heldout_other_last"):
            vals = [r[key] for r in runs if r[key] is not None]
            arm["summary"][key] = _spread(vals) if vals else None
        arm["summary"]["heldout_gain"] = (_spread([r["heldout_last"] - r["heldout_first"] for r in runs])
                                          if all(r["heldout_first"] is not None for r in runs) else None)
    baseline = f"local{settings['groups_per_round']}-ext0"
    if baseline in arms:
        base = arms[baseline]["runs"]
        for arm in arms.values():
            seeds = sorted(set(arm["runs"]) & set(base))
            ratios = [arm["runs"][s]["cumulative_reward_local"] / base[s]["cumulative_reward_local"] for s in seeds
                      if base[s]["cumulative_reward_local"] > 0]
            arm["summary"]["ratio_vs_baseline_local"] = _spread(ratios) if ratios else None
            ratios = [arm["runs"][s]["cumulative_reward_train"] / base[s]["cumulative_reward_train"] for s in seeds
                      if base[s]["cumulative_reward_train"] > 0]
            arm["summary"]["ratio_vs_baseline_train"] = _spread(ratios) if ratios else None
        for name, ratios in ratios_against(arms, baseline, RATIO_KEYS).items():
            arms[name]["ci_vs_baseline"] = ratios
    for name, ratios in ratios_against(arms, "control", CONTROL_KEYS).items():
        arms[name]["ci_vs_control"] = ratios
    return {"settings": settings, "baseline": baseline, "arms": arms, "pending_runs": pending,
            "equal_compute": budgets, "ablation": ablation(arms, baseline)}


def _equal_compute(arms: dict[str, dict[str, Any]]) -> dict[str, float | None]:
    """Held-out (and OOD) accuracy of every run at the budgets every run reached: the smallest final compute
    (tokens, seconds) over all runs. Sets `{heldout,ood}_at_equal_{tokens,seconds}` per run; returns the budgets."""
    runs = [r for arm in arms.values() for r in arm["runs"].values()]
    budgets: dict[str, float | None] = {}
    for axis in ("tokens", "seconds"):
        ends = [r["curve_heldout"][-1][axis] for r in runs if r["curve_heldout"]]
        budgets[axis] = min(ends) if runs and len(ends) == len(runs) else None
        for r in runs:
            for name in ("heldout", "ood"):
                curve = r[f"curve_{name}"]
                r[f"{name}_at_equal_{axis}"] = accuracy_at(curve, axis, budgets[axis]) if budgets[axis] else None
    return budgets


def _fmt(s: dict[str, float] | None, digits: int = 2) -> str:
    if not s:
        return "-"
    return f"{s['mean']:.{digits}f} ± {s['std']:.{digits}f}" if s["n"] > 1 else f"{s['mean']:.{digits}f}"


def markdown(results: dict[str, Any]) -> str:
    settings = results["settings"]
    order = sorted(results["arms"], key=lambda name: (name == "control", -int(name.split("-")[0][5:] or 0)
                                                       if name.startswith("local") else 0))
    lines = [
        f"Preset `{settings['preset']}`: {settings['agents']} agents, {settings['rounds']} rounds, "
        f"{settings['groups_per_round']} groups per round. Mean ± sample std over seeds (n = seeds).",
        "",
        "| arm (local/external) | seeds | cumulative reward, own completions | vs baseline | cumulative reward, "
        "training batch | vs baseline | held-out acc. before | held-out acc. after | external groups / round | "
        "round s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in order:
        arm = results["arms"][name]
        s = arm["summary"]
        runs = list(arm["runs"].values())
        lines.append(
            f"| {arm['label']} | {len(runs)} | {_fmt(s['cumulative_reward_local'])} | "
            f"{_fmt(s.get('ratio_vs_baseline_local'))} | {_fmt(s['cumulative_reward_train'])} | "
            f"{_fmt(s.get('ratio_vs_baseline_train'))} | {_fmt(s['heldout_first'], 3)} | "
            f"{_fmt(s['heldout_last'], 3)} | {statistics.fmean(r['external_used_per_round'] for r in runs):.2f} | "
            f"{statistics.fmean(r['round_s'] for r in runs):.0f} |")
    lines += _ratio_table(results, order)
    if results["pending_runs"]:
        lines += ["", f"Unfinished runs (not in the table): {', '.join(results['pending_runs'])}."]
    lines += ["", "Scaled-down choices:", *[f"- {n}" for n in settings["notes"]]]
    return "\n".join(lines) + "\n"


def _ci(c: dict[str, float] | None) -> str:
    if not c:
        return "-"
    return f"{c['ratio']:.2f} [{c['lo']:.2f}, {c['hi']:.2f}]" if c["n"] > 1 else f"{c['ratio']:.2f} (1 seed)"


def _ratio_table(results: dict[str, Any], order: list[str]) -> list[str]:
    """Held-out accuracies (both sets, also at equal compute) and the ratios to the baseline with paired
    bootstrap 95% intervals, for experiments whose logs have what they need."""
    arms = results["arms"]
    if not any("ci_vs_baseline" in arms[n] for n in order):
        return []
    keys = [k for k in RATIO_KEYS if any(arms[n].get("ci_vs_baseline", {}).get(k) for n in order)]
    budget = results["equal_compute"]
    lines = ["", "Held-out accuracy at the end (mean ± std over seeds) and at equal node compute: "
             f"{budget.get('tokens') or 0:.0f} tokens (generated + trained) and {budget.get('seconds') or 0:.0f} s "
             "of round time per agent, the most every run reached.", "",
             "| arm | seeds | held-out before | held-out end | OOD before | OOD end | held-out at equal tokens | "
             "held-out at equal seconds | OOD at equal tokens | tokens / agent | git commits |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name in order:
        arm, s = arms[name], arms[name]["summary"]
        runs = list(arm["runs"].values())
        eq = {k: _spread([r[k] for r in runs if r.get(k) is not None]) if any(r.get(k) is not None for r in runs)
              else None for k in ("heldout_at_equal_tokens", "heldout_at_equal_seconds", "ood_at_equal_tokens")}
        commits = sorted({(r.get("git_commit") or "?")[:8] + ("+dirty" if r.get("git_dirty") else "") for r in runs})
        lines.append(f"| {arm['label']} | {len(runs)} | {_fmt(s['heldout_first'], 3)} | {_fmt(s['heldout_last'], 3)} "
                     f"| {_fmt(s.get('ood_first'), 3)} | {_fmt(s.get('ood_last'), 3)} | "
                     f"{_fmt(eq['heldout_at_equal_tokens'], 3)} | {_fmt(eq['heldout_at_equal_seconds'], 3)} | "
                     f"{_fmt(eq['ood_at_equal_tokens'], 3)} | "
                     f"{statistics.fmean(r['tokens_per_agent'] for r in runs):.0f} | {' '.join(commits)} |")
    lines += ["", f"Ratio to {results['baseline']} (paired by seed: ratio of seed means, percentile bootstrap 95% "
              "interval over seeds, 10,000 resamples; with fewer than 3 seeds it only spans the seeds' own ratios, "
              "not a real confidence interval):", "",
              *_ci_table(arms, order, "ci_vs_baseline", keys)]
    return lines + _breakdown_tables(results, order)


def _ci_table(arms: dict[str, Any], names: list[str], field: str, keys: list[str]) -> list[str]:
    """A markdown table: one row per arm, its `field` ratios (with intervals) for `keys` of RATIO_KEYS."""
    lines = ["| arm | " + " | ".join(RATIO_KEYS[k] for k in keys) + " |", "|---|" + "---|" * len(keys)]
    for name in names:
        ci = arms[name].get(field, {})
        lines.append(f"| {arms[name]['label']} | " + " | ".join(_ci(ci.get(k)) for k in keys) + " |")
    return lines


def _breakdown_tables(results: dict[str, Any], order: list[str]) -> list[str]:
    """Held-out accuracy on the own task against the other tasks (one-task specialists only), and the ablation:
    each ingredient against the arm without it (breakdown.py)."""
    arms, lines = results["arms"], []
    if any(arms[n]["summary"].get("heldout_own_last") for n in order):
        lines += ["", "Held-out accuracy on each agent's own task (the only task of its own stream) and on the other "
                  "three, mean over agents (mean ± std over seeds):", "",
                  "| arm | seeds | own task before | own task end | other tasks before | other tasks end |",
                  "|---|---|---|---|---|---|"]
        for name in order:
            s = arms[name]["summary"]
            lines.append(f"| {arms[name]['label']} | {len(arms[name]['runs'])} | "
                         + " | ".join(_fmt(s.get(f"heldout_{side}_{when}"), 3)
                                      for side in ("own", "other") for when in ("first", "last")) + " |")
    if "control" in arms and any(arms[n].get("ci_vs_control") for n in order if n != "control"):
        keys = [k for k in CONTROL_KEYS if any(arms[n]["ci_vs_control"].get(k) for n in order if n != "control")]
        lines += ["", "Ratio to the control (4/0 with local filtering), paired by seed, percentile bootstrap 95% "
                  "interval:", "", *_ci_table(arms, [n for n in order if n != "control"], "ci_vs_control", keys)]
    rows = results.get("ablation") or []
    keys = [k for k in ABLATION_KEYS if any(row["ratios"].get(k) for row in rows)]
    if any(row["parent"] != results["baseline"] for row in rows):  # otherwise it repeats the ratio table
        lines += ["", "Ablation: each ingredient against the same arm without it, paired by seed (ratio of seed means, "
                  "percentile bootstrap 95% interval; with fewer than 3 seeds it only spans the seeds' own ratios):",
                  "", "| ingredient | arm | against | seeds | " + " | ".join(ABLATION_KEYS[k] for k in keys) + " |",
                  "|---|---|---|---|" + "---|" * len(keys)]
        for row in sorted(rows, key=lambda r: (order.index(r["arm"]) if r["arm"] in order else len(order))):
            lines.append(f"| {row['ingredient']} | {arms[row['arm']]['label']} | {arms[row['parent']]['label']} | "
                         f"{', '.join(map(str, row['seeds']))} | "
                         + " | ".join(_ci(row["ratios"].get(k)) for k in keys) + " |")
    return lines


def embed(doc: Path, root: Path, text: str) -> None:
    """Put an experiment's generated markdown `text` into the document `doc` (docs/results.md), between the
    marker lines `<!-- begin experiment report ROOT -->` and `<!-- end experiment report ROOT -->`, ROOT being the
    experiment directory relative to `doc`'s folder (appended at
    the end, markers included, if `doc` has none), with its plot paths made relative to `doc`'s folder. The rest
    of `doc` is left as it is, so the tables there are re-created from the logs by one command, never copied by
    hand.

    Raises:
        FileNotFoundError: `doc` does not exist.
    """
    name = Path(os.path.relpath(root.resolve(), doc.resolve().parent)).as_posix()  # ../experiments/x from docs/
    begin, end = f"<!-- begin experiment report {name} -->", f"<!-- end experiment report {name} -->"
    plots = f"{name}/plots"
    block = f"{begin}\n{text.replace('](plots/', f']({plots}/').rstrip()}\n{end}"
    current = doc.read_text()
    if begin in current and end in current.split(begin, 1)[1]:
        head, rest = current.split(begin, 1)
        current = head + block + rest.split(end, 1)[1]
    else:
        current = current.rstrip("\n") + "\n\n" + block + "\n"
    doc.write_text(current)


def write_results(root: Path, doc: Path | None = None) -> Path:
    """Write results.json, results.md and plots/ for an experiment directory, and with `doc` the same tables and
    plots into that document (embed). Returns the markdown path.

    Raises:
        FileNotFoundError: `root` holds no experiment.json, or `doc` does not exist.
    """
    results = collect(root)
    for arm in results["arms"].values():  # JSON keys must be strings
        for run in arm["runs"].values():
            run["heldout_by_round"] = {str(k): v for k, v in run["heldout_by_round"].items()}
    (root / "results.json").write_text(json.dumps(results, indent=1, sort_keys=True))
    for arm in results["arms"].values():
        for run in arm["runs"].values():
            run["heldout_by_round"] = {int(k): v for k, v in run["heldout_by_round"].items()}
    md = root / "results.md"
    from swarm_node.experiment.plots import plot

    figures = plot(root, results) if results["arms"] else []
    text = markdown(results) + "".join(f"\n![{p.stem}](plots/{p.name})\n" for p in figures)
    md.write_text(f"# Experiment {root.name}\n\n" + text)
    if doc is not None:
        embed(doc, root, text)
    return md
