"""Plots and a summary of finished (or running) nodes, read from their `metrics.jsonl` files.

A single node's output directory holds `metrics.jsonl` itself; a local swarm's holds `node0/metrics.jsonl`,
`node1/metrics.jsonl`, ... `write_report` reads either layout and writes into `<output_dir>/report/`:

- `reward.png`: mean local reward per round per node, with a dashed moving average over 5 rounds;
- `phases.png`: stacked bars of the mean seconds per round spent in generate/publish/collect/train, per node;
- `peers.png`: peers seen and external groups used per round per node;
- `summary.md`: a markdown table with one row per node.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from swarm_node.errors import OperatorError
from swarm_node.records import PHASES, RecordError, RoundRecord, read_rounds

METRICS = "metrics.jsonl"
WINDOW = 5  # rounds: the moving average and the "first/last rounds" columns of the summary


class ReportError(OperatorError):
    """The output directory holds no readable metrics; the message says which directory to pass instead."""


def _natural_key(name: str) -> list[Any]:
    """Sort key so that node2 comes before node10."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _read_metrics(path: Path) -> list[RoundRecord]:
    """One RoundRecord per complete line; a last line that does not parse is being written and is skipped."""
    try:
        return read_rounds(path, strict=True)
    except RecordError as e:
        raise ReportError(str(e)) from None
    except ValidationError as e:
        raise ReportError(f"{path} is not a swarm-node metrics.jsonl ({e.errors()[0]['loc']}: "
                          f"{e.errors()[0]['msg']}); pass the --output-dir a node or swarm ran with") from None


def load_runs(output_dir: Path) -> dict[str, list[RoundRecord]]:
    """Read the per-round metrics of the node(s) whose output directory is `output_dir`.

    `output_dir` is either one node's output directory (with `metrics.jsonl` in it; the node is named "node")
    or a directory whose immediate subdirectories are node output directories (named after the subdirectory).
    Returns {node name: [one RoundRecord per round, in file order]}, nodes in natural order (node2 before node10).
    A partial last line (a round being written) is skipped.
    Raises ReportError if `output_dir` has no `metrics.jsonl` in it or in its immediate subdirectories,
    or if a line other than the last is not valid JSON or not a RoundRecord.
    """
    output_dir = Path(output_dir)
    if (output_dir / METRICS).is_file():
        return {"node": _read_metrics(output_dir / METRICS)}
    paths = sorted(output_dir.glob(f"*/{METRICS}"), key=lambda p: _natural_key(p.parent.name))
    if not paths:
        raise ReportError(
            f"no {METRICS} in {output_dir} or its subdirectories: pass the --output-dir a node or swarm ran with "
            f"(e.g. runs/swarm), after it finished at least one round"
        )
    return {path.parent.name: _read_metrics(path) for path in paths}


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _fmt(value: float | None, digits: int) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _moving_average(values: list[float], window: int = WINDOW) -> list[float]:
    """Trailing mean over the last `window` values (fewer at the start)."""
    return [_mean(values[max(0, i - window + 1):i + 1]) for i in range(len(values))]


def _summary_row(name: str, records: list[RoundRecord]) -> str:
    rewards = [r.reward_local_mean for r in records]
    # `rejected` is cumulative, so the last round holds the totals.
    rejected = records[-1].rejected if records else {}
    cells = [
        name,
        str(len(records)),
        _fmt(_mean(rewards[:WINDOW]), 3),
        _fmt(_mean(rewards[-WINDOW:]), 3),
        _fmt(_mean([r.external_groups_used for r in records]), 2),
        _fmt(_mean([r.round_s for r in records]), 1),
        _fmt(max((r.peak_rss_mb for r in records), default=None), 1),
        ", ".join(f"{reason}: {count}" for reason, count in sorted(rejected.items()) if count) or "none",
    ]
    return "| " + " | ".join(cells) + " |"


def _write_summary(runs: dict[str, list[RoundRecord]], path: Path) -> None:
    header = [
        "node", "rounds", f"local reward, first {WINDOW} rounds", f"local reward, last {WINDOW} rounds",
        "external groups used", "round s", "peak RSS MB", "rejections",
    ]
    lines = [
        "# Run summary",
        "",
        "Means are per round; rejections are totals by reason over the whole run.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        *(_summary_row(name, records) for name, records in runs.items()),
    ]
    path.write_text("\n".join(lines) + "\n")


def write_report(output_dir: Path, report_dir: Path | None = None) -> Path:
    """Write reward.png, phases.png, peers.png and summary.md for the node(s) in `output_dir`.

    `output_dir` has the layout `load_runs` accepts; `report_dir` defaults to `<output_dir>/report` and is
    created if missing (existing files in it are overwritten). Returns `report_dir`.
    Raises ReportError as `load_runs` does.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    runs = load_runs(output_dir)
    report_dir = Path(report_dir) if report_dir is not None else Path(output_dir) / "report"
    report_dir.mkdir(parents=True, exist_ok=True)
    colors = {name: f"C{i % 10}" for i, name in enumerate(runs)}

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name, records in runs.items():
        rounds = [r.round for r in records]
        rewards = [r.reward_local_mean for r in records]
        ax.plot(rounds, rewards, color=colors[name], alpha=0.5, marker=".", label=name)
        ax.plot(rounds, _moving_average(rewards), color=colors[name], linestyle="--",
                label=f"{name} ({WINDOW}-round mean)")
    ax.set(xlabel="round", ylabel="mean local reward", ylim=(0, 1), title="Local reward per round")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(report_dir / "reward.png")
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(max(4, 1.2 * len(runs) + 2), 4.5))
    bottoms = [0.0] * len(runs)
    for phase in PHASES:
        heights = [_mean([r.phase_s(phase) for r in records]) or 0.0 for records in runs.values()]
        ax.bar(list(runs), heights, bottom=bottoms, label=phase)
        bottoms = [b + h for b, h in zip(bottoms, heights)]
    ax.set(ylabel="mean seconds per round", title="Time per round by phase")
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(report_dir / "phases.png")
    plt.close(fig)

    fig, (top, bottom) = plt.subplots(2, 1, sharex=True, figsize=(8, 6))
    for name, records in runs.items():
        rounds = [r.round for r in records]
        top.plot(rounds, [r.peers_seen for r in records], color=colors[name], marker=".", label=name)
        bottom.plot(rounds, [r.external_groups_used for r in records], color=colors[name], marker=".", label=name)
    top.set(ylabel="peers seen", title="Peers and external groups per round")
    bottom.set(xlabel="round", ylabel="external groups used")
    for ax in (top, bottom):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylim(bottom=0)
    top.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(report_dir / "peers.png")
    plt.close(fig)

    _write_summary(runs, report_dir / "summary.md")
    return report_dir
