"""One GRPO step with a tiny model and the real SmolLM2 tokenizer."""

import copy

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


@pytest.mark.parametrize("optimizer", ["adamw", "adafactor"])
def test_step_changes_weights_and_counts_tokens(tiny_policy_factory, taskset, optimizer):
    policy = tiny_policy_factory()
    trainer = Trainer(policy, TrainConfig(model="tiny", learning_rate=1e-3, micro_batch_size=3, optimizer=optimizer),
                      taskset)
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


def _state_floats(optimizer: torch.optim.Optimizer) -> int:
    return sum(v.numel() for state in optimizer.state.values() for v in state.values()
               if isinstance(v, torch.Tensor) and v.dim() > 0)


def test_adafactor_state_is_factored_and_resumes_exactly(tiny_policy_factory, taskset):
    """Adafactor keeps (n,) + (m,) floats per (n, m) matrix instead of AdamW's 2 x n x m, and its state_dict
    (what a checkpoint stores) continues training exactly where it stopped."""
    spec = TaskSpec("chain_sum", taskset.tasks["chain_sum"], 0, 1, 1000)
    answer = recreate(spec).answer
    groups = [make_group(spec, [f"<answer>{answer}</answer>", "<answer>x</answer>", "no", "<answer>0</answer>"],
                         [1.0, 0.0, 0.0, 0.5])]
    config = TrainConfig(model="tiny", learning_rate=1e-3, optimizer="adafactor")
    adamw = Trainer(tiny_policy_factory(), TrainConfig(model="tiny", learning_rate=1e-3), taskset)
    adamw.step(groups)
    straight = Trainer(tiny_policy_factory(), config, taskset)
    straight.step(groups)
    n_params = sum(p.numel() for p in straight.policy.model.parameters())
    assert _state_floats(adamw.optimizer) == 2 * n_params
    assert _state_floats(straight.optimizer) < 0.05 * n_params

    resumed = Trainer(tiny_policy_factory(), config, taskset)
    resumed.policy.model.load_state_dict(straight.policy.model.state_dict())
    # a copy, as a checkpoint file gives: load_state_dict would otherwise share the moment tensors
    resumed.optimizer.load_state_dict(copy.deepcopy(straight.optimizer.state_dict()))
    straight.step(groups)
    resumed.step(groups)
    for a, b in zip(straight.policy.model.parameters(), resumed.policy.model.parameters()):
        assert torch.equal(a, b)


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


def _naive_sequence_logprobs(model, prompt_ids, completion_ids):
    """Reference: one full (prompt + completion) forward per completion, full-vocab log-softmax. Returns (Tc,)."""
    ids = torch.tensor([prompt_ids + completion_ids])
    full = torch.log_softmax(model(ids).logits[0].float(), -1)  # (T, V)
    p = len(prompt_ids)
    return full[p - 1:-1].gather(1, torch.tensor(completion_ids).unsqueeze(1)).squeeze(1)


def test_shared_prompt_gradients_match_full_sequences(tiny_policy_factory, taskset):
    """The shared-prefix forward gives the same loss gradient as one full forward per completion."""
    policy = tiny_policy_factory()
    trainer = Trainer(policy, TrainConfig(model="tiny"), taskset)
    spec = TaskSpec("chain_sum", taskset.tasks["chain_sum"], 0, 5, 1000)
    group = make_group(spec, ["<answer>5</answer>", "7 and a much longer tail here", "x", "<answer>9"],
                       [1.0, 0.0, 0.0, 1.0])
    batch, _ = trainer._sequences([group])
    weights = torch.tensor([0.3, -1.0, 0.7, 2.0])
    logp, mask = trainer._completion_logprobs(policy.model, batch)
    ((logp * mask).sum(1) * weights).sum().backward()
    fast = [p.grad.clone() for p in policy.model.parameters()]
    policy.model.zero_grad()
    total = sum(w * _naive_sequence_logprobs(policy.model, s.prompt_ids, s.completion_ids).sum()
                for w, s in zip(weights, batch))
    total.backward()
    for a, p in zip(fast, policy.model.parameters()):
        assert torch.allclose(a, p.grad, atol=1e-5, rtol=1e-4)


def test_micro_batches_share_one_prompt(tiny_policy_factory, taskset):
    policy = tiny_policy_factory()
    trainer = Trainer(policy, TrainConfig(model="tiny", micro_batch_size=3), taskset)
    groups = [make_group(TaskSpec("chain_sum", taskset.tasks["chain_sum"], 0, i, 1000), ["a", "b", "c", "d"],
                         [1.0, 0.0, 0.0, 0.0]) for i in (6, 7)]
    sequences, _ = trainer._sequences(groups)
    batches = trainer._micro_batches(sequences)
    assert [len(b) for b in batches] == [3, 1, 3, 1]
    assert all(len({tuple(s.prompt_ids) for s in b}) == 1 for b in batches)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_greedy_generation_matches_transformers_generate(taskset, precision):
    """The shared-prefix decode loop reproduces `transformers` greedy `generate` (left padding, finished rows
    dropped), on the fp32 weights and on the bf16 inference copy."""
    from swarm_node.learning.models import load_policy

    policy = load_policy("tiny", seed=3, precision=precision)
    trainer = Trainer(policy, TrainConfig(model="tiny"), taskset)
    specs = [TaskSpec("chain_sum", taskset.tasks["chain_sum"], 0, 8, 1000), TaskSpec("syllogism", {}, 0, 9, 1000)]
    prompts = [trainer.prompt_text(s) for s in specs]
    ours = generate(policy, prompts, 2, 12, 1.0, greedy=True)
    tok = policy.tokenizer
    enc = tok(prompts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
    from swarm_node.learning.generation import inference_model

    model = inference_model(policy)
    with torch.no_grad():
        ref = model.generate(**enc, do_sample=False, max_new_tokens=12, pad_token_id=tok.pad_token_id)
    want = tok.batch_decode(ref[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    assert [c[0] for c in ours.completions] == want
    assert all(c[0] == c[1] for c in ours.completions)  # greedy: the L samples of a prompt agree


def test_sampling_follows_the_generator_seed(tiny_policy_factory, taskset):
    policy = tiny_policy_factory()
    trainer = Trainer(policy, TrainConfig(model="tiny"), taskset)
    prompt = [trainer.prompt_text(TaskSpec("chain_sum", taskset.tasks["chain_sum"], 0, 10, 1000))]
    a = generate(policy, prompt, 6, 8, 1.0, generator=torch.Generator().manual_seed(1))
    b = generate(policy, prompt, 6, 8, 1.0, generator=torch.Generator().manual_seed(1))
    c = generate(policy, prompt, 6, 8, 1.0, generator=torch.Generator().manual_seed(2))
    assert a.completions == b.completions and a.completions != c.completions
    assert len(set(a.completions[0])) > 1  # the L samples differ


def test_bf16_inference_copy_tracks_the_training_weights(taskset):
    from swarm_node.learning.generation import inference_model, release_inference_model
    from swarm_node.learning.models import load_policy

    policy = load_policy("tiny", seed=4, precision="bf16")
    trainer = Trainer(policy, TrainConfig(model="tiny", learning_rate=1e-2), taskset)
    spec = TaskSpec("chain_sum", taskset.tasks["chain_sum"], 0, 11, 1000)
    trainer.step([make_group(spec, ["<answer>1</answer>", "no"], [1.0, 0.0])])  # weights move after a copy existed
    infer = inference_model(policy)
    for (name, a), (_, b) in zip(infer.named_parameters(), policy.model.named_parameters()):
        assert a.dtype == torch.bfloat16 and torch.equal(a, b.to(torch.bfloat16)), name
    for (name, a), (_, b) in zip(infer.named_buffers(), policy.model.named_buffers()):
        assert a.dtype == b.dtype and torch.equal(a, b), name  # e.g. fp32 rotary frequencies are not rounded
    x = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert torch.allclose(infer(x).logits.float(), policy.model(x).logits, atol=0.1)
    release_inference_model(policy)
    assert policy._inference_copy is None
