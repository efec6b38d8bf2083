"""Where a node's CPU goes, measured in one run: generation, training, peak memory and swarm overhead.

    python benchmarks/node_speed.py [--threads 1] [--repeats 3] [--swarm-rounds 4] [--skip-swarm]

1. Generation tokens/s of the node's path (`swarm_node.learning.generation.generate`: each prompt prefilled
   once with its KV cache shared by its L samples, bf16 weight copy, finished rows dropped) vs plain
   `transformers` `model.generate(num_return_sequences=L, do_sample=True)` on the fp32 model, same prompts
   (I = 4 `smol` questions with the two-example prompt), L = 8, 32 new tokens. Also vs plain `generate` under
   bf16 autocast (what the node did before).
2. Train-step seconds per 1k completion tokens of the node's `Trainer.step` (shared-prompt forward, LM head on
   completion positions only, bf16 autocast, fused AdamW) vs a naive fp32 step (one full prompt + completion
   forward per completion, full-vocabulary log-softmax, micro-batch 4, AdamW), same groups.
3. The training step's achieved FLOP/s as a share of this machine's own bf16 matmul peak, both measured in this
   run with the same threads (`torch.matmul` of two 4096 x 4096 bf16 matrices, best of 5), the share of padding
   in the completion positions it runs, and what shortens it (issue 11, part 4): the step before length buckets
   (one padded batch per group, LM head on every position), the length buckets, and (measured only, never the
   default: it changes the prompt) the 1- and 0-example prompts.
4. Peak RSS and the share of round time spent in swarm work (publish + collect minus idle waiting, which
   includes fetching and verifying peers' groups) from a real 2-node SmolLM2 local swarm (`swarm-node swarm`).

Prints a table and writes benchmarks/results/node_speed.json. Timings depend on machine load, which is
recorded (os.getloadavg) next to them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

from swarm_node.config import TrainConfig
from swarm_node.learning.generation import generate
from swarm_node.learning.models import load_policy
from swarm_node.learning.rollouts import score_generated
from swarm_node.learning.sapo import Group
from swarm_node.learning.tasks import TaskSet
from swarm_node.learning.trainer import Trainer

I, L, MAX_NEW_TOKENS = 4, 8, 32


def plain_generate(policy, prompts: list[str], autocast_bf16: bool) -> int:
    """Plain transformers sampling, the way a first implementation calls it. Returns new tokens (to first EOS)."""
    tok = policy.tokenizer
    batch = tok(prompts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if autocast_bf16 else torch.autocast("cpu", enabled=False)
    with torch.no_grad(), ctx:
        out = policy.model.generate(**batch, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                                    max_new_tokens=MAX_NEW_TOKENS, num_return_sequences=L,
                                    pad_token_id=tok.pad_token_id)
    new = out[:, batch["input_ids"].shape[1]:]
    finished = (new == tok.eos_token_id).cumsum(dim=1)
    return int(((finished == 0) | ((finished == 1) & (new == tok.eos_token_id))).sum())


def naive_step(policy, trainer: Trainer, groups: list[Group], optimizer) -> int:
    """Reference fp32 GRPO step: full forward per completion, full-vocab log-softmax. Returns completion tokens."""
    sequences, total = trainer._sequences(groups)
    optimizer.zero_grad(set_to_none=True)
    for k in range(0, len(sequences), 4):
        batch = sequences[k:k + 4]
        T = max(len(s.prompt_ids) + len(s.completion_ids) for s in batch)
        ids = torch.full((len(batch), T), policy.tokenizer.pad_token_id)
        attn = torch.zeros((len(batch), T), dtype=torch.long)
        for i, s in enumerate(batch):
            seq = s.prompt_ids + s.completion_ids
            ids[i, :len(seq)] = torch.tensor(seq)
            attn[i, :len(seq)] = 1
        logp_all = F.log_softmax(policy.model(input_ids=ids, attention_mask=attn).logits.float(), -1)  # (B, T, V)
        loss = 0.0
        for i, s in enumerate(batch):
            p, c = len(s.prompt_ids), len(s.completion_ids)
            lp = logp_all[i, p - 1:p - 1 + c].gather(1, torch.tensor(s.completion_ids).unsqueeze(1)).squeeze(1)
            loss = loss - s.advantage * lp.sum() / total  # ratio 1 at the first step: the clipped loss's gradient
        loss.backward()
    torch.nn.utils.clip_grad_norm_(policy.model.parameters(), 1.0)
    optimizer.step()
    return sum(len(s.completion_ids) for s in sequences)


def training_groups(policy, specs, out) -> list[Group]:
    """The sampled completions scored by the node's verifier (learning/rollouts.py), without generator log-probs;
    a group whose rewards are all equal gets its first reward flipped, so every group trains."""
    groups = score_generated(policy, specs, out, "bench", 1, keep_logprobs=False).groups
    for g in groups:
        if not g.has_signal:
            g.rewards[0] = 1.0 - g.rewards[0]
    return groups


def bench_compute(args) -> dict:
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    taskset = TaskSet("smol", [], -1, 0, 100_000)
    rng = random.Random(0)
    node = load_policy("smollm2-135m", precision="auto")
    fp32 = load_policy("smollm2-135m", precision="fp32")
    trainer = Trainer(node, TrainConfig(), taskset)
    gen_rows = {"node": [], "plain_fp32": [], "plain_bf16_autocast": []}
    groups_per_repeat = []
    for rep in range(args.repeats):
        specs = [taskset.draw(rng) for _ in range(I)]
        prompts = [trainer.prompt_text(s) for s in specs]
        t0 = time.perf_counter()
        out = generate(node, prompts, L, MAX_NEW_TOKENS, 1.0)
        gen_rows["node"].append(out.num_tokens / (time.perf_counter() - t0))
        for name, bf16 in (("plain_fp32", False), ("plain_bf16_autocast", True)):
            t0 = time.perf_counter()
            n = plain_generate(fp32, prompts, bf16)
            gen_rows[name].append(n / (time.perf_counter() - t0))
        groups_per_repeat.append(training_groups(node, specs, out))
        print(f"repeat {rep + 1}: tokens/s node {gen_rows['node'][-1]:.0f}, plain fp32 {gen_rows['plain_fp32'][-1]:.0f}, "
              f"plain bf16 {gen_rows['plain_bf16_autocast'][-1]:.0f}", flush=True)
    train_rows = {"node": [], "naive_fp32": []}
    naive_trainer = Trainer(fp32, TrainConfig(precision="fp32"), taskset)
    naive_opt = torch.optim.AdamW(fp32.model.parameters(), lr=2e-5, weight_decay=0.0)
    for groups in groups_per_repeat:
        t0 = time.perf_counter()
        stats = trainer.step(groups)
        completion_tokens = sum(len(node.tokenizer(c, add_special_tokens=False)["input_ids"][:MAX_NEW_TOKENS]) + 1
                                for g in groups for c in g.completions)
        train_rows["node"].append((time.perf_counter() - t0) / completion_tokens * 1000)
        t0 = time.perf_counter()
        n = naive_step(fp32, naive_trainer, groups, naive_opt)
        train_rows["naive_fp32"].append((time.perf_counter() - t0) / n * 1000)
        print(f"train s/1k tokens: node {train_rows['node'][-1]:.2f}, naive fp32 {train_rows['naive_fp32'][-1]:.2f} "
              f"({stats.num_sequences} sequences)", flush=True)
    med = {k: statistics.median(v) for k, v in {**gen_rows, **{f"train_{k}": v for k, v in train_rows.items()}}.items()}
    return {
        "generation_tokens_per_s": {k: statistics.median(v) for k, v in gen_rows.items()},
        "generation_ratio_vs_plain_fp32": med["node"] / med["plain_fp32"],
        "generation_ratio_vs_plain_bf16_autocast": med["node"] / med["plain_bf16_autocast"],
        "train_s_per_1k_tokens": {k: statistics.median(v) for k, v in train_rows.items()},
        "train_speedup_vs_naive_fp32": med["train_naive_fp32"] / med["train_node"],
        "raw": {"generation": gen_rows, "train": train_rows},
    }


def matmul_peak_flops(n: int = 4096, repeats: int = 5) -> float:
    """This machine's bf16 matmul FLOP/s with the current torch threads: 2 n^3 / (best time of `repeats`)."""
    a, b = torch.randn(n, n, dtype=torch.bfloat16), torch.randn(n, n, dtype=torch.bfloat16)
    torch.matmul(a, b)  # warm-up (oneDNN picks its kernel)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.matmul(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best


def step_flops(policy, micro: list) -> float:
    """Useful matmul FLOPs of one `Trainer.step` (forward + backward = 3x forward; Kaplan et al. 2020, "Scaling
    Laws", C = 6 N per token), padding excluded: the decoder's non-embedding weights on every position that must
    run (each prompt once, then Tc_i - 1 positions per completion), the LM head on the Tc_i positions that predict
    completion tokens, and attention scores and values (4 x layers x hidden x query positions x key positions).
    Divided by the step time this is the model FLOPs utilisation's numerator (PaLM, Chowdhery et al. 2022)."""
    cfg = policy.model.config
    H, layers, V = cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size
    n_dec = sum(p.numel() for p in policy.model.parameters()) - V * H * (1 if cfg.tie_word_embeddings else 2)
    total = 0.0
    for batch in micro:
        Tp, cols = len(batch[0].prompt_ids), [len(s.completion_ids) for s in batch]
        attn = 4 * layers * H * (Tp * Tp / 2 + sum((c - 1) * (Tp + c / 2) for c in cols))
        total += 2 * n_dec * (Tp + sum(c - 1 for c in cols)) + 2 * V * H * sum(cols) + attn
    return 3 * total


class PaddedTrainer(Trainer):
    """The training step before length buckets: one right-padded (B, Tc) batch per micro-batch on the shared
    prompt cache, and the LM head on every position, padding included."""

    BUCKET_OVERHEAD_POSITIONS = 10 ** 9

    def _completion_logprobs(self, model, batch):
        from transformers import DynamicCache

        prompt, pad = batch[0].prompt_ids, self.policy.tokenizer.pad_token_id
        B, Tp, Tc = len(batch), len(prompt), max(len(s.completion_ids) for s in batch)
        targets, mask = torch.full((B, Tc), pad, dtype=torch.long), torch.zeros((B, Tc))
        for i, s in enumerate(batch):
            targets[i, : len(s.completion_ids)] = torch.tensor(s.completion_ids)
            mask[i, : len(s.completion_ids)] = 1
        decoder = getattr(model, model.base_model_prefix)
        cache = DynamicCache()
        prompt_hidden = decoder(input_ids=torch.tensor([prompt]), cache=cache, use_cache=True).last_hidden_state
        cache.batch_repeat_interleave(B)
        picked = prompt_hidden[:, -1:].expand(B, 1, -1)
        if Tc > 1:
            attention = torch.cat([torch.ones((B, Tp)), mask], dim=1).long()
            positions = torch.arange(Tp, Tp + Tc - 1).expand(B, -1)
            hidden = decoder(input_ids=targets[:, :-1], attention_mask=attention[:, :-1], position_ids=positions,
                             cache=cache, use_cache=True).last_hidden_state
            picked = torch.cat([picked, hidden], dim=1)
        logits = model.get_output_embeddings()(picked).float()
        logprobs = -F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none")
        return logprobs.view(B, Tc), mask


class EveryLengthTrainer(Trainer):
    """Length buckets with no per-bucket overhead assumed: every distinct length its own decoder call."""

    BUCKET_OVERHEAD_POSITIONS = 0


def _positions_run(trainer: Trainer, micro: list) -> int:
    """Completion positions the decoder runs, padding included, under `trainer`'s bucketing."""
    return sum(len(rows) * Tb for b in micro for rows, Tb in trainer.length_buckets([len(s.completion_ids) for s in b]))


def bench_train_step(args, groups_per_repeat: list[list[Group]] | None = None) -> dict:
    """Training-step model FLOPs utilisation against this machine's bf16 matmul peak, padding share, and step
    time of the variants (interleaved per repeat, in rotating order; medians), on the same groups."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    policy = load_policy("smollm2-135m", precision="auto")
    taskset = TaskSet("smol", [], -1, 0, 100_000)
    if groups_per_repeat is None:  # sample the groups here (the same way bench_compute does)
        rng, trainer = random.Random(0), Trainer(policy, TrainConfig(), taskset)
        groups_per_repeat = []
        for _ in range(args.repeats):
            specs = [taskset.draw(rng) for _ in range(I)]
            out = generate(policy, [trainer.prompt_text(s) for s in specs], L, MAX_NEW_TOKENS, 1.0)
            groups_per_repeat.append(training_groups(policy, specs, out))
    variants = {  # name -> trainer (all share one policy; each step moves it a little, irrelevant to timing)
        "before: one padded batch per group": PaddedTrainer(policy, TrainConfig(), taskset),
        "length buckets (default)": Trainer(policy, TrainConfig(), taskset),
        "length buckets, every length its own call": EveryLengthTrainer(policy, TrainConfig(), taskset),
        "1-example prompt (not default)": Trainer(policy, TrainConfig(), TaskSet("smol", [], 1, 0, 100_000)),
        "0-example prompt (not default)": Trainer(policy, TrainConfig(), TaskSet("smol", [], 0, 0, 100_000)),
    }
    names = list(variants)
    peaks, rows = [], {name: [] for name in variants}
    for rep, groups in enumerate(groups_per_repeat):
        peaks.append(matmul_peak_flops())
        for name in names[rep % len(names):] + names[:rep % len(names)]:  # rotate: no variant always runs first
            trainer = variants[name]
            sequences, _ = trainer._sequences(groups)
            micro = trainer._micro_batches(sequences)
            t0 = time.perf_counter()
            trainer.step(groups)
            dt = time.perf_counter() - t0
            rows[name].append({"step_s": dt, "useful_flops": step_flops(policy, micro),
                               "prompt_tokens": sum(len(b[0].prompt_ids) for b in micro),
                               "completion_tokens": sum(len(s.completion_ids) for s in sequences),
                               "completion_positions_run": _positions_run(trainer, micro)})
        print(f"repeat {rep + 1}: bf16 matmul peak {peaks[-1] / 1e9:.0f} GFLOP/s; " + "; ".join(
            f"{n} {rows[n][-1]['step_s']:.1f} s" for n in names), flush=True)
    return {**summarize_train_step(rows, peaks), "load_average": os.getloadavg()}


def summarize_train_step(rows: dict[str, list[dict]], peaks: list[float]) -> dict:
    """Medians over repeats, each repeat paired with the matmul peak measured just before it and with the
    "before" variant's step on the same groups (the machine's load moves between repeats, not within one)."""
    before = rows["before: one padded batch per group"]
    out = {"bf16_matmul_peak_gflops": statistics.median(peaks) / 1e9,
           "bf16_matmul_peak_gflops_raw": [p / 1e9 for p in peaks]}
    for name, rs in rows.items():
        flops = [r["useful_flops"] / r["step_s"] for r in rs]
        out[name] = {"step_s": statistics.median(r["step_s"] for r in rs),
                     "step_time_ratio_to_before": statistics.median(r["step_s"] / b["step_s"]
                                                                    for r, b in zip(rs, before)),
                     "achieved_gflops": statistics.median(flops) / 1e9,
                     "share_of_peak": statistics.median(f / p for f, p in zip(flops, peaks)),
                     "padding_share_of_completion_positions": 1 - sum(r["completion_tokens"] for r in rs) / sum(
                         r["completion_positions_run"] for r in rs),
                     "prompt_tokens_per_step": statistics.fmean(r["prompt_tokens"] for r in rs),
                     "completion_tokens_per_step": statistics.fmean(r["completion_tokens"] for r in rs),
                     "raw": rs}
    return out


def bench_swarm(args, optimizer: str) -> dict:
    """A real 2-node SmolLM2 local swarm with the default settings and `optimizer`; per-round phases from
    metrics.jsonl."""
    out = Path(tempfile.mkdtemp(prefix="node-speed-"))
    cmd = [sys.executable, "-m", "swarm_node.cli", "swarm", "--nodes", "2", "--rounds", str(args.swarm_rounds),
           "--output-dir", str(out), "--metrics-port", "-1", "--optimizer", optimizer]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, timeout=3600)
    rows = [json.loads(x) for n in (0, 1) for x in (out / f"node{n}" / "metrics.jsonl").read_text().splitlines()]
    work = [m["publish_s"] + m["collect_s"] - m["collect_wait_s"] for m in rows]
    return {
        "optimizer": optimizer,
        "load_average_after": os.getloadavg(),
        "rounds": len(rows),
        "peak_rss_mb": max(m["peak_rss_mb"] for m in rows),
        "peak_rss_mb_per_node": [max(m["peak_rss_mb"] for m in rows if m["peer_id"] == p)
                                 for p in sorted({m["peer_id"] for m in rows})],
        "swarm_share": sum(work) / sum(m["round_s"] for m in rows),
        "swarm_work_s_per_round": statistics.fmean(work),
        "verify_ms_per_group": statistics.fmean(m["verify_ms_per_group"] for m in rows),
        "phase_s_per_round": {k: statistics.fmean(m[k] for m in rows)
                              for k in ("generate_s", "publish_s", "collect_s", "collect_wait_s", "train_s", "round_s")},
        "external_groups_used_per_round": statistics.fmean(m["external_groups_used"] for m in rows),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1, help="torch threads (a node of a 2-node swarm gets 1)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--swarm-rounds", type=int, default=4)
    parser.add_argument("--skip-swarm", action="store_true")
    parser.add_argument("--skip-compute", action="store_true", help="only the swarm runs (peak RSS, swarm share)")
    parser.add_argument("--skip-train-step", action="store_true", help="skip the FLOP/s and training-step variants")
    parser.add_argument("--optimizers", nargs="+", default=["adamw", "adafactor"], choices=["adamw", "adafactor"],
                        help="one 2-node swarm per optimizer (peak RSS differs by about 1 GB)")
    parser.add_argument("--out", default="benchmarks/results/node_speed.json")
    args = parser.parse_args()
    result = {"machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                          "torch": torch.__version__, "threads": args.threads},
              "load_average_before": os.getloadavg()}
    if Path(args.out).exists():  # keep the sections of the previous run that this run skips
        rerun = set() if args.skip_swarm else {"swarm"}
        rerun |= set() if args.skip_train_step else {"train_step"}
        if args.skip_compute:
            result.update({k: v for k, v in json.loads(Path(args.out).read_text()).items() if k not in rerun})
        else:
            result.update({k: v for k, v in json.loads(Path(args.out).read_text()).items()
                           if k in {"swarm", "train_step"} - rerun})
    if not args.skip_compute:
        result.update(bench_compute(args))
    if not args.skip_train_step:
        result["train_step"] = bench_train_step(args)
    if not args.skip_swarm:
        result["swarm"] = {opt: bench_swarm(args, opt) for opt in args.optimizers}
    if not args.skip_compute:
        result["load_average_after"] = os.getloadavg()
    table = Table(title=f"node speed (SmolLM2-135M, I={I}, L={L}, {MAX_NEW_TOKENS} new tokens, {args.threads} thread(s))")
    for col in ("measure", "node", "reference", "ratio", "target"):
        table.add_column(col)
    if "generation_tokens_per_s" in result:
        g = result["generation_tokens_per_s"]
        table.add_row("generation tokens/s", f"{g['node']:.0f}", f"{g['plain_fp32']:.0f} (plain generate, fp32)",
                      f"{result['generation_ratio_vs_plain_fp32']:.2f}x", ">= 2x")
        table.add_row("", "", f"{g['plain_bf16_autocast']:.0f} (plain generate, bf16 autocast)",
                      f"{result['generation_ratio_vs_plain_bf16_autocast']:.2f}x", "")
        t = result["train_s_per_1k_tokens"]
        table.add_row("train s / 1k completion tokens", f"{t['node']:.2f}", f"{t['naive_fp32']:.2f} (naive fp32)",
                      f"{result['train_speedup_vs_naive_fp32']:.2f}x faster", "")
    ts = result.get("train_step")
    if ts:
        base = ts["length buckets (default)"]
        table.add_row("train step: share of bf16 matmul peak", f"{100 * base['share_of_peak']:.1f}%",
                      f"{ts['bf16_matmul_peak_gflops']:.0f} GFLOP/s peak (torch.matmul bf16 4096^2)",
                      f"{base['achieved_gflops']:.0f} GFLOP/s", "")
        for name, v in ts.items():
            if isinstance(v, dict) and "step_s" in v:
                table.add_row(f"train step: {name}", f"{v['step_s']:.2f} s",
                              f"padding {100 * v['padding_share_of_completion_positions']:.0f}% of completion "
                              f"positions, {v['prompt_tokens_per_step']:.0f} prompt tokens",
                              f"{v['step_time_ratio_to_before']:.2f}x the step time before", "")
    for opt, s in result.get("swarm", {}).items():
        table.add_row(f"peak RSS of a node, MB ({opt})", f"{s['peak_rss_mb']:.0f}", "", "", "<= 3072")
        table.add_row(f"swarm share of round time ({opt})", f"{100 * s['swarm_share']:.2f}%", "", "", "<= 2%")
    Console().print(table)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
