"""Verification and trust logic without the network: Collector.verify_payload and PeerTrust."""

import random

import psutil

import pytest

from swarm_node.config import NetworkConfig, TrainConfig
from swarm_node.learning.tasks import TaskSet
from swarm_node.network.collector import Collector, CollectorSettings
from swarm_node.network.trust import PeerTrust

from hostile import honest_payload


@pytest.fixture
def collector():
    return make_collector(None, NetworkConfig(ban_strikes=2))


def make_collector(exchange, net: NetworkConfig) -> Collector:
    return Collector(exchange, CollectorSettings.pick(net, TrainConfig(model="tiny")), random.Random(0))


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
    collector = make_collector(None, NetworkConfig(max_groups_per_payload=3))
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


def test_spec_policy_allows_own_tasks_and_the_safe_table_only(taskset):
    from swarm_node.learning.tasks import TaskSpec
    from swarm_node.network.verify import SpecPolicy

    policy = SpecPolicy(taskset.tasks)
    spec = lambda name, config, size=100: TaskSpec(name, config, 0, 1, size)
    assert policy.check(spec("chain_sum", taskset.tasks["chain_sum"])) is None  # own config
    assert policy.check(spec("chain_sum", {"max_terms": 9, "allow_negation": True})) is None  # safe table
    assert policy.check(spec("letter_counting", {})) is None  # defaults of an own task
    assert "outside" in policy.check(spec("chain_sum", {"min_terms": 6000, "max_terms": 6000}))
    assert "outside" in policy.check(spec("count_primes", {"max_n": 50_000_000}))
    assert "outside" in policy.check(spec("chain_sum", {"max_terms": True}))  # a bool is no number here
    assert "not a scalar" in policy.check(spec("chain_sum", {"max_terms": [[[6]]]}))
    assert "not allowed" in policy.check(spec("rubiks_cube", {}))
    assert "size" in policy.check(spec("chain_sum", {}, size=10**12))


def test_verification_worker_enforces_memory_and_time_and_restarts():
    from swarm_node.learning.tasks import SMOL_SYSTEM_PROMPT, TaskSpec
    from swarm_node.network.verify import VerifyBudgetError, VerifyWorker

    worker = VerifyWorker(memory_mb=700, timeout_s=30)
    try:
        honest = (TaskSpec("chain_sum", {}, 0, 1, 100), ["<answer>1</answer>"])
        costly = (TaskSpec("count_primes", {"max_n": 50_000_000}, 0, 1, 100), ["<answer>1</answer>"])
        results = worker.run([costly, honest], SMOL_SYSTEM_PROMPT, 2, 16_384)
        assert [r[0] for r in results] == ["verify_memory", "ok"]  # the worker survives its MemoryError
        first_pid = worker.pid
        worker.timeout_s = 0.05  # 5,000 questions with their prompts take far longer: the worker is killed
        with pytest.raises(VerifyBudgetError) as e:
            worker.run([(TaskSpec("chain_sum", {}, 0, i, 10_000), ["x"]) for i in range(5000)], SMOL_SYSTEM_PROMPT,
                       2, 16_384)
        assert e.value.reason == "verify_timeout" and worker.pid is None
        assert not psutil.pid_exists(first_pid) or psutil.Process(first_pid).status() == psutil.STATUS_ZOMBIE
        worker.timeout_s = 30
        assert worker.run([honest], SMOL_SYSTEM_PROMPT, 2, 16_384)[0][0] == "ok"  # restarted
        assert worker.restarts == 0 or worker.pid != first_pid
    finally:
        worker.close()
    assert worker.pid is None


def test_per_peer_maps_stay_bounded_under_fresh_peer_ids():
    """Issue 15, hole 6: 5,000 fresh peer IDs (manifests that fail with a strike, malformed records, churn) leave
    every per-peer map of the collector and the trust tracker at its bound, and count no peer as seen."""
    import asyncio

    from hivemind.utils import get_dht_time

    from swarm_node.network import wire
    from swarm_node.network.exchange import FetchError, Rejection

    rng = random.Random(0)
    new_id = lambda: "Qm" + "".join(rng.choice("123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz")
                                     for _ in range(44))

    class Sybils:  # the exchange's poll/fetch interface, answered by made-up peers
        async def poll(self, shards=None):
            manifests = [wire.Manifest.model_construct(
                version=wire.PROTOCOL_VERSION, peer_id=new_id(), round=1, policy_version=0, model="m", num_groups=1,
                num_completions=2, payload_bytes=100, payload_sha256=rng.randbytes(32), created_at_s=get_dht_time())
                for _ in range(250)]
            return manifests, [Rejection("malformed", new_id(), "", rng.randbytes(32)) for _ in range(250)]

        async def fetch(self, manifest, max_payload_bytes):
            raise FetchError("hash_mismatch" if rng.random() < 0.5 else "fetch_timeout")

    net = NetworkConfig(max_tracked_peers=64, max_manifests_per_round=250, fetches_per_round=250,
                        max_inflight_fetches=250)  # every manifest admitted (sampling off)
    collector = make_collector(Sybils(), net)

    async def run():
        for _ in range(10):
            await collector.collect_once()
            await collector.drain()
            collector.take()

    asyncio.run(run())
    trust = collector.trust
    assert trust.rejects["hash_mismatch"] + trust.rejects["fetch_timeout"] == 2500 and trust.rejects["malformed"] == 2500
    for name in ("peers_announced", "accepted_by_peer", "peer_latest"):
        assert len(getattr(collector, name)) <= 64, name
    for name in ("failures", "tries", "timeouts", "backoff_until", "good_peers"):
        assert len(getattr(collector.admission, name)) <= 64, name
    for name in ("rejects_by_peer", "_strikes", "_banned_until"):
        assert len(getattr(trust, name)) <= 64, name
    assert len(collector.admission.seen_manifests) == 4 * 64  # full, and no fuller
    assert len(collector._seen_bad_records) == 4 * 64
    assert len(trust._strikes) == 64  # the bound is reached, not avoided
    assert collector.take().peers_seen == 0  # only peers that delivered verified groups count
