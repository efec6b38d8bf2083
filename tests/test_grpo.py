"""GRPO maths against a naive per-element reference loop."""

import math

import torch

from swarm_node.learning.grpo import clipped_policy_loss, group_advantages


def naive_advantages(rewards, eps):
    out = []
    for row in rewards:
        mean = sum(row) / len(row)
        std = math.sqrt(sum((r - mean) ** 2 for r in row) / (len(row) - 1))
        out.append([(r - mean) / (std + eps) for r in row])
    return out


def naive_loss(logp, old, adv, mask, lo, hi, ref=None, kl_coef=0.0):
    total, n = 0.0, 0
    for b in range(len(logp)):
        for t in range(len(logp[b])):
            if not mask[b][t]:
                continue
            ratio = math.exp(logp[b][t] - old[b][t])
            term = -min(ratio * adv[b], min(max(ratio, 1 - lo), 1 + hi) * adv[b])
            if kl_coef:
                d = ref[b][t] - logp[b][t]
                term += kl_coef * (math.exp(d) - d - 1)
            total += term
            n += 1
    return total / n


def test_group_advantages_match_reference_loop():
    rewards = [[1.0, 0.0, 0.0, 1.0], [0.5, 0.5, 0.5, 0.5], [0.0, 0.2, 0.9, 0.1]]
    got = group_advantages(torch.tensor(rewards), eps=1e-6).tolist()
    want = naive_advantages(rewards, 1e-6)
    for g, w in zip(got, want):
        assert g == [pytest_approx(x) for x in w]
    assert got[1] == [0.0, 0.0, 0.0, 0.0]  # equal rewards: no signal


def pytest_approx(x):
    import pytest

    return pytest.approx(x, abs=1e-5)


def test_clipped_loss_matches_reference_loop_with_clipping_and_kl():
    torch.manual_seed(0)
    B, T = 4, 6
    logp = (torch.randn(B, T) * 0.5 - 1).requires_grad_()
    old = logp.detach() + torch.randn(B, T) * 0.4  # ratios far from 1, so both clip edges are hit
    ref = logp.detach() + torch.randn(B, T) * 0.1
    adv = torch.tensor([1.0, -1.0, 0.5, -2.0])
    mask = torch.ones(B, T)
    mask[0, 4:] = 0
    mask[3, 1:] = 0
    loss, stats = clipped_policy_loss(logp, old, adv, mask, 0.2, 0.28, ref_logprobs=ref, kl_coef=0.1)
    want = naive_loss(logp.tolist(), old.tolist(), adv.tolist(), mask.tolist(), 0.2, 0.28, ref.tolist(), 0.1)
    assert float(loss) == pytest_approx(want)
    assert 0 < stats["clip_fraction"] < 1
    loss.backward()
    assert logp.grad[0, 5] == 0 and logp.grad[3, 2] == 0  # padding gets no gradient


def test_ratio_one_gives_policy_gradient_and_microbatches_sum_to_full_batch():
    torch.manual_seed(1)
    logp = torch.randn(6, 5).requires_grad_()
    adv = torch.randn(6)
    mask = (torch.rand(6, 5) > 0.3).float()
    n = int(mask.sum())
    full, _ = clipped_policy_loss(logp, logp.detach(), adv, mask)
    full.backward()
    grad_full = logp.grad.clone()
    logp.grad = None
    parts = [clipped_policy_loss(logp[i:i + 2], logp[i:i + 2].detach(), adv[i:i + 2], mask[i:i + 2], num_tokens=n)[0]
             for i in range(0, 6, 2)]
    sum(parts).backward()
    assert torch.allclose(logp.grad, grad_full, atol=1e-6)
    # at ratio 1 the gradient is -A / N on every unmasked token (REINFORCE with a group baseline)
    assert torch.allclose(grad_full, -(adv.unsqueeze(1) * mask) / n, atol=1e-6)
