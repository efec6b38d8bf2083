"""Figures of an experiment, from its logs: per-agent reward, agent-averaged reward, cumulative reward, held-out
accuracy by round, and held-out accuracy against the node's own compute (tokens and seconds; stats.py)."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from swarm_node.records import load_run

MOVING_AVERAGE_ROUNDS = 5


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
                ys = [m.reward_local_mean for m in agent["metrics"]][:rounds]
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
        series = [[m.reward_local_mean for m in a["metrics"]][:rounds] for run in runs[name].values()
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
                    if m.round <= rounds:
                        per_round[m.round - 1] += m.reward_local_mean
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
    if any(r.get("curve_heldout") for arm in results["arms"].values() for r in arm["runs"].values()):
        paths.append(plot_accuracy_vs_compute(plots, results, colors, label))
    return paths


def plot_accuracy_vs_compute(plots: Path, results: dict[str, Any], colors: dict[str, str],
                             label: dict[str, str]) -> Path:
    """Held-out (top) and OOD (bottom) accuracy against the node's own compute: tokens (left) and seconds of
    round time (right), per agent; one line per run (seeds dashed after the first)."""
    import matplotlib.pyplot as plt

    has_ood = any(r.get("curve_ood") for arm in results["arms"].values() for r in arm["runs"].values())
    rows = 2 if has_ood else 1
    fig, axes = plt.subplots(rows, 2, figsize=(11, 3.8 * rows), squeeze=False)
    for name in sorted(results["arms"]):
        runs = results["arms"][name]["runs"]
        for k, seed in enumerate(sorted(runs)):
            for row, key in enumerate(("curve_heldout", "curve_ood")[:rows]):
                curve = runs[seed].get(key) or []
                for col, axis in enumerate(("tokens", "seconds")):
                    axes[row][col].plot([p[axis] for p in curve], [p["accuracy"] for p in curve], marker=".",
                                        color=colors[name], ls="-" if k == 0 else "--", alpha=0.85,
                                        label=label[name] if k == 0 else None)
    for row, what in enumerate(("held-out", "OOD")[:rows]):
        axes[row][0].set_xlabel("node compute: tokens generated + trained (per agent)")
        axes[row][1].set_xlabel("node compute: seconds of round time (per agent)")
        for ax in axes[row]:
            ax.set_ylabel(f"{what} greedy accuracy (mean of agents)")
            ax.legend(fontsize=7)
    fig.suptitle("Accuracy against the node's own compute (each line one run; dashed: later seeds)", fontsize=10)
    fig.tight_layout()
    path = plots / "accuracy_vs_compute.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


