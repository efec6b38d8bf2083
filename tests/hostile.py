"""Test helper: scripted peers that speak the swarm protocol on a real hivemind DHT, honestly or not.

A `ScriptedPeer` is a real libp2p peer (its own p2pd daemon) with a real `DHTNode` in the test's event loop.
It publishes manifests it chooses (signed with any of its keys, or forged) and answers rollout fetches with
whatever bytes its `serve` behaviour returns. Nothing here is mocked: the honest nodes under test talk to it
over the same DHT and libp2p streams as to any other peer.
"""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path
from typing import Awaitable, Callable

from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.node import DHTNode
from hivemind.dht.validation import DHTRecord, RecordValidatorBase
from hivemind.p2p import P2P
from hivemind.utils import get_dht_time

from swarm_node.learning.tasks import TaskSet, recreate, score
from swarm_node.network import wire
from swarm_node.network.exchange import HEADER_BYTES, STREAM_PROTOCOL, rollout_key, shard_of
from swarm_node.network.identity import load_or_create_identity

# serve(request_round) -> raw bytes to write on the stream (header included), or None to just close
ServeFn = Callable[[asyncio.StreamReader, asyncio.StreamWriter, int], Awaitable[None]]


class AnyKeySigner(RecordValidatorBase):
    """Signs a record with whichever of its keys owns the subkey; accepts everything (a hostile peer's view)."""

    def __init__(self, validators: list[RSASignatureValidator]):
        self.validators = validators

    def validate(self, record: DHTRecord) -> bool:
        return True

    def sign_value(self, record: DHTRecord) -> bytes:
        for v in self.validators:
            if v.local_public_key in record.subkey:
                return v.sign_value(record)
        if b"[owner:" in record.subkey:  # someone else's marker: append a made-up signature
            return record.value + b"[signature:" + b"Zm9yZ2Vk" * 43 + b"]"
        return record.value

    def strip_value(self, record: DHTRecord) -> bytes:
        return self.validators[0].strip_value(record)  # drops any [signature:...] suffix


def framed(data: bytes, announced: int | None = None) -> bytes:
    return (len(data) if announced is None else announced).to_bytes(HEADER_BYTES, "big") + data


class ScriptedPeer:
    """A peer with its own identity, p2pd and DHTNode. Create with `await ScriptedPeer.create(...)`."""

    def __init__(self):
        self.payloads: dict[int, bytes] = {}
        self.serve: ServeFn | None = None
        self.fetches = 0
        self.stores_ok = self.stores_failed = 0

    @classmethod
    async def create(cls, key_path: Path, initial_peers: list[str], swarm_name: str = "sapo",
                     extra_keys: int = 0) -> "ScriptedPeer":
        self = cls()
        self.swarm_name = swarm_name
        identity = load_or_create_identity(key_path)
        self.peer_id = identity.peer_id.to_base58()
        self.validator = RSASignatureValidator(identity.private_key)
        self.sybils = [RSASignatureValidator(load_or_create_identity(key_path.with_suffix(f".sybil{i}")).private_key)
                       for i in range(extra_keys)]
        self.p2p = await P2P.create(initial_peers=initial_peers, host_maddrs=["/ip4/127.0.0.1/tcp/0"],
                                    identity_path=str(identity.path), check_if_identity_free=False)
        self.dht = await DHTNode.create(p2p=self.p2p, initial_peers=initial_peers, num_replicas=20,
                                        record_validator=AnyKeySigner([self.validator, *self.sybils]))
        await self.p2p.add_binary_stream_handler(STREAM_PROTOCOL, self._handle)
        return self

    async def shutdown(self) -> None:
        await self.dht.shutdown()
        await self.p2p.shutdown()

    # ------------------------------------------------------------------ serving
    async def _handle(self, info, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.fetches += 1
        try:
            length = int.from_bytes(await reader.readexactly(HEADER_BYTES), "big")
            request = wire.decode_request(await reader.readexactly(length))
            if self.serve is not None:
                await self.serve(reader, writer, request.round)
            else:
                writer.write(framed(self.payloads.get(request.round, b"")))
                await writer.drain()
        except Exception:
            pass
        finally:
            writer.close()

    # ------------------------------------------------------------------ publishing
    def manifest_for(self, round_: int, data: bytes, **override) -> wire.Manifest:
        fields = dict(version=wire.PROTOCOL_VERSION, peer_id=self.peer_id, round=round_, policy_version=0,
                      model="scripted", num_groups=1, num_completions=2, payload_bytes=len(data),
                      payload_sha256=wire.sha256(data), created_at_s=get_dht_time())
        try:
            decoded = wire.decode_payload(data, 1 << 24)
            fields.update(num_groups=len(decoded.groups), num_completions=sum(len(g.completions) for g in decoded.groups))
        except wire.WireError:
            pass
        fields.update(override)
        return wire.Manifest.model_construct(**fields)

    async def store_manifest(self, value: bytes, num_shards: int, *, as_peer: str | None = None,
                             signer: RSASignatureValidator | None = None) -> bool:
        """Store raw manifest bytes under the shard of `as_peer` (default: self), signed by `signer` (default: own key)."""
        signer = signer or self.validator
        key = rollout_key(self.swarm_name, shard_of(as_peer or self.peer_id, num_shards))
        for _ in range(3):  # the test process is busy: retry a store that reached no replica
            if await self.dht.store(key, value, get_dht_time() + 3600, subkey=signer.local_public_key):
                self.stores_ok += 1
                return True
        self.stores_failed += 1
        return False

    async def publish(self, round_: int, data: bytes, num_shards: int, **manifest_override) -> bool:
        """Serve `data` for the round and announce it with a (possibly doctored) manifest."""
        self.payloads[round_] = data
        manifest = self.manifest_for(round_, data, **manifest_override)
        return await self.store_manifest(wire.encode(manifest), num_shards)


def honest_payload(peer_id: str, round_: int, taskset: TaskSet, indices: range, num_completions: int = 4,
                   **group_override) -> wire.RolloutPayload:
    """A payload an honest peer would send: one correct and several wrong answers per question, verifier rewards."""
    groups = []
    for i in indices:
        spec = dataclasses.replace(taskset.draw(__import__("random").Random(i)), index=i)
        question = recreate(spec)
        texts = [f"<answer>{question.answer}</answer>"] + [f"<answer>wrong{k}</answer>" for k in range(num_completions - 1)]
        rewards = [score(question, t) for t in texts]  # true rewards (some tasks give partial credit)
        fields = dict(spec=wire.WireTaskSpec(dataset=spec.dataset, config=spec.config, seed=spec.seed,
                                             index=spec.index, size=spec.size, rg_version=spec.rg_version),
                      completions=texts, rewards=rewards)
        fields.update(group_override)
        groups.append(wire.WireGroup.model_construct(**fields))
    return wire.RolloutPayload.model_construct(version=wire.PROTOCOL_VERSION, peer_id=peer_id, round=round_,
                                               policy_version=0, model="scripted", groups=groups)
