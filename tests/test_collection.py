"""The collection loop against an in-memory exchange: admission, verification drops by reason, pool sampling.

Real reasoning-gym tasks, real wire encoding and the real manifest checks (`exchange.manifest_for`,
`exchange.payload_for`); only the DHT and the libp2p stream are replaced by a dict (the network boundary), and
re-scoring runs in this process (the budgeted worker process has its own test in test_trust.py). No model.
"""

import asyncio
import dataclasses
import random

import pytest
from hivemind.utils import get_dht_time

from swarm_node.config import NetworkConfig, TrainConfig
from swarm_node.learning.sapo import Group
from swarm_node.learning.tasks import TaskSet, TaskSpec, recreate, score
from swarm_node.network import checks, wire
from swarm_node.network.collector import Collector, CollectorSettings
from swarm_node.network.exchange import FetchError, manifest_for, payload_for, shard_of
from swarm_node.network.verify import rescore

from hostile import honest_payload

TASKSET = TaskSet("smol", [], -1, 0, 100_000)
NUM_SHARDS = 4


class InMemoryExchange:
    """`poll(shards)` and `fetch(manifest, max_payload_bytes)` over a dict of each peer's latest manifest and bytes."""

    def __init__(self):
        self.latest: dict[str, tuple[wire.Manifest, bytes]] = {}
        self.fetched: list[str] = []

    def publish(self, payload: wire.RolloutPayload, data: bytes | None = None, **manifest_fields) -> None:
        data = wire.encode(payload) if data is None else data
        manifest = manifest_for(payload, data, payload.peer_id).model_copy(update=manifest_fields)
        self.latest[payload.peer_id] = (manifest, data)

    async def poll(self, shards):
        shards = set(shards)
        return [m for m, _ in self.latest.values() if shard_of(m.peer_id, NUM_SHARDS) in shards], []

    async def fetch(self, manifest: wire.Manifest, max_payload_bytes: int) -> wire.RolloutPayload:
        self.fetched.append(manifest.peer_id)
        if manifest.payload_bytes > max_payload_bytes:
            raise FetchError("too_large", f"announced {manifest.payload_bytes} bytes")
        _, data = self.latest[manifest.peer_id]
        return payload_for(manifest, data, max_payload_bytes)


class InProcessWorker:
    """The verification worker's interface, running `rescore` in this process."""

    pid = None

    def _ensure(self):
        pass

    def run(self, work, system_prompt, num_fewshot, max_prompt_bytes):
        return rescore(work, system_prompt, num_fewshot, max_prompt_bytes)

    def close(self):
        pass


def make_collector(exchange, **network) -> Collector:
    settings = CollectorSettings.pick(NetworkConfig(num_shards=NUM_SHARDS, ban_strikes=2, **network),
                                      TrainConfig(model="tiny", num_external_groups=2))
    return Collector(exchange, settings, random.Random(0), taskset=TASKSET, worker=InProcessWorker())


async def cycle(collector: Collector) -> None:
    await collector.collect_once()
    await collector.drain()


def forged(peer_id: str, indices: range) -> wire.RolloutPayload:
    return honest_payload(peer_id, 1, TASKSET, indices, rewards=[1.0, 1.0, 1.0, 1.0])


def test_collection_loop_admits_verifies_counts_and_samples():
    exchange = InMemoryExchange()
    collector = make_collector(exchange, max_groups_per_payload=4, max_manifests_per_round=16, fetches_per_round=16,
                               max_inflight_fetches=16)  # every new manifest is admitted
    honest = honest_payload("QmHonest", 1, TASKSET, range(3))
    own = honest_payload("QmMe", 1, TASKSET, range(100, 102))
    collector.note_own([checks.group_from_wire(own, i, TaskSpec(**g.spec.model_dump()), list(g.rewards))
                        for i, g in enumerate(own.groups)])
    exchange.publish(honest)
    exchange.publish(forged("QmLiar", range(10, 12)))
    exchange.publish(honest_payload("QmBig", 1, TASKSET, range(20, 25)))  # 5 groups > 4
    exchange.publish(own.model_copy(update={"peer_id": "QmCopier"}))  # our own groups under another ID
    exchange.publish(honest_payload("QmHash", 1, TASKSET, range(30, 31)), payload_sha256=bytes(32))
    exchange.publish(honest_payload("QmAged", 1, TASKSET, range(40, 41)), created_at_s=get_dht_time() - 10**4)
    exchange.publish(honest_payload("QmHi", 0, TASKSET, range(0)))  # a readiness announcement
    exchange.publish(honest_payload("QmHuge", 1, TASKSET, range(50, 51)), payload_bytes=10**9)
    unknown = honest_payload("QmRubik", 1, TASKSET, range(60, 62))
    unknown.groups[0] = unknown.groups[0].model_copy(update={"spec": unknown.groups[0].spec.model_copy(
        update={"dataset": "rubiks_cube", "config": {}})})
    exchange.publish(unknown)
    asyncio.run(cycle(collector))

    rejects = collector.trust.rejects
    assert rejects == {"reward_mismatch": 1, "over_limit": 1, "own_group": 2, "hash_mismatch": 1, "stale": 1,
                       "too_large": 1, "spec_not_allowed": 1}, dict(rejects)
    by_peer = collector.trust.rejects_by_peer
    assert by_peer["QmLiar"] == {"reward_mismatch": 1} and by_peer["QmBig"] == {"over_limit": 1}
    assert "QmHi" not in exchange.fetched and "QmAged" not in exchange.fetched  # nothing to fetch / stale
    assert collector.accepted_by_peer["QmHonest"] == 3 and collector.accepted_by_peer["QmRubik"] == 1
    assert collector.accepted_total == 4
    assert "QmHonest" in collector.admission.good_peers and "QmLiar" not in collector.admission.good_peers

    # a manifest already handled is not fetched again; the same content under a new ID is a duplicate
    fetched = len(exchange.fetched)
    exchange.publish(honest.model_copy(update={"peer_id": "QmEcho"}))
    asyncio.run(cycle(collector))
    assert exchange.fetched[fetched:] == ["QmEcho"]
    assert by_peer["QmEcho"] == {"duplicate": 3} and not collector.trust.is_banned("QmEcho")

    # pool sampling: J = 2 per take, only verified groups, each used once, the verifier's rewards
    first, second, third = collector.take(), collector.take(), collector.take()
    assert (len(first.groups), first.available, first.peers_seen) == (2, 4, 2)
    assert (len(second.groups), second.available) == (2, 2) and third.groups == []
    taken = first.groups + second.groups
    assert {g.peer_id for g in taken} == {"QmHonest", "QmRubik"}
    assert len({g.content_key() for g in taken}) == 4
    for g in taken:
        assert g.rewards == [score(recreate(g.spec), c) for c in g.completions]

    # a second forged payload bans the liar (ban_strikes = 2): its next manifest is skipped unfetched
    exchange.publish(forged("QmLiar", range(70, 71)).model_copy(update={"round": 2}))
    asyncio.run(cycle(collector))
    assert collector.trust.is_banned("QmLiar")
    exchange.publish(forged("QmLiar", range(80, 81)).model_copy(update={"round": 3}))
    fetched = len(exchange.fetched)
    asyncio.run(cycle(collector))
    assert "QmLiar" not in exchange.fetched[fetched:] and rejects["banned_peer"] == 1


def test_admission_prefers_known_good_peers_and_counts_the_flood_once():
    exchange = InMemoryExchange()
    collector = make_collector(exchange, max_manifests_per_round=3, fetches_per_round=3, max_inflight_fetches=3,
                               explore_share=0.0)
    exchange.publish(honest_payload("QmGood", 1, TASKSET, range(2)))
    asyncio.run(cycle(collector))
    collector.take()
    assert "QmGood" in collector.admission.good_peers
    exchange.publish(honest_payload("QmGood", 2, TASKSET, range(2, 4)))
    for i in range(8):  # a Sybil crowd of newcomers
        exchange.publish(honest_payload(f"QmSybyk{i + 1}", 1, TASKSET, range(10 + i, 11 + i)))
    fetched = len(exchange.fetched)
    asyncio.run(cycle(collector))
    admitted = exchange.fetched[fetched:]
    assert len(admitted) == 3 and admitted[0] == "QmGood"  # known-good first, by announcement time
    assert collector.trust.rejects["flood"] == 6
    collector.take()
    asyncio.run(cycle(collector))  # the same flood read again is not counted again
    assert collector.trust.rejects["flood"] == 6
    assert len(exchange.fetched) == fetched + 6  # later cycles admit the waiting newcomers


def test_verify_is_a_pure_function_of_payload_limits_and_seen():
    limits = checks.Limits(max_groups_per_payload=8, max_completions_per_group=8, max_completion_chars=200,
                           max_prompt_tokens=2048)
    seen = checks.Seen(64, 60.0)
    payload = honest_payload("QmA", 1, TASKSET, range(3))
    groups, rejections = checks.verify(payload, limits, seen)
    assert len(groups) == 3 and rejections == []
    assert all(isinstance(g, Group) and g.peer_id == "QmA" for g in groups)
    groups, rejections = checks.verify(payload, limits, seen)  # the same content again
    assert groups == [] and [r.reason for r in rejections] == ["duplicate"] * 3
    groups, rejections = checks.verify(forged("QmB", range(5, 6)), limits, checks.Seen(64, 60.0))
    assert groups is None and [(r.reason, r.peer_id) for r in rejections] == [("reward_mismatch", "QmB")]
    tight = dataclasses.replace(limits, max_prompt_tokens=10)
    groups, rejections = checks.verify(honest_payload("QmC", 1, TASKSET, range(7, 8)), tight, checks.Seen(64, 60.0))
    assert groups == [] and [r.reason for r in rejections] == ["prompt_too_long"]


@pytest.mark.parametrize("field", ["max_completions_per_group", "max_completion_chars"])
def test_verify_drops_the_whole_payload_over_a_size_limit(field):
    limits = checks.Limits(max_groups_per_payload=8, max_completions_per_group=8, max_completion_chars=200,
                           max_prompt_tokens=2048)
    payload = honest_payload("QmA", 1, TASKSET, range(2))
    if field == "max_completions_per_group":
        limits = dataclasses.replace(limits, max_completions_per_group=3)
    else:
        limits = dataclasses.replace(limits, max_completion_chars=5)
    groups, rejections = checks.verify(payload, limits, checks.Seen(64, 60.0))
    assert groups is None and [r.reason for r in rejections] == ["over_limit"]
