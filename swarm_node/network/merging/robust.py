"""Robust aggregation rules for one part of an all-reduce: coordinate-wise trimmed mean and CenteredClip.

Not used by the all-reduce yet (the group mean stays hivemind's plain mean, verified by checksums and the trust
region, guard.py): these are the rules a reducer would apply to the parts its senders sent, measured against the
plain mean in `benchmarks/merge.py --checks` (cost and distance to the mean without an attack). The hook for
them is `averager.Instrumented.runner_cls` (a GuardedAllReduceRunner subclass whose reducer keeps every sender's
part and returns the robust aggregate instead of the running mean); with it, the members' checksums would no
longer predict the result, so the checksum test would become a bound (docs/merging.md, "Robust aggregation").

- `trimmed_mean`: per coordinate, drop the `trim` largest and smallest values and average the rest (Yin et al.,
  "Byzantine-Robust Distributed Learning: Towards Optimal Statistical Rates", ICML 2018). With n senders it
  tolerates `trim` < n / 2 hostile ones; trim = 0 is the mean, trim = (n - 1) // 2 the (lower) median.
- `centered_clip`: v <- v + mean_i clip(x_i - v, tau), with clip(z, tau) = z * min(1, tau / ||z||), iterated from
  a starting point v0 (Karimireddy, He and Jaggi, "Learning from History for Byzantine Robust Optimization",
  ICML 2021, Algorithm 2); the rule Gorbunov, Borzunov, Diskin and Ryabinin use for Byzantine-tolerant all-reduce
  ("Secure Distributed Training at Scale", ICML 2022, BTARD), where each reducer applies it to its part. One
  hostile sender moves the result by at most tau / n per iteration, whatever it sends.
"""

from __future__ import annotations

import torch


@torch.no_grad()
def trimmed_mean(parts: torch.Tensor, trim: int) -> torch.Tensor:
    """parts: (n, d) float32, one row per sender. Returns (d,). Raises ValueError unless 0 <= 2 * trim < n."""
    n = parts.shape[0]
    if not 0 <= 2 * trim < n:
        raise ValueError(f"cannot trim {trim} of {n} values from each side")
    if trim == 0:
        return parts.mean(dim=0)
    ordered = parts.sort(dim=0).values
    return ordered[trim : n - trim].mean(dim=0)


@torch.no_grad()
def centered_clip(parts: torch.Tensor, tau: float, iterations: int = 3, start: torch.Tensor | None = None
                  ) -> torch.Tensor:
    """parts: (n, d) float32; tau: clipping radius (L2, same units as the parts); start: (d,) v0 (default: the
    coordinate-wise median, a robust start). Returns (d,). With every ||x_i - v|| <= tau it returns the mean."""
    v = (parts.median(dim=0).values if start is None else start).clone()
    for _ in range(iterations):
        diff = parts - v
        scale = (tau / diff.norm(dim=1).clamp_min(1e-12)).clamp(max=1.0)
        v += (diff * scale[:, None]).mean(dim=0)
    return v
