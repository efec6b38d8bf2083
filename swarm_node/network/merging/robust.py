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


CLIP_SPREAD = 2.0  # tau = CLIP_SPREAD x the median distance of the senders' parts to their coordinate-wise median


@torch.no_grad()
def self_calibrated_clip(parts: torch.Tensor, iterations: int = 3) -> torch.Tensor:
    """CenteredClip with tau = CLIP_SPREAD * median_i ||x_i - median(x)||, started at the coordinate-wise median.
    parts: (n, d). Honest parts that are about equally far from each other are not clipped, so the result is
    their exact mean; a minority of far-away parts is clipped to about tau."""
    start = parts.median(dim=0).values
    tau = CLIP_SPREAD * float((parts - start).norm(dim=1).median())
    if tau == 0.0:
        return start.clone()
    return centered_clip(parts, tau, iterations, start)


class ClippingPartReducer:
    """A hivemind 1.1.12 `TensorPartReducer` that keeps every sender's part and returns `self_calibrated_clip`
    of them instead of their running mean (made by `make_clipping_reducer`, since hivemind's class is imported
    lazily in the averager's process)."""


def make_clipping_reducer(part_shapes, num_senders: int):
    """The reducer of one all-reduce for `merge_aggregation = centered_clip` (see ClippingPartReducer)."""
    import asyncio

    from hivemind.averaging.partition import AllreduceException, BannedException, TensorPartReducer

    class _Reducer(TensorPartReducer, ClippingPartReducer):
        def reset_accumulators(self):
            self._parts: list[torch.Tensor] = []
            super().reset_accumulators()

        async def accumulate_part(self, sender_index: int, part_index: int, tensor_part: torch.Tensor,
                                  weight: float = 1.0) -> torch.Tensor:
            # hivemind's accumulate_part, keeping the part instead of adding it to a running sum
            assert 0 <= sender_index < self.num_senders and 0 <= part_index < self.num_parts
            self.num_parts_received[sender_index] += 1
            while part_index > self.current_part_index:
                await asyncio.wait({self.current_part_future, asyncio.create_task(self.finished.wait())},
                                   return_when=asyncio.FIRST_COMPLETED)
                if self.finished.is_set():
                    raise AllreduceException("attempted to aggregate part in a finalized reducer")
            if self.sender_failed_after[sender_index] != float("inf"):
                raise BannedException(f"sender {sender_index} was banned in background")
            current_part_future = self.current_part_future
            if part_index < self.sender_failed_after[sender_index]:
                self._parts.append(tensor_part.reshape(-1).to(torch.float32))
                self.current_part_accumulated_from += 1
                self.denominator += 1.0
                self.check_current_part_finished()
            return await current_part_future

        def check_current_part_finished(self):
            assert self.current_part_accumulated_from <= self.num_current_senders
            if self.current_part_accumulated_from == self.num_current_senders:
                shape = self.part_shapes[self.current_part_index]
                if self._parts:
                    result = self_calibrated_clip(torch.stack(self._parts)).reshape(shape)
                else:
                    result = torch.zeros(shape)
                self.current_part_future.set_result(result)
                self.reset_accumulators()

    return _Reducer(part_shapes, num_senders)
