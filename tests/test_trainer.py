"""One GRPO step with a tiny model and the real SmolLM2 tokenizer."""

import pytest
import torch

from swarm_node.config import TrainConfig
from swarm_node.learning.generation import generate
from swarm_node.learning.sapo import Group
from swarm_node.learning.tasks import TaskSet, TaskSpec, recreate
from swarm_node.learning.trainer import Trainer


@pytest.fixture(scope="module")
def taskset():
    return TaskSet("smol", [], -1, 0, 1000)


def make_group(spec, completions, rewards, peer="QmLocal"):
    return Group(spec, completions, rewards, peer, 1, 0, "tiny")


def test_generate_returns_l_completions_per_prompt(tiny_policy_factory, taskset):
    policy = tiny_policy_factory()
    trainer = Trainer(policy, TrainConfig(model="tiny", max_new_tokens=6), taskset)
    specs = [TaskSpec("chain_sum", taskset.tasks["chain_sum"], 0, i, 1000) for i in range(3)]
    out = generate(policy, [trainer.prompt_text(s) for s in specs], 4, 6, 1.0)
    assert [len(c) for c in out.completions] == [4, 4, 4]
    assert 0 < out.num_tokens <= 3 * 4 * 6


def test_step_changes_weights_and_counts_tokens(tiny_policy_factory, taskset):
    policy = tiny_policy_factory()
    trainer = Trainer(policy, TrainConfig(model="tiny", learning_rate=1e-3, micro_batch_size=3), taskset)
    spec = TaskSpec("chain_sum", taskset.tasks["chain_sum"], 0, 1, 1000)
    answer = recreate(spec).answer
    # an external group: text from another peer, re-tokenised locally
    external = make_group(spec, [f"<answer>{answer}</answer>", "<answer>x</answer>", "hmm", "<answer>0</answer>"],
                          [1.0, 0.0, 0.0, 0.0], peer="QmOther")
    flat = make_group(TaskSpec("syllogism", {}, 0, 2, 1000), ["Yes", "No"], [0.0, 0.0])
    before = [p.detach().clone() for p in policy.model.parameters()]
    stats = trainer.step([external, flat])
    assert stats.loss is not None and stats.policy_version == 1
    assert stats.num_sequences == 4  # the zero-advantage group is not run through the model
    tok = policy.tokenizer
    expected_tokens = sum(len(tok(c, add_special_tokens=False)["input_ids"]) + 1
                          for c in external.completions + flat.completions)
    assert stats.num_tokens == expected_tokens
    changed = sum(not torch.equal(a, b) for a, b in zip(before, policy.model.parameters()))
    assert changed > 0
    # the step raised the log-probability of the rewarded completion relative to the others
    batch, _ = trainer._sequences([external])
    with torch.no_grad():
        logp, mask = trainer._completion_logprobs(policy.model, batch)
    policy2 = tiny_policy_factory()
    with torch.no_grad():
        logp0, _ = Trainer(policy2, TrainConfig(model="tiny"), taskset)._completion_logprobs(policy2.model, batch)
    gain = ((logp - logp0) * mask).sum(1) / mask.sum(1)
    assert gain[0] > gain[1:].max()


def test_no_signal_means_no_step(tiny_policy_factory, taskset):
    policy = tiny_policy_factory()
    trainer = Trainer(policy, TrainConfig(model="tiny"), taskset)
    stats = trainer.step([make_group(TaskSpec("syllogism", {}, 0, 2, 1000), ["a", "b"], [1.0, 1.0])])
    assert stats.loss is None and stats.policy_version == 0


def test_completion_logprobs_match_full_forward(tiny_policy_factory, taskset):
    policy = tiny_policy_factory()
    trainer = Trainer(policy, TrainConfig(model="tiny"), taskset)
    spec = TaskSpec("chain_sum", taskset.tasks["chain_sum"], 0, 3, 1000)
    batch, _ = trainer._sequences([make_group(spec, ["<answer>5</answer>", "7 and more"], [1.0, 0.0])])
    with torch.no_grad():
        logp, mask = trainer._completion_logprobs(policy.model, batch)
        for i, s in enumerate(batch):
            ids = torch.tensor([s.prompt_ids + s.completion_ids])
            full = torch.log_softmax(policy.model(ids).logits[0].float(), -1)  # (T, V)
            p = len(s.prompt_ids)
            want = full[p - 1:-1].gather(1, torch.tensor(s.completion_ids).unsqueeze(1)).squeeze(1)
            assert torch.allclose(logp[i, :len(s.completion_ids)], want, atol=1e-4)
            assert mask[i].sum() == len(s.completion_ids)


def test_kl_reference_and_multiple_steps(tiny_policy_factory, taskset):
    policy = tiny_policy_factory()
    cfg = TrainConfig(model="tiny", kl_coef=0.1, steps_per_round=3, learning_rate=1e-2)
    trainer = Trainer(policy, cfg, taskset)
    spec = TaskSpec("chain_sum", taskset.tasks["chain_sum"], 0, 4, 1000)
    stats = trainer.step([make_group(spec, ["<answer>1</answer>", "<answer>2</answer>"], [1.0, 0.0])])
    assert stats.policy_version == 3
    assert stats.kl > 0  # the policy moved away from the frozen reference
