"""Held-out evaluation: greedy accuracy on a fixed in-distribution set and an out-of-distribution (OOD) set.

In distribution (`heldout_*` in eval.jsonl): `eval_num_questions` questions of the node's own preset tasks, from
datasets seeded with `eval_seed` (apart from the training streams), asked with the training prompt.

Out of distribution (`ood_*`, when `eval_ood_num_questions` > 0): questions a policy that only learned the
training prompt's habits must not find easy (issue 11):
- reasoning-gym tasks that no node of the preset trains on (`products`, `gcd`, ...);
- harder sizes of the trained tasks (three one-digit terms, two-digit terms, ...);
- asked with a prompt worded differently from the training prompt: another system prompt, and the few-shot
  turns formatted differently (user turns start with "Problem:", the examples' replies read
  "Final result: <answer>X</answer>", examples from a dataset seeded apart from the training prompt's).
The answer still goes in `<answer>` tags, because the verifier is strict (no tags, no reward). Task sizes were
chosen where the base model is not at 0 (measured in docs/results.md, "Held-out sets"). The set is fixed: every
node builds the same OOD questions, round-robin over the OOD tasks, from datasets seeded with `OOD_SEED`.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable

from swarm_node.errors import OperatorError
from swarm_node.learning.tasks import SMOL_TASKS, TaskSpec, dataset_for, has_answer_tags, recreate, score

OOD_SEED = 4_242_424
OOD_FEWSHOT_SEED_OFFSET = 0x0D0D  # differs from the training prompt's FEWSHOT_SEED_OFFSET
OOD_NUM_FEWSHOT = 2
OOD_SYSTEM_PROMPT = "You are a careful problem solver. Give the final result between <answer> and </answer>."
# (task, config) of the `smol` preset's OOD set. None of them is a (task, config) of SMOL_TASKS (tested).
SMOL_OOD_TASKS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("products", {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1}),
    ("gcd", {"min_numbers": 2, "max_numbers": 2, "min_value": 1, "max_value": 20}),
    ("chain_sum", {"min_terms": 3, "max_terms": 3, "min_digits": 1, "max_digits": 1}),
    ("basic_arithmetic", {"min_terms": 2, "max_terms": 2, "min_digits": 2, "max_digits": 2}),
)
OOD_TASKS = {"smol": SMOL_OOD_TASKS}
EVAL_BATCH_PROMPTS = 8  # prompts per generate call: bounds the prefill's transient memory


class EvaluationError(OperatorError):
    """An evaluation that cannot run as configured (e.g. an OOD set asked of a preset that has none)."""


def ood_specs(task_preset: str, num_questions: int, dataset_size: int) -> list[TaskSpec]:
    """The fixed OOD set of a task preset: `num_questions` specs round-robin over its OOD tasks.

    Raises:
        EvaluationError: the preset defines no OOD set.
    """
    if task_preset not in OOD_TASKS:
        raise EvaluationError(f"task preset {task_preset!r} has no out-of-distribution set; set "
                              f"--eval-ood-num-questions 0 or use --task-preset {' or '.join(OOD_TASKS)}")
    tasks = OOD_TASKS[task_preset]
    return [TaskSpec(tasks[i % len(tasks)][0], tasks[i % len(tasks)][1], OOD_SEED, i // len(tasks), dataset_size)
            for i in range(num_questions)]


def ood_messages(spec: TaskSpec) -> list[dict[str, str]]:
    """Chat messages of an OOD question: the OOD system prompt, two differently formatted examples, the question."""
    shots = dataset_for(dataclasses.replace(spec, seed=spec.seed + OOD_FEWSHOT_SEED_OFFSET))
    messages = [{"role": "system", "content": OOD_SYSTEM_PROMPT}]
    for k in range(OOD_NUM_FEWSHOT):
        example = shots[(spec.index * OOD_NUM_FEWSHOT + k) % spec.size]
        messages.append({"role": "user", "content": "Problem: " + example["question"].strip()})
        messages.append({"role": "assistant", "content": f"Final result: <answer>{example['answer']}</answer>"})
    messages.append({"role": "user", "content": "Problem: " + recreate(spec).text.strip()})
    return messages


def greedy_accuracy(policy, prompts: list[str], specs: list[TaskSpec], max_new_tokens: int) -> dict[str, Any]:
    """Greedy accuracy (strict verifier) of `policy` on `specs` asked with `prompts` (one per spec).

    Returns {"accuracy", "format_rate", "by_task": {task: accuracy}, "num_questions"}.
    """
    from swarm_node.learning.generation import generate

    per_task: dict[str, list[float]] = {}
    formatted = 0
    for i in range(0, len(specs), EVAL_BATCH_PROMPTS):
        chunk = specs[i:i + EVAL_BATCH_PROMPTS]
        out = generate(policy, prompts[i:i + EVAL_BATCH_PROMPTS], 1, max_new_tokens, 1.0, greedy=True)
        for spec, completions in zip(chunk, out.completions):
            per_task.setdefault(spec.dataset, []).append(score(recreate(spec), completions[0]))
            formatted += has_answer_tags(completions[0])
    scores = [x for v in per_task.values() for x in v]
    return {"accuracy": sum(scores) / len(scores), "format_rate": formatted / len(scores),
            "by_task": {k: sum(v) / len(v) for k, v in sorted(per_task.items())}, "num_questions": len(scores)}


def evaluate(policy, train_prompt: Callable[[TaskSpec], str], taskset, tasks_config, max_new_tokens: int
             ) -> dict[str, Any]:
    """Both held-out sets as one eval.jsonl line (without round and identity fields).

    Args:
        policy: the policy to score (greedy decoding).
        train_prompt: spec -> the node's training prompt text (`Trainer.prompt_text`).
        taskset: the node's TaskSet (its `heldout` gives the in-distribution set).
        tasks_config: the node's TaskConfig (eval sizes and seeds).
        max_new_tokens: generation budget per answer.
    """
    t0 = time.perf_counter()
    specs = taskset.heldout(tasks_config.eval_num_questions, tasks_config.eval_seed)
    ind = greedy_accuracy(policy, [train_prompt(s) for s in specs], specs, max_new_tokens)
    line = {"heldout_accuracy": ind["accuracy"], "num_questions": ind["num_questions"],
            "heldout_format_rate": ind["format_rate"], "heldout_by_task": ind["by_task"]}
    if tasks_config.eval_ood_num_questions:
        ood = ood_specs(tasks_config.task_preset, tasks_config.eval_ood_num_questions, taskset.size)
        tok = policy.tokenizer
        prompts = [tok.apply_chat_template(ood_messages(s), tokenize=False, add_generation_prompt=True) for s in ood]
        res = greedy_accuracy(policy, prompts, ood, max_new_tokens)
        line.update(ood_accuracy=res["accuracy"], ood_num_questions=res["num_questions"],
                    ood_format_rate=res["format_rate"], ood_by_task=res["by_task"])
    line["eval_s"] = round(time.perf_counter() - t0, 3)
    return line
