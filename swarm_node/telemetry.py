"""Observability: Prometheus metrics, a health check and a status document over one small HTTP endpoint.

Endpoints (bound to 127.0.0.1 by default):
- `/metrics`: Prometheus text format, namespaced `swarm_node_*` (prometheus-client, a registry per node).
- `/healthz`: 200 with `{"ok": true, ...}` while the node makes progress (a round finished, or start-up or
  lingering, within `health_stall_s`), else 503.
- `/status`: JSON for `swarm-node status`: peer ID, multiaddrs, round, recent rewards, peers, rejections,
  last warning or error.
- `/`: the live dashboard page, and its JSON endpoints `/api/rounds`, `/api/eval`, `/api/peers`, `/api/swarm`
  (swarm_node/dashboard/). The server runs on its own thread and event loop (swarm_node/dashboard/http.py).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from pathlib import Path
from typing import Any

import psutil
from prometheus_client import CollectorRegistry, Counter, Gauge

from swarm_node.dashboard.api import MAX_EVALS, MAX_ROUNDS, DashboardApi, peers_snapshot, round_row
from swarm_node.dashboard.http import HttpServer
from swarm_node.records import PHASES, EvalRecord, RoundRecord, RoundSummary, iter_tail

NAMESPACE = "swarm_node"


class LastProblem(logging.Handler):
    """Remembers the newest WARNING-or-worse log line of the node (shown by `swarm-node status`)."""

    def __init__(self):
        super().__init__(level=logging.WARNING)
        self.message: str | None = None
        self.at_s: float | None = None

    def emit(self, record: logging.LogRecord) -> None:
        self.message, self.at_s = f"{record.levelname}: {record.getMessage()}"[:300], record.created


class Telemetry:
    """Per-node metrics and status. Call `observe_round` after every round and `serve` once to expose them.

    Args:
        health_stall_s: how long without a finished round before /healthz reports the node as stuck, seconds.
    """

    def __init__(self, health_stall_s: float = 900.0):
        self.health_stall_s = health_stall_s
        self.registry = r = CollectorRegistry()
        kw = dict(namespace=NAMESPACE, registry=r)
        self.rounds = Counter("rounds", "Rounds completed", **kw)
        self.reward_local = Gauge("reward_local", "Mean strict reward of the node's own completions, last round", **kw)
        self.reward_train = Gauge("reward_train", "Mean reward of the training batch, last round", **kw)
        self.loss = Gauge("loss", "GRPO loss of the last step", **kw)
        self.tokens_per_s = Gauge("generation_tokens_per_second", "Generated tokens per second, last round", **kw)
        self.peers = Gauge("peers_seen", "Peers with a fresh manifest, last round", **kw)
        self.groups = Counter("groups", "Groups by kind: published, received (verified), used", ["kind"], **kw)
        self.rejected = Counter("rejected", "Rejected peer inputs by reason", ["reason"], **kw)
        self.bytes = Counter("bytes", "Rollout payload bytes by direction", ["direction"], **kw)
        self.phase_s = Gauge("phase_seconds", "Seconds spent in each phase, last round", ["phase"], **kw)
        self.loop_lag_s = Gauge("event_loop_lag_seconds", "Event-loop lag, last sample", **kw)
        self.merges = Counter("merges", "Scheduled merges by outcome (merged, repaired, alone, no_group, failed)",
                              ["outcome"], **kw)
        self.merge_bytes = Counter("merge_bytes", "Merge traffic (tensor payloads) by direction", ["direction"], **kw)
        self.merge_s = Gauge("merge_seconds", "Seconds spent in the last scheduled merge", **kw)
        self.last_progress_s = time.time()
        self.recent: deque[dict[str, Any]] = deque(maxlen=10)
        self.info: dict[str, Any] = {"state": "starting"}
        self.problem = LastProblem()
        self._seen_rejects: dict[str, int] = {}
        self._last_bytes = {"in": 0, "out": 0}
        self._last_merge_bytes = {"in": 0, "out": 0}
        self._server: HttpServer | None = None
        # dashboard snapshots (swarm_node/dashboard/api.py): rows are never mutated once appended, and `peers` is
        # replaced as a whole, so the HTTP thread reads them without a lock
        self.rows: deque[dict[str, Any]] = deque(maxlen=MAX_ROUNDS)
        self.evals: deque[dict[str, Any]] = deque(maxlen=MAX_EVALS)
        self.peers_info: tuple[list[dict[str, Any]], int, float] = ([], 0, 0.0)  # rows, peers known, unix time
        self._process = psutil.Process()

    def observe_round(self, m: RoundRecord, received_groups: int) -> None:
        """Record one metrics.jsonl line and the cumulative verified-group count. The record's counters are
        cumulative; the Prometheus counters advance by the difference to the previous round."""
        self.rounds.inc()
        self.reward_local.set(m.reward_local_mean)
        self.reward_train.set(m.reward_train_mean)
        if m.loss is not None:
            self.loss.set(m.loss)
        self.tokens_per_s.set(m.tokens_generated / max(m.generate_s, 1e-9))
        self.peers.set(m.peers_seen)
        self.groups.labels("published").inc(m.local_groups if m.published else 0)
        self.groups.labels("used").inc(m.external_groups_used)
        self.groups.labels("received").inc(max(0, received_groups - self.info.get("received_groups", 0)))
        self.info["received_groups"] = received_groups
        for reason, total in m.rejected.items():
            self.rejected.labels(reason).inc(total - self._seen_rejects.get(reason, 0))
            self._seen_rejects[reason] = total
        for direction, total in (("in", m.bytes_in), ("out", m.bytes_out)):
            self.bytes.labels(direction).inc(total - self._last_bytes[direction])
            self._last_bytes[direction] = total
        for phase in (*PHASES, "round"):
            self.phase_s.labels(phase).set(m.phase_s(phase))
        if m.merge_outcome:
            self.merges.labels(m.merge_outcome).inc()
            self.merge_s.set(m.merge_s)
        for direction, total in (("in", m.merge_bytes_in), ("out", m.merge_bytes_out)):
            if total is not None:
                self.merge_bytes.labels(direction).inc(max(0, total - self._last_merge_bytes[direction]))
                self._last_merge_bytes[direction] = total
        row = round_row(m, self.rows[-1]["rejected_total"] if self.rows else {})
        row["rss_mb"] = round(self._process.memory_info().rss / 2**20, 1)
        self.rows.append(row)
        self.recent.append(RoundSummary.of(m).model_dump())
        self.last_progress_s = time.time()

    def observe_eval(self, line: EvalRecord) -> None:
        """Record one eval.jsonl line (held-out accuracy; swarm_node/node/evaluate.py) for /api/eval."""
        self.evals.append(line.model_dump(include={"round", "heldout_accuracy", "num_questions", "ood_accuracy",
                                                   "ood_num_questions", "eval_s", "time_s"}))

    def load_history(self, out_dir: Path) -> None:
        """Fill the dashboard's series from the last MAX_ROUNDS lines of metrics.jsonl and eval.jsonl (a resumed
        node's earlier rounds). A torn or foreign line ends the read."""
        for name, keep in (("metrics.jsonl", MAX_ROUNDS), ("eval.jsonl", MAX_EVALS)):
            path = out_dir / name
            if not path.exists():
                continue
            for text in iter_tail(path, keep):
                try:  # a pydantic ValidationError is a ValueError
                    if name == "eval.jsonl":
                        self.observe_eval(EvalRecord.model_validate_json(text))
                    else:
                        line = RoundRecord.model_validate_json(text)
                        self.rows.append(round_row(line, self.rows[-1]["rejected_total"] if self.rows else {}))
                except ValueError:
                    break

    def refresh_peers(self, collector) -> None:
        """Snapshot the peers this node knows for /api/peers. Call on the thread that owns `collector` (the node's
        event loop); the HTTP thread only reads the new tuple."""
        if collector is None:
            return
        try:
            rows, known = peers_snapshot(collector)
        except Exception as e:  # a dashboard bug must not end the caller's loop (the event-loop lag probe)
            logging.getLogger("swarm_node").debug("peer snapshot failed: %r", e)
            return
        self.peers_info = (rows, known, time.time())

    async def probe_loop(self, collector) -> None:
        """Run on the node's event loop until cancelled: every second, sample the loop's lag and rebuild the peer
        table (a first one at once, before round 1)."""
        self.refresh_peers(collector)
        while True:
            t0 = time.perf_counter()
            await asyncio.sleep(1.0)
            self.loop_lag_s.set(max(0.0, time.perf_counter() - t0 - 1.0))
            self.refresh_peers(collector)  # the dashboard's peer table, built on this loop

    def mark(self, state: str) -> None:
        """Set the lifecycle state (starting, running, lingering, stopping); counts as progress."""
        self.info["state"] = state
        self.last_progress_s = time.time()

    def health(self) -> tuple[bool, dict[str, Any]]:
        stalled_s = time.time() - self.last_progress_s
        ok = self.info["state"] in ("starting", "lingering") or stalled_s < self.health_stall_s
        return ok, {"ok": ok, "state": self.info["state"], "seconds_since_progress": round(stalled_s, 1)}

    def status(self) -> dict[str, Any]:
        ok, health = self.health()
        return {**self.info, "health": health, "recent_rounds": list(self.recent),
                "rejected": dict(self._seen_rejects), "last_problem": self.problem.message,
                "last_problem_at_s": self.problem.at_s}

    def serve(self, host: str, port: int) -> int:
        """Start the HTTP endpoint (metrics, health, status, dashboard) on a daemon thread; port 0 picks a free
        one. Returns the bound port.

        Raises:
            OSError: the address cannot be bound.
        """
        self._server = HttpServer(DashboardApi(self).route)
        return self._server.start(host, port)

    def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
