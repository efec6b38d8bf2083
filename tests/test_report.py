"""`swarm_node.tools.report`: plots and summary from synthetic metrics.jsonl files in both output layouts."""

from __future__ import annotations

import json

import pytest

from swarm_node.errors import OperatorError
from swarm_node.tools.report import ReportError, load_runs, write_report

from rounds import round_line

PLOTS = ("reward.png", "phases.png", "peers.png")


def _record(round_: int, reward: float, rejected: dict[str, int] | None = None) -> dict:
    return round_line(
        round_, peer_id=f"QmPeer{round_}", reward_local_mean=reward, reward_train_mean=reward,
        format_rate_local=0.9, external_groups_available=4, external_groups_used=round_ % 3,
        peers_seen=1, loss=None if round_ == 1 else 0.05, tokens_generated=300,
        generate_s=2.0, publish_s=0.1, collect_s=0.5, train_s=3.0, round_s=5.6 + round_,
        peak_rss_mb=1000.0 + 10 * round_, rejected=rejected or {},
    )


def _write_metrics(node_dir, records, tail: str = "") -> None:
    node_dir.mkdir(parents=True, exist_ok=True)
    lines = "".join(json.dumps(r) + "\n" for r in records)
    (node_dir / "metrics.jsonl").write_text(lines + tail)


def _assert_pngs(report_dir) -> None:
    for name in PLOTS:
        data = (report_dir / name).read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n"), name


def test_swarm_layout_writes_plots_and_summary(tmp_path):
    rewards0 = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7]  # first 5: 0.300, last 5: 0.500
    _write_metrics(tmp_path / "node0", [_record(i + 1, r) for i, r in enumerate(rewards0)])
    rewards1 = [0.0, 0.0, 0.5, 0.5, 1.0, 1.0]  # first 5: 0.400, last 5: 0.600
    records1 = [_record(i + 1, r, {"bad_signature": i, "stale": 1}) for i, r in enumerate(rewards1)]
    _write_metrics(tmp_path / "node1", records1, tail='{"round": 7, "peer_id": "QmPe')
    (tmp_path / "node2").mkdir()  # a node directory without metrics is not a node

    runs = load_runs(tmp_path)
    assert list(runs) == ["node0", "node1"]
    assert [r.round for r in runs["node1"]] == [1, 2, 3, 4, 5, 6]  # the partial round 7 is skipped

    report_dir = write_report(tmp_path)
    assert report_dir == tmp_path / "report"
    _assert_pngs(report_dir)
    summary = (report_dir / "summary.md").read_text()
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in summary.splitlines() if line.startswith("| node") and "| rounds |" not in line}
    assert set(rows) == {"node0", "node1"}
    assert rows["node0"][:3] == ["7", "0.300", "0.500"]
    assert rows["node1"][:3] == ["6", "0.400", "0.600"]
    assert rows["node0"][3] == f"{sum(i % 3 for i in range(1, 8)) / 7:.2f}"  # mean external groups used
    assert rows["node0"][5] == "1070.0"  # peak RSS is the maximum over rounds
    assert rows["node1"][6] == "bad_signature: 5, stale: 1"  # cumulative: the last round's counts
    assert rows["node0"][6] == "none"


def test_single_node_layout_and_custom_report_dir(tmp_path):
    out = tmp_path / "run"
    _write_metrics(out, [_record(1, 0.25), _record(2, 0.75)])
    assert list(load_runs(out)) == ["node"]

    report_dir = write_report(out, tmp_path / "elsewhere")
    assert report_dir == tmp_path / "elsewhere"
    _assert_pngs(report_dir)
    summary = (report_dir / "summary.md").read_text()
    assert "| node | 2 | 0.500 | 0.500 |" in summary


def test_nodes_in_natural_order(tmp_path):
    for name in ("node10", "node2", "node1"):
        _write_metrics(tmp_path / name, [_record(1, 0.5)])
    assert list(load_runs(tmp_path)) == ["node1", "node2", "node10"]


@pytest.mark.parametrize("layout", ["empty", "missing", "too deep"])
def test_no_metrics_raises_actionable_error(tmp_path, layout):
    out = tmp_path / "missing" if layout == "missing" else tmp_path
    if layout == "too deep":  # only output_dir and its immediate subdirectories are searched
        _write_metrics(tmp_path / "swarm" / "node0", [_record(1, 0.5)])
    with pytest.raises(ReportError) as exc:
        write_report(out)
    message = str(exc.value)
    assert isinstance(exc.value, OperatorError)
    assert "\n" not in message
    assert "no metrics.jsonl" in message and str(out) in message and "--output-dir" in message
    assert not (out / "report").exists()


def test_invalid_line_before_the_last_raises(tmp_path):
    _write_metrics(tmp_path, [_record(1, 0.5)], tail="{oops\n" + json.dumps(_record(2, 0.5)) + "\n")
    with pytest.raises(ReportError, match=r"metrics.jsonl:2 is not valid JSON"):
        load_runs(tmp_path)
