"""The dashboard's cost: page weight, update interval, bytes per update, and the load a polling client adds to a
tiny node's round time (issue 12's closing note).

    python benchmarks/dashboard.py [--phase-s 45] [--repeats 2] [--poll-s 2]

1. Page weight: the bytes a browser downloads for one page load (HTML, CSS, JS and the vendored uPlot), as served.
2. Update interval: POLL_MS of the page's script; bytes one update fetches from a running node (status, the rounds
   since the last one, evaluations, peers; the swarm list every 5th update), measured on the node below.
3. Load: one real tiny node (`swarm-node run --model tiny`, 1 torch thread) runs rounds without interruption while
   phases alternate: no client, then a client that polls every `--poll-s` seconds exactly what the page fetches
   for the node it shows (the page's files once, then status, /api/rounds?since=..., /api/eval?since=...,
   /api/peers, and /api/swarm every 5th update), `--repeats` times. Reports mean and stdev of round_s per arm
   over the rounds that started and ended inside a phase. The client runs in this process (a browser would
   normally run on another machine; its rendering is not charged to the node).

Prints a table and writes benchmarks/results/dashboard.json with the git commit, settings and load average.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from rich.console import Console
from rich.table import Table

from swarm_node.dashboard.api import STATIC, load_static, page_weight_bytes

NODE_FLAGS = ["--model", "tiny", "--num-local-groups", "2", "--num-completions", "3", "--max-new-tokens", "6",
              "--no-filter-zero-advantage", "--torch-threads", "1", "--rounds", "0", "--eval-every-rounds", "0"]


def fetch(url: str) -> int:
    with urllib.request.urlopen(url, timeout=5) as response:
        return len(response.read())


class PollingClient:
    """Fetches what the dashboard page fetches for one node, every `poll_s` seconds, on a thread."""

    def __init__(self, base: str, poll_s: float):
        self.base, self.poll_s = base, poll_s
        self.stop = threading.Event()
        self.updates, self.update_bytes, self.page_bytes = 0, [], 0
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        self.page_bytes = sum(fetch(self.base + path) for path in STATIC if not path.endswith("LICENSE"))
        last_round, last_eval = -1, -1
        while not self.stop.is_set():
            t0 = time.monotonic()
            n = fetch(self.base + "/status")
            with urllib.request.urlopen(f"{self.base}/api/rounds?since={last_round}&last=1000", timeout=5) as r:
                body = r.read()
            n += len(body)
            rows = json.loads(body)["rounds"]
            last_round = rows[-1]["round"] if rows else last_round
            with urllib.request.urlopen(f"{self.base}/api/eval?since={last_eval}", timeout=5) as r:
                body = r.read()
            n += len(body)
            evals = json.loads(body)["evals"]
            last_eval = evals[-1]["round"] if evals else last_eval
            n += fetch(self.base + "/api/peers")
            if self.updates % 5 == 0:
                n += fetch(self.base + "/api/swarm")
            self.updates += 1
            self.update_bytes.append(n)
            self.stop.wait(max(0.0, self.poll_s - (time.monotonic() - t0)))


def read_rows(path: Path) -> list[dict]:
    rows = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            rows.append(json.loads(line))
        except ValueError:
            break
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--phase-s", type=float, default=45.0, help="seconds per phase")
    parser.add_argument("--repeats", type=int, default=2, help="pairs of phases (no client, client)")
    parser.add_argument("--poll-s", type=float, default=2.0, help="client polling interval, seconds")
    parser.add_argument("--warmup-rounds", type=int, default=5)
    args = parser.parse_args()

    static = load_static()
    weight = {path: len(body) for path, (body, _) in static.items() if not path.endswith("LICENSE")}
    poll_ms = int(re.search(rb"POLL_MS = (\d+)", static["/static/dashboard.js"][0]).group(1))

    tmp = Path(tempfile.mkdtemp(prefix="dashboard-bench-"))
    out = tmp / "node0"
    out.mkdir()
    log = open(out / "node.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "swarm_node.cli", "run", "--output-dir", str(out), *NODE_FLAGS],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    phases = []  # (arm, start unix time, end unix time)
    client_stats = {}
    try:
        deadline = time.monotonic() + 300
        while not (out / "node.json").exists() or len(read_rows(out / "metrics.jsonl")) < args.warmup_rounds:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the node did not start: {(out / 'node.log').read_text()[-2000:]}")
            time.sleep(0.5)
        base = json.loads((out / "node.json").read_text())["metrics_url"]
        for _ in range(args.repeats):
            for arm in ("no client", "client every %g s" % args.poll_s):
                client = PollingClient(base, args.poll_s) if arm != "no client" else None
                start = time.time()
                if client:
                    client.thread.start()
                time.sleep(args.phase_s)
                if client:
                    client.stop.set()
                    client.thread.join(timeout=10)
                    client_stats.setdefault("updates", 0)
                    client_stats["updates"] += client.updates
                    client_stats.setdefault("update_bytes", []).extend(client.update_bytes)
                    client_stats["page_bytes_served"] = client.page_bytes
                phases.append((arm, start, time.time()))
        rows = read_rows(out / "metrics.jsonl")
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        proc.wait()
        log.close()

    arms: dict[str, list[float]] = {}
    phase_means: dict[str, list[float]] = {}
    for arm, start, end in phases:  # rounds that started and ended inside the phase
        inside = [r["round_s"] for r in rows if r["time_s"] - r["round_s"] >= start and r["time_s"] <= end]
        arms.setdefault(arm, []).extend(inside)
        phase_means.setdefault(arm, []).append(round(statistics.mean(inside), 4) if inside else None)
    result = {
        "page_weight_bytes": page_weight_bytes(),
        "page_weight_by_file": weight,
        "update_interval_s": poll_ms / 1000,
        "bytes_per_update_mean": statistics.mean(client_stats["update_bytes"]) if client_stats else None,
        "client_updates": client_stats.get("updates"),
        "round_s": {arm: {"rounds": len(v), "mean": round(statistics.mean(v), 4) if v else None,
                          "stdev": round(statistics.stdev(v), 4) if len(v) > 1 else None,
                          "median": round(statistics.median(v), 4) if v else None,
                          "stderr": round(statistics.stdev(v) / len(v) ** 0.5, 4) if len(v) > 1 else None,
                          "phase_means": phase_means[arm]} for arm, v in arms.items()},
    }
    no, yes = (result["round_s"][a]["mean"] for a in arms)
    result["client_added_round_s_pct"] = round(100 * (yes - no) / no, 2) if no and yes else None

    table = Table(title="dashboard: page weight, update interval, load of a polling client on a tiny node")
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_row("page weight (HTML+CSS+JS+uPlot), bytes", f"{result['page_weight_bytes']:,}")
    for path, n in weight.items():
        table.add_row(f"  {path}", f"{n:,}")
    table.add_row("update interval, s", f"{result['update_interval_s']:g}")
    table.add_row("bytes per update (one node), mean", f"{result['bytes_per_update_mean'] or 0:,.0f}")
    for arm, s in result["round_s"].items():
        table.add_row(f"round_s mean ± stdev, {arm} ({s['rounds']} rounds)", f"{s['mean']} ± {s['stdev']}")
        table.add_row(f"  median; standard error of the mean", f"{s['median']}; {s['stderr']}")
        table.add_row("  mean per phase", " ".join(str(m) for m in s["phase_means"]))
    table.add_row("round time added by the client, %", str(result["client_added_round_s_pct"]))
    Console().print(table)

    source = Path(__file__).resolve().parent.parent
    commit = subprocess.run(["git", "-C", str(source), "rev-parse", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    result.update(commit=commit, settings={**vars(args), "node_flags": NODE_FLAGS}, machine=platform.platform(),
                  cpus=os.cpu_count(), loadavg=os.getloadavg())
    path = source / "benchmarks" / "results" / "dashboard.json"
    path.write_text(json.dumps(result, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
