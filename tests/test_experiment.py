"""The SAPO experiment harness: arm scaling, result maths from logs, and the tiny preset end to end (real swarms)."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from swarm_node.config import load_config
from swarm_node.evaluation import SMOL_OOD_TASKS, EvaluationError, ood_messages, ood_specs
from swarm_node.experiment.run import ExperimentError, PRESETS, git_provenance, paper_arms, plan, resolve_settings
from swarm_node.experiment.presets import Arm, sharing_arms
from swarm_node.learning.tasks import SMOL_TASKS, TaskError, TaskSet, recreate
from swarm_node.records import EvalRecord, RoundRecord
from swarm_node.experiment.breakdown import ablation, own_task_split, parent_arm, ratios_against
from swarm_node.experiment.results import collect, embed, markdown
from swarm_node.experiment.stats import accuracy_at, compute_curve, paired_bootstrap_ratio

from rounds import round_line


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


def test_sharing_arms_are_setting_dicts_with_short_names():
    arms = sharing_arms(4)
    assert list(arms) == ["local4-ext0", "control", "local2-ext2", "local2-ext2-tis", "local2-ext2-learnability",
                          "local2-ext2-tis-learnability", "local2-ext2-tis-success"]
    paper = arms["local2-ext2"].settings
    assert paper["off_policy_correction"] == "none" and paper["external_selection"] == "uniform"
    assert arms["local2-ext2-tis-success"].settings["external_selection"] == "success_gated"
    assert arms["control"].settings == {"num_local_groups": 4, "num_external_groups": 0, "local_oversample": 2}
    runs = plan(PRESETS["homogeneous"], ["2/2-tis", "4/0", "control"], [0])
    assert [a.name for a, _ in runs] == ["local2-ext2-tis", "local4-ext0", "control"]
    for name in ("homogeneous", "heterogeneous"):
        preset = PRESETS[name]
        assert len(preset.seeds) >= 3 and preset.agents == 4
        assert {"local4-ext0", "control", "local2-ext2"} <= set(preset.arm_order)
    assert PRESETS["homogeneous"].rounds >= 32 and PRESETS["heterogeneous"].rounds >= 48


def test_arm_settings_this_build_lacks_are_dropped_only_at_their_legacy_value():
    known = Arm("a", "a", {"num_local_groups": 2, "num_external_groups": 2})
    assert resolve_settings(known) == known.settings
    legacy = Arm("b", "b", {"num_local_groups": 2, "no_such_setting_xyz": 1})
    assert "no_such_setting_xyz" in resolve_settings(legacy)  # a sentence: cannot run here
    resolved = resolve_settings(sharing_arms(4)["local2-ext2"])  # the paper's arm runs on every build
    assert isinstance(resolved, dict) and resolved["num_external_groups"] == 2
    load_config(None, resolved)  # and every setting it keeps is a real node setting


def test_heterogeneous_agents_each_draw_one_task_and_the_heldout_set_covers_all():
    preset = PRESETS["heterogeneous"]
    streams = [a["stream_tasks"] for a in preset.per_agent]
    assert sorted(t for s in streams for t in s) == sorted(SMOL_TASKS) and all(len(s) == 1 for s in streams)
    cfg = load_config(None, {**preset.overrides, **preset.per_agent[0]})
    ts = TaskSet("smol", [], -1, 0, 1000, cfg.tasks.stream_tasks)
    rng = random.Random(0)
    assert {ts.draw(rng).dataset for _ in range(50)} == set(streams[0])
    assert {s.dataset for s in ts.heldout(cfg.tasks.eval_num_questions, cfg.tasks.eval_seed)} == set(SMOL_TASKS)
    with pytest.raises(TaskError, match="not in this preset"):
        TaskSet("smol", [], -1, 0, 1000, ["products"])


def test_ood_set_is_fixed_unseen_by_training_and_prompted_differently():
    specs = ood_specs("smol", 8, 1000)
    assert specs == ood_specs("smol", 8, 1000) and len({s.dataset for s in specs}) == len(SMOL_OOD_TASKS)
    trained = {(name, json.dumps(cfg, sort_keys=True)) for name, cfg in SMOL_TASKS.items()}
    assert not {(s.dataset, json.dumps(s.config, sort_keys=True)) for s in specs} & trained
    train_messages = TaskSet("smol", [], -1, 0, 1000).messages(recreate(specs[0]))
    ood = ood_messages(specs[0])
    assert ood[0]["content"] != train_messages[0]["content"] and ood[1]["content"].startswith("Problem: ")
    assert ood[2]["content"].startswith("Final result: <answer>")
    with pytest.raises(EvaluationError, match="no out-of-distribution set"):
        ood_specs("paper", 4, 1000)


def test_paired_bootstrap_ratio_interval():
    ci = paired_bootstrap_ratio([2.0, 4.0, 6.0], [1.0, 2.0, 3.0])
    assert ci["ratio"] == pytest.approx(2.0) and ci["lo"] == pytest.approx(2.0) and ci["hi"] == pytest.approx(2.0)
    ci = paired_bootstrap_ratio([1.0, 3.0, 2.0, 2.5], [1.0, 1.0, 2.0, 2.0])
    assert ci["lo"] < ci["ratio"] < ci["hi"] and ci["n"] == 4
    assert paired_bootstrap_ratio([1.0], [0.0]) is None


def test_accuracy_against_node_compute():
    agents = [{"metrics": [RoundRecord(**round_line(r, tokens_generated=10, train_tokens=30, round_s=2.0))
                           for r in (1, 2)],
               "eval": [EvalRecord(round=0, heldout_accuracy=0.2), EvalRecord(round=2, heldout_accuracy=a)]}
              for a in (0.4, 0.6)]
    curve = compute_curve(agents, 2)
    assert curve == [{"round": 0, "accuracy": pytest.approx(0.2), "tokens": 0.0, "seconds": 0.0},
                     {"round": 2, "accuracy": pytest.approx(0.5), "tokens": 80.0, "seconds": 4.0}]
    assert accuracy_at(curve, "tokens", 40.0) == pytest.approx(0.35)
    assert accuracy_at(curve, "seconds", 5.0) is None
    assert compute_curve(agents, 2, "ood_accuracy") == []


def test_git_provenance_names_the_commit():
    info = git_provenance()
    assert set(info) == {"git_commit", "git_dirty"}
    assert info["git_commit"] is None or len(info["git_commit"]) == 40


def _write_run(root: Path, arm: str, label: str, seed: int, rewards: list[list[float]], heldout: list[float]):
    d = root / "runs" / f"{arm}-seed{seed}"
    for i, agent in enumerate(rewards):
        node = d / f"node{i}"
        node.mkdir(parents=True)
        node.joinpath("metrics.jsonl").write_text("".join(json.dumps(round_line(
            r + 1, reward_local_mean=x, reward_train_mean=2 * x, external_groups_used=1, round_s=10.0,
            tokens_generated=0, train_tokens=0)) + "\n" for r, x in enumerate(agent)))
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
    arms = [a.name for a, _ in plan(PRESETS["tiny"], None, [0])]  # + the TIS/learnability arm where the build has it
    assert arms[:3] == ["local4-ext0", "local2-ext2", "control"]
    for arm in arms:
        run = exp / "runs" / f"{arm}-seed0"
        assert (run / "done.json").exists()
        for node in ("node0", "node1"):
            rows = [json.loads(x) for x in (run / node / "metrics.jsonl").read_text().splitlines()]
            assert [m["round"] for m in rows] == [1, 2]  # contiguous after the interruption, no duplicates
            evals = [json.loads(x) for x in (run / node / "eval.jsonl").read_text().splitlines()]
            assert [e["round"] for e in evals] == [0, 1, 2]
            assert all(e["ood_num_questions"] == 4 and 0 <= e["ood_accuracy"] <= 1 for e in evals)
            assert not (run / node / "checkpoints").exists()
            if arm == "control":
                assert all(m["local_groups_generated"] == 8 and m["local_groups"] == 4 for m in rows)
            if arm.startswith("local2-ext2"):
                assert all(m["local_groups"] == 2 for m in rows)
        record = json.loads((run / "run.json").read_text())
        assert record["per_agent"] == [{"stream_tasks": ["chain_sum"]}, {"stream_tasks": ["syllogism"]}]
        assert len(record["starts"]) == (2 if arm == "local4-ext0" else 1)  # the interrupted run started twice
        assert "git_commit" in json.loads((run / "done.json").read_text())
        if arm.startswith("local2-ext2"):
            used = [json.loads(x)["external_groups_used"] for n in ("node0", "node1")
                    for x in (run / n / "metrics.jsonl").read_text().splitlines()]
            assert max(used) == 2
    results = json.loads((exp / "results.json").read_text())
    assert set(results["arms"]) == set(arms)
    assert results["arms"]["local2-ext2"]["ci_vs_baseline"]["cumulative_reward_local"] is None  # 4/0 never scores
    assert len(list((exp / "plots").glob("*.png"))) == 4  # with accuracy against compute
    text = (exp / "results.md").read_text()
    again = subprocess.run(_cli("sapo", "--preset", "tiny", "--seeds", "0", "--root", str(root)), env=env,
                           capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and again.stdout.count(": done") == len(arms)  # nothing re-run
    (exp / "results.md").unlink()
    report = subprocess.run(_cli("report", str(exp)), env=env, capture_output=True, text=True, timeout=120)
    assert report.returncode == 0 and (exp / "results.md").read_text() == text
    other = subprocess.run(_cli("sapo", "--preset", "tiny", "--rounds", "3", "--root", str(root)), env=env,
                           capture_output=True, text=True, timeout=60)
    assert other.returncode == 2 and "other settings" in other.stderr


def test_ablation_pairs_each_ingredient_with_the_arm_without_it():
    base = "local4-ext0"
    assert parent_arm(base, base) is None
    assert parent_arm("local2-ext2", base) == (base, "sharing (2 of 4 groups from peers)")
    assert parent_arm("control", base) == (base, "local filtering (control)")
    assert parent_arm("local2-ext2-tis-success", base) == ("local2-ext2-tis", "success gating")
    assert parent_arm("local2-ext2-tis", base) == ("local2-ext2", "TIS")

    def arm(**per_seed):
        return {"runs": {int(s[1:]): {"heldout_last": v, "round_s": 10.0} for s, v in per_seed.items()}}

    arms = {base: arm(s0=0.2, s1=0.3, s2=0.4), "local2-ext2": arm(s0=0.4, s1=0.3),
            "local2-ext2-tis-success": arm(s0=0.8, s1=0.9, s2=1.0)}
    rows = {row["arm"]: row for row in ablation(arms, base)}
    assert set(rows) == {"local2-ext2", "local2-ext2-tis-success"}
    assert rows["local2-ext2"]["seeds"] == [0, 1]  # only the seeds both arms ran
    assert rows["local2-ext2"]["ratios"]["heldout_last"]["ratio"] == pytest.approx(0.7 / 0.5)
    # 2/2-tis did not run, so success gating is measured together with TIS against plain 2/2
    assert rows["local2-ext2-tis-success"]["parent"] == "local2-ext2"
    assert rows["local2-ext2-tis-success"]["ingredient"] == "TIS + success gating"
    assert rows["local2-ext2-tis-success"]["ratios"]["heldout_last"]["ratio"] == pytest.approx(1.7 / 0.7)
    assert rows["local2-ext2-tis-success"]["ratios"]["cumulative_reward_local"] is None  # not in these runs
    against = ratios_against(arms, "local2-ext2", ["heldout_last", "round_s"])
    assert against["local2-ext2-tis-success"]["heldout_last"]["ratio"] == pytest.approx(1.7 / 0.7)
    assert against["local2-ext2-tis-success"]["heldout_last"]["n"] == 2
    assert against[base]["round_s"]["ratio"] == pytest.approx(1.0)
    assert ratios_against(arms, "control", ["heldout_last"]) == {}  # the control did not run
    # 2/2-tis ran on seed 0 only: success gating alone on that seed, then both ingredients on seeds 0 and 1
    arms["local2-ext2-tis"] = arm(s0=0.5)
    mine = [row for row in ablation(arms, base) if row["arm"] == "local2-ext2-tis-success"]
    assert [(r["parent"], r["ingredient"], r["seeds"]) for r in mine] == [
        ("local2-ext2-tis", "success gating", [0]), ("local2-ext2", "TIS + success gating", [0, 1])]
    assert mine[0]["ratios"]["heldout_last"]["ratio"] == pytest.approx(0.8 / 0.5)
    assert mine[1]["ratios"]["heldout_last"]["ratio"] == pytest.approx(1.7 / 0.7)
    arms["local2-ext2-tis"] = arm(s0=0.5, s1=0.6, s2=0.7)  # covers every seed: no joined row
    assert [r["parent"] for r in ablation(arms, base) if r["arm"] == "local2-ext2-tis-success"] == ["local2-ext2-tis"]


def test_own_task_split_separates_a_specialists_task_from_the_others():
    def agent(*by_task):
        return {"eval": [EvalRecord(round=r, heldout_accuracy=0.0, heldout_by_task=t) for r, t in enumerate(by_task)]}

    agents = [agent({"a": 0.2, "b": 0.2, "c": 0.2}, {"a": 0.8, "b": 0.3, "c": 0.5}),
              agent({"a": 0.2, "b": 0.4, "c": 0.2}, {"a": 0.1, "b": 0.6, "c": 0.3})]
    split = own_task_split(agents, [["a"], ["b"]], rounds=10)
    assert split["heldout_own_first"] == pytest.approx(0.3)
    assert split["heldout_own_last"] == pytest.approx((0.8 + 0.6) / 2)
    assert split["heldout_other_last"] == pytest.approx((0.4 + 0.2) / 2)
    assert split["heldout_other_first"] == pytest.approx((0.2 + 0.2) / 2)
    assert own_task_split(agents, [["a"], ["b"]], rounds=0)["heldout_own_last"] == pytest.approx(0.3)
    # undefined where an agent draws from several tasks (homogeneous) or the logs lack the per-task split
    assert set(own_task_split(agents, [["a", "b"], ["b"]], rounds=10).values()) == {None}
    assert set(own_task_split(agents, None, rounds=10).values()) == {None}
    bare = [{"eval": [EvalRecord(round=0, heldout_accuracy=0.1)]}] * 2
    assert set(own_task_split(bare, [["a"], ["b"]], rounds=10).values()) == {None}


def test_report_into_a_document_replaces_only_its_own_block(tmp_path):
    root = tmp_path / "experiments" / "exp"
    (root / "plots").mkdir(parents=True)
    doc = tmp_path / "docs" / "results.md"
    doc.parent.mkdir()
    doc.write_text("# Results\n\nHand-written reading.\n")
    embed(doc, root, "| table v1 |\n\n![p](plots/p.png)\n")
    first = doc.read_text()
    assert first.startswith("# Results\n\nHand-written reading.\n\n<!-- begin experiment report ../experiments/exp -->")
    assert "![p](../experiments/exp/plots/p.png)" in first and "<!-- end experiment report ../experiments/exp -->" in first
    doc.write_text(first + "\nMore reading after the block.\n")
    embed(doc, root, "| table v2 |\n")
    second = doc.read_text()
    assert "table v2" in second and "table v1" not in second and second.count("<!-- begin experiment report") == 1
    assert second.startswith("# Results\n\nHand-written reading.\n") and second.endswith("More reading after the block.\n")
