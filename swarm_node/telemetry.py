"""Observability: Prometheus metrics, a health check and a status document over one small HTTP endpoint.

Endpoints (bound to 127.0.0.1 by default):
- `/metrics`: Prometheus text format, namespaced `swarm_node_*` (prometheus-client, a registry per node).
- `/healthz`: 200 with `{"ok": true, ...}` while the node makes progress (a round finished, or start-up or
  lingering, within `health_stall_s`), else 503.
- `/status`: JSON for `swarm-node status`: peer ID, multiaddrs, round, recent rewards, peers, rejections,
  last warning or error.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

NAMESPACE = "swarm_node"
PHASES = ("generate", "publish", "collect", "train", "round")


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
        self._server: ThreadingHTTPServer | None = None

    def observe_round(self, m: dict[str, Any], received_groups: int) -> None:
        """Record one metrics.jsonl line (see Node.run_round) and the cumulative verified-group count."""
        self.rounds.inc()
        self.reward_local.set(m["reward_local_mean"])
        self.reward_train.set(m["reward_train_mean"])
        if m["loss"] is not None:
            self.loss.set(m["loss"])
        self.tokens_per_s.set(m["tokens_generated"] / max(m["generate_s"], 1e-9))
        self.peers.set(m["peers_seen"])
        self.groups.labels("published").inc(m["local_groups"] if m["published"] else 0)
        self.groups.labels("used").inc(m["external_groups_used"])
        self.groups.labels("received").inc(max(0, received_groups - self.info.get("received_groups", 0)))
        self.info["received_groups"] = received_groups
        for reason, total in m["rejected"].items():
            self.rejected.labels(reason).inc(total - self._seen_rejects.get(reason, 0))
            self._seen_rejects[reason] = total
        for direction, key in (("in", "bytes_in"), ("out", "bytes_out")):
            self.bytes.labels(direction).inc(m[key] - self._last_bytes[direction])
            self._last_bytes[direction] = m[key]
        for phase in PHASES:
            self.phase_s.labels(phase).set(m[f"{phase}_s"])
        if m.get("merge_outcome"):
            self.merges.labels(m["merge_outcome"]).inc()
            self.merge_s.set(m["merge_s"])
        for direction in ("in", "out"):
            total = m.get(f"merge_bytes_{direction}")
            if total is not None:
                self.merge_bytes.labels(direction).inc(max(0, total - self._last_merge_bytes[direction]))
                self._last_merge_bytes[direction] = total
        self.recent.append({k: m[k] for k in ("round", "reward_local_mean", "reward_train_mean", "external_groups_used",
                                              "peers_seen", "loss", "round_s")})
        self.last_progress_s = time.time()

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
        """Start the HTTP endpoint on a daemon thread; port 0 picks a free one. Returns the bound port."""
        telemetry = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (http.server API)
                if self.path == "/metrics":
                    body, code, ctype = generate_latest(telemetry.registry), 200, CONTENT_TYPE_LATEST
                elif self.path == "/healthz":
                    ok, health = telemetry.health()
                    body, code, ctype = json.dumps(health).encode(), 200 if ok else 503, "application/json"
                elif self.path == "/status":
                    body, code, ctype = json.dumps(telemetry.status()).encode(), 200, "application/json"
                else:
                    body, code, ctype = b"not found: try /metrics, /healthz or /status\n", 404, "text/plain"
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):  # keep the node's log clean
                pass

        self._server = ThreadingHTTPServer((host, port), Handler)
        threading.Thread(target=self._server.serve_forever, name="telemetry-http", daemon=True).start()
        return self._server.server_address[1]

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
