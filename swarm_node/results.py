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
over agents.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

MOVING_AVERAGE_ROUNDS = 5


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The lines of a per-round JSONL log, up to a torn (being written) last line; [] if the file is missing."""
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return rows


def load_run(d: Path) -> dict[str, Any]:
    """One run's per-agent series: {"agents": [{"metrics": [...], "eval": [...]}, ...], "done": {...}}."""
    agents = []
    for node in sorted(d.glob("node*"), key=lambda p: int(p.name[4:]) if p.name[4:].isdigit() else 0):
        agents.append({"name": node.name, "metrics": read_jsonl(node / "metrics.jsonl"), "eval": read_jsonl(node / "eval.jsonl")})
    done = json.loads((d / "done.json").read_text()) if (d / "done.json").exists() else None
    return {"dir": d.name, "agents": agents, "done": done}


def _spread(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values), "n": len(values)}


def summarize_run(run: dict[str, Any], rounds: int) -> dict[str, Any]:
    """Cumulative rewards (sum over agents and rounds 1..rounds), held-out accuracy per evaluation round
    (mean over agents), external groups used and round time."""
    rows = [m for a in run["agents"] for m in a["metrics"] if m["round"] <= rounds]
    evals: dict[int, list[float]] = {}
    for a in run["agents"]:
        for e in a["eval"]:
            evals.setdefault(e["round"], []).append(e["heldout_accuracy"])
    heldout = {r: statistics.fmean(v) for r, v in sorted(evals.items())}
    return {
        "cumulative_reward_local": sum(m["reward_local_mean"] for m in rows),
        "cumulative_reward_train": sum(m["reward_train_mean"] for m in rows),
        "mean_reward_local": statistics.fmean(m["reward_local_mean"] for m in rows) if rows else 0.0,
        "heldout_by_round": heldout,
        "heldout_first": heldout[min(heldout)] if heldout else None,
        "heldout_last": heldout[max(heldout)] if heldout else None,
        "external_used_per_round": statistics.fmean(m["external_groups_used"] for m in rows) if rows else 0.0,
        "round_s": statistics.fmean(m["round_s"] for m in rows) if rows else 0.0,
        "agent_rounds": len(rows),
    }


def collect(root: Path) -> dict[str, Any]:
    """Every finished run of an experiment directory, grouped by arm, with per-arm mean and spread over seeds."""
    settings = json.loads((root / "experiment.json").read_text())
    rounds = settings["rounds"]
    arms: dict[str, dict[str, Any]] = {}
    pending = []
    for d in sorted((root / "runs").glob("*-seed*")):
        run = load_run(d)
        if run["done"] is None:
            pending.append(d.name)
            continue
        arm = arms.setdefault(run["done"]["arm"], {"label": run["done"]["label"], "runs": {}})
        arm["runs"][run["done"]["seed"]] = {**summarize_run(run, rounds), "wall_s": run["done"]["wall_s"]}
    for arm in arms.values():
        runs = list(arm["runs"].values())
        arm["summary"] = {key: _spread([r[key] for r in runs]) for key in
                          ("cumulative_reward_local", "cumulative_reward_train", "mean_reward_local")}
        for key in ("heldout_first", "heldout_last"):
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
    return {"settings": settings, "baseline": baseline, "arms": arms, "pending_runs": pending}


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
    if results["pending_runs"]:
        lines += ["", f"Unfinished runs (not in the table): {', '.join(results['pending_runs'])}."]
    lines += ["", "Scaled-down choices:", *[f"- {n}" for n in settings["notes"]]]
    return "\n".join(lines) + "\n"


def _moving_average(values: list[float], window: int) -> list[float]:
    out = []
    for i in range(len(values)):
        chunk = values[max(0, i - window + 1): i + 1]
        out.append(sum(chunk) / len(chunk))
    return out


def plot(root: Path, results: dict[str, Any]) -> list[Path]:
    """The paper-style figures: per-agent reward, agent-averaged moving average with a min/max band, cumulative
    reward per arm, and held-out accuracy per arm. Returns the PNG paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots = root / "plots"
    plots.mkdir(exist_ok=True)
    names = sorted(results["arms"])
    runs = {name: {seed: load_run(root / "runs" / f"{name}-seed{seed}") for seed in results["arms"][name]["runs"]}
            for name in names}
    rounds = results["settings"]["rounds"]
    colors = {name: f"C{i}" for i, name in enumerate(names)}
    label = {name: results["arms"][name]["label"] for name in names}
    paths = []

    fig, axes = plt.subplots(1, len(names), figsize=(4 * len(names), 3.2), sharey=True, squeeze=False)
    for ax, name in zip(axes[0], names):
        for seed, run in runs[name].items():
            for agent in run["agents"]:
                ys = [m["reward_local_mean"] for m in agent["metrics"]][:rounds]
                ax.plot(range(1, len(ys) + 1), _moving_average(ys, MOVING_AVERAGE_ROUNDS), lw=0.9,
                        ls="-" if seed == min(runs[name]) else "--", alpha=0.8)
        ax.set_title(label[name], fontsize=9)
        ax.set_xlabel("round")
    axes[0][0].set_ylabel(f"own-completion reward ({MOVING_AVERAGE_ROUNDS}-round avg)")
    fig.suptitle("Per-agent reward (each line one agent; dashed: later seeds)", fontsize=10)
    fig.tight_layout()
    paths.append(plots / "reward_per_agent.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for name in names:
        series = [[m["reward_local_mean"] for m in a["metrics"]][:rounds] for run in runs[name].values()
                  for a in run["agents"]]
        series = [_moving_average(s, MOVING_AVERAGE_ROUNDS) for s in series if len(s) == rounds]
        if not series:
            continue
        xs = range(1, rounds + 1)
        mean = [statistics.fmean(col) for col in zip(*series)]
        ax.plot(xs, mean, color=colors[name], label=label[name])
        ax.fill_between(xs, [min(c) for c in zip(*series)], [max(c) for c in zip(*series)], color=colors[name],
                        alpha=0.12)
    ax.set_xlabel("round")
    ax.set_ylabel(f"own-completion reward, {MOVING_AVERAGE_ROUNDS}-round moving avg")
    ax.set_title("Agent-averaged reward (band: min/max over agents and seeds)", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(plots / "reward_moving_average.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name in names:
        curves = []
        for run in runs[name].values():
            per_round = [0.0] * rounds
            for a in run["agents"]:
                for m in a["metrics"]:
                    if m["round"] <= rounds:
                        per_round[m["round"] - 1] += m["reward_local_mean"]
            total, curve = 0.0, []
            for v in per_round:
                total += v
                curve.append(total)
            curves.append(curve)
        xs = range(1, rounds + 1)
        axes[0].plot(xs, [statistics.fmean(c) for c in zip(*curves)], color=colors[name], label=label[name])
        axes[0].fill_between(xs, [min(c) for c in zip(*curves)], [max(c) for c in zip(*curves)], color=colors[name],
                             alpha=0.12)
        held = [r["heldout_by_round"] for r in results["arms"][name]["runs"].values()]
        eval_rounds = sorted(set.intersection(*(set(h) for h in held))) if held else []
        if eval_rounds:
            axes[1].plot(eval_rounds, [statistics.fmean(h[r] for h in held) for r in eval_rounds], marker="o",
                         color=colors[name], label=label[name])
            axes[1].fill_between(eval_rounds, [min(h[r] for h in held) for r in eval_rounds],
                                 [max(h[r] for h in held) for r in eval_rounds], color=colors[name], alpha=0.12)
    axes[0].set_title("Cumulative own-completion reward (sum over agents; band: seeds)", fontsize=10)
    axes[0].set_xlabel("round")
    axes[1].set_title("Held-out greedy accuracy (mean over agents; band: seeds)", fontsize=10)
    axes[1].set_xlabel("round")
    for ax in axes:
        ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(plots / "cumulative_and_heldout.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


def write_results(root: Path) -> Path:
    """Write results.json, results.md and plots/ for an experiment directory. Returns the markdown path.

    Raises:
        FileNotFoundError: `root` holds no experiment.json.
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
    figures = plot(root, results) if results["arms"] else []
    md.write_text(f"# Experiment {root.name}\n\n" + markdown(results) + "".join(
        f"\n![{p.stem}](plots/{p.name})\n" for p in figures))
    return md
