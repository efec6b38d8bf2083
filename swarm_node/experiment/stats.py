"""Statistics of an experiment's runs: paired bootstrap confidence intervals and accuracy at equal node compute.

Node compute (issue 11: "does joining get my node to accuracy X sooner?") is counted per agent, from its own
metrics.jsonl, up to each evaluation round:
- tokens: `tokens_generated` (new tokens the node sampled) + `train_tokens` (completion tokens in its training
  batch, local and external), summed over rounds;
- seconds: `round_s` summed over rounds (the node's wall time in its rounds, on the same machine in the same
  run; the evaluation's own time is not counted, it is the same for every arm).
Held-out accuracy at a compute budget is read off the (compute, accuracy) points of the evaluations (round 0 at
compute 0) by linear interpolation; the budget is the smallest final compute of any run in the comparison, so
every run reaches it.
"""

from __future__ import annotations

from typing import Any

import numpy as np

BOOTSTRAP_RESAMPLES = 10_000
BOOTSTRAP_SEED = 0  # fixed, so `experiment report` reproduces the same intervals


def paired_bootstrap_ratio(values: list[float], base: list[float], resamples: int = BOOTSTRAP_RESAMPLES,
                           seed: int = BOOTSTRAP_SEED) -> dict[str, float] | None:
    """Ratio of means arm/baseline over seeds, with a paired percentile bootstrap 95% interval.

    `values[i]` and `base[i]` come from the same seed (same task streams). Seeds are resampled with
    replacement, as pairs; each resample gives mean(values) / mean(base). Returns {"ratio", "lo", "hi", "n"}
    (lo = hi = ratio for one seed), or None with no seeds or a zero baseline mean.
    Source: Efron and Tibshirani, "An Introduction to the Bootstrap" (1993), chapter 13 (percentile interval).
    """
    x, b = np.asarray(values, dtype=float), np.asarray(base, dtype=float)
    if len(x) == 0 or len(x) != len(b) or b.mean() == 0:
        return None
    idx = np.random.default_rng(seed).integers(0, len(x), size=(resamples, len(x)))  # (resamples, n)
    num, den = x[idx].mean(axis=1), b[idx].mean(axis=1)
    ratios = num[den != 0] / den[den != 0]
    lo, hi = np.percentile(ratios, [2.5, 97.5]) if len(x) > 1 else (x.mean() / b.mean(),) * 2
    return {"ratio": float(x.mean() / b.mean()), "lo": float(lo), "hi": float(hi), "n": int(len(x))}


def compute_curve(agents: list[dict[str, Any]], rounds: int, key: str = "heldout_accuracy"
                  ) -> list[dict[str, float]]:
    """Per evaluation round (present for every agent): the agents' mean accuracy (`key` of eval.jsonl) and mean
    cumulative compute (tokens and seconds, see the module doc) up to that round. [] if `key` is never logged."""
    per_round: dict[int, list[tuple[float, float, float]]] = {}
    for agent in agents:
        metrics = sorted((m for m in agent["metrics"] if m.round <= rounds), key=lambda m: m.round)
        for e in agent["eval"]:
            accuracy = getattr(e, key)
            if accuracy is None or e.round > rounds:
                continue
            done = [m for m in metrics if m.round <= e.round]
            tokens = sum(m.tokens_generated + m.train_tokens for m in done)
            seconds = sum(m.round_s for m in done)
            per_round.setdefault(e.round, []).append((accuracy, tokens, seconds))
    n = len(agents)
    return [{"round": r, "accuracy": float(np.mean([v[0] for v in vals])), "tokens": float(np.mean([v[1] for v in vals])),
             "seconds": float(np.mean([v[2] for v in vals]))}
            for r, vals in sorted(per_round.items()) if len(vals) == n]


def accuracy_at(curve: list[dict[str, float]], axis: str, budget: float) -> float | None:
    """Accuracy interpolated at `budget` of `axis` ("tokens" or "seconds"); None past the curve's end."""
    if not curve or budget > curve[-1][axis]:
        return None
    xs = [p[axis] for p in curve]
    return float(np.interp(budget, xs, [p["accuracy"] for p in curve]))
