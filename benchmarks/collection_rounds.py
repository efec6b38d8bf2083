"""Background collection check: does every node of a small local swarm train on external groups in every round from
round 2 on, on an idle and on a loaded machine? (issue 11, "Never wait"; issue 15, hole 3)

    python benchmarks/collection_rounds.py [--nodes 2] [--rounds 4] [--busy 2]
    python benchmarks/collection_rounds.py --quickstart     # the README's quickstart swarm, on the real model

`--quickstart` runs the README's first command's swarm (`swarm-node swarm --nodes 2 --rounds 3`, embedded SmolLM2,
default flags) once, under whatever load the machine has (load averages recorded before and after), and writes
benchmarks/results/collection_rounds_quickstart.json.

Runs `swarm-node swarm --nodes N --rounds R --model tiny` twice: once as is, once while `--busy` busy-loop
processes (started and killed by PID here) load the machine. Per node and round it records external groups
used and available, `collect_s`, `collect_wait_s` and `round_s`. Prints a table and writes
benchmarks/results/collection_rounds.json (with git commit and settings).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

FLAGS = ["--model", "tiny", "--no-filter-zero-advantage", "--num-local-groups", "4", "--num-external-groups", "2",
         "--num-completions", "4", "--max-new-tokens", "48"]


def run_swarm(nodes: int, rounds: int, out: Path, flags: list[str] = FLAGS, timeout_s: float = 900) -> dict:
    cmd = [sys.executable, "-m", "swarm_node.cli", "swarm", "--nodes", str(nodes), "--rounds", str(rounds),
           "--output-dir", str(out), *flags]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    if result.returncode != 0:
        raise SystemExit(result.stderr[-2000:])
    per_node = {}
    for i in range(nodes):
        rows = [json.loads(line) for line in (out / f"node{i}" / "metrics.jsonl").read_text().splitlines()]
        per_node[f"node{i}"] = [{k: r[k] for k in ("round", "external_groups_used", "external_groups_available",
                                                  "peers_seen", "collect_s", "collect_wait_s", "round_s")}
                                for r in rows]
    return dict(command=" ".join(cmd[1:]), nodes=per_node,
                external_every_round_from_2=all(r["external_groups_used"] > 0 for rows in per_node.values()
                                                for r in rows[1:]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--busy", type=int, default=2, help="busy-loop processes for the loaded run")
    parser.add_argument("--quickstart", action="store_true", help="run the README quickstart's swarm once instead")
    args = parser.parse_args()
    results = {}
    if args.quickstart:
        return quickstart()
    with tempfile.TemporaryDirectory() as tmp:
        results["idle"] = run_swarm(args.nodes, args.rounds, Path(tmp) / "idle")
        busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.busy)]
        try:
            results["loaded"] = run_swarm(args.nodes, args.rounds, Path(tmp) / "loaded")
            results["loaded"]["load_average"] = os.getloadavg()
        finally:
            for p in busy:
                os.kill(p.pid, signal.SIGKILL)
                p.wait()
    for name, res in results.items():
        print(f"{name}: external groups every round from round 2: {res['external_every_round_from_2']}")
        for node, rows in res["nodes"].items():
            print("  ", node, [(r["round"], r["external_groups_used"], r["external_groups_available"],
                                r["collect_wait_s"], r["round_s"]) for r in rows])
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    out = Path(__file__).parent / "results" / "collection_rounds.json"
    out.write_text(json.dumps(dict(commit=commit, settings=vars(args), flags=FLAGS, cpu_count=os.cpu_count(),
                                   results=results), indent=1))
    print("wrote", out)


def quickstart() -> None:
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        res = run_swarm(2, 3, Path(tmp) / "quickstart", flags=[], timeout_s=3600)
    res["load_average_before"], res["load_average_after"] = load_before, os.getloadavg()
    print(f"quickstart: external groups every round from round 2: {res['external_every_round_from_2']} "
          f"(load average before {load_before[0]:.1f}, after {res['load_average_after'][0]:.1f} on {os.cpu_count()} cores)")
    for node, rows in res["nodes"].items():
        print("  ", node, [(r["round"], r["external_groups_used"], r["external_groups_available"], r["round_s"])
                           for r in rows])
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    out = Path(__file__).parent / "results" / "collection_rounds_quickstart.json"
    out.write_text(json.dumps(dict(commit=commit, settings={"nodes": 2, "rounds": 3, "model": "default"},
                                   cpu_count=os.cpu_count(), results=res), indent=1))
    print("wrote", out)


if __name__ == "__main__":
    main()
