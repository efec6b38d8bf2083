"""What a peer's task spec may cost, and the budgeted worker process that re-creates and scores it.

A node re-creates every external question from its spec (swarm_node/learning/tasks.py) and trains on it, so a
spec is a request for work. The second outside attack on the rollout path (issue 15, hole 2) showed how much: a
316-byte `chain_sum` spec with 6,000 terms made one train step take 97 s instead of 0.4 s, and four `count_primes`
specs with `max_n` = 5·10⁷ took a node from 740 MB to 2.2 GB and blocked its event loop for 13 s. Three bounds,
applied in this order before any work (protocols/PROTOCOL.md, "Task spec cost limits"):

1. `SpecPolicy`: an allow-list of datasets and per-dataset config ranges: the node's own task set (exactly its
   own config values) plus `SAFE_CONFIG_RANGES` below. Config values must be scalars. Reason `spec_not_allowed`.
2. A CPU-time and memory budget: re-creation and scoring run in one long-lived worker process (`VerifyWorker`)
   with RLIMIT_AS = `verify_memory_mb` and a wall-clock deadline of `verify_timeout_s` per payload. A payload
   over the deadline gets the worker killed (SIGKILL) and restarted, reason `verify_timeout`; a MemoryError in
   the worker drops that group, reason `verify_memory`. The event loop never runs this work.
3. A prompt-token limit (`max_prompt_tokens`), checked on the re-created prompt before it is tokenised for
   training. Reason `prompt_too_long`.

All four reasons are strikes (swarm_node/network/trust.py): fresh keys make a costly spec free to repeat.
"""

from __future__ import annotations

import logging
import resource
import socket
import subprocess
import sys
from multiprocessing.connection import Connection
from typing import Any

from swarm_node.learning.tasks import SpecError, TaskSpec, prompt_messages, recreate, safe_repr, score

log = logging.getLogger(__name__)

# Config ranges a peer may use beyond the node's own task set. Every range keeps re-creation of one item under
# about 10 ms and its prompt under about 1,000 tokens (benchmarks/spec_cost.py measures the largest of them).
# A key not listed must equal the node's own config value for that dataset (or be left at reasoning-gym's
# default by omitting it). `bool` admits True and False.
SAFE_CONFIG_RANGES: dict[str, dict[str, Any]] = {
    "chain_sum": {"min_terms": (2, 10), "max_terms": (2, 10), "min_digits": (1, 5), "max_digits": (1, 5),
                  "allow_negation": bool},
    "basic_arithmetic": {"min_terms": (2, 6), "max_terms": (2, 6), "min_digits": (1, 4), "max_digits": (1, 4),
                         "allow_parentheses": bool, "allow_negation": bool},
    "count_primes": {"min_n": (1, 100_000), "max_n": (1, 100_000)},
    "letter_counting": {"min_words": (1, 30), "max_words": (1, 30)},
    "syllogism": {"allow_all": bool, "allow_no": bool, "allow_some": bool, "allow_some_not": bool,
                  "invalid_ratio": (0.0, 1.0), "inversion_probability": (0.0, 1.0)},
    "base_conversion": {"min_base": (2, 16), "max_base": (2, 16), "min_value": (0, 100_000),
                        "max_value": (0, 100_000)},
    "arc_1d": {"min_size": (10, 15), "max_size": (10, 15), "num_train": (1, 2)},
    "bf": {"difficulty": (1, 1)},
    "propositional_logic": {"min_vars": (1, 4), "max_vars": (1, 4), "min_statements": (1, 4),
                            "max_statements": (1, 4), "min_complexity": (1, 3), "max_complexity": (1, 3)},
    "fraction_simplification": {"min_value": (1, 10_000), "max_value": (1, 10_000), "min_factor": (1, 100),
                                "max_factor": (1, 100)},
    "decimal_arithmetic": {"min_num_decimal_places": (1, 4), "max_num_decimal_places": (1, 4),
                           "min_terms": (2, 6), "max_terms": (2, 6), "precision": (4, 16)},
    "calendar_arithmetic": {"year": (1900, 2100), "offset_upper_bound": (1, 200), "leap_year_range": (1, 200)},
    "binary_matrix": {"min_n": (1, 6), "max_n": (1, 6), "p_zero": (0.0, 1.0)},
}
MAX_DATASET_SIZE = 10**9  # reasoning-gym datasets generate items lazily from (seed, index); size is only a range
SCALARS = (bool, int, float, str, type(None))
PROMPT_BYTES_PER_TOKEN = 16  # prompts longer than this many UTF-8 bytes per allowed token are dropped untokenised


class SpecPolicy:
    """The allow-list of datasets and config values a node re-creates for peers.

    Args:
        own_tasks: the node's own task set, dataset name -> config (always allowed with exactly these values).
        safe_ranges: extra datasets and per-key ranges (default `SAFE_CONFIG_RANGES`).
    """

    def __init__(self, own_tasks: dict[str, dict[str, Any]], safe_ranges: dict[str, dict[str, Any]] | None = None):
        self.own = {name: dict(config) for name, config in own_tasks.items()}
        self.ranges = SAFE_CONFIG_RANGES if safe_ranges is None else safe_ranges

    def check(self, spec: TaskSpec) -> str | None:
        """None if the spec may be re-created, else why not (a short detail for the `spec_not_allowed` count)."""
        if spec.dataset not in self.own and spec.dataset not in self.ranges:
            return f"dataset {safe_repr(spec.dataset)} is not allowed"
        if not 0 < spec.size <= MAX_DATASET_SIZE:
            return f"size {spec.size} outside (0, {MAX_DATASET_SIZE}]"
        own, ranges = self.own.get(spec.dataset, {}), self.ranges.get(spec.dataset, {})
        for key, value in spec.config.items():
            if not isinstance(value, SCALARS):
                return f"{spec.dataset}.{safe_repr(key)} is not a scalar"
            if key in own and type(value) is type(own[key]) and value == own[key]:
                continue
            bound = ranges.get(key)
            if bound is bool and isinstance(value, bool):
                continue
            if isinstance(bound, tuple) and isinstance(value, (int, float)) and not isinstance(value, bool):
                if bound[0] <= value <= bound[1]:
                    continue
            return f"{spec.dataset}.{safe_repr(key)} = {safe_repr(value)} is outside the allowed range"
        return None


def rescore(work: list[tuple[TaskSpec, list[str]]], system_prompt: str, num_fewshot: int,
            max_prompt_bytes: int) -> list[tuple[str, Any, Any]]:
    """Re-create each spec's question, score its completions with the local verifier, and build its prompt.

    A pure function of its arguments, run in the worker process. Returns per group ("ok", rewards, prompt) where
    prompt is the message texts joined (None if longer than `max_prompt_bytes` UTF-8 bytes), or
    (reason, detail, None) with reason `bad_task_spec`, `verify_memory` or `internal_error`.
    """
    out: list[tuple[str, Any, Any]] = []
    for spec, completions in work:
        try:
            question = recreate(spec)
            rewards = [score(question, c) for c in completions]
            text = "\n".join(m["content"] for m in prompt_messages(question, system_prompt, num_fewshot))
            out.append(("ok", rewards, text if len(text.encode()) <= max_prompt_bytes else None))
        except SpecError as e:
            out.append(("bad_task_spec", str(e)[:300], None))
        except MemoryError:
            recreate_cache_clear()
            out.append(("verify_memory", f"{spec.dataset} over the worker's memory limit", None))
        except Exception as e:  # whatever a peer's spec makes reasoning-gym do, it stays this group's problem
            out.append(("internal_error", safe_repr(e), None))
    return out


def recreate_cache_clear() -> None:
    from swarm_node.learning import tasks

    tasks._dataset.cache_clear()


def _worker_entry(fd: int, memory_mb: int) -> None:
    _worker_main(Connection(fd), memory_mb)


def _worker_main(conn, memory_mb: int) -> None:
    """The verification worker: RLIMIT_AS, then answer (work, system_prompt, num_fewshot, max_prompt_bytes)
    requests with `rescore` results until the pipe closes."""
    limit = memory_mb * 2**20
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    conn.send("ready")
    while True:
        try:
            request = conn.recv()
        except (EOFError, OSError):
            return  # the node is gone
        try:
            conn.send(rescore(*request))
        except MemoryError:
            recreate_cache_clear()
            conn.send([("verify_memory", "over the worker's memory limit", None)] * len(request[0]))


class VerifyBudgetError(Exception):
    """A payload broke the verification budget; `reason` is the countable code (`verify_timeout`)."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


class VerifyWorker:
    """One long-lived worker process (a fresh interpreter, so no torch or hivemind state is forked) that runs
    `rescore` under RLIMIT_AS = `memory_mb` and a per-payload deadline. Killed on a deadline, restarted on the
    next payload; `close` kills and reaps it. Call `run` from one thread at a time (not the event loop).

    Args:
        memory_mb: the worker's address-space limit, MiB (the idle worker maps about 250 MiB).
        timeout_s: wall-clock deadline per payload, seconds.
        startup_timeout_s: deadline for a (re)started worker to import reasoning-gym, seconds.
    """

    def __init__(self, memory_mb: int, timeout_s: float, startup_timeout_s: float = 120.0):
        self.memory_mb, self.timeout_s, self.startup_timeout_s = memory_mb, timeout_s, startup_timeout_s
        self._process = None
        self._conn = None
        self._ready = False
        self.restarts = 0

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def launch(self) -> None:
        """Start the worker process without waiting for it (it imports reasoning-gym, a few seconds); idempotent.
        The node launches it before loading its model, so both happen at once."""
        if self._process is not None and self._process.poll() is None:
            return
        if self._process is not None:
            self.close()
            self.restarts += 1
        ours, theirs = socket.socketpair()
        # a fresh interpreter (no fork of torch/hivemind state, no re-import of the caller's __main__)
        self._process = subprocess.Popen(
            [sys.executable, "-c", f"from swarm_node.network.verify import _worker_entry; "
             f"_worker_entry({theirs.fileno()}, {self.memory_mb})"],
            pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL)
        theirs.close()
        self._conn = Connection(ours.detach())
        self._ready = False

    def _ensure(self) -> None:
        """Launch the worker if it is not running, and wait until it is ready. Raises VerifyBudgetError."""
        self.launch()
        if self._ready:
            return
        try:
            ready = self._conn.poll(self.startup_timeout_s) and self._conn.recv() == "ready"
        except (EOFError, OSError):
            ready = False
        if not ready:
            self.close()
            raise VerifyBudgetError("verify_unavailable", "the verification worker did not start")
        self._ready = True
        log.debug("verification worker %d ready", self._process.pid)

    def run(self, work: list[tuple[TaskSpec, list[str]]], system_prompt: str, num_fewshot: int,
            max_prompt_bytes: int) -> list[tuple[str, Any, Any]]:
        """`rescore` in the worker within the budget. Raises VerifyBudgetError (`verify_timeout`: the worker was
        killed; `verify_unavailable`: it died or would not start)."""
        self._ensure()
        try:
            self._conn.send((work, system_prompt, num_fewshot, max_prompt_bytes))
            if not self._conn.poll(self.timeout_s):
                self.close()
                raise VerifyBudgetError("verify_timeout", f"over {self.timeout_s:.1f} s")
            return self._conn.recv()
        except (EOFError, OSError, BrokenPipeError) as e:  # killed from outside (e.g. the kernel's OOM killer)
            self.close()
            raise VerifyBudgetError("verify_unavailable", safe_repr(e)) from None

    def close(self) -> None:
        """Kill and reap the worker (idempotent)."""
        process, self._process = self._process, None
        self._ready = False
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        if process is not None:
            if process.poll() is None:
                process.kill()
            try:
                process.wait(5)
            except subprocess.TimeoutExpired:
                log.warning("verification worker %d did not exit after SIGKILL", process.pid)
