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
