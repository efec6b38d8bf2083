"""The rollout exchange over real hivemind DHT peers on 127.0.0.1: signed manifests, streams, failures."""

import asyncio
import time

import pytest

import swarm_node.network  # noqa: F401  (applies the hivemind pipe fix before any DHT exists)
from hivemind import DHT
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.utils import get_dht_time

from swarm_node.config import NetworkConfig
from swarm_node.network import wire
from swarm_node.network.exchange import FetchError, RolloutExchange, rollout_key, shard_of
from swarm_node.network.identity import load_or_create_identity

pytestmark = pytest.mark.slow


def payload(peer_id, round_, n_groups=2):
    groups = [wire.WireGroup(
        spec=wire.WireTaskSpec(dataset="chain_sum", config={}, seed=0, index=i, size=100, rg_version="0.1.25"),
        completions=[f"<answer>{i}</answer>", "x"], rewards=[0.0, 0.0]) for i in range(n_groups)]
    return wire.RolloutPayload(version=wire.PROTOCOL_VERSION, peer_id=peer_id, round=round_, policy_version=0,
                               model="tiny", groups=groups)


async def make_peer(tmp_path, name, initial_peers, config):
    identity = load_or_create_identity(tmp_path / f"{name}.key")
    validator = RSASignatureValidator(identity.private_key)
    loop = asyncio.get_running_loop()
    dht = await loop.run_in_executor(None, lambda: DHT(
        start=True, initial_peers=initial_peers, host_maddrs=["/ip4/127.0.0.1/tcp/0"],
        identity_path=str(identity.path), record_validators=[validator]))
    exchange = RolloutExchange(dht, await dht.replicate_p2p(), validator, config)
    await exchange.start()
    return dht, exchange


async def shutdown(peers):
    for dht, exchange in peers:
        await exchange.stop()
        dht.shutdown()


def test_publish_poll_fetch_and_failures(tmp_path, reap_children):
    config = NetworkConfig(num_shards=4, fetch_timeout_s=3, dht_timeout_s=5)

    async def main():
        a = await make_peer(tmp_path, "a", None, config)
        maddrs = [str(m) for m in a[0].get_visible_maddrs()]
        b = await make_peer(tmp_path, "b", maddrs, config)
        c = await make_peer(tmp_path, "c", maddrs, config)
        peers = [a, b, c]
        try:
            (dht_a, ex_a), (dht_b, ex_b), (dht_c, ex_c) = peers
            assert await ex_a.publish(payload(ex_a.peer_id, 1))
            assert await ex_c.publish(payload(ex_c.peer_id, 1, n_groups=3))
            manifests, rejects = await ex_b.poll()
            assert sorted(m.peer_id for m in manifests) == sorted([ex_a.peer_id, ex_c.peer_id])
            assert rejects == []
            by_peer = {m.peer_id: m for m in manifests}
            got = await ex_b.fetch(by_peer[ex_a.peer_id], 1 << 20)
            assert got == payload(ex_a.peer_id, 1)
            assert ex_b.bytes_in == by_peer[ex_a.peer_id].payload_bytes

            # c signs a record with its own key but claims to be a: rejected as owner_mismatch
            forged = by_peer[ex_a.peer_id].model_copy(update={"round": 2})
            key = rollout_key(config.swarm_name, shard_of(ex_a.peer_id, config.num_shards))
            # c's own manifest is stored under the same subkey when a and c share a shard (1 in num_shards), and
            # the DHT keeps the later expiration: outlive it so the forged record always replaces it
            expiration = get_dht_time() + 2 * config.publish_ttl_s
            assert dht_c.store(key, wire.encode(forged), expiration, subkey=ex_c.validator.local_public_key)
            manifests, rejects = await ex_b.poll()
            assert [(r.reason, r.peer_id) for r in rejects] == [("owner_mismatch", ex_c.peer_id)]
            # the peer's next round replaces its previous manifest (one record per peer)
            assert await ex_a.publish(payload(ex_a.peer_id, 2))
            manifests, _ = await ex_b.poll()
            assert {m.peer_id: m.round for m in manifests}[ex_a.peer_id] == 2
            assert ex_b.bytes_in == by_peer[ex_a.peer_id].payload_bytes

            # announced hash does not match the bytes served
            bad_hash = by_peer[ex_a.peer_id].model_copy(update={"payload_sha256": b"\0" * 32})
            with pytest.raises(FetchError) as e:
                await ex_b.fetch(bad_hash, 1 << 20)
            assert e.value.reason == "hash_mismatch"
            # announced size differs from the stream's
            bad_size = by_peer[ex_a.peer_id].model_copy(update={"payload_bytes": 10})
            with pytest.raises(FetchError) as e:
                await ex_b.fetch(bad_size, 1 << 20)
            assert e.value.reason == "size_mismatch"
            # over the reader's cap: refused before any byte moves
            with pytest.raises(FetchError) as e:
                await ex_b.fetch(by_peer[ex_a.peer_id], 100)
            assert e.value.reason == "too_large"
            # a round the peer does not serve
            with pytest.raises(FetchError) as e:
                await ex_b.fetch(by_peer[ex_a.peer_id].model_copy(update={"round": 9}), 1 << 20)
            assert e.value.reason == "not_available"

            # a dead peer costs at most fetch_timeout_s and is a normal failure
            dead = by_peer[ex_c.peer_id]
            await ex_c.stop()
            dht_c.shutdown()
            peers.remove(c)
            t0 = time.monotonic()
            with pytest.raises(FetchError) as e:
                await ex_b.fetch(dead, 1 << 20)
            assert e.value.reason in {"unreachable", "fetch_timeout"}
            assert time.monotonic() - t0 < config.fetch_timeout_s + 2
        finally:
            await shutdown(peers)

    asyncio.run(main())
