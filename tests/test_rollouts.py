"""learning/rollouts.py: generate-and-score, the one implementation the node, evaluations and benchmarks share."""

import random

import torch

from swarm_node.learning.generation import generate
from swarm_node.learning.rollouts import generate_and_score, score_generated
from swarm_node.learning.tasks import TaskSet, has_answer_tags, recreate, score
from swarm_node.learning.trainer import Trainer


def test_generate_and_score_groups_with_local_rewards(tiny_policy_factory):
    policy = tiny_policy_factory()
    taskset = TaskSet("smol", [], -1, 0, 100_000)
    specs = [taskset.draw(random.Random(i)) for i in range(2)]
    prompts = [Trainer(policy, _settings(), taskset).prompt_text(s) for s in specs]
    scored = generate_and_score(policy, prompts, specs, 3, 8, 1.0, peer_id="QmMe", round_=4, policy_version=2,
                                generator=torch.Generator().manual_seed(0))
    assert [g.spec for g in scored.groups] == specs and scored.num_tokens > 0
    completions = [c for g in scored.groups for c in g.completions]
    assert len(completions) == 6
    assert scored.format_rate == sum(map(has_answer_tags, completions)) / 6
    for g in scored.groups:
        assert (g.peer_id, g.round, g.policy_version, g.model) == ("QmMe", 4, 2, policy.name)
        assert g.rewards == [score(recreate(g.spec), c) for c in g.completions]
        assert len(g.logprobs) == 3 and g.tokenizer
    # the same sampling scored separately gives the same groups; without log-probs on request
    out = generate(policy, prompts, 3, 8, 1.0, generator=torch.Generator().manual_seed(0))
    again = score_generated(policy, specs, out, "QmMe", 4, 2, keep_logprobs=False)
    assert [g.completions for g in again.groups] == [g.completions for g in scored.groups]
    assert all(g.logprobs is None and g.tokenizer == "" for g in again.groups)


def _settings():
    from swarm_node.config import TrainConfig

    return TrainConfig(model="tiny", max_new_tokens=8)
