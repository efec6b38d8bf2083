"""The GENERATE and SCORE phases of a round: the node's own groups (SAPO's I local questions x L completions).

One batched generation call for every prompt, then the strict verifier on every completion
(`learning/rollouts.generate_and_score`). Runs on the node's
torch thread. The learning layer provides every step (tasks, prompts, generation, scoring); this module only
wires them for one round and stamps each group with the node's identity, round and policy version.
"""

from __future__ import annotations

from swarm_node.learning.sapo import Group
from swarm_node.learning.tasks import TaskSpec
from swarm_node.node.memory import release_free_memory


def generate_local_groups(policy, trainer, specs: list[TaskSpec], num_completions: int, max_new_tokens: int,
                          temperature: float, peer_id: str, round_: int) -> tuple[list[Group], int, float]:
    """(one Group per spec, tokens generated, fraction of completions with <answer> tags).

    Args:
        policy: the loaded policy (swarm_node/learning/models.py); trainer: its Trainer (prompt text, version).
        specs: the round's task specs, drawn from the node's own stream.
    """
    from swarm_node.learning.rollouts import generate_and_score

    prompts = [trainer.prompt_text(s) for s in specs]
    try:
        out = generate_and_score(policy, prompts, specs, num_completions, max_new_tokens, temperature,
                                 peer_id=peer_id, round_=round_, policy_version=trainer.policy_version)
    finally:
        release_free_memory()
    return out.groups, out.num_tokens, out.format_rate
