"""Base reward of a model on the node's task preset, with the strict verifier (no training).

    python benchmarks/base_reward.py [--model smollm2-135m] [--questions 32] [--completions 8]

Prints a table per task (reward mean, share of completions with <answer> tags, groups with signal) and writes
benchmarks/results/base_reward.json.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from swarm_node.config import TrainConfig
from swarm_node.learning.models import load_policy
from swarm_node.learning.rollouts import generate_and_score
from swarm_node.learning.tasks import TaskSet, TaskSpec
from swarm_node.learning.trainer import Trainer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--preset", default="smol")
    parser.add_argument("--questions", type=int, default=32, help="questions per task")
    parser.add_argument("--completions", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/results/base_reward.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    policy = load_policy(args.model)
    taskset = TaskSet(args.preset, [], -1, seed=12345, size=100_000)  # seed unused by training streams
    trainer = Trainer(policy, TrainConfig(model=args.model), taskset)
    rng = random.Random(0)
    rows = {}
    for task, config in sorted(taskset.tasks.items()):
        specs = [TaskSpec(task, config, taskset.seed, rng.randrange(taskset.size), taskset.size)
                 for _ in range(args.questions)]
        t0 = time.perf_counter()
        rewards, tagged, signal = [], 0, 0
        for start in range(0, len(specs), 4):  # the node's batch: 4 questions x L completions
            batch = specs[start:start + 4]
            scored = generate_and_score(policy, [trainer.prompt_text(s) for s in batch], batch, args.completions,
                                        args.max_new_tokens, 1.0)
            rewards += [x for g in scored.groups for x in g.rewards]
            tagged += scored.formatted
            signal += sum(g.has_signal for g in scored.groups)
        rows[task] = {"config": config, "reward_mean": sum(rewards) / len(rewards),
                      "format_rate": tagged / len(rewards), "groups_with_signal": signal / len(specs),
                      "questions": len(specs), "completions_per_question": args.completions,
                      "seconds": round(time.perf_counter() - t0, 1)}
    overall = sum(r["reward_mean"] for r in rows.values()) / len(rows)
    table = Table(title=f"base reward of {args.model} on preset {args.preset} (strict verifier, temperature 1.0)")
    for col in ("task", "reward", "<answer> tags", "groups with signal", "s"):
        table.add_column(col)
    for task, r in rows.items():
        table.add_row(task, f"{r['reward_mean']:.3f}", f"{r['format_rate']:.2f}", f"{r['groups_with_signal']:.2f}",
                      str(r["seconds"]))
    table.add_row("mean", f"{overall:.3f}", "", "", "")
    Console().print(table)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"model": args.model, "preset": args.preset, "tasks": rows,
                                          "reward_mean": overall, "max_new_tokens": args.max_new_tokens}, indent=1))


if __name__ == "__main__":
    main()
