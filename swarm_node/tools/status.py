"""`swarm-node status`: a running node's state in a rich table, read from its /status endpoint.

TARGET is the node's endpoint URL (http://127.0.0.1:PORT) or its output directory (whose node.json holds the
URL); a local swarm's output directory shows every node in it. The last line is the URL of the live dashboard
(the first node's page, which shows every node of a local swarm).
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from swarm_node.errors import OperatorError
from swarm_node.records import RoundSummary


class StatusError(OperatorError):
    """The node's status endpoint cannot be found or reached."""


def resolve_urls(target: str) -> list[tuple[str, str]]:
    """(label, status URL) for a URL or an output directory (a node's or a local swarm's)."""
    if target.startswith(("http://", "https://")):
        return [(target, target.rstrip("/") + "/status")]
    root = Path(target)
    infos = sorted(root.glob("node.json")) or sorted(root.glob("*/node.json"))
    if not infos:
        raise StatusError(f"no node.json in {root} or its subdirectories: pass a node's --output-dir or its metrics URL")
    urls = []
    for path in infos:
        url = json.loads(path.read_text()).get("metrics_url")
        if not url:
            raise StatusError(f"{path} has no metrics_url: that node runs with --metrics-port -1 (endpoint off)")
        urls.append((path.parent.name, url + "/status"))
    return urls


def fetch_status(url: str, timeout_s: float = 3.0) -> dict[str, Any]:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            return json.loads(response.read())
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise StatusError(f"cannot read {url} ({e}); is the node running? (check its log)") from None


def render(target: str, console: Console | None = None) -> None:
    """Print one table row per node found at `target`. Raises StatusError."""
    table = Table(title="swarm-node status")
    for col in ("node", "peer ID", "multiaddrs", "state", "round", "reward local (last 5)", "ext. used", "peers",
                "rejected", "last problem"):
        table.add_column(col, overflow="fold")
    urls = resolve_urls(target)
    for label, url in urls:
        try:
            s = fetch_status(url)
        except StatusError as e:
            table.add_row(label, "-", "-", "[red]unreachable[/]", "-", "-", "-", "-", "-", str(e))
            continue
        try:
            recent = [RoundSummary.model_validate(r) for r in s.get("recent_rounds", [])[-5:]]
        except ValueError as e:  # pydantic's ValidationError: not a swarm-node /status (or another version's)
            table.add_row(label, "-", "-", "[red]unreadable[/]", "-", "-", "-", "-", "-", str(e)[:200])
            continue
        health = s.get("health", {})
        state = s.get("state", "?") + ("" if health.get("ok", True) else " [red](stuck)[/]")
        table.add_row(
            label, s.get("peer_id", "?"), " ".join(s.get("multiaddrs", [])), state, str(s.get("round", 0)),
            " ".join(f"{r.reward_local_mean:.2f}" for r in recent) or "-",
            str(recent[-1].external_groups_used) if recent else "-",
            str(recent[-1].peers_seen) if recent else "-",
            str(sum(s.get("rejected", {}).values())),
            s.get("last_problem") or "",
        )
    console = console or Console()
    console.print(table)
    # one page for the whole local swarm: the first node's dashboard reads its siblings' endpoints
    console.print(f"dashboard: {urls[0][1].removesuffix('/status')}/")
