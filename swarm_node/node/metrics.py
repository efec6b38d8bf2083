"""Assembling a round's `RoundRecord` (swarm_node/records.py) from what the round's phases returned and the
counters of the parts that count events (the collector, its trust and pool, the exchange).

The node times each phase with `PhaseTimer` and hands the results here; this module is the one place that reads
the parts' counters for the metrics line.
"""

from __future__ import annotations

import resource
import time
from contextlib import contextmanager
from typing import Any

import psutil

from swarm_node.records import RoundRecord


class PhaseTimer:
    """Wall seconds per phase of one round, and the node's CPU seconds over the whole round."""

    def __init__(self):
        self.started = time.perf_counter()
        self.cpu_started = cpu_seconds()
        self.seconds: dict[str, float] = {}

    @contextmanager
    def phase(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = time.perf_counter() - t0


def cpu_seconds() -> float:
    """CPU seconds (user + system) used so far by this node: its own threads plus its live child processes (the
    DHT process, p2pd and the verification worker). The per-round difference is the node's own compute,
    independent of how many other processes share the machine's cores (wall time is not)."""
    total = 0.0
    me = psutil.Process()
    for proc in [me, *me.children(recursive=True)]:
        try:
            t = proc.cpu_times()
            total += t.user + t.system
        except psutil.Error:  # a child that just exited
            pass
    return total


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def round_record(*, round_: int, peer_id: str, model: str, timer: PhaseTimer, generated: list, local: list,
                 collected, published: bool, stats, format_rate: float, tokens_generated: int, collector, exchange,
                 rounds_failed: int, pace_wait_s: float, merge_fields: dict[str, Any]) -> RoundRecord:
    """The metrics line of one finished round.

    Args:
        generated: every local group generated this round (I x local_oversample); `local` the I trained on.
        collected: what the collector handed out this round (`.groups` are the J external groups used).
        stats: the trainer's StepStats of this round's step.
        collector, exchange: read for their cumulative counters (rejections, pool drops, bans, bytes).
        merge_fields: the merger's `merge_*` fields ({} without merging).
    """
    external = collected.groups
    s = timer.seconds
    return RoundRecord(
        round=round_,
        peer_id=peer_id,
        model=model,
        policy_version=stats.policy_version,
        reward_local_mean=_mean([x for g in generated for x in g.rewards]),  # every completion generated
        reward_train_mean=_mean([x for g in local + external for x in g.rewards]),
        format_rate_local=format_rate,
        local_groups=len(local),
        local_groups_generated=len(generated),
        local_groups_with_signal=sum(g.has_signal for g in local),
        external_groups_available=collected.available,
        external_groups_used=len(external),
        external_peers_used=len({g.peer_id for g in external}),
        external_peer_ids=sorted({g.peer_id for g in external}),
        peers_seen=collected.peers_seen,
        published=published,
        rejected=dict(collector.trust.rejects),
        pool_dropped=dict(collector.pool.dropped),
        banned_peers=len(collector.trust.banned_peers),
        verify_ms_per_group=round(1000 * collector.verify_s / max(1, collector.verified_groups), 3),
        loss=stats.loss,
        grad_norm=stats.grad_norm,
        clip_fraction=stats.clip_fraction,
        kl=stats.kl,
        offpolicy=stats.offpolicy,
        peer_usefulness=collector.peer_weight.snapshot() if collector.peer_weight else {},
        train_sequences=stats.num_sequences,
        train_tokens=stats.num_tokens,
        tokens_generated=tokens_generated,
        bytes_in=exchange.bytes_in,
        bytes_out=exchange.bytes_out,
        generate_s=round(s["generate"], 3),
        publish_s=round(s["publish"], 3),
        collect_s=round(s["collect"], 3),
        collect_wait_s=round(collected.wait_s, 3),
        train_s=round(s["train"], 3),
        round_s=round(time.perf_counter() - timer.started, 3),
        cpu_s=round(cpu_seconds() - timer.cpu_started, 3),
        peak_rss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        time_s=time.time(),
        rounds_failed=rounds_failed,
        pace_wait_s=round(pace_wait_s, 3),
        **merge_fields,
    )
