"""The run logs' contract: one typed `RoundRecord` per line of `metrics.jsonl`, and the JSONL reading and writing
that every producer and consumer shares.

The node writes a `RoundRecord` after every round (swarm_node/node/roundlog.py); telemetry, the dashboard,
`swarm-node status`, `report`, the launcher and the experiment results read them back through `read_rounds`, by
attribute, never by string key. Fields added after the first experiments were logged have defaults, so every
committed `metrics.jsonl` under experiments/ still loads (tests/test_records.py). Unknown fields (a newer
node's) are kept as extras rather than refused: a reader of old software can still read new logs.

Counters (`rejected`, `pool_dropped`, `bytes_in`, `bytes_out`, the `merge*` counts) are cumulative since the node
started, so each line is self-contained and a torn or missing line loses nothing; readers that need per-round
values take differences (`Telemetry.observe_round`, the dashboard's `rejected_new`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterator

from pydantic import BaseModel, ConfigDict

PHASES = ("generate", "publish", "collect", "train")  # the round's phases, each timed as `<phase>_s`


class RoundRecord(BaseModel):
    """One line of metrics.jsonl: what one round of one node did (SAPO's I local and J external groups).

    Times are seconds (`*_s`), rewards are the strict verifier's in [0, 1], byte and rejection counts are
    cumulative since the node started. The `merge*` fields are present only when merging is on
    (swarm_node/network/merging/stats.py; docs/merging.md).
    """

    model_config = ConfigDict(extra="allow", frozen=True)

    round: int
    peer_id: str
    model: str
    policy_version: int
    reward_local_mean: float  # every completion this node generated this round
    reward_train_mean: float  # the training batch: I local + J external groups
    format_rate_local: float
    local_groups: int
    local_groups_generated: int
    local_groups_with_signal: int
    external_groups_available: int
    external_groups_used: int
    external_peers_used: int
    external_peer_ids: list[str] = []  # at most J distinct peer IDs (not in the first logs)
    peers_seen: int
    published: bool
    rejected: dict[str, int]  # cumulative, by reason
    pool_dropped: dict[str, int] = {}  # cumulative, by reason
    banned_peers: int
    verify_ms_per_group: float
    loss: float | None  # None: no group had signal, no optimizer step
    grad_norm: float | None
    clip_fraction: float | None
    kl: float | None
    offpolicy: dict[str, int | float] = {}  # TIS / filter counts of the step (docs/algorithm.md)
    peer_usefulness: dict[str, float] = {}
    train_sequences: int
    train_tokens: int
    tokens_generated: int
    bytes_in: int  # cumulative rollout payload bytes
    bytes_out: int
    generate_s: float
    publish_s: float
    collect_s: float
    collect_wait_s: float = 0.0
    train_s: float
    round_s: float
    cpu_s: float | None = None  # this node's CPU seconds (threads and children) in the round
    peak_rss_mb: float
    time_s: float  # unix time the round ended
    rounds_failed: int = 0  # cumulative rounds that raised and were retried
    pace_wait_s: float = 0.0  # min_round_interval_s wait before this round
    # merging (only with --merge-mode): swarm_node/network/merging/stats.py
    merge_mode: str | None = None
    merge_outcome: str | None = None  # merged, repaired, alone, no_group, failed; None: no merge this round
    merge_joined: bool = False
    merge_group_size: int = 0
    merge_s: float = 0.0
    merge_mismatch: Any = None
    merges: int = 0
    merges_failed: int = 0
    merge_repairs: int = 0
    merges_skipped: int = 0
    merge_state_loads: int = 0
    merge_rejected: dict[str, int] = {}
    merge_bytes_out: int | None = None  # cumulative
    merge_bytes_in: int | None = None
    merge_checksum: list[float] | None = None  # [sum, L2 norm] of the weights after a merge
    merge_grad_epoch: int | None = None

    def phase_s(self, phase: str) -> float:
        """Seconds spent in `phase` (one of PHASES, or "round")."""
        return getattr(self, f"{phase}_s")

    def to_json(self) -> str:
        """The line as written: the fields that were set, in the order the node set them."""
        return json.dumps(self.model_dump(exclude_unset=True))


class RoundSummary(BaseModel):
    """The few fields of a RoundRecord that /status lists for the last rounds (read by `swarm-node status`)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    round: int
    reward_local_mean: float
    reward_train_mean: float
    external_groups_used: int
    peers_seen: int
    loss: float | None
    round_s: float

    @classmethod
    def of(cls, record: RoundRecord) -> "RoundSummary":
        return cls.model_validate(record.model_dump(include=set(cls.model_fields)))


class EvalRecord(BaseModel):
    """One line of eval.jsonl: greedy held-out accuracy after `round` (swarm_node/evaluation.py)."""

    model_config = ConfigDict(extra="allow", frozen=True)

    round: int
    heldout_accuracy: float
    peer_id: str | None = None
    policy_version: int | None = None
    num_questions: int | None = None
    ood_accuracy: float | None = None
    ood_num_questions: int | None = None
    heldout_by_task: dict[str, float] | None = None  # accuracy per task of the held-out set
    ood_by_task: dict[str, float] | None = None
    eval_s: float | None = None
    time_s: float | None = None


class RecordError(ValueError):
    """A line that is not the last of its file does not parse; carries the path and line number."""


def read_jsonl(path: Path, strict: bool = False) -> list[dict[str, Any]]:
    """The objects of a per-round JSONL log, up to a torn (being written) last line; [] if the file is missing.

    Args:
        strict: raise RecordError for a line that is not the last and does not parse (default: stop there).
    """
    if not Path(path).exists():
        return []
    lines = Path(path).read_text().splitlines()
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            if strict and number < len(lines):
                raise RecordError(f"{path}:{number} is not valid JSON ({e.msg}); fix or delete that line") from None
            break
    return rows


def read_rounds(path: Path, strict: bool = False) -> list[RoundRecord]:
    """The RoundRecords of a metrics.jsonl (see `read_jsonl` for torn lines and `strict`).

    Raises:
        pydantic.ValidationError: a line lacks a field every node has written.
    """
    return [RoundRecord.model_validate(row) for row in read_jsonl(path, strict)]


def read_evals(path: Path) -> list[EvalRecord]:
    """The EvalRecords of an eval.jsonl, up to a torn last line."""
    return [EvalRecord.model_validate(row) for row in read_jsonl(path)]


def iter_tail(path: Path, keep: int) -> Iterator[str]:
    """The last `keep` raw lines of a file (for a resumed node's history), without reading it all into a list."""
    from collections import deque

    with open(path) as f:
        yield from deque(f, maxlen=keep)


def append_jsonl(path: Path, record: BaseModel | dict[str, Any]) -> None:
    """Append one line and fsync it, so a crash loses at most the line being written."""
    text = record.to_json() if isinstance(record, RoundRecord) else (
        json.dumps(record.model_dump(exclude_unset=True)) if isinstance(record, BaseModel) else json.dumps(record))
    with open(path, "a") as f:
        f.write(text + "\n")
        f.flush()
        os.fsync(f.fileno())


def write_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` through a temporary file and a rename: readers see the old or the new file, whole."""
    tmp = Path(path).with_name(Path(path).name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def truncate_jsonl(path: Path, last_round: int) -> None:
    """Keep the lines of a per-round JSONL log up to `last_round` (and drop a torn last line), atomically."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["round"] <= last_round:
                kept.append(line)
        except (ValueError, KeyError, TypeError):
            break  # a torn last line from the crash
    write_atomic(path, "".join(line + "\n" for line in kept))


def load_run(d: Path) -> dict[str, Any]:
    """One experiment run's per-agent logs: {"dir", "agents": [{"name", "metrics": [RoundRecord], "eval":
    [EvalRecord]}], "done": done.json or None}."""
    agents = []
    for node in sorted(d.glob("node*"), key=lambda p: int(p.name[4:]) if p.name[4:].isdigit() else 0):
        agents.append({"name": node.name, "metrics": read_rounds(node / "metrics.jsonl"),
                       "eval": read_evals(node / "eval.jsonl")})
    done = json.loads((d / "done.json").read_text()) if (d / "done.json").exists() else None
    return {"dir": d.name, "agents": agents, "done": done}
