"""GRPO maths: group-normalised advantages and the token-level clipped policy loss. Pure torch, no network.

This is GRPO as used by SAPO (Gensyn, arXiv 2509.08721, section 3): the advantage of completion i in a
group is (r_i - mean(r)) / (std(r) + eps) (DeepSeekMath, arXiv 2402.03300, eq. 3 "outcome supervision"),
and the loss is the PPO-clip surrogate with the asymmetric "clip-higher" range of DAPO
(arXiv 2503.14476, eq. 8-10): ratio clipped to [1 - eps_low, 1 + eps_high], averaged over *all completion
tokens in the batch* (token-level, DAPO's fix to GRPO's per-sequence mean). The KL term is the k3
estimator exp(ref - logp) - (ref - logp) - 1 (Schulman, "Approximating KL divergence"), weight 0 by default.
"""

from __future__ import annotations

import math

import torch


def group_advantages(rewards: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Group-normalised advantages.

    Args:
        rewards: (G, L) rewards, G groups of L completions of the same question.
        eps: added to the standard deviation (unbiased, as torch.std) to avoid division by zero.

    Returns:
        (G, L) advantages; a group whose rewards are all equal gets all zeros.
    """
    assert rewards.dim() == 2 and rewards.shape[1] >= 2, f"expected (G, L>=2) rewards, got {tuple(rewards.shape)}"
    mean = rewards.mean(dim=1, keepdim=True)  # (G, 1)
    std = rewards.std(dim=1, keepdim=True)  # (G, 1)
    return (rewards - mean) / (std + eps)


def clipped_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    eps_low: float = 0.2,
    eps_high: float = 0.28,
    num_tokens: int | None = None,
    ref_logprobs: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Token-level clipped surrogate loss (DAPO eq. 8 with KL penalty as in GRPO eq. 3).

    loss = sum_{b,t} mask * ( -min(rho * A_b, clip(rho, 1-eps_low, 1+eps_high) * A_b) + kl_coef * KL_bt ) / N
    with rho = exp(logprobs - old_logprobs) and N = num_tokens (all completion tokens of the whole batch,
    so micro-batches can be summed) or mask.sum().

    Args:
        logprobs: (B, T) log-probabilities of the sampled tokens under the current policy (requires grad).
        old_logprobs: (B, T) log-probabilities under the policy that generated them (no grad).
        advantages: (B,) one advantage per sequence, broadcast over its tokens.
        mask: (B, T) 1 on completion tokens, 0 on padding.
        eps_low, eps_high: clip range of the importance ratio.
        num_tokens: normaliser N; defaults to mask.sum().
        ref_logprobs: (B, T) reference-model log-probabilities, needed when kl_coef > 0.
        kl_coef: weight of the k3 KL estimate.
        is_weights: optional (B, T) truncated importance weights pi_old / pi_generator (no grad) multiplying the
            clipped surrogate of each token (decoupled PPO with TIS; see `tis_weights`).

    Returns:
        (scalar loss, stats) where stats has `clip_fraction`, `ratio_mean` and `kl` (token means in this call).
    """
    mask = mask.to(logprobs.dtype)
    n = float(num_tokens if num_tokens is not None else mask.sum().clamp(min=1).item())
    ratio = torch.exp(logprobs - old_logprobs)  # (B, T)
    adv = advantages.unsqueeze(1)  # (B, 1)
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high) * adv
    per_token = -torch.minimum(unclipped, clipped)  # (B, T)
    if is_weights is not None:
        per_token = per_token * is_weights
    kl = torch.zeros_like(per_token)
    if kl_coef > 0:
        assert ref_logprobs is not None, "kl_coef > 0 needs ref_logprobs"
        delta = ref_logprobs - logprobs
        kl = torch.exp(delta) - delta - 1.0  # k3, >= 0
        per_token = per_token + kl_coef * kl
    loss = (per_token * mask).sum() / n
    with torch.no_grad():
        tokens = mask.sum().clamp(min=1)
        stats = {
            "clip_fraction": float(((unclipped != clipped).to(mask.dtype) * mask).sum() / tokens),
            "ratio_mean": float((ratio * mask).sum() / tokens),
            "kl": float((kl * mask).sum() / tokens),
        }
    return loss, stats


def tis_weights(
    old_logprobs: torch.Tensor,
    generator_logprobs: torch.Tensor,
    known: torch.Tensor,
    mask: torch.Tensor,
    max_ratio: float = 2.0,
    drop_ratio: float = 10.0,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
    """Filtered truncated importance weights of the generator's samples (F-TIS, arXiv 2605.22537; TIS as in
    Yao et al. 2025 "Your efficient RL framework secretly brings you off-policy RL training"; decoupled PPO of
    Hilton et al. 2021, arXiv 2110.00641).

    Per token, w = min(pi_old / pi_generator, max_ratio) with pi_old the learner's policy before the step.
    Filter: a token whose ratio lies outside [1 / drop_ratio, drop_ratio] is masked out, and so is a whole
    sequence whose geometric-mean ratio (exp of the mean log ratio over its known tokens) lies outside that range
    (a claimed log-prob far from the learner's own is either a different policy or a lie). Tokens without a
    generator log-prob (`known` = 0) get weight 1 (ratio 1: today's behaviour).

    Args:
        old_logprobs: (B, T) learner log-probs of the sampled tokens (no grad).
        generator_logprobs: (B, T) the generator's log-probs (any value where `known` is 0); clamped to <= 0.
        known: (B, T) 1 where a generator log-prob exists.
        mask: (B, T) 1 on completion tokens.
        max_ratio: truncation C (>= 1).
        drop_ratio: D (> 1) of the extreme-ratio filter.

    Returns:
        ((B, T) weights, (B, T) mask with filtered tokens zeroed, stats: `tokens_truncated`, `tokens_dropped`,
        `sequences_dropped`, `ess_fraction` (Kish effective sample size / n of the weights over known tokens)).
    """
    mask = mask.to(old_logprobs.dtype)
    known = known.to(old_logprobs.dtype) * mask
    log_r = (old_logprobs - generator_logprobs.clamp(max=0.0)) * known  # (B, T); 0 where unknown
    log_d = math.log(drop_ratio)
    token_ok = (log_r.abs() <= log_d).to(mask.dtype)  # unknown tokens have log_r = 0: kept
    n_known = known.sum(dim=1)  # (B,)
    seq_mean = log_r.sum(dim=1) / n_known.clamp(min=1)
    seq_ok = ((seq_mean.abs() <= log_d) | (n_known == 0)).to(mask.dtype)  # (B,)
    keep = mask * token_ok * seq_ok[:, None]
    ratio = torch.exp(log_r)
    weights = torch.where(known > 0, ratio.clamp(max=max_ratio), torch.ones_like(ratio))
    with torch.no_grad():
        kk = known * keep
        w = weights * kk
        n = float(kk.sum())
        ess = float(w.sum() ** 2 / (w.pow(2).sum() * n)) if n > 0 and float(w.pow(2).sum()) > 0 else 1.0
        stats = {
            "tokens_truncated": float(((ratio > max_ratio).to(mask.dtype) * kk).sum()),
            "tokens_dropped": float((known * (1 - token_ok) * seq_ok[:, None]).sum()),
            "sequences_dropped": float(((1 - seq_ok) * (mask.sum(dim=1) > 0).to(mask.dtype)).sum()),
            "tokens_known": float(known.sum()),
            "ess_fraction": ess,
        }
    return weights, keep, stats
