"""DiLoCo's outer step: Nesterov momentum on the averaged pseudo-gradient. Pure torch, no network.

DiLoCo (Douillard et al., 2023, "DiLoCo: Distributed Low-Communication Training of Language Models",
arXiv 2311.08455, Algorithm 1): each worker i trains its copy θ_i for H inner steps from the shared weights
θ^(t-1); then the pseudo-gradient Δ^(t) = (1/k) Σ_i (θ^(t-1) - θ_i^(t)) (weights at the last sync minus
weights now, averaged over the k workers) is fed to an outer optimizer, Nesterov momentum, with the paper's
outer learning rate 0.7 and momentum 0.9:

    m ← μ·m + Δ                    # (same update as torch.optim.SGD(nesterov=True, dampening=0))
    θ ← θ - lr·(Δ + μ·m)

With lr = 1 and μ = 0 the outer step is plain parameter averaging: θ ← θ - (θ - mean θ_i) = mean θ_i.
"""

from __future__ import annotations

from typing import Sequence

import torch


def pseudo_gradient(anchor: Sequence[torch.Tensor], current: Sequence[torch.Tensor],
                    out: Sequence[torch.Tensor]) -> None:
    """out ← anchor - current (weights at the last sync minus weights now), tensor by tensor."""
    with torch.no_grad():
        for o, a, c in zip(out, anchor, current):
            torch.sub(a, c.to(a.device, a.dtype), out=o)


def nesterov_outer_step(anchor: Sequence[torch.Tensor], delta: Sequence[torch.Tensor],
                        momentum: Sequence[torch.Tensor], lr: float, mu: float) -> None:
    """In place: momentum ← μ·momentum + Δ; anchor ← anchor - lr·(Δ + μ·momentum). Tensors share shapes."""
    with torch.no_grad():
        for a, d, m in zip(anchor, delta, momentum):
            m.mul_(mu).add_(d)
            a.sub_(d + mu * m, alpha=lr)
