"""Smoke test of the real CLI: `swarm-node swarm` with the tiny model and weight merging every round, checked
through metrics.jsonl."""

import json
import subprocess
import sys

import psutil
import pytest

pytestmark = pytest.mark.slow

REQUIRED = {"round", "peer_id", "reward_local_mean", "reward_train_mean", "external_groups_available",
            "external_groups_used", "peers_seen", "loss", "tokens_generated", "generate_s", "publish_s", "collect_s",
            "train_s", "round_s", "cpu_s", "external_peer_ids"}


def test_local_swarm_of_three_exchanges_rollouts_and_cleans_up(tmp_path):
    out = tmp_path / "swarm"
    cmd = [sys.executable, "-m", "swarm_node.cli", "swarm", "--nodes", "3", "--rounds", "3", "--model", "tiny",
           "--output-dir", str(out), "--no-filter-zero-advantage", "--num-local-groups", "2",
           "--num-external-groups", "2", "--num-completions", "3", "--max-new-tokens", "8",
           "--merge-mode", "params", "--merge-every-rounds", "1",
           # a tiny-model round (~0.3 s) is faster than one collection cycle (poll, fetch, verify): paced like
           # the `tiny` experiment preset, so that "peers' groups from round 2 on" is about the node, not the clock
           "--min-round-interval-s", "3", "--collect-interval-s", "0.5"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "dashboard of the whole swarm: http://127.0.0.1:" in result.stdout  # one URL for the local swarm
    peer_ids, pids, checksums = set(), [], []
    for i in range(3):
        info = json.loads((out / f"node{i}" / "node.json").read_text())
        peer_ids.add(info["peer_id"])
        pids.append(info["pid"])
        rows = [json.loads(line) for line in (out / f"node{i}" / "metrics.jsonl").read_text().splitlines()]
        assert [r["round"] for r in rows] == [1, 2, 3]
        for r in rows:
            assert REQUIRED <= r.keys()
            assert r["peer_id"] == info["peer_id"]
            assert r["cpu_s"] > 0  # a round generates and trains: the node's processes used CPU
            assert len(r["external_peer_ids"]) == r["external_peers_used"] and info["peer_id"] not in r["external_peer_ids"]
        # every node trained on groups that its peers generated, from round 2 on
        assert all(r["external_groups_used"] > 0 for r in rows[1:]), rows
        assert rows[-1]["peers_seen"] == 2
        assert rows[-1]["bytes_in"] > 0 and rows[-1]["rejected"] == {}
        # the launcher set the target group size to 3, so every round ended with a merge of all three
        assert [(r["merge_outcome"], r["merge_group_size"]) for r in rows] == [("merged", 3)] * 3, rows
        assert rows[-1]["merge_bytes_out"] > 0 and rows[-1]["merges_failed"] == 0
        checksums.append(rows[-1]["merge_checksum"])
    assert len(peer_ids) == 3
    (sum0, norm0) = checksums[0]  # equal weights, up to fp16 compression (the default) of each member's share
    assert all(abs(s - sum0) < 1e-3 * norm0 and abs(n - norm0) < 1e-4 * norm0 for s, n in checksums), checksums
    report = subprocess.run([sys.executable, "-m", "swarm_node.cli", "report", str(out)], capture_output=True,
                            text=True, timeout=120)
    assert report.returncode == 0, report.stderr
    assert (out / "report" / "reward.png").read_bytes()[:4] == b"\x89PNG"
    assert "node2" in (out / "report" / "summary.md").read_text()
    # nothing left running: no node process, and nothing in the nodes' sessions (DHT processes, p2pd)
    for pid in pids:
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    leftovers = []
    for proc in psutil.process_iter(["pid"]):
        try:
            if __import__("os").getsid(proc.pid) in pids:
                leftovers.append(proc.pid)
        except (ProcessLookupError, PermissionError):
            pass
    assert leftovers == []
