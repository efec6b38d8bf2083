"""The GENERATE and SCORE phases of a round: the node's own groups (SAPO's I local questions x L completions).

One batched generation call for every prompt, then the strict verifier on every completion. Runs on the node's
torch thread. The learning layer provides every step (tasks, prompts, generation, scoring); this module only
wires them for one round and stamps each group with the node's identity, round and policy version.
"""

from __future__ import annotations

from swarm_node.learning.sapo import Group
from swarm_node.learning.tasks import TaskSpec, has_answer_tags, recreate, score
from swarm_node.node.memory import release_free_memory


def generate_local_groups(policy, trainer, specs: list[TaskSpec], num_completions: int, max_new_tokens: int,
                          temperature: float, peer_id: str, round_: int) -> tuple[list[Group], int, float]:
    """(one Group per spec, tokens generated, fraction of completions with <answer> tags).

    Args:
        policy: the loaded policy (swarm_node/learning/models.py); trainer: its Trainer (prompt text, version).
        specs: the round's task specs, drawn from the node's own stream.
    """
    from swarm_node.learning.generation import generate, tokenizer_identity

    questions = [recreate(s) for s in specs]
    prompts = [trainer.prompt_text(s) for s in specs]
    try:
        out = generate(policy, prompts, num_completions, max_new_tokens, temperature)
    finally:
        release_free_memory()
    tokenizer_id = tokenizer_identity(policy.tokenizer)
    groups, formatted, total = [], 0, 0
    for question, completions, logprobs in zip(questions, out.completions, out.logprobs):
        rewards = [score(question, c) for c in completions]
        formatted += sum(has_answer_tags(c) for c in completions)
        total += len(completions)
        groups.append(Group(question.spec, completions, rewards, peer_id, round_, trainer.policy_version,
                            policy.name, logprobs, tokenizer_id))
    return groups, out.num_tokens, formatted / max(total, 1)
