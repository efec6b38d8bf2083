"""Spec cost benchmark: the worst a single hostile payload can cost a node now that specs are bounded (issue 15).

    python benchmarks/spec_cost.py [--model tiny] [--groups 32] [--completions 8] [--train-groups 8]

For every dataset of the allow-list (`SAFE_CONFIG_RANGES`, network/verify.py) the script builds the *largest
allowed* config (every min_* key at the bottom of its range, every other numeric key at the top), then a payload of `--groups`
groups of that spec with `--completions` completions each (the receiver's limits allow 32 x 32; more groups
cost verification linearly, more completions only cost scoring), and measures:

- verification: wall time of one payload in the budgeted worker process (VerifyWorker.run, as the node runs it),
  the worker's peak RSS (VmHWM) and whether the payload passed the prompt-token limit;
- training: one GRPO step (median of 3) of the local policy on `--train-groups` such groups (the most a round takes from one
  peer is J), its wall time and the node process's RSS growth, next to the same step on the node's own smol
  chain_sum spec.

Prints a table and writes benchmarks/results/spec_cost.json (with git commit and settings).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import time
from pathlib import Path

import psutil

from swarm_node.config import NetworkConfig, TrainConfig
from swarm_node.learning.sapo import Group
from swarm_node.learning.tasks import RG_VERSION, SMOL_TASKS, TaskSet, TaskSpec, prompt_messages, recreate
from swarm_node.network.verify import PROMPT_BYTES_PER_TOKEN, SAFE_CONFIG_RANGES, VerifyWorker


def largest_config(dataset: str) -> dict:
    config = {}
    for key, bound in SAFE_CONFIG_RANGES[dataset].items():
        if isinstance(bound, tuple):  # the widest range: min_* at the bottom, every other key at the top
            config[key] = bound[0] if key.startswith("min_") else bound[1]
    return config


def worker_peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--groups", type=int, default=32)
    parser.add_argument("--completions", type=int, default=8)
    parser.add_argument("--train-groups", type=int, default=8)
    args = parser.parse_args()

    import torch

    from swarm_node.learning.models import load_policy
    from swarm_node.learning.trainer import Trainer

    torch.set_num_threads(1)
    net = NetworkConfig()
    taskset = TaskSet("smol", [], -1, 0, 100_000)
    train = TrainConfig(model=args.model, num_completions=args.completions)
    policy = load_policy(args.model, 0, train.precision)
    trainer = Trainer(policy, train, taskset)
    worker = VerifyWorker(net.verify_memory_mb, net.verify_timeout_s)
    worker._ensure()
    process = psutil.Process()
    completions = [f"<answer>{k}</answer>" for k in range(args.completions)]

    def train_step(spec_of) -> tuple[float, float, int]:
        groups = [Group(spec_of(i), completions, [float(k == 0) for k in range(args.completions)], "QmBench", 1, 0,
                        "x") for i in range(args.train_groups)]
        rss0 = process.memory_info().rss
        times = []
        for _ in range(3):  # median of 3 steps: the machine is shared
            t0 = time.perf_counter()
            stats = trainer.step(groups)
            times.append(time.perf_counter() - t0)
        return sorted(times)[1], (process.memory_info().rss - rss0) / 2**20, stats.num_tokens

    rows = []
    own = SMOL_TASKS["chain_sum"]
    base_s, base_mb, base_tokens = train_step(lambda i: TaskSpec("chain_sum", own, 1, i, 1000))
    rows.append(dict(dataset="chain_sum (own smol spec)", config=own, verify_s=None, worker_peak_rss_mb=None,
                     prompt_tokens=None, train_s=base_s, train_rss_growth_mb=base_mb, train_tokens=base_tokens))
    for dataset in sorted(SAFE_CONFIG_RANGES):
        config = largest_config(dataset)
        specs = [TaskSpec(dataset, config, 1, i, 1000, RG_VERSION) for i in range(args.groups)]
        work = [(s, completions) for s in specs]
        t0 = time.perf_counter()
        try:
            results = worker.run(work, taskset.system_prompt, taskset.num_fewshot,
                                 PROMPT_BYTES_PER_TOKEN * net.max_prompt_tokens)
            verdicts = sorted({r[0] for r in results})
            prompts = [r[2] for r in results if r[0] == "ok" and r[2] is not None]
        except Exception as e:  # a budget break is a result too
            verdicts, prompts = [getattr(e, "reason", repr(e))], []
        verify_s = time.perf_counter() - t0
        prompt_tokens = max((len(policy.tokenizer(p).input_ids) for p in prompts), default=None)
        row = dict(dataset=dataset, config=config, verify_s=verify_s, worker_peak_rss_mb=worker_peak_rss_mb(worker.pid)
                   if worker.pid else None, verdicts=verdicts, prompt_tokens=prompt_tokens,
                   passes_prompt_limit=prompt_tokens is not None and prompt_tokens <= net.max_prompt_tokens)
        if row["passes_prompt_limit"] and verdicts == ["ok"]:
            row["train_s"], row["train_rss_growth_mb"], row["train_tokens"] = train_step(lambda i: specs[i])
        rows.append(row)
        print(f"{dataset:24s} verify {verify_s:6.3f} s  worker peak {row['worker_peak_rss_mb'] or 0:6.0f} MB  "
              f"prompt {prompt_tokens} tok  {verdicts}  train {row.get('train_s', float('nan')):.3f} s "
              f"(+{row.get('train_rss_growth_mb', 0):.0f} MB)", flush=True)
    worker.close()
    trained = [r for r in rows[1:] if "train_s" in r]
    worst_train = max(trained, key=lambda r: r["train_s"])
    worst_verify = max(rows[1:], key=lambda r: r["verify_s"])
    summary = dict(
        baseline_train_s=base_s,
        worst_train=dict(dataset=worst_train["dataset"], train_s=worst_train["train_s"],
                         ratio_to_baseline=worst_train["train_s"] / base_s),
        worst_verify=dict(dataset=worst_verify["dataset"], verify_s=worst_verify["verify_s"]),
        worst_worker_peak_rss_mb=max(r["worker_peak_rss_mb"] or 0 for r in rows[1:]),
        node_peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        worst_round_added_s=worst_verify["verify_s"] + worst_train["train_s"] - base_s,
    )
    print(json.dumps(summary, indent=1))
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    out = Path(__file__).parent / "results" / "spec_cost.json"
    out.write_text(json.dumps(dict(commit=commit, settings=vars(args), machine=platform.platform(),
                                   cpu_count=psutil.cpu_count(), max_prompt_tokens=net.max_prompt_tokens,
                                   verify_memory_mb=net.verify_memory_mb, verify_timeout_s=net.verify_timeout_s,
                                   summary=summary, rows=rows), indent=1))
    print("wrote", out)


if __name__ == "__main__":
    main()
