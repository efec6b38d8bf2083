"""Length-sorted micro-batches (issue 11, part 4): less padding, the same update."""

import copy

import torch

from swarm_node.config import TrainConfig
from swarm_node.learning.sapo import Group
from swarm_node.learning.tasks import TaskSet, TaskSpec
from swarm_node.learning.trainer import Trainer

COMPLETIONS = ["<answer>3</answer>", "the answer is probably seven, or maybe eight <answer>8</answer>", "<answer>4",
               "I think that the sum is <answer>5</answer>", "<answer>6</answer>", "x"]
REWARDS = [1.0, 0.0, 0.0, 1.0, 0.0, 0.0]


class ArrivalOrderTrainer(Trainer):
    """Micro-batches in arrival order (the trainer before sorting), as the reference."""

    def _micro_batches(self, sequences):
        size = self.config.micro_batch_size
        return [sequences[i:i + size] for i in range(0, len(sequences), size)]


def _group(taskset):
    spec = TaskSpec("chain_sum", taskset.tasks["chain_sum"], 0, 3, 1000)
    return Group(spec, COMPLETIONS, REWARDS, "QmLocal", 1, 0, "tiny")


def _padded_positions(batches):
    return sum(len(b) * max(len(s.completion_ids) for s in b) for b in batches)


def test_sorted_micro_batches_pad_less_and_give_the_same_update(tiny_policy_factory):
    taskset = TaskSet("smol", [], -1, 0, 1000)
    config = TrainConfig(model="tiny", micro_batch_size=3, learning_rate=1e-3, max_new_tokens=16)
    policy = tiny_policy_factory()
    reference_policy = copy.deepcopy(policy)
    sorted_trainer = Trainer(policy, config, taskset)
    reference = ArrivalOrderTrainer(reference_policy, config, taskset)
    sequences, _ = sorted_trainer._sequences([_group(taskset)])
    batches = sorted_trainer._micro_batches(sequences)
    lengths = [len(s.completion_ids) for b in batches for s in b]
    assert lengths == sorted(lengths) and [len(b) for b in batches] == [3, 3]
    assert _padded_positions(batches) < _padded_positions(reference._micro_batches(sequences))
    a = sorted_trainer.step([_group(taskset)])
    b = reference.step([_group(taskset)])
    assert a.num_sequences == b.num_sequences == 6 and a.num_tokens == b.num_tokens
    assert abs(a.loss - b.loss) < 1e-5
    for p, q in zip(policy.model.parameters(), reference_policy.model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)  # summation order only


def test_length_buckets_partition_by_cost():
    taskset = TaskSet("smol", [], -1, 0, 1000)
    trainer = Trainer.__new__(Trainer)  # length_buckets needs no model
    lengths = [30, 5, 6, 31, 5, 7]
    trainer.BUCKET_OVERHEAD_POSITIONS = 16
    assert trainer.length_buckets(lengths) == [([1, 4, 2, 5], 7), ([0, 3], 31)]
    trainer.BUCKET_OVERHEAD_POSITIONS = 10_000  # one padded batch
    assert trainer.length_buckets(lengths) == [([1, 4, 2, 5, 0, 3], 31)]
    trainer.BUCKET_OVERHEAD_POSITIONS = 0  # no padding at all
    assert all(len({lengths[i] for i in rows}) == 1 for rows, _ in trainer.length_buckets(lengths))
    assert taskset  # the fixture-free TaskSet builds


def test_bucketed_logprobs_and_gradients_equal_one_padded_batch(tiny_policy_factory):
    """Each bucket runs on the shared prompt cache: the same log-probs and gradients as one padded batch."""
    taskset = TaskSet("smol", [], -1, 0, 1000)
    results = []
    for overhead in (0, 10_000):
        policy = tiny_policy_factory()
        trainer = Trainer(policy, TrainConfig(model="tiny", max_new_tokens=16), taskset)
        trainer.BUCKET_OVERHEAD_POSITIONS = overhead
        batch, _ = trainer._sequences([_group(taskset)])
        assert len(trainer.length_buckets([len(s.completion_ids) for s in batch])) == (1 if overhead else 5)
        logp, mask = trainer._completion_logprobs(policy.model, batch)
        weights = torch.linspace(-1.0, 2.0, len(batch))
        ((logp * mask).sum(1) * weights).sum().backward()
        results.append((logp.detach(), mask, [p.grad.clone() for p in policy.model.parameters()]))
    (a, mask_a, grads_a), (b, mask_b, grads_b) = results
    assert torch.equal(mask_a, mask_b)
    torch.testing.assert_close(a * mask_a, b * mask_b, rtol=1e-5, atol=1e-5)
    for g, h in zip(grads_a, grads_b):
        torch.testing.assert_close(g, h, rtol=1e-4, atol=1e-5)
