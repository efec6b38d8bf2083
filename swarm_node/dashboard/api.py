"""The dashboard's JSON endpoints and static files, served from the node's metrics port (see docs/operations.md).

Every answer is built from snapshots the node prepared on its own event loop (`Telemetry.observe_round`,
`observe_eval`, `refresh_peers`): immutable rows in bounded deques and a peer list replaced as a whole, so a
request copies a reference or a deque (one C call under the GIL) and serialises outside any lock. Every answer
is bounded: at most `MAX_ROUNDS` rounds, `MAX_EVALS` evaluations, `MAX_PEERS` peers and `MAX_SWARM_NODES` nodes.

Endpoints (all GET, JSON, `Access-Control-Allow-Origin: *` so node0's page can read its siblings' data):
- `/api/rounds?last=N&since=R`: this node's per-round series (rows with `round > R`, the last N of them).
- `/api/eval?since=R`: held-out (and OOD) accuracy per evaluation, from eval.jsonl's lines.
- `/api/peers`: the peers this node knows, most recently heard first.
- `/api/swarm`: the nodes of a local swarm (output directories side by side) and their dashboard URLs.
"""

from __future__ import annotations

import heapq
import json
import time
from importlib import resources
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import parse_qs, urlsplit

from swarm_node.dashboard.http import Response
from swarm_node.records import RoundRecord

MAX_ROUNDS = 1000  # rounds kept in memory and the most one answer holds
DEFAULT_ROUNDS = 300
MAX_EVALS = 500
MAX_PEERS = 100
MAX_SWARM_NODES = 32
SWARM_RESCAN_S = 5.0
CORS = [("Access-Control-Allow-Origin", "*"), ("Cache-Control", "no-store")]

# the RoundRecord fields a round row keeps (swarm_node/records.py); plus the derived ones in `round_row`
ROUND_FIELDS = ("round", "time_s", "policy_version", "reward_local_mean", "reward_train_mean", "format_rate_local",
                "external_groups_available", "external_groups_used", "external_peers_used", "external_peer_ids",
                "peers_seen", "banned_peers", "loss", "kl", "generate_s", "publish_s", "collect_s", "train_s",
                "round_s", "peak_rss_mb", "merge_outcome", "merge_group_size", "merge_s", "rounds_failed")

STATIC = {  # URL path -> (package file under swarm_node/dashboard/static, content type)
    "/": ("index.html", "text/html; charset=utf-8"),
    "/static/dashboard.css": ("dashboard.css", "text/css; charset=utf-8"),
    "/static/dashboard.js": ("dashboard.js", "text/javascript; charset=utf-8"),
    "/static/vendor/uplot/uPlot.iife.min.js": ("vendor/uplot/uPlot.iife.min.js", "text/javascript; charset=utf-8"),
    "/static/vendor/uplot/uPlot.min.css": ("vendor/uplot/uPlot.min.css", "text/css; charset=utf-8"),
    "/static/vendor/uplot/LICENSE": ("vendor/uplot/LICENSE", "text/plain; charset=utf-8"),
}


def load_static() -> dict[str, tuple[bytes, str]]:
    """The page's files, read once from the package (pyproject's package-data ships them)."""
    root = resources.files("swarm_node.dashboard") / "static"
    return {url: ((root / name).read_bytes(), ctype) for url, (name, ctype) in STATIC.items()}


def page_weight_bytes() -> int:
    """Bytes a browser downloads for one page load: HTML, CSS, JS and the vendored chart library (no licence)."""
    return sum(len(body) for url, (body, _) in load_static().items() if not url.endswith("LICENSE"))


def round_row(m: RoundRecord, previous_rejected: dict[str, int]) -> dict[str, Any]:
    """The dashboard's row for one metrics.jsonl line: the fields in ROUND_FIELDS, this round's new rejections by
    reason (`rejected_new`, from the cumulative `rejected` counts) and the current resident memory `rss_mb`."""
    row = {k: getattr(m, k) for k in ROUND_FIELDS}
    total = m.rejected
    row["rejected_new"] = {r: n - previous_rejected.get(r, 0) for r, n in total.items()
                           if n - previous_rejected.get(r, 0) > 0}
    row["rejected_total"] = dict(total)
    return row


def peers_snapshot(collector, max_peers: int = MAX_PEERS) -> tuple[list[dict[str, Any]], int]:
    """(rows of at most `max_peers` peers, number of peers known) from the collector's bounded per-peer maps.

    Run on the node's event loop (the thread that mutates those maps). A row: peer_id, model, last_round,
    policy_version, announced_at_s (unix time of its latest manifest, DHT clock), accepted_groups,
    rejected (reason -> count), banned. Peers heard from most recently come first; peers known only by
    rejections come last.
    """
    latest = dict(collector.peer_latest)  # peer -> (model, round, policy_version, created_at_s)
    rejects = collector.trust.rejects_by_peer
    accepted = collector.accepted_by_peer
    banned = set(collector.trust.banned_peers)
    known = set(latest) | set(accepted) | set(rejects) | banned
    chosen = heapq.nlargest(max_peers, known, key=lambda p: (latest[p][3] if p in latest else -1.0,
                                                             accepted.get(p, 0), p))
    rows = []
    for p in chosen:
        model, last_round, version, at_s = latest.get(p, (None, None, None, None))
        rows.append({"peer_id": p, "model": model, "last_round": last_round, "policy_version": version,
                     "announced_at_s": at_s, "accepted_groups": accepted.get(p, 0),
                     "rejected": dict(rejects[p]) if p in rejects else {}, "banned": p in banned})
    return rows, len(known)


def swarm_nodes(out_dir: Path, max_nodes: int = MAX_SWARM_NODES) -> list[dict[str, Any]]:
    """The nodes whose output directories sit next to `out_dir` (a local swarm: node0, node1, ...), from their
    node.json files: label, peer_id, model, metrics_url, port, self. Unreadable or foreign files are skipped."""
    nodes = []
    for info_path in sorted(out_dir.parent.glob("*/node.json"))[:max_nodes]:
        try:
            info = json.loads(info_path.read_text())
            url = info.get("metrics_url")
            port = urlsplit(url).port if isinstance(url, str) and url.startswith("http://") else None
        except (OSError, ValueError, AttributeError):
            continue
        if port is None:
            continue
        nodes.append({"label": info_path.parent.name, "peer_id": str(info.get("peer_id", ""))[:100],
                      "model": str(info.get("model", ""))[:100], "metrics_url": url, "port": port,
                      "self": info_path.parent.resolve() == out_dir.resolve()})
    return nodes


def _int(query: dict[str, list[str]], name: str, default: int, low: int, high: int) -> int:
    value = query.get(name, [str(default)])[-1]
    if not value.lstrip("-").isdigit() or len(value) > 12:
        raise ValueError(f"{name} must be an integer")
    return max(low, min(high, int(value)))


def _json(data: Any, status: int = 200) -> Response:
    return Response(status, "application/json", json.dumps(data, separators=(",", ":")).encode(), CORS)


class Snapshots(Protocol):
    """What the API reads: the node's `Telemetry` (swarm_node/telemetry.py), which owns the snapshots."""

    registry: Any
    info: dict[str, Any]
    rows: Any  # deque of round rows (`round_row`)
    evals: Any  # deque of eval rows
    peers_info: tuple[list[dict[str, Any]], int, float]

    def health(self) -> tuple[bool, dict[str, Any]]: ...

    def status(self) -> dict[str, Any]: ...


class DashboardApi:
    """Routes a request target to an answer, reading the node's `Telemetry` snapshots."""

    def __init__(self, telemetry: Snapshots):
        self.t = telemetry
        self.static = load_static()
        self._swarm: tuple[float, list[dict[str, Any]]] = (0.0, [])

    def route(self, target: str) -> Response:
        from prometheus_client import generate_latest
        from prometheus_client.exposition import CONTENT_TYPE_LATEST

        parts = urlsplit(target)
        path, query = parts.path, parse_qs(parts.query, max_num_fields=8)
        if path in self.static:
            body, ctype = self.static[path]
            return Response(200, ctype, body, [("Cache-Control", "no-cache")])
        if path == "/metrics":
            return Response(200, CONTENT_TYPE_LATEST, generate_latest(self.t.registry))
        if path == "/healthz":
            ok, health = self.t.health()
            return _json(health, 200 if ok else 503)
        if path == "/status":
            return _json(self.t.status())
        try:
            if path == "/api/rounds":
                return _json(self.rounds(_int(query, "last", DEFAULT_ROUNDS, 0, MAX_ROUNDS),
                                         _int(query, "since", -1, -1, 2**53)))
            if path == "/api/eval":
                return _json(self.evals(_int(query, "since", -1, -1, 2**53)))
            if path == "/api/peers":
                return _json(self.peers())
            if path == "/api/swarm":
                return _json(self.swarm())
        except ValueError as e:
            return _json({"error": str(e)}, 400)
        return Response(404, "text/plain", b"not found: try /, /metrics, /healthz, /status, /api/rounds, "
                        b"/api/eval, /api/peers or /api/swarm\n")

    def _node(self) -> dict[str, Any]:
        info = self.t.info
        return {"peer_id": info.get("peer_id"), "model": info.get("model"), "round": info.get("round", 0),
                "state": info.get("state")}

    def rounds(self, last: int, since: int) -> dict[str, Any]:
        rows = [r for r in list(self.t.rows) if r["round"] > since]
        return {**self._node(), "rounds": rows[len(rows) - last:] if last else []}

    def evals(self, since: int) -> dict[str, Any]:
        return {**self._node(), "evals": [e for e in list(self.t.evals) if e["round"] > since]}

    def peers(self) -> dict[str, Any]:
        rows, known, at_s = self.t.peers_info  # replaced as a whole by the node: one consistent snapshot
        now = time.time()
        return {**self._node(), "snapshot_age_s": round(now - at_s, 3) if at_s else None, "known_peers": known,
                "peers": [{**r, "age_s": None if r["announced_at_s"] is None else round(now - r["announced_at_s"], 1)}
                          for r in rows]}

    def swarm(self) -> dict[str, Any]:
        at_s, nodes = self._swarm
        out_dir = self.t.info.get("output_dir")
        if out_dir and time.monotonic() - at_s > SWARM_RESCAN_S:  # a few small files, re-read at most every 5 s
            nodes = swarm_nodes(Path(out_dir))
            self._swarm = (time.monotonic(), nodes)
        return {**self._node(), "nodes": nodes}
