"""Hostile-peer suite: two honest nodes (real Node, tiny model, real DHT) plus an honest scripted peer, attacked
by scripted peers over the real DHT and libp2p streams.

For every attack the test asserts that the honest nodes keep running and training, that honest rollouts still
arrive and are used, and that the attack is rejected under its reason.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math

import msgpack
import pytest

import swarm_node.network  # noqa: F401
from swarm_node.config import load_config
from hivemind.utils import get_dht_time

from swarm_node.learning.tasks import RG_VERSION, TaskSet
from swarm_node.network import wire
from swarm_node.network.identity import peer_id_from_public_key
from swarm_node.network.trust import VIOLATIONS
from swarm_node.node import Node

from hostile import ScriptedPeer, framed, honest_payload

pytestmark = pytest.mark.slow

ROUNDS = 5
SHARDS = 4
PERIOD_S = 3.0  # attackers publish a new round this often
HONEST_PERIOD_S = 0.5  # the honest scripted peer publishes faster than the nodes' rounds: a node never waits for
# peers (background collection), so a round only finds new honest groups if some were published since the last one


def node_config(tmp_path, name, initial_peers):
    return load_config(environ={}, overrides=dict(
        output_dir=str(tmp_path / name), model="tiny", rounds=ROUNDS, num_local_groups=2, num_completions=4,
        max_new_tokens=24, num_external_groups=16, collect_timeout_s=8, fetch_timeout_s=4, dht_timeout_s=5,
        num_shards=SHARDS, initial_peers=initial_peers, max_manifests_per_round=16, ban_strikes=2,
        torch_threads=1, min_peers=1, collect_interval_s=0.5,
    ))


def raw_payload(payload: wire.RolloutPayload, **changes) -> bytes:
    d = msgpack.unpackb(wire.encode(payload), raw=False)
    d.update(changes)
    return msgpack.packb(d)


async def stall(reader, writer, round_):
    writer.write((1000).to_bytes(8, "big"))
    await writer.drain()
    await asyncio.sleep(30)


async def trickle(reader, writer, round_):
    writer.write((1000).to_bytes(8, "big"))
    for _ in range(60):
        writer.write(b"x")
        await writer.drain()
        await asyncio.sleep(0.5)


async def slam(reader, writer, round_):
    writer.close()  # answers every fetch with an error: the stream ends without a reply


# Timing-dependent by design: a node never waits for peers, and the tiny model's rounds last about a second, so a
# round trains on an honest external group only if one was published, fetched and verified since the last round.
# The honest peer publishes every 0.5 s and the nodes poll every 0.5 s (collect_interval_s) to make that the rule;
# on a heavily loaded machine a round can still find nothing new and, with no signal in its own groups, train
# nothing (loss None). Seen once in two clean-clone CI runs with 1 s periods; hence the reruns.
@pytest.mark.flaky(reruns=2)
def test_hostile_peers_are_rejected_and_honest_training_continues(tmp_path, reap_children, caplog):
    caplog.set_level(logging.WARNING, logger="swarm_node.network.trust")
    taskset = TaskSet("smol", [], -1, 0, 100_000)

    async def main():
        a = Node(node_config(tmp_path, "a", []))
        await a.start()
        boot = a.maddrs
        b = Node(node_config(tmp_path, "b", boot))
        await b.start()
        peers: dict[str, ScriptedPeer] = {}

        async def peer(name, extra_keys=0):
            peers[name] = await ScriptedPeer.create(tmp_path / f"{name}.key", boot, extra_keys=extra_keys)
            return peers[name]

        try:
            # every scripted peer publishes a new round every PERIOD_S while the honest nodes run, like a live peer
            scripts: list = []  # async step(r) functions
            honest = await peer("honest")
            honest_payloads: dict[int, wire.RolloutPayload] = {}

            async def honest_step(r):
                honest_payloads[r] = honest_payload(honest.peer_id, r, taskset, range(10 * r, 10 * r + 2))
                await honest.publish(r, wire.encode(honest_payloads[r]), SHARDS)

            attacks: dict[str, str] = {}  # attacker name -> expected reason

            async def payload_attack(name, reason, make_data, serve=None, **manifest_override):
                p = await peer(name)
                attacks[name] = reason
                p.serve = serve

                async def step(r):
                    await p.publish(r, make_data(p, r), SHARDS, **manifest_override)

                scripts.append(step)

            good = lambda p, r, **kw: honest_payload(p.peer_id, r, taskset, range(1000 * r + 7, 1000 * r + 9), **kw)
            await payload_attack("malformed", "malformed", lambda p, r: b"\xc1\xc1 not msgpack")
            await payload_attack("wrong_types", "schema", lambda p, r: raw_payload(good(p, r), round=str(r)))
            await payload_attack("many_groups", "over_limit", lambda p, r: wire.encode(
                honest_payload(p.peer_id, r, taskset, range(40 * r, 40 * r + 40))))
            await payload_attack("many_completions", "over_limit", lambda p, r: wire.encode(
                honest_payload(p.peer_id, r, taskset, range(r, r + 1), num_completions=40)))
            await payload_attack("huge_completion", "over_limit", lambda p, r: wire.encode(
                good(p, r, completions=["x" * 5000, "y"], rewards=[0.0, 0.0])))
            await payload_attack("nan_reward", "schema", lambda p, r: wire.encode(
                good(p, r, rewards=[math.nan, 0.0, 0.0, 0.0])))
            await payload_attack("major_version", "version", lambda p, r: raw_payload(good(p, r), version=[2, 0]))
            await payload_attack("forged_reward", "reward_mismatch", lambda p, r: wire.encode(
                good(p, r, rewards=[1.0, 1.0, 1.0, 0.0])))
            bad_spec = wire.WireTaskSpec.model_construct(dataset="no_such_dataset", config={}, seed=0, index=1,
                                                         size=10, rg_version=RG_VERSION)
            await payload_attack("bad_dataset", "spec_not_allowed", lambda p, r: wire.encode(good(p, r, spec=bad_spec)))
            bad_index = bad_spec.model_copy(update={"dataset": "chain_sum", "index": 10})
            await payload_attack("bad_index", "schema", lambda p, r: wire.encode(good(p, r, spec=bad_index)))  # PROTOCOL.md: index >= size is schema
            await payload_attack("hash", "hash_mismatch", lambda p, r: wire.encode(good(p, r)),
                                 payload_sha256=b"\x07" * 32)
            await payload_attack("stall", "fetch_timeout", lambda p, r: b"z" * 1000, serve=stall)
            await payload_attack("trickle", "fetch_timeout", lambda p, r: b"z" * 1000, serve=trickle)

            async def oversend(reader, writer, round_):
                writer.write(framed(b"q" * 100, announced=50_000_000))
                await writer.drain()

            await payload_attack("oversend", "size_mismatch", lambda p, r: b"q" * 100, serve=oversend)
            await payload_attack("error_reply", "stream_error", lambda p, r: b"z" * 100, serve=slam)
            # duplicates: re-publishes the honest peer's groups of two rounds ago under its own ID
            await payload_attack("duplicate", "duplicate", lambda p, r: wire.encode(
                honest_payloads[sorted(honest_payloads)[-3:][0]].model_copy(update={"peer_id": p.peer_id, "round": r})))

            # record-level attacks from one DHT peer holding extra keys
            rec = await peer("records", extra_keys=12)
            victim = a.peer_id
            sybil_ids = [peer_id_from_public_key(v.local_public_key[7:-1]).to_base58() for v in rec.sybils]
            m = lambda r, **kw: rec.manifest_for(r, b"x" * 10, **kw)

            async def record_step(r):
                await rec.store_manifest(b"\x93\xc1\xc1" + bytes([r % 256]), SHARDS, signer=rec.sybils[0])
                await rec.store_manifest(raw_payload(m(r), round=str(r)), SHARDS, signer=rec.sybils[1])
                await rec.store_manifest(wire.encode(m(r, model="m" * 100)) + b"\x00" * 1200, SHARDS,
                                         signer=rec.sybils[2])
                await rec.store_manifest(raw_payload(m(r), version=[9, r]), SHARDS, signer=rec.sybils[3])
                # replayed old record / far-future record
                await rec.store_manifest(wire.encode(m(r, peer_id=sybil_ids[4], created_at_s=get_dht_time() - 10_000)),
                                         SHARDS, as_peer=sybil_ids[4], signer=rec.sybils[4])
                await rec.store_manifest(wire.encode(m(r, peer_id=sybil_ids[5], created_at_s=get_dht_time() + 10_000)),
                                         SHARDS, as_peer=sybil_ids[5], signer=rec.sybils[5])
                # someone else's owner marker with a made-up signature
                await rec.store_manifest(wire.encode(m(r, peer_id=victim)), SHARDS, as_peer=victim, signer=a.validator)
                # own signature, another peer's ID
                await rec.store_manifest(wire.encode(m(r, peer_id=victim)), SHARDS, as_peer=victim)
                # flood: 6 more Sybil identities announce rounds (at most 16 new manifests are fetched per round)
                for s, sybil_id in zip(rec.sybils[6:], sybil_ids[6:]):
                    await rec.store_manifest(wire.encode(m(r, peer_id=sybil_id)), SHARDS, as_peer=sybil_id, signer=s)

            scripts.append(record_step)

            async def drive():
                r = 0
                while True:
                    r += 1
                    await asyncio.gather(*(step(r) for step in scripts))
                    await asyncio.sleep(PERIOD_S)

            async def drive_honest():
                r = 0
                while True:
                    r += 1
                    await honest_step(r)
                    await asyncio.sleep(HONEST_PERIOD_S)

            honest_driver = asyncio.create_task(drive_honest())
            await asyncio.sleep(HONEST_PERIOD_S)
            driver = asyncio.create_task(drive())
            await asyncio.sleep(2 * PERIOD_S)
            await asyncio.gather(a.run(), b.run())
            driver.cancel()
            honest_driver.cancel()
            return a, b, peers, attacks, sybil_ids
        finally:
            for p in peers.values():
                await p.shutdown()
            await a.stop()
            await b.stop()

    a, b, peers, attacks, sybil_ids = asyncio.run(main())
    report, cross_accepted = {}, {}
    for node, other in ((a, b), (b, a)):
        rows = [json.loads(line) for line in (node.out_dir / "metrics.jsonl").read_text().splitlines()]
        trust = node.collector.trust
        print("rounds:", [(r["loss"], r["external_groups_used"], r["external_groups_available"], r["collect_s"])
                          for r in rows], "H:", dict(trust.rejects_by_peer.get(peers["honest"].peer_id, {})),
              node.collector.accepted_by_peer[peers["honest"].peer_id])
        names = {p.peer_id: n for n, p in peers.items()}
        print("stores failed:", {n: p.stores_failed for n, p in peers.items() if p.stores_failed})
        print("never announced:", [names[p] for p in names if p not in node.collector.peers_announced],
              "never tried:", [names[p] for p in names if not node.collector.admission.tries[p]],
              "tries:", {names.get(p, p[:6]): c for p, c in node.collector.admission.tries.items()})
        # 1. the honest node kept running and training
        assert [r["round"] for r in rows] == list(range(1, ROUNDS + 1))
        # (round 1 may miss the honest scripted peer: the Sybil flood can push a newcomer to a later round)
        assert all(r["loss"] is not None for r in rows[1:]), [
            (r["loss"], r["external_groups_used"], r["external_groups_available"], r["peers_seen"], r["collect_s"])
            for r in rows] + [dict(node.collector.accepted_by_peer), dict(trust.rejects)]
        # 2. honest rollouts still arrived and were used
        assert all(r["external_groups_used"] > 0 for r in rows[1:])
        assert node.collector.accepted_by_peer[peers["honest"].peer_id] >= 4
        cross_accepted[node.peer_id] = node.collector.accepted_by_peer[other.peer_id]
        assert peers["honest"].peer_id not in trust.banned_peers and other.peer_id not in trust.banned_peers
        # honest sources commit no protocol violation (a fetch may time out on this busy 2-core box: churn, no strike)
        for honest_id in (peers["honest"].peer_id, other.peer_id):
            assert not set(trust.rejects_by_peer.get(honest_id, {})) & VIOLATIONS, dict(trust.rejects_by_peer[honest_id])
        # 3. every attack was rejected under its reason, and none of its groups was used
        for name, reason in attacks.items():
            attacker = peers[name].peer_id
            assert trust.rejects_by_peer[attacker][reason] >= 1, (name, dict(trust.rejects_by_peer[attacker]))
            if name != "duplicate":
                assert node.collector.accepted_by_peer[attacker] == 0, name
        records = peers["records"]
        for sybil_id, reason in zip(sybil_ids, ["malformed", "schema", "too_large", "version", "stale", "future"]):
            assert trust.rejects_by_peer[sybil_id][reason] >= 1, (reason, dict(trust.rejects_by_peer[sybil_id]))
        assert trust.rejects_by_peer[records.peer_id]["owner_mismatch"] >= 1
        assert trust.rejects["bad_signature"] >= 1
        assert trust.rejects["flood"] >= 1
        assert trust.rejects["banned_peer"] >= 1 and peers["malformed"].peer_id in trust.banned_peers
        report[node.peer_id] = dict(trust.rejects)
    # the honest nodes' own rollouts crossed too (in at least one direction: on a loaded 2-core machine a fetch
    # between the two in-process nodes can time out, which is churn, never a strike)
    assert sum(cross_accepted.values()) > 0, cross_accepted
    assert "ignoring peer" in caplog.text
    print("reject counts per honest node:", json.dumps(report, indent=1))
