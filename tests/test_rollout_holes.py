"""Regression tests for the rollout-path holes of the second outside attack (issue 15), each through the real
exchange path: one real Node (tiny model) on a real DHT, an honest scripted peer, and one attacker (tests/hostile.py).

Each test asserts that the node keeps running and training on honest groups, and that the attack is dropped and
counted under its reason.
"""

from __future__ import annotations

import asyncio
import json
from typing import Awaitable, Callable

import msgpack
import pytest

import swarm_node.network  # noqa: F401
from swarm_node.config import load_config
from swarm_node.learning.tasks import TaskSet
from swarm_node.network import wire
from swarm_node.network.trust import VIOLATIONS
from swarm_node.node import Node

from hostile import ScriptedPeer, honest_payload

pytestmark = pytest.mark.slow

SHARDS = 2
PERIOD_S = 1.0
TASKSET = TaskSet("smol", [], -1, 0, 100_000)


def node_config(tmp_path, rounds, **overrides):
    settings = dict(
        output_dir=str(tmp_path / "node"), model="tiny", rounds=rounds, num_local_groups=2, num_completions=4,
        max_new_tokens=24, num_external_groups=8, fetch_timeout_s=4, dht_timeout_s=5, num_shards=SHARDS,
        ban_strikes=2, torch_threads=1, min_peers=1, collect_interval_s=0.5)
    settings.update(overrides)
    return load_config(environ={}, overrides=settings)


def with_config(payload: wire.RolloutPayload, config_bytes: bytes) -> bytes:
    """The payload's msgpack bytes with the first group's spec config replaced by raw msgpack `config_bytes`
    (values msgpack's own packer refuses to build, like 1,000 nested arrays)."""
    d = msgpack.unpackb(wire.encode(payload), raw=False)
    d["groups"][0]["spec"]["config"] = {"deep": "@@PLACEHOLDER@@"}
    raw = msgpack.packb(d)
    return raw.replace(msgpack.packb("@@PLACEHOLDER@@"), config_bytes)


StepFn = Callable[[ScriptedPeer, int], Awaitable[None]]


def run_node_against(tmp_path, attack: StepFn, rounds: int = 4, **overrides):
    """Run one Node for `rounds` rounds while an honest scripted peer and an attacker publish every PERIOD_S.

    Returns (node, honest peer ID, attacker peer ID, metrics rows).
    """

    async def main():
        node = Node(node_config(tmp_path, rounds, **overrides))
        await node.start()
        honest = await ScriptedPeer.create(tmp_path / "honest.key", node.maddrs)
        attacker = await ScriptedPeer.create(tmp_path / "attacker.key", node.maddrs)

        async def drive():
            r = 0
            while True:
                r += 1
                data = wire.encode(honest_payload(honest.peer_id, r, TASKSET, range(10 * r, 10 * r + 2)))
                await asyncio.gather(honest.publish(r, data, SHARDS), attack(attacker, r))
                await asyncio.sleep(PERIOD_S)

        driver = asyncio.create_task(drive())
        try:
            await asyncio.sleep(2 * PERIOD_S)
            await node.run()
            return node, honest.peer_id, attacker.peer_id
        finally:
            driver.cancel()
            await honest.shutdown()
            await attacker.shutdown()
            await node.stop()

    node, honest_id, attacker_id = asyncio.run(main())
    rows = [json.loads(line) for line in (node.out_dir / "metrics.jsonl").read_text().splitlines()]
    return node, honest_id, attacker_id, rows


def assert_survived_and_trained_on_honest(node, honest_id, attacker_id, rows, rounds):
    trust = node.collector.trust
    assert [r["round"] for r in rows] == list(range(1, rounds + 1)), rows
    assert node.collector.accepted_by_peer[honest_id] >= 2, dict(trust.rejects)
    assert sum(r["external_groups_used"] for r in rows) > 0
    assert node.collector.accepted_by_peer[attacker_id] == 0
    assert not set(trust.rejects_by_peer.get(honest_id, {})) & VIOLATIONS


def test_hole1_deeply_nested_config_is_dropped_and_struck(tmp_path, reap_children):
    """A config value nested 1,000 levels deep (1 byte per level: inside msgpack's limits and the 2,048-byte config
    budget) made re-creation and then the error message's repr raise RecursionError out of the node (issue 15)."""

    async def attack(p: ScriptedPeer, r: int) -> None:
        payload = honest_payload(p.peer_id, r, TASKSET, range(500 + r, 501 + r))
        await p.publish(r, with_config(payload, b"\x91" * 1000 + b"\xc0"), SHARDS)

    node, honest_id, attacker_id, rows = run_node_against(tmp_path, attack)
    assert_survived_and_trained_on_honest(node, honest_id, attacker_id, rows, 4)
    struck = set(node.collector.trust.rejects_by_peer[attacker_id]) & VIOLATIONS
    assert struck, dict(node.collector.trust.rejects_by_peer[attacker_id])
    assert attacker_id in node.collector.trust.banned_peers  # ban_strikes = 2, one payload per second


@pytest.mark.parametrize("dataset, config", [
    ("chain_sum", {"min_terms": 6000, "max_terms": 6000, "min_digits": 4, "max_digits": 4}),  # 97 s train step
    ("count_primes", {"min_n": 1, "max_n": 50_000_000}),  # +1.5 GB, 13 s of blocked event loop
])
def test_hole2_costly_specs_are_dropped_before_any_work(tmp_path, reap_children, dataset, config):
    """Valid but costly specs (issue 15's measurements in the comments) are refused by the allow-list before
    re-creation, count as `spec_not_allowed` strikes, and get the attacker banned; honest groups still flow."""

    async def attack(p: ScriptedPeer, r: int) -> None:
        payload = honest_payload(p.peer_id, r, TASKSET, range(700 + 4 * r, 704 + 4 * r))
        spec = payload.groups[0].spec.model_construct(dataset=dataset, config=config, seed=r, index=1, size=100,
                                                      rg_version=payload.groups[0].spec.rg_version)
        costly = [g.model_copy(update={"spec": spec, "rewards": [0.0] * len(g.completions)}) for g in payload.groups]
        await p.publish(r, wire.encode(payload.model_copy(update={"groups": costly})), SHARDS)

    node, honest_id, attacker_id, rows = run_node_against(tmp_path, attack)
    assert_survived_and_trained_on_honest(node, honest_id, attacker_id, rows, 4)
    rejects = node.collector.trust.rejects_by_peer[attacker_id]
    assert rejects["spec_not_allowed"] >= 2, dict(rejects)
    assert node.collector.verified_groups == node.collector.accepted_by_peer[honest_id]  # no costly spec re-created
    assert attacker_id in node.collector.trust.banned_peers
