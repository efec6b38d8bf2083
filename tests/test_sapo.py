"""SAPO training-set construction: the zero-advantage filter and J."""

import random

from swarm_node.learning.sapo import Group, select_external
from swarm_node.learning.tasks import TaskSpec


def group(i, rewards):
    return Group(TaskSpec("chain_sum", {}, 0, i, 100), [f"c{i}-{k}" for k in range(len(rewards))], rewards,
                 "peer", 1, 0, "tiny")


def test_select_external_drops_zero_advantage_and_respects_j():
    pool = [group(0, [0, 0, 0]), group(1, [1, 0, 1]), group(2, [1, 1, 1]), group(3, [0, 0.5, 0]), group(4, [0, 1, 0])]
    chosen = select_external(pool, 2, random.Random(0))
    assert len(chosen) == 2
    assert all(g.has_signal for g in chosen)
    assert len({id(g) for g in chosen}) == 2
    assert select_external(pool, 10, random.Random(0)) == [pool[1], pool[3], pool[4]]
    assert select_external(pool, 0, random.Random(0)) == []


def test_select_external_is_uniform_over_the_filtered_pool():
    pool = [group(i, [0, 1]) for i in range(4)] + [group(9, [1, 1])]
    rng = random.Random(0)
    counts = {i: 0 for i in range(4)}
    for _ in range(4000):
        for g in select_external(pool, 1, rng):
            counts[g.spec.index] += 1
    assert sum(counts.values()) == 4000
    assert all(850 < c < 1150 for c in counts.values()), counts


def test_filter_can_be_disabled():
    pool = [group(0, [0, 0]), group(1, [1, 1])]
    assert len(select_external(pool, 5, random.Random(0), filter_zero_advantage=False)) == 2


def test_select_local_prefers_groups_with_signal():
    from swarm_node.learning.sapo import select_local

    spec = TaskSpec("chain_sum", {}, 0, 0, 10)
    flat = [Group(spec, ["a", "b"], [0.0, 0.0], "me", 1, 0, "m") for _ in range(3)]
    live = [Group(spec, ["a", "b"], [1.0, 0.0], "me", 1, 0, "m") for _ in range(2)]
    mixed = [flat[0], live[0], flat[1], flat[2], live[1]]
    assert select_local(mixed, 3) == [live[0], live[1], flat[0]]
    assert select_local(mixed, 1) == [live[0]]
    assert select_local(flat, 2) == flat[:2]  # nothing with signal: still I groups (they add no gradient)
