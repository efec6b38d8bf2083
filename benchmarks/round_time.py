"""Round time and compute of a sharing node (2/2) against an all-local node (4/0), side by side (issue 11, "never
wait": with I + J fixed, a sharing node's round must be no slower than an all-local node's; it generates less).

    python benchmarks/round_time.py [--rounds 8] [--model smollm2-135m]

Arms run in different experiment runs see different machine loads, so their `round_s` cannot be compared. Here
one local swarm of 4 SmolLM2 nodes holds both kinds at once, under the same load: nodes 0 and 1 are 4/0 (I = 4,
J = 0), nodes 2 and 3 are 2/2 (I = 2, J = 2, the recommended `tis` + `success_gated` variant); everything else is
the `homogeneous` preset's settings (L = 8, 32 new tokens, smol tasks). Every node publishes, so the 2/2 nodes
have external groups to take. Per kind it reports mean `round_s`, `cpu_s` (CPU seconds of the node's processes),
`generate_s`, `train_s`, `collect_s`, tokens generated and trained, and the ratios 2/2 : 4/0; round 1 is left out
(start-up). Writes benchmarks/results/round_time.json with the git commit, settings and per-round rows.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import tempfile
from pathlib import Path

from swarm_node.tools.launcher import LocalSwarm

KEYS = ("round_s", "cpu_s", "generate_s", "train_s", "collect_s", "tokens_generated", "train_tokens",
        "train_sequences", "local_groups_with_signal", "external_groups_used")
KINDS = {"4/0": dict(num_local_groups=4, num_external_groups=0),
         "2/2": dict(num_local_groups=2, num_external_groups=2, off_policy_correction="tis",
                     external_selection="success_gated")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--model", default="smollm2-135m")
    args = parser.parse_args()
    overrides = dict(model=args.model, task_preset="smol", num_completions=8, max_new_tokens=32,
                     eval_every_rounds=0, checkpoint_every_rounds=0, metrics_port=-1)
    per_node = [KINDS["4/0"], KINDS["4/0"], KINDS["2/2"], KINDS["2/2"]]
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        swarm = LocalSwarm(4, args.rounds, tmp, None, overrides, node_overrides=per_node)
        status = swarm.run()
        if status != 0:
            raise SystemExit(f"the swarm failed (exit {status})")
        rows = {i: [json.loads(line) for line in (Path(tmp) / f"node{i}" / "metrics.jsonl").read_text().splitlines()]
                for i in range(4)}
    kinds = {"4/0": [0, 1], "2/2": [2, 3]}
    table = {}
    for kind, nodes in kinds.items():
        later = [r for i in nodes for r in rows[i] if r["round"] > 1]
        table[kind] = {k: statistics.fmean(r[k] for r in later) for k in KEYS}
    ratio = {k: table["2/2"][k] / table["4/0"][k] if table["4/0"][k] else None for k in KEYS}
    print(f"{'measure':22} {'4/0':>10} {'2/2':>10} {'2/2 : 4/0':>10}")
    for k in KEYS:
        r = f"{ratio[k]:.2f}" if ratio[k] is not None else "-"
        print(f"{k:22} {table['4/0'][k]:10.2f} {table['2/2'][k]:10.2f} {r:>10}")
    print(f"load average {load_before[0]:.1f} before, {os.getloadavg()[0]:.1f} after, {os.cpu_count()} cores")
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip()
    out = Path(__file__).parent / "results" / "round_time.json"
    out.write_text(json.dumps(dict(commit=commit, settings={**vars(args), **overrides}, kinds=KINDS,
                                   load_average_before=load_before, load_average_after=os.getloadavg(),
                                   mean_from_round_2=table, ratio_2_2_to_4_0=ratio,
                                   rows={f"node{i}": rows[i] for i in rows}), indent=1))
    print("wrote", out)


if __name__ == "__main__":
    main()
