"""External-group selection strategies and per-peer usefulness (learning/selection.py)."""

import random
from collections import Counter

import pytest

from swarm_node.learning.sapo import Group, select_external
from swarm_node.learning.selection import PeerUsefulness, strategy_weight, weighted_sample
from swarm_node.learning.tasks import TaskSpec


def group(rewards, peer="QmA", i=0):
    return Group(TaskSpec("chain_sum", {}, 0, i, 100), [str(k) for k in range(len(rewards))], rewards, peer, 1, 0, "m")


def test_strategy_weights():
    assert strategy_weight([1, 0, 0, 0], "learnability") == pytest.approx(0.1875)
    assert strategy_weight([1, 1, 0, 0], "learnability") == pytest.approx(0.25)
    assert strategy_weight([0.5, 0.0], "success_gated") == 0.0
    assert strategy_weight([1.0, 0.0], "success_gated") == 1.0
    with pytest.raises(ValueError):
        strategy_weight([1.0], "bogus")


def test_uniform_is_the_papers_rng_sample():
    pool = [group([1, 0], i=i) for i in range(10)]
    assert select_external(pool, 3, random.Random(5)) == random.Random(5).sample(pool, 3)


def test_success_gated_never_picks_groups_without_success():
    pool = [group([0.5, 0.0], i=i) for i in range(5)] + [group([1.0, 0.0], i=10 + i) for i in range(2)]
    chosen = select_external(pool, 4, random.Random(0), strategy="success_gated")
    assert len(chosen) == 2 and all(max(g.rewards) == 1.0 for g in chosen)


def test_learnability_prefers_half_pass_rate():
    pool = [group([1, 1, 0, 0], i=0), group([1, 0, 0, 0, 0, 0, 0, 0], i=1)]
    wins = Counter(select_external(pool, 1, random.Random(s), strategy="learnability")[0].spec.index
                   for s in range(2000))
    # weights 0.25 vs 0.109: the first is drawn with probability 0.25 / 0.359 = 0.70
    assert 0.65 < wins[0] / 2000 < 0.75


def test_weighted_sample_without_replacement_and_zero_weights():
    items = list(range(6))
    got = weighted_sample(items, [1, 0, 2, 0, 3, 1], 10, random.Random(1))
    assert sorted(got) == [0, 2, 4, 5]


def test_peer_usefulness_downweights_off_policy_peers_and_is_bounded():
    u = PeerUsefulness(decay=0.5, floor=0.05, max_peers=3)
    for _ in range(6):
        u.update({"QmGood": 0.95, "QmBad": 0.1, "QmNaN": float("nan")})
    assert u("QmGood") > 0.9 and u("QmBad") < 0.2 and u("QmNaN") == 0.05 and u("QmNew") == 1.0
    pool = [group([1, 0], "QmGood", i) for i in range(5)] + [group([1, 0], "QmBad", 10 + i) for i in range(5)]
    picks = Counter(g.peer_id for s in range(300) for g in select_external(pool, 1, random.Random(s), peer_weight=u))
    assert picks["QmGood"] > 3 * picks["QmBad"]
    u.update({"Qm1": 1.0, "Qm2": 1.0})
    assert len(u.snapshot()) == 3 and u("QmGood") == 1.0  # least recently updated forgotten


def test_without_zero_advantage_filter_excluded_groups_still_fill_up():
    pool = [group([0.0, 0.0], i=i) for i in range(3)] + [group([1.0, 0.0], i=9)]
    chosen = select_external(pool, 2, random.Random(0), filter_zero_advantage=False, strategy="success_gated")
    assert len(chosen) == 2 and chosen[0].spec.index == 9
    assert select_external(pool, 2, random.Random(0), strategy="success_gated") == [pool[3]]
