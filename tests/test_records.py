"""The run-log contract (swarm_node/records.py): every committed metrics.jsonl still loads as RoundRecords, and
`swarm-node experiment report` re-creates a committed results.md, and its block in docs/results.md, byte for byte
from the typed records."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from swarm_node.records import RecordError, RoundRecord, read_jsonl, read_rounds, truncate_jsonl

from rounds import round_line

ROOT = Path(__file__).resolve().parent.parent
COMMITTED = sorted((ROOT / "experiments").glob("*/runs/**/metrics.jsonl"))


def test_every_committed_metrics_log_loads_as_round_records():
    assert len(COMMITTED) > 40  # the glob found the experiments' logs
    for path in COMMITTED:
        rows = read_jsonl(path)
        records = read_rounds(path)
        assert [r.round for r in records] == [row["round"] for row in rows]
        for row, record in zip(rows, records):  # nothing of an old line is lost or changed on the way in
            assert record.model_dump(exclude_unset=True) == row


def test_a_record_is_written_as_set_and_rejects_a_missing_field(tmp_path):
    line = round_line(3, rejected={"stale": 2}, offpolicy={"completions_implausible": 1})
    record = RoundRecord(**line)
    assert json.loads(record.to_json()) == line  # ints stay ints, no default is added
    assert record.phase_s("generate") == line["generate_s"] and record.merge_outcome is None
    del line["reward_local_mean"]
    with pytest.raises(ValidationError):
        RoundRecord(**line)


def test_torn_and_corrupt_lines(tmp_path):
    path = tmp_path / "metrics.jsonl"
    good = [json.dumps(round_line(r)) for r in (1, 2, 3)]
    path.write_text("\n".join(good) + "\n{\"round\": 4, \"pee")
    assert [r.round for r in read_rounds(path, strict=True)] == [1, 2, 3]  # a torn last line is being written
    path.write_text(good[0] + "\nnot json\n" + good[1] + "\n")
    assert [r.round for r in read_rounds(path)] == [1]
    with pytest.raises(RecordError, match=":2 is not valid JSON"):
        read_rounds(path, strict=True)
    path.write_text("\n".join(good) + "\n{\"round\": 4, \"pee")
    truncate_jsonl(path, 2)
    assert [r.round for r in read_rounds(path)] == [1, 2]


@pytest.mark.slow  # plots with matplotlib: about 15 s on a loaded 2-core machine
@pytest.mark.parametrize("name", ["heterogeneous", "homogeneous"])
def test_experiment_report_reproduces_the_committed_results_and_docs(tmp_path, name):
    """results.md, and the experiment's block in docs/results.md, are what `experiment report` makes of the
    committed logs: byte for byte, so no table is copied or edited by hand."""
    source = ROOT / "experiments" / name
    if not (source / "experiment.json").exists():
        pytest.skip(f"experiments/{name} has no committed logs yet")
    exp = tmp_path / "experiments" / name
    # what git keeps of a run (a running experiment's checkpoints come and go under this copy)
    shutil.copytree(source, exp, ignore=shutil.ignore_patterns("*.log", "*.png", "checkpoints", "identity.key*",
                                                               "node.pids", "node.json"))
    (exp / "results.md").unlink()
    doc = tmp_path / "docs" / "results.md"
    doc.parent.mkdir()
    shutil.copy(ROOT / "docs" / "results.md", doc)
    result = subprocess.run([sys.executable, "-m", "swarm_node.cli", "experiment", "report", str(exp), "--into",
                             str(doc)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (exp / "results.md").read_bytes() == (source / "results.md").read_bytes()
    assert doc.read_text() == (ROOT / "docs" / "results.md").read_text(), (
        f"docs/results.md's block of experiments/{name} is stale: run `swarm-node experiment report "
        f"experiments/{name} --into docs/results.md`")
