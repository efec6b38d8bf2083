"""DiLoCo's outer step: Nesterov momentum on the averaged pseudo-gradient. Pure torch, no network.

DiLoCo (Douillard et al., 2023, "DiLoCo: Distributed Low-Communication Training of Language Models",
arXiv 2311.08455, Algorithm 1): each worker i trains its copy θ_i for H inner steps from the shared weights
θ^(t-1); then the pseudo-gradient Δ^(t) = (1/k) Σ_i (θ^(t-1) - θ_i^(t)) (weights at the last sync minus
weights now, averaged over the k workers) is fed to an outer optimizer, Nesterov momentum, with the paper's
outer learning rate 0.7 and momentum 0.9:

    m ← μ·m + Δ
    θ ← θ - lr·(Δ + μ·m)

which is exactly `torch.optim.SGD(lr, momentum=μ, dampening=0, nesterov=True)` with Δ as the gradient, so the
step is torch's; the momentum buffers are the caller's tensors (the merger shares and checkpoints them).
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
    """In place: momentum ← μ·momentum + Δ; anchor ← anchor - lr·(Δ + μ·momentum), by torch.optim.SGD with
    nesterov=True over `anchor` (leaf tensors, no autograd) with `momentum` as its momentum buffers. Tensors share
    shapes."""
    anchor = list(anchor)
    sgd = torch.optim.SGD(anchor, lr=lr, momentum=mu, dampening=0.0, nesterov=mu > 0)
    for a, m in zip(anchor, momentum):
        sgd.state[a]["momentum_buffer"] = m  # updated in place by the step
    with torch.no_grad():
        for a, d in zip(anchor, delta):
            a.grad = d
        try:
            sgd.step()
        finally:
            for a in anchor:
                a.grad = None
        if mu == 0:  # torch keeps no buffer without momentum; the merger's momentum is then Δ, as μ·m + Δ says
            for m, d in zip(momentum, delta):
                m.copy_(d)
