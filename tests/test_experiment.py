"""The SAPO experiment harness: arm scaling, result maths from logs, and the tiny preset end to end (real swarms)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from swarm_node.experiment import ExperimentError, PRESETS, paper_arms, plan
from swarm_node.results import collect, markdown


def test_paper_arms_scale_proportionally():
    arms = paper_arms(8)
    assert [(a.local, a.external) for a in arms.values() if a.oversample == 1] == [(8, 0), (6, 2), (4, 4), (2, 6)]
    assert [(a.local, a.external, a.oversample) for a in paper_arms(4).values()] == [
        (4, 0, 1), (3, 1, 1), (2, 2, 1), (1, 3, 1), (4, 0, 2)]
    with pytest.raises(ExperimentError, match="multiple of 4"):
        paper_arms(6)


def test_plan_runs_seed_by_seed_and_rejects_unknown_arms():
    runs = plan(PRESETS["smol"], ["local4-ext0", "control"], [0, 1])
    assert [(a.name, s) for a, s in runs] == [("local4-ext0", 0), ("control", 0), ("local4-ext0", 1), ("control", 1)]
    with pytest.raises(ExperimentError, match="unknown arm"):
        plan(PRESETS["smol"], ["local8-ext0"], None)


def _write_run(root: Path, arm: str, label: str, seed: int, rewards: list[list[float]], heldout: list[float]):
    d = root / "runs" / f"{arm}-seed{seed}"
    for i, agent in enumerate(rewards):
        node = d / f"node{i}"
        node.mkdir(parents=True)
        node.joinpath("metrics.jsonl").write_text("".join(json.dumps(
            {"round": r + 1, "reward_local_mean": x, "reward_train_mean": 2 * x, "external_groups_used": 1,
             "round_s": 10.0}) + "\n" for r, x in enumerate(agent)))
        node.joinpath("eval.jsonl").write_text("".join(json.dumps({"round": 2 * k, "heldout_accuracy": h}) + "\n"
                                                       for k, h in enumerate(heldout)))
    d.joinpath("done.json").write_text(json.dumps({"arm": arm, "label": label, "seed": seed, "wall_s": 1.0}))


def test_results_sum_over_agents_and_rounds_and_compare_seed_matched(tmp_path):
    (tmp_path / "experiment.json").write_text(json.dumps(
        {"preset": "x", "agents": 2, "rounds": 2, "groups_per_round": 4, "overrides": {}, "notes": ["n"]}))
    _write_run(tmp_path, "local4-ext0", "4/0", 0, [[0.1, 0.2], [0.3, 0.4]], [0.1, 0.2])
    _write_run(tmp_path, "local4-ext0", "4/0", 1, [[0.2, 0.2], [0.2, 0.2]], [0.1, 0.1])
    _write_run(tmp_path, "local2-ext2", "2/2", 0, [[0.2, 0.4], [0.6, 0.8]], [0.1, 0.4])
    (tmp_path / "runs" / "local2-ext2-seed1" / "node0").mkdir(parents=True)  # unfinished: reported as pending
    results = collect(tmp_path)
    base = results["arms"]["local4-ext0"]
    assert base["runs"][0]["cumulative_reward_local"] == pytest.approx(1.0)
    assert base["runs"][0]["cumulative_reward_train"] == pytest.approx(2.0)
    assert base["summary"]["cumulative_reward_local"]["mean"] == pytest.approx(0.9)
    shared = results["arms"]["local2-ext2"]["summary"]
    assert shared["ratio_vs_baseline_local"]["mean"] == pytest.approx(2.0)  # seed 0 only: 2.0 / 1.0
    assert shared["heldout_gain"]["mean"] == pytest.approx(0.3)
    assert results["pending_runs"] == ["local2-ext2-seed1"]
    text = markdown(results)
    assert "| 2/2 | 1 | 2.00 | 2.00 |" in text and "local2-ext2-seed1" in text


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "swarm_node.cli", "experiment", *args]


@pytest.mark.slow
def test_tiny_preset_end_to_end_resumes_and_reports(tmp_path, reap_children):
    """The tiny preset (seed 0, all its arms) as real local swarms; an interrupted run continues from its
    checkpoints; a second start skips finished runs; `experiment report` re-creates the same results."""
    root = tmp_path / "experiments"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    # interrupt the first run after its first checkpoint, then continue it
    proc = subprocess.Popen(_cli("sapo", "--preset", "tiny", "--seeds", "0", "--root", str(root)), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    first = root / "tiny" / "runs" / "local4-ext0-seed0" / "node0"
    deadline = time.monotonic() + 180
    while not list((first / "checkpoints").glob("*")) and time.monotonic() < deadline:
        assert proc.poll() is None, "the experiment exited before its first checkpoint"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGINT)
    assert proc.wait(timeout=120) == 130
    assert not (first.parent / "done.json").exists()
    done = subprocess.run(_cli("sapo", "--preset", "tiny", "--seeds", "0", "--root", str(root)), env=env,
                          capture_output=True, text=True, timeout=420)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    exp = root / "tiny"
    for arm in ("local4-ext0", "local2-ext2", "control"):
        run = exp / "runs" / f"{arm}-seed0"
        assert (run / "done.json").exists()
        for node in ("node0", "node1"):
            rows = [json.loads(x) for x in (run / node / "metrics.jsonl").read_text().splitlines()]
            assert [m["round"] for m in rows] == [1, 2]  # contiguous after the interruption, no duplicates
            evals = [json.loads(x)["round"] for x in (run / node / "eval.jsonl").read_text().splitlines()]
            assert evals == [0, 1, 2]
            assert not (run / node / "checkpoints").exists()
            if arm == "control":
                assert all(m["local_groups_generated"] == 8 and m["local_groups"] == 4 for m in rows)
            if arm == "local2-ext2":
                assert all(m["local_groups"] == 2 for m in rows)
        if arm == "local2-ext2":
            used = [json.loads(x)["external_groups_used"] for n in ("node0", "node1")
                    for x in (run / n / "metrics.jsonl").read_text().splitlines()]
            assert max(used) == 2
    results = json.loads((exp / "results.json").read_text())
    assert set(results["arms"]) == {"local4-ext0", "local2-ext2", "control"}
    assert len(list((exp / "plots").glob("*.png"))) == 3
    text = (exp / "results.md").read_text()
    again = subprocess.run(_cli("sapo", "--preset", "tiny", "--seeds", "0", "--root", str(root)), env=env,
                           capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and again.stdout.count(": done") == 3  # nothing re-run
    (exp / "results.md").unlink()
    report = subprocess.run(_cli("report", str(exp)), env=env, capture_output=True, text=True, timeout=120)
    assert report.returncode == 0 and (exp / "results.md").read_text() == text
    other = subprocess.run(_cli("sapo", "--preset", "tiny", "--rounds", "3", "--root", str(root)), env=env,
                           capture_output=True, text=True, timeout=60)
    assert other.returncode == 2 and "other settings" in other.stderr
