"""Averaging AdamW's moments with the weights (merge_optimizer_state = average).

The merger is the only writer of the optimizer's state besides the optimizer itself, and only here: `read`
copies each merged parameter's `exp_avg` and `exp_avg_sq` into the averaging buffer (zeros for a parameter without
moments yet, so such a peer contributes zeros), and `write` puts the group's averages back, bounded so that no
averaged moment can make one AdamW update larger than MOMENT_RATIO x lr (`torch.optim.AdamW`'s state layout:
`step`, `exp_avg`, `exp_avg_sq`; Loshchilov & Hutter 2019, "Decoupled Weight Decay Regularization", Algorithm 2).
"""

from __future__ import annotations

from typing import Sequence

import torch

MOMENT_RATIO = 10.0  # averaged AdamW moments: |exp_avg_hat| is clamped to this times sqrt(exp_avg_sq_hat)
KEYS = ("exp_avg", "exp_avg_sq")


@torch.no_grad()
def read(optimizer: torch.optim.Optimizer, params: Sequence[torch.Tensor], out: Sequence[torch.Tensor]) -> None:
    """out[:n] <- exp_avg, out[n:2n] <- exp_avg_sq of the n `params` (zeros where the optimizer has none yet)."""
    n = len(params)
    for i, p in enumerate(params):
        state = optimizer.state.get(p, {})
        for k, key in enumerate(KEYS):
            target = out[k * n + i]
            if key in state:
                target.copy_(state[key])
            else:
                target.zero_()


@torch.no_grad()
def write(optimizer: torch.optim.Optimizer, params: Sequence[torch.Tensor], averaged: Sequence[torch.Tensor],
          step: int) -> None:
    """Set each parameter's moments to the group's averages `averaged` (layout of `read`).

    The second moment is clamped at 0 (lossy compression may push it below), and the first is clamped so that the
    bias-corrected |m_hat| <= MOMENT_RATIO * sqrt(v_hat): each AdamW update stays within MOMENT_RATIO * lr, whatever
    the group sent (one peer's own moments keep the ratio near 1; a mean of disagreeing peers' moments may exceed 1
    a little, so the bound has headroom). A parameter without a `step` yet gets max(step, 1), `step` being the
    group's lower median optimizer step."""
    n = len(params)
    betas = {id(q): g.get("betas", (0.9, 0.999)) for g in optimizer.param_groups for q in g["params"]}
    for i, p in enumerate(params):
        state = optimizer.state[p]
        if "step" not in state:
            state["step"] = torch.tensor(float(max(step, 1)))
        exp_avg_sq = averaged[n + i].clamp_min(0)
        beta1, beta2 = betas.get(id(p), (0.9, 0.999))
        t = max(float(state["step"]), 1.0)
        bound = exp_avg_sq.sqrt() * (MOMENT_RATIO * (1 - beta1**t) / (1 - beta2**t) ** 0.5)
        state["exp_avg"] = torch.minimum(torch.maximum(averaged[i], -bound), bound).to(p.device)
        state["exp_avg_sq"] = exp_avg_sq.to(p.device).clone()
