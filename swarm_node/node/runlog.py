"""The node's run log: `metrics.jsonl` (one RoundRecord per round) and `eval.jsonl` (one EvalRecord per held-out
evaluation) in the output directory, appended with fsync.

After a resume the logs are cut back to the checkpoint's round, so they never hold duplicated or missing rounds;
a fresh start (no checkpoint) moves the previous logs to `*.jsonl.prev`.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from swarm_node.records import EvalRecord, RoundRecord, append_jsonl, read_jsonl, truncate_jsonl

log = logging.getLogger("swarm_node")


class RunLog:
    """The metrics and eval logs of one node under `out_dir`."""

    def __init__(self, out_dir: Path):
        self.metrics_path = Path(out_dir) / "metrics.jsonl"
        self.eval_path = Path(out_dir) / "eval.jsonl"

    def start_fresh(self) -> None:
        """No checkpoint to resume from: set earlier logs aside (`*.jsonl.prev`), so round 1 starts a new log."""
        if self.metrics_path.exists() and self.metrics_path.stat().st_size:
            log.warning("no checkpoint: starting at round 1 and moving the previous metrics to metrics.jsonl.prev")
            os.replace(self.metrics_path, self.metrics_path.with_suffix(".jsonl.prev"))
        if self.eval_path.exists():
            os.replace(self.eval_path, self.eval_path.with_suffix(".jsonl.prev"))

    def resume_at(self, round_: int) -> None:
        """Drop the lines after `round_` (written after the checkpoint the node resumes from) and a torn last line."""
        for path in (self.metrics_path, self.eval_path):
            truncate_jsonl(path, round_)

    def append_round(self, record: RoundRecord) -> None:
        append_jsonl(self.metrics_path, record)

    def append_eval(self, record: EvalRecord) -> None:
        append_jsonl(self.eval_path, record)

    def evaluated(self, round_: int) -> bool:
        """Whether eval.jsonl's last line is the evaluation after `round_` (a resumed node does not repeat it)."""
        rows = read_jsonl(self.eval_path)
        return bool(rows) and rows[-1].get("round") == round_
