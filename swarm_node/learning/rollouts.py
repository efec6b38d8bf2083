"""Rollouts: L sampled completions per question, scored by the strict local verifier, as `Group`s.

One function for what a node does each round before publishing (and what the benchmarks and evaluations do
with the same parts): one batched `generation.generate` call over the prompts, then `tasks.score` of every
completion against the question re-created from its spec (0 without `<answer>` tags; no format reward, SAPO
arXiv 2509.08721 section 3 and docs/algorithm.md).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import torch

from swarm_node.learning.generation import Generated, generate, tokenizer_identity
from swarm_node.learning.sapo import Group
from swarm_node.learning.tasks import TaskSpec, has_answer_tags, recreate, score


@dataclasses.dataclass
class Rollouts:
    """Scored groups of one generate call."""

    groups: list[Group]  # one per prompt, in prompt order; rewards from the local verifier
    num_tokens: int  # tokens generated
    formatted: int  # completions with <answer>...</answer> tags

    @property
    def format_rate(self) -> float:
        """Share of completions with answer tags (0 when there are none)."""
        total = sum(len(g.completions) for g in self.groups)
        return self.formatted / max(total, 1)


def score_generated(policy, specs: Sequence[TaskSpec], out: Generated, peer_id: str = "", round_: int = 0,
                    policy_version: int = 0, keep_logprobs: bool = True) -> Rollouts:
    """Score `generate`'s output for `specs` (one spec per prompt) into groups carrying the generator's log-probs
    and tokenizer identity (learning/offpolicy.py; none with `keep_logprobs=False`). Raises `tasks.SpecError` for a
    spec that cannot be re-created."""
    tokenizer_id = tokenizer_identity(policy.tokenizer)
    groups, formatted = [], 0
    logprobs = out.logprobs if keep_logprobs and out.logprobs else [None] * len(specs)
    for spec, completions, lps in zip(specs, out.completions, logprobs):
        question = recreate(spec)
        rewards = [score(question, c) for c in completions]
        formatted += sum(has_answer_tags(c) for c in completions)
        groups.append(Group(question.spec, completions, rewards, peer_id, round_, policy_version, policy.name, lps,
                            tokenizer_id if lps is not None else ""))
    return Rollouts(groups, out.num_tokens, formatted)


def generate_and_score(policy, prompts: Sequence[str], specs: Sequence[TaskSpec], num_completions: int,
                       max_new_tokens: int, temperature: float = 1.0, *, greedy: bool = False, peer_id: str = "",
                       round_: int = 0, policy_version: int = 0,
                       generator: torch.Generator | None = None) -> Rollouts:
    """Generate `num_completions` completions for each prompt (prompt i asks the question of `specs[i]`) in one
    batched call, and score them with the strict verifier.

    Args:
        policy: the loaded policy (learning/models.py).
        prompts: chat-formatted prompt texts, one per spec (e.g. `Trainer.prompt_text(spec)`).
        specs: the task specs the questions are re-created from.
        num_completions: L, completions per prompt.
        max_new_tokens: generation budget per completion, tokens.
        temperature, greedy, generator: sampling (learning/generation.py).
        peer_id, round_, policy_version: stamped on the groups (the generating node).
    """
    out = generate(policy, list(prompts), num_completions, max_new_tokens, temperature, greedy=greedy,
                   generator=generator)
    return score_generated(policy, specs, out, peer_id, round_, policy_version)
