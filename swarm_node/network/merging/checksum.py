"""Verifying a merge: linear checksums of the averaged tensors, exchanged before and compared after.

Why: with hivemind 1.1.12, a peer that dies during an all-reduce can leave the survivors reporting success
with different weights (docs/hivemind.md section 4). So every member sends, in the round's `gather`, two
linear checksums per segment of the tensors it contributes: the plain sum and the alternating-sign sum
(x0 - x1 + x2 - ...), in float64. Both are linear, so the checksums of the group mean are the weighted mean
of the members' checksums. After the all-reduce each member compares its own result against that mean.
A member whose result does not match knows the round failed for it, without a second exchange.

Tolerance. Averaging is not exact: hivemind sends the difference between the mean and each member's
(compressed) contribution, so every member ends at the mean plus its own rounding error. For n values with
per-value error of relative size eps, the error of a sum is about eps * ||x||_2 (errors of random sign), so a
segment passes when |observed - expected| <= REL_TOL[compression] * ||x||_2 + 1e-9, with REL_TOL well above
the measured error of each compression (none ~1e-7, fp16 ~3e-4, 8-bit ~1.5e-2 per value). A failure that
leaves a whole hivemind part (about 128k values) un-averaged moves a sum by the peers' difference on that
part; when peers are nearly equal, that can be below the tolerance of a lossy compression. That is why the
averager also reports hivemind's own failure signals (parts that fell back to local values, senders dropped
mid-round; see averager.py), which are exact. The checksums catch what those miss (a wrong or garbage
result from a peer).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from swarm_node.network.wire import MAX_MERGE_SEGMENTS

REL_TOL = {"none": 1e-5, "fp16": 5e-3, "8bit": 0.15}


def segments(tensors: Sequence[torch.Tensor], max_segments: int = MAX_MERGE_SEGMENTS) -> list[list[int]]:
    """Split tensor indices into at most `max_segments` contiguous groups (one tensor per group when they fit)."""
    per = -(-len(tensors) // max_segments)  # ceil
    return [list(range(i, min(i + per, len(tensors)))) for i in range(0, len(tensors), per)]


@torch.no_grad()
def checksums(tensors: Sequence[torch.Tensor], groups: list[list[int]]) -> list[float]:
    """[sum_0, alt_0, sum_1, alt_1, ...] in float64, one pair per segment. Linear in the tensors."""
    out: list[float] = []
    for group in groups:
        total = alternating = 0.0
        for i in group:
            flat = tensors[i].detach().reshape(-1)
            even = flat[0::2].sum(dtype=torch.float64).item()
            odd = flat[1::2].sum(dtype=torch.float64).item()
            total += even + odd
            alternating += even - odd
        out += [total, alternating]
    return out


@torch.no_grad()
def norms(tensors: Sequence[torch.Tensor], groups: list[list[int]]) -> list[float]:
    """L2 norm of each segment (float64), the scale of its checksum tolerance."""
    out = []
    for group in groups:
        sq = sum(torch.linalg.vector_norm(tensors[i].detach().reshape(-1), dtype=torch.float64).item() ** 2
                 for i in group)
        out.append(sq ** 0.5)
    return out


def expected_checksums(members: Sequence[tuple[list[float], float]]) -> list[float]:
    """Weighted mean of the members' checksums: what the group mean's checksums must be. members: (sums, weight).
    Every weight is 1 in protocol v1 (MergeGather.weight), so this is the plain mean."""
    total_weight = sum(w for _, w in members)
    length = len(members[0][0])
    assert all(len(s) == length for s, _ in members), "members' checksums differ in length"
    return [sum(s[k] * w for s, w in members) / total_weight for k in range(length)]


def mismatch(observed: Sequence[float], expected: Sequence[float], segment_norms: Sequence[float],
             compression: str) -> float:
    """Worst |observed - expected| over the tolerance across segments; <= 1 means the merge checks out.

    Any non-finite value (a NaN or inf in the result, the expectation or a norm) gives inf: NaN compares false
    with everything, so a plain max() would silently drop it and pass the merge (issue 16)."""
    if len(observed) != len(expected) or len(segment_norms) * 2 < len(observed):
        return math.inf
    rel = REL_TOL[compression]
    worst = 0.0
    for k, (o, e) in enumerate(zip(observed, expected)):
        tol = rel * segment_norms[k // 2] + 1e-9
        ratio = abs(o - e) / tol
        if not math.isfinite(ratio):
            return math.inf
        worst = max(worst, ratio)
    return worst


@torch.no_grad()
def digest(tensors: Sequence[torch.Tensor]) -> list[float]:
    """[sum, L2 norm] of all `tensors` together (float64): a cheap identity of a set of weights (the model's merged
    parameters after a merge; the DiLoCo anchor in a gather)."""
    total = sum(t.detach().sum(dtype=torch.float64).item() for t in tensors)
    norm = sum(torch.linalg.vector_norm(t.detach(), dtype=torch.float64).item() ** 2 for t in tensors) ** 0.5
    return [total, norm]
