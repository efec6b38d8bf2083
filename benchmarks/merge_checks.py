"""Cost of the merge checks (issue 16) and robust aggregation vs the plain mean: `python benchmarks/merge.py --checks`.

Part 1, checks per merge at SmolLM2-135M's size (134.5M fp32 values, its real parameter shapes, random values):
the time one node spends on the checks of one merge, before (checksums and segment norms of its contribution,
checksums of the result) and added by issue 16 (its update norm, the trust-region distance of the result to its
own contribution, the anchor norm), and the bytes the new messages add (the signed registry record each round;
on a join or repair, up to MAX_DONORS state-metadata answers, each the first message of a state stream).

Part 2, robust aggregation (swarm_node/network/merging/robust.py) of n = 4 contributions of --robust-values values:
honest ones are a shared anchor plus independent drift (each peer's own update, norm u); "attack" replaces one
contribution with noise x10 of the weights' scale. For the plain mean, the coordinate-wise median, the trimmed mean
CenteredClip (tau = u and tau = 4u, the trust factor) and the self-calibrated CenteredClip the reducers run with
`merge_aggregation = centered_clip` (tau = 2 x the median distance to the coordinate-wise median): ms per aggregation, and the distance of the result to
the honest peers' plain mean, relative to u (0 = exact mean).

Writes benchmarks/results/merge_checks.json (with the git commit and settings) and prints tables.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from swarm_node.network import wire
from swarm_node.network.merging import checksum, guard, robust
from swarm_node.network.merging.registry import MergeMember
from swarm_node.network.merging.state import MAX_DONORS


def _ms(fn, repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best * 1000


def check_costs(shapes: list[tuple[str, tuple[int, ...]]]) -> dict:
    torch.manual_seed(0)
    own = [torch.randn(s) * 0.05 for _, s in shapes]
    anchor = [t + torch.randn_like(t) * 1e-4 for t in own]
    result = [t + torch.randn_like(t) * 1e-4 for t in own]
    groups = checksum.segments(own)
    before = {
        "checksums_of_contribution": _ms(lambda: checksum.checksums(own, groups)),
        "segment_norms": _ms(lambda: checksum.norms(own, groups)),
        "checksums_of_result": _ms(lambda: checksum.checksums(result, groups)),
    }
    added = {
        "update_norm": _ms(lambda: guard.distance(own, anchor)),
        "trust_region_distance": _ms(lambda: guard.distance(result, own)),
        "anchor_norm": _ms(lambda: guard.norm(anchor)),
    }
    record = wire.encode(MergeMember(version=wire.PROTOCOL_VERSION, peer_id="Qm" + "x" * 44, mode="params",
                                     fingerprint="ab" * 32, merges=1000, merging_until_s=1.7e9))
    owner_marker = len(b"[owner:ssh-rsa ]") + 372  # OpenSSH encoding of a 2048-bit RSA public key
    signature = len(b"[signature:]") + 256
    info = wire.encode(wire.MergeStateInfo(version=wire.PROTOCOL_VERSION, mode="params", fingerprint="ab" * 32,
                                           merges=1000, sums=[1.0] * (2 * len(groups))))
    first_chunk = 2**16  # hivemind's streaming chunk: the first state message carries metadata + one tensor chunk
    return {
        "values": sum(t.numel() for t in own), "segments": len(groups),
        "ms_before": before, "ms_added": added,
        "ms_before_total": sum(before.values()), "ms_added_total": sum(added.values()),
        "bytes_registry_record_per_round": len(record) + owner_marker + signature,
        "bytes_state_info_fetch_per_join_or_repair": MAX_DONORS * (len(info) + first_chunk),
    }


def robust_quality(values: int, peers: int = 4) -> list[dict]:
    torch.manual_seed(1)
    anchor = torch.randn(values) * 0.05
    drift = 1e-3
    honest = torch.stack([anchor + torch.randn(values) * drift for _ in range(peers)])
    u = float((honest[0] - anchor).norm())
    attacked = honest.clone()
    attacked[-1] = anchor + torch.randn(values) * 10 * anchor.abs().mean()
    rules = {
        "mean": lambda x: x.mean(dim=0),
        "median": lambda x: x.median(dim=0).values,
        "trimmed_mean(1)": lambda x: robust.trimmed_mean(x, 1),
        "centered_clip(tau=u)": lambda x: robust.centered_clip(x, u),
        "centered_clip(tau=4u)": lambda x: robust.centered_clip(x, 4 * u),
        "self_calibrated_clip (merge_aggregation=centered_clip)": robust.self_calibrated_clip,
    }
    rows = []
    for name, rule in rules.items():
        out = {"rule": name, "ms": _ms(lambda: rule(honest), repeats=2)}
        out["no_attack_distance_to_mean_over_u"] = float((rule(honest) - honest.mean(dim=0)).norm()) / u
        out["attack_distance_to_honest_mean_over_u"] = float((rule(attacked) - honest[:-1].mean(dim=0)).norm()) / u
        rows.append(out)
    return rows


def run(shapes, out: str, robust_values: int) -> None:
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    costs = check_costs(shapes)
    rows = robust_quality(robust_values)
    console = Console(width=140)
    table = Table(title=f"checks per merge at {costs['values'] / 1e6:.1f}M values ({costs['segments']} segments)")
    for col in ("check", "ms"):
        table.add_column(col)
    for k, v in {**costs["ms_before"], **costs["ms_added"]}.items():
        table.add_row(k + (" (new)" if k in costs["ms_added"] else ""), f"{v:.0f}")
    table.add_row("total before / added", f"{costs['ms_before_total']:.0f} / {costs['ms_added_total']:.0f}")
    console.print(table)
    print(f"bytes: registry record {costs['bytes_registry_record_per_round']} per round; state metadata from "
          f"{MAX_DONORS} donors {costs['bytes_state_info_fetch_per_join_or_repair']} per join or repair")
    table = Table(title=f"aggregating 4 contributions of {robust_values / 1e6:.0f}M values (u = own update norm)")
    for col in ("rule", "ms", "no attack: |result - mean| / u", "1 of 4 noise x10: |result - honest mean| / u"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["rule"], f"{r['ms']:.0f}", f"{r['no_attack_distance_to_mean_over_u']:.3f}",
                      f"{r['attack_distance_to_honest_mean_over_u']:.2f}")
    console.print(table)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps({
        "commit": commit, "settings": {"robust_values": robust_values, "peers": 4, "drift_per_value": 1e-3},
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
                    "load_average": os.getloadavg()},
        "checks": costs, "robust": rows}, indent=1))
