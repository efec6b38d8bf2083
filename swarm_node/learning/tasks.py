"""Verifiable reasoning tasks from reasoning-gym: the task stream, task specs, prompts and the strict verifier.

A question never crosses the network as text. It travels as a `TaskSpec` (dataset name, dataset
config, seed, index, reasoning-gym version); any node re-creates the question and its answer from
the spec and scores completions with reasoning-gym's own `score_answer`. That is what lets a node
ignore a peer's claimed question, answer and reward.

Design decision, measured here (docs/algorithm.md, "The default model needs a prompt it can follow"): SmolLM2-135M never writes `<answer>` tags
under reasoning-gym's default prompt, so the `smol` preset prompts with two in-context examples
from the same task, whose replies are just `<answer>X</answer>`, and uses easy task sizes.
The examples are derived from the spec, so every node builds the same prompt for a spec.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import json
import math
import random
import reprlib
from functools import lru_cache
from typing import Any

import reasoning_gym
from reasoning_gym.factory import DATASETS
from reasoning_gym.utils import SYSTEM_PROMPTS

from swarm_node.errors import OperatorError
from swarm_node.learning.spec_config import config_problem

RG_VERSION = importlib.metadata.version("reasoning-gym")

SMOL_SYSTEM_PROMPT = "Answer the question. Reply with only the final answer inside <answer></answer> tags."

# Task sizes at which SmolLM2-135M-Instruct sometimes succeeds (measured: 6-38%, docs/algorithm.md).
SMOL_TASKS: dict[str, dict[str, Any]] = {
    "chain_sum": {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1},
    "basic_arithmetic": {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1},
    "letter_counting": {},
    "syllogism": {},
}
# The SAPO paper's nine tasks (arXiv 2509.08721, section 5), reasoning-gym defaults.
PAPER_TASKS: dict[str, dict[str, Any]] = {
    name: {}
    for name in (
        "base_conversion",
        "basic_arithmetic",
        "arc_1d",
        "bf",
        "propositional_logic",
        "fraction_simplification",
        "decimal_arithmetic",
        "calendar_arithmetic",
        "binary_matrix",
    )
}
FEWSHOT_SEED_OFFSET = 0x5EED  # few-shot examples come from a differently seeded copy of the dataset


class SpecError(ValueError):
    """A task spec that cannot be re-created (unknown dataset, bad config, version, index). Specs come from
    peers as well as from the node's own task set, so this is not an operator error: the verifier counts a
    peer's as `bad_task_spec`, and `TaskSet` turns its own into a `TaskError`."""


class TaskError(OperatorError):
    """The operator's task settings cannot be used (unknown task name, a config reasoning-gym rejects, a stream
    task outside the preset): one actionable message."""


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """Everything needed to re-create one reasoning-gym question and its answer.

    Attributes:
        dataset: reasoning-gym dataset name, e.g. "chain_sum".
        config: dataset config keyword arguments (JSON-serialisable).
        seed: dataset seed.
        index: item index in [0, size).
        size: dataset size the index was drawn from.
        rg_version: reasoning-gym version that generated it; a mismatch is rejected.
    """

    dataset: str
    config: dict[str, Any]
    seed: int
    index: int
    size: int
    rg_version: str = RG_VERSION

    def key(self) -> str:
        """Canonical string identity of the question (used for dedupe and caching)."""
        return json.dumps(dataclasses.asdict(self), sort_keys=True, separators=(",", ":"))


@dataclasses.dataclass(frozen=True)
class Question:
    """A question re-created from its spec. `entry` is reasoning-gym's item dict (question, answer, metadata)."""

    spec: TaskSpec
    entry: dict[str, Any]

    @property
    def text(self) -> str:
        return self.entry["question"]

    @property
    def answer(self) -> str:
        return str(self.entry["answer"])


@lru_cache(maxsize=256)
def _dataset(name: str, config_json: str, seed: int, size: int):
    return reasoning_gym.create_dataset(name, seed=seed, size=size, **json.loads(config_json))


def dataset_for(spec: TaskSpec):
    """The (cached) reasoning-gym dataset of a spec. Raises SpecError if it cannot be built."""
    if spec.rg_version != RG_VERSION:
        raise SpecError(f"reasoning-gym version {spec.rg_version!r} differs from local {RG_VERSION!r}")
    if spec.dataset not in DATASETS:
        raise SpecError(f"unknown reasoning-gym dataset {spec.dataset!r}")
    if not (0 <= spec.index < spec.size):
        raise SpecError(f"index {spec.index} outside [0, {spec.size})")
    try:
        return _dataset(spec.dataset, json.dumps(spec.config, sort_keys=True), spec.seed, spec.size)
    except MemoryError:
        raise  # a resource limit, not a bad config: the caller's budget decides (network/verify.py)
    except Exception as e:  # reasoning-gym raises TypeError/ValueError/AssertionError on bad configs
        raise SpecError(f"cannot build dataset {spec.dataset!r} with config {safe_repr(spec.config)}: "
                        f"{safe_repr(e)}") from None


_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxdict, _REPR.maxlist, _REPR.maxstring, _REPR.maxother = 3, 8, 8, 80, 80


def safe_repr(value: Any) -> str:
    """A short repr of a peer-supplied value for error messages: bounded depth and length, so it never recurses
    deeply (a config nested 1,000 levels made plain `repr` raise RecursionError) and never raises."""
    try:
        return _REPR.repr(value)[:200]
    except Exception:
        return f"<unprintable {type(value).__name__}>"


def recreate(spec: TaskSpec) -> Question:
    """Re-create the question of a spec from reasoning-gym alone. Raises SpecError."""
    dataset = dataset_for(spec)
    try:
        return Question(spec, dataset[spec.index])
    except MemoryError:
        raise
    except Exception as e:
        raise SpecError(f"cannot generate {spec.dataset}[{spec.index}]: {safe_repr(e)}") from None


ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"
_ASCII_SPACE = " \t\n\r\x0b\x0c"


def extract_answer(completion: str) -> str | None:
    """The answer of a completion (PROTOCOL.md "Answer extraction"), or None if it has no tag pair.

    The last `<answer>` that some `</answer>` follows counts; the answer is the text between it and the first
    `</answer>` after it, with ASCII whitespace stripped from both ends. Tags are exact and case-sensitive.
    Linear time (two `rfind` and one `find`), whatever the text: a completion full of unclosed tags costs no more.
    """
    close = completion.rfind(ANSWER_CLOSE)
    if close < 0:
        return None
    start = completion.rfind(ANSWER_OPEN, 0, close)
    if start < 0:
        return None
    start += len(ANSWER_OPEN)
    return completion[start : completion.index(ANSWER_CLOSE, start)].strip(_ASCII_SPACE)


def score(question: Question, completion: str) -> float:
    """Strict verifier reward in [0, 1]: reasoning-gym's `score_answer` on `extract_answer(completion)`.

    A completion without an `<answer>...</answer>` pair scores 0 (no format reward is mixed in). A verifier
    that raises or returns a non-finite value scores 0.
    """
    answer = extract_answer(completion)
    if answer is None:
        return 0.0
    try:
        reward = float(dataset_for(question.spec).score_answer(answer, question.entry))
    except Exception:  # a verifier crash on odd text counts as a wrong answer
        return 0.0
    return min(max(reward, 0.0), 1.0) if math.isfinite(reward) else 0.0


def has_answer_tags(completion: str) -> bool:
    """Whether the completion followed the `<answer>...</answer>` format (reported, never rewarded)."""
    return extract_answer(completion) is not None


class TaskSet:
    """The node's task list and prompt style, resolved from the config preset.

    Args:
        preset: "smol", "paper" or "custom".
        custom_tasks: entries `name` or `name:{json}` (custom preset only).
        num_fewshot: in-context examples per prompt; -1 uses the preset default.
        seed: dataset seed shared by the swarm (all nodes draw from the same datasets).
        size: dataset size.
        stream_tasks: restrict `draw` (the node's own stream) to these task names; empty: all tasks. The
            held-out set and the verification of peers' groups still cover every task.

    Raises:
        TaskError: an unknown task name, a config reasoning-gym rejects, a stream task outside the preset.
    """

    def __init__(self, preset: str, custom_tasks: list[str], num_fewshot: int, seed: int, size: int,
                 stream_tasks: list[str] | tuple[str, ...] = ()):
        if preset == "smol":
            tasks, default_shots, self.system_prompt = SMOL_TASKS, 2, SMOL_SYSTEM_PROMPT
        elif preset == "paper":
            tasks, default_shots, self.system_prompt = PAPER_TASKS, 0, SYSTEM_PROMPTS["default"]
        else:
            tasks, default_shots, self.system_prompt = _parse_custom(custom_tasks), 2, SMOL_SYSTEM_PROMPT
        self.tasks = dict(tasks)
        self.num_fewshot = default_shots if num_fewshot < 0 else num_fewshot
        self.seed, self.size = seed, size
        for name, config in self.tasks.items():
            # the config travels in every task spec, so it must be one the wire allows (scalar values)
            problem = "config is not a map" if type(config) is not dict else config_problem(config)
            if problem:
                raise TaskError(f"task {name}: {problem}")
            try:
                dataset_for(TaskSpec(name, config, seed, 0, size))  # fail at start-up, not mid-run
            except SpecError as e:
                raise TaskError(f"task {name}: {e}") from None
        unknown = sorted(set(stream_tasks) - set(self.tasks))
        if unknown:
            raise TaskError(f"stream task(s) {', '.join(unknown)} not in this preset's tasks; choose from "
                            f"{', '.join(sorted(self.tasks))}")
        self.stream_tasks = sorted(stream_tasks) or sorted(self.tasks)

    def draw(self, rng: random.Random) -> TaskSpec:
        """Draw one spec: a task uniformly (among `stream_tasks`), then an index uniformly in [0, size)."""
        name = rng.choice(self.stream_tasks)
        return TaskSpec(name, self.tasks[name], self.seed, rng.randrange(self.size), self.size)

    def heldout(self, num_questions: int, seed: int) -> list[TaskSpec]:
        """A fixed held-out set: `num_questions` specs spread round-robin over the tasks (sorted by name), with
        indices 0, 1, 2, ... of datasets built with `seed`. Every node with the same tasks builds the same set."""
        names = sorted(self.tasks)
        return [TaskSpec(names[i % len(names)], self.tasks[names[i % len(names)]], seed, i // len(names), self.size)
                for i in range(num_questions)]

    def messages(self, question: Question) -> list[dict[str, str]]:
        """Chat messages for a question: system prompt, few-shot turns derived from the spec, the question."""
        return prompt_messages(question, self.system_prompt, self.num_fewshot)


def prompt_messages(question: Question, system_prompt: str, num_fewshot: int) -> list[dict[str, str]]:
    """Chat messages for a question: the system prompt, `num_fewshot` example turns derived from the spec (a
    differently seeded copy of its dataset), then the question. Raises SpecError."""
    spec = question.spec
    messages = [{"role": "system", "content": system_prompt}]
    if num_fewshot:
        shots = dataset_for(dataclasses.replace(spec, seed=spec.seed + FEWSHOT_SEED_OFFSET))
        for k in range(num_fewshot):
            example = shots[(spec.index * num_fewshot + k) % spec.size]
            messages.append({"role": "user", "content": example["question"]})
            messages.append({"role": "assistant", "content": f"<answer>{example['answer']}</answer>"})
    messages.append({"role": "user", "content": question.text})
    return messages


def _parse_custom(entries: list[str]) -> dict[str, dict[str, Any]]:
    tasks: dict[str, dict[str, Any]] = {}
    for entry in entries:
        name, _, raw = entry.partition(":")
        try:
            config = json.loads(raw) if raw else {}
        except json.JSONDecodeError as e:
            raise TaskError(f"task {entry!r}: config after ':' is not JSON ({e})") from None
        if name not in DATASETS:
            raise TaskError(f"unknown task {name!r}; reasoning-gym has e.g. {', '.join(sorted(DATASETS)[:6])}, ...")
        tasks[name] = config
    return tasks


def stream_seed(task_seed: int, peer_id: str) -> int:
    """Per-node task-stream seed, so that peers draw different questions from the same datasets."""
    return int.from_bytes(hashlib.sha256(f"{task_seed}/{peer_id}".encode()).digest()[:8], "big")
