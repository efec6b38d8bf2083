"""The base model on the held-out sets: the fixed in-distribution and OOD sets, and the OOD candidate task sizes.

    python benchmarks/heldout_base.py [--threads 2] [--candidates-per-task 16] [--skip-candidates]

1. Greedy accuracy of SmolLM2-135M-Instruct (no training) on exactly the sets the `homogeneous` and
   `heterogeneous` experiments evaluate: 64 in-distribution questions under the training prompt and 32 OOD
   questions under the OOD prompt (swarm_node/evaluation.py), per task.
2. The candidates the OOD set was chosen from (unseen tasks and harder sizes of the trained ones), each on
   `--candidates-per-task` questions under the OOD prompt: a candidate where the base model is at 0 gives no
   signal and was not used.

Prints a table and writes benchmarks/results/heldout_base.json (with the git commit).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from swarm_node.config import load_config
from swarm_node.evaluation import OOD_SEED, evaluate, greedy_accuracy, ood_messages
from swarm_node.experiment.presets import PRESETS
from swarm_node.learning.models import load_policy
from swarm_node.learning.tasks import TaskSet, TaskSpec
from swarm_node.learning.trainer import Trainer

CANDIDATES = (
    ("products", {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1}),
    ("gcd", {"min_numbers": 2, "max_numbers": 2, "min_value": 1, "max_value": 20}),
    ("lcm", {"min_numbers": 2, "max_numbers": 2, "min_value": 1, "max_value": 10}),
    ("leg_counting", {"min_animals": 1, "max_animals": 1}),
    ("chain_sum", {"min_terms": 3, "max_terms": 3, "min_digits": 1, "max_digits": 1}),
    ("chain_sum", {"min_terms": 2, "max_terms": 2, "min_digits": 2, "max_digits": 2}),
    ("basic_arithmetic", {"min_terms": 2, "max_terms": 2, "min_digits": 2, "max_digits": 2}),
    ("letter_counting", {"min_words": 8, "max_words": 12}),
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--candidates-per-task", type=int, default=16)
    parser.add_argument("--skip-candidates", action="store_true")
    parser.add_argument("--out", default="benchmarks/results/heldout_base.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = load_config(None, dict(PRESETS["homogeneous"].overrides))
    t = config.tasks
    taskset = TaskSet(t.task_preset, t.tasks, t.num_fewshot, t.task_seed, t.dataset_size)
    policy = load_policy(config.train.model, precision="auto")
    trainer = Trainer(policy, config.train, taskset)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    t0 = time.perf_counter()
    sets = evaluate(policy, trainer.prompt_text, taskset, t, config.train.max_new_tokens)
    result = {"git_commit": commit, "model": config.train.model, "threads": args.threads,
              "settings": {"eval_num_questions": t.eval_num_questions, "eval_seed": t.eval_seed,
                           "eval_ood_num_questions": t.eval_ood_num_questions, "ood_seed": OOD_SEED,
                           "max_new_tokens": config.train.max_new_tokens},
              "base_model": sets, "eval_wall_s": time.perf_counter() - t0, "candidates": []}
    tok = policy.tokenizer
    for name, cfg in () if args.skip_candidates else CANDIDATES:
        specs = [TaskSpec(name, cfg, OOD_SEED + 1, i, t.dataset_size) for i in range(args.candidates_per_task)]
        prompts = [tok.apply_chat_template(ood_messages(s), tokenize=False, add_generation_prompt=True)
                   for s in specs]
        res = greedy_accuracy(policy, prompts, specs, config.train.max_new_tokens)
        result["candidates"].append({"task": name, "config": cfg, **res})
        print(f"{name} {json.dumps(cfg)}: accuracy {res['accuracy']:.3f}, format {res['format_rate']:.2f}", flush=True)
    table = Table(title="base model on the held-out sets (greedy, strict verifier)")
    for col in ("set", "task", "accuracy"):
        table.add_column(col)
    for label, key in (("in distribution", "heldout"), ("out of distribution", "ood")):
        for task, acc in sets[f"{key}_by_task"].items():
            table.add_row(label, task, f"{acc:.3f}")
        table.add_row(label, "all", f"{sets['heldout_accuracy' if key == 'heldout' else 'ood_accuracy']:.3f}")
    for c in result["candidates"]:
        table.add_row("OOD candidate", f"{c['task']} {json.dumps(c['config'])}", f"{c['accuracy']:.3f}")
    Console().print(table)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
