"""Verification and trust logic without the network: Collector.verify_payload and PeerTrust."""

import random

import pytest

from swarm_node.config import NetworkConfig, TrainConfig
from swarm_node.learning.tasks import TaskSet
from swarm_node.network.collector import Collector
from swarm_node.network.trust import PeerTrust

from hostile import honest_payload


@pytest.fixture
def collector():
    return Collector(None, NetworkConfig(ban_strikes=2), TrainConfig(model="tiny"), random.Random(0))


@pytest.fixture(scope="module")
def taskset():
    return TaskSet("smol", [], -1, 0, 100_000)


def test_honest_payload_is_accepted_with_local_rewards(collector, taskset):
    payload = honest_payload("QmHonest", 1, taskset, range(5))
    groups = collector.verify_payload(payload)
    assert len(groups) == 5 and collector.trust.rejects == {}
    assert [g.rewards for g in groups] == [list(g.rewards) for g in payload.groups]


def test_forged_reward_drops_the_whole_payload_and_strikes(collector, taskset):
    payload = honest_payload("QmLiar", 1, taskset, range(3))
    forged = payload.model_copy(update={"groups": [payload.groups[0].model_copy(update={"rewards": [1.0] * 4}),
                                                   *payload.groups[1:]]})
    assert collector.verify_payload(forged) is None
    assert collector.trust.rejects_by_peer["QmLiar"]["reward_mismatch"] == 1


def test_other_reasoning_gym_release_is_skipped_without_a_strike(collector, taskset):
    payload = honest_payload("QmOld", 1, taskset, range(2))
    old = payload.groups[0].model_copy(update={"spec": payload.groups[0].spec.model_copy(update={"rg_version": "0.0.1"})})
    groups = collector.verify_payload(payload.model_copy(update={"groups": [old, payload.groups[1]]}))
    assert len(groups) == 1
    assert collector.trust.rejects["rg_version_mismatch"] == 1
    for _ in range(5):
        collector.verify_payload(payload.model_copy(update={"groups": [old]}))
    assert not collector.trust.is_banned("QmOld")


def test_duplicates_count_once_whoever_sends_them(collector, taskset):
    original = honest_payload("QmA", 1, taskset, range(2))
    copy = original.model_copy(update={"peer_id": "QmCopier", "round": 2})
    assert len(collector.verify_payload(original)) == 2
    assert collector.verify_payload(copy) == []
    assert collector.trust.rejects_by_peer["QmCopier"]["duplicate"] == 2
    assert not collector.trust.is_banned("QmCopier")  # a duplicate is not a protocol violation


def test_receiver_limits(collector, taskset):
    collector.net.max_groups_per_payload = 3
    assert collector.verify_payload(honest_payload("QmBig", 1, taskset, range(4))) is None
    assert collector.trust.rejects_by_peer["QmBig"]["over_limit"] == 1


def test_ban_after_strikes_then_cooldown():
    now = [0.0]
    trust = PeerTrust(ban_strikes=3, ban_cooldown_s=10, clock=lambda: now[0])
    for _ in range(20):
        trust.reject("fetch_timeout", "QmSlow")  # churn is never a strike
        trust.reject("unreachable", "QmSlow")
    assert not trust.is_banned("QmSlow")
    trust.reject("malformed", "QmBad")
    trust.reject("schema", "QmBad")
    assert not trust.is_banned("QmBad")
    trust.reject("hash_mismatch", "QmBad")
    assert trust.is_banned("QmBad") and trust.banned_peers == ["QmBad"]
    now[0] = 10.5
    assert not trust.is_banned("QmBad")
    assert trust.rejects["malformed"] == 1 and trust.rejects["fetch_timeout"] == 20
