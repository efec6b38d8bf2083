"""Publishing and collecting rollouts: a signed manifest index in the DHT, payloads over libp2p streams.

Why two paths (docs/hivemind.md section 2): a DHT value is one message capped at 4 MiB that silently
vanishes above the cap, lives only in RAM on several replicas and crashed hivemind's processes when large.
So the DHT holds only a small per-peer, per-round `Manifest`, and the rollout bytes move peer-to-peer over
a libp2p stream, checked against the manifest's size and sha256.

DHT layout (protocols/PROTOCOL.md): key `"{swarm}/v1/rollouts/{shard}"`, shard = first byte of
sha256(peer ID) mod num_shards, subkey = the publisher's owner marker `[owner:<RSA public key>]`, value =
msgpack Manifest of the publisher's *latest* round, signed by RSASignatureValidator. Every node keeps its own
round counter, and counters of nodes that joined at different times differ by any amount, so keys never
contain a round: a reader reads each peer's latest manifest and judges freshness on the DHT clock. Sharding
keeps every DHT value small (about 32 manifests with the shard-count rule), and a poll reads only the shards it
is given (network/sampling.py chooses them), so a node's reads do not grow with the swarm.

Every failure of a peer is a normal return value here: `fetch` raises `FetchError(reason)` which the node
counts; nothing from a peer is trusted before `wire.decode_*` and the node's re-scoring.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import multiprocessing
import re
from collections import OrderedDict

from hivemind import DHT
from hivemind.utils import get_dht_time
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.p2p import P2P, PeerID

from swarm_node.learning.settings import pick
from swarm_node.network import wire
from swarm_node.network.identity import peer_id_from_public_key

log = logging.getLogger(__name__)

STREAM_PROTOCOL = "/swarm-node/rollouts/1"
HEADER_BYTES = 8  # big-endian payload length, as hivemind's P2P.send_raw_data
_OWNER_RE = re.compile(RSASignatureValidator.PUBLIC_KEY_REGEX)


@dataclasses.dataclass(frozen=True)
class Rejection:
    """A dropped record: a countable reason, the signer's peer ID when known, and a detail for debug logs."""

    reason: str
    peer_id: str | None
    detail: str = ""
    record_id: bytes = b""  # sha256 of the record, so a record read on every poll is counted once


class RecordError(Exception):
    def __init__(self, reason: str, signer: str | None, detail: str = ""):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.signer, self.detail = reason, signer, detail


class FetchError(Exception):
    """A payload could not be fetched or did not match its manifest. `reason` is a countable code."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


class CountingSignatureValidator(RSASignatureValidator):
    """hivemind's RSASignatureValidator that also counts records failing the signature check.

    hivemind validates in the DHT's child process and drops bad records silently; the count lives in shared
    memory (created before the DHT process forks) so the node can report `bad_signature` rejections.
    """

    def __init__(self, private_key):
        super().__init__(private_key)
        self._invalid = multiprocessing.Value("q", 0)
        self._seen_invalid: set[bytes] = set()  # lives in the DHT process

    def validate(self, record) -> bool:
        ok = super().validate(record)
        if not ok:
            digest = hashlib.sha256(record.key + record.subkey + record.value).digest()
            if digest not in self._seen_invalid:  # a record read again on every poll counts once
                if len(self._seen_invalid) > 100_000:
                    self._seen_invalid.clear()
                self._seen_invalid.add(digest)
                with self._invalid.get_lock():
                    self._invalid.value += 1
        return ok

    @property
    def invalid_signatures(self) -> int:
        return self._invalid.value


def rollout_key(swarm_name: str, shard: int) -> str:
    return f"{swarm_name}/v{wire.PROTOCOL_MAJOR}/rollouts/{shard}"


def shard_of(peer_id: str, num_shards: int) -> int:
    """The shard of a peer's manifest: sha256(peer ID)[0] mod S for S <= 256 (the 1.0 rule), else the first four
    digest bytes as a little-endian integer mod S. For powers of two the rules agree on the low bits, so going
    from S to 2S splits every shard in two (protocols/PROTOCOL.md, DHT layout)."""
    digest = hashlib.sha256(peer_id.encode()).digest()
    if num_shards <= 256:
        return digest[0] % num_shards
    return int.from_bytes(digest[:4], "little") % num_shards


@dataclasses.dataclass(frozen=True)
class ExchangeSettings:
    """The settings the exchange reads (same names, units and meaning as the network section of
    the node config, config.py)."""

    swarm_name: str
    num_shards: int
    publish_ttl_s: float
    dht_timeout_s: float
    fetch_timeout_s: float


def publish_key(config, peer_id: str) -> str:
    """The DHT key a peer publishes its manifest under (`config`: anything with `swarm_name` and `num_shards`)."""
    return rollout_key(config.swarm_name, shard_of(peer_id, config.num_shards))


def manifest_for(payload: wire.RolloutPayload, data: bytes, peer_id: str) -> wire.Manifest:
    """The manifest `peer_id` announces `payload` (encoded as `data`) with, stamped with the DHT clock now."""
    return wire.Manifest(version=wire.PROTOCOL_VERSION, peer_id=peer_id, round=payload.round,
                         policy_version=payload.policy_version, model=payload.model, num_groups=len(payload.groups),
                         num_completions=sum(len(g.completions) for g in payload.groups), payload_bytes=len(data),
                         payload_sha256=wire.sha256(data), created_at_s=get_dht_time())


def payload_for(manifest: wire.Manifest, data: bytes, max_payload_bytes: int) -> wire.RolloutPayload:
    """Decode fetched bytes and check them against their manifest (hash, schema, peer, round, policy version,
    model, group count). Raises FetchError (`hash_mismatch`, a `wire.WireError` reason, `manifest_mismatch`)."""
    if wire.sha256(data) != manifest.payload_sha256:
        raise FetchError("hash_mismatch")
    try:
        payload = wire.decode_payload(data, max_payload_bytes)
    except wire.WireError as e:
        raise FetchError(e.reason, e.detail) from None
    if (payload.peer_id, payload.round, payload.policy_version, payload.model) != (
            manifest.peer_id, manifest.round, manifest.policy_version, manifest.model):
        raise FetchError("manifest_mismatch", "payload peer, round, policy version or model differs from its manifest")
    if len(payload.groups) != manifest.num_groups:
        raise FetchError("manifest_mismatch", "group count differs from its manifest")
    return payload


class RolloutExchange:
    """Publishes this node's rounds and collects peers' manifests and payloads.

    Args:
        dht: a running hivemind DHT created with `validator` among its record validators.
        p2p: a P2P replica of the DHT's daemon in this process (serves the rollout stream).
        validator: the RSASignatureValidator built from the node's identity key.
        config: `ExchangeSettings`, or any object with its fields (the node's network section; learning/settings.py).
        keep_rounds: how many of this node's own payloads stay available to peers.
    """

    def __init__(self, dht: DHT, p2p: P2P, validator: RSASignatureValidator, config, keep_rounds: int = 8):
        self.dht, self.p2p, self.validator, self.config = dht, p2p, validator, pick(ExchangeSettings, config)
        self.peer_id = p2p.peer_id.to_base58()
        self._payloads: OrderedDict[int, bytes] = OrderedDict()
        self._keep_rounds = keep_rounds
        self.bytes_out = 0
        self.bytes_in = 0
        self.records_read = 0  # records read by the last poll

    async def start(self) -> None:
        await self.p2p.add_binary_stream_handler(STREAM_PROTOCOL, self._serve)

    async def stop(self) -> None:
        try:
            await asyncio.wait_for(self.p2p.remove_binary_stream_handler(STREAM_PROTOCOL), 2.0)
        except Exception as e:  # the daemon may already be gone during shutdown
            log.debug("removing stream handler failed: %s", e)
        await self.p2p.shutdown()

    # ------------------------------------------------------------------ publishing
    async def publish(self, payload: wire.RolloutPayload) -> bool:
        """Keep the payload for serving and store its signed manifest in the DHT. Returns whether the store succeeded."""
        data = wire.encode(payload)
        self._payloads[payload.round] = data
        while len(self._payloads) > self._keep_rounds:
            self._payloads.popitem(last=False)
        manifest = manifest_for(payload, data, self.peer_id)
        key = publish_key(self.config, self.peer_id)
        future = self.dht.store(
            key, wire.encode(manifest), get_dht_time() + self.config.publish_ttl_s,
            subkey=self.validator.local_public_key, return_future=True,
        )
        try:
            return bool(await asyncio.wait_for(future, self.config.dht_timeout_s))
        except (asyncio.TimeoutError, Exception) as e:
            log.warning("publishing round %d manifest failed: %r", payload.round, e)
            return False

    async def _serve(self, stream_info, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Stream handler: read a FetchRequest, answer with a length-prefixed payload (length 0: not available)."""
        try:
            header = await asyncio.wait_for(reader.readexactly(HEADER_BYTES), self.config.fetch_timeout_s)
            length = int.from_bytes(header, "big")
            if length > 256:
                return
            request = wire.decode_request(await asyncio.wait_for(reader.readexactly(length), self.config.fetch_timeout_s))
            data = self._payloads.get(request.round, b"")
            writer.write(len(data).to_bytes(HEADER_BYTES, "big"))
            for offset in range(0, len(data), 1 << 16):
                writer.write(data[offset : offset + (1 << 16)])
            await writer.drain()
            self.bytes_out += len(data)
        except (asyncio.TimeoutError, asyncio.IncompleteReadError, ConnectionError, wire.WireError) as e:
            log.debug("bad rollout request from %s: %r", getattr(stream_info, "peer_id", "?"), e)
        finally:
            writer.close()

    # ------------------------------------------------------------------ collecting
    async def poll(self, shards: list[int] | None = None) -> tuple[list[wire.Manifest], list[Rejection]]:
        """Read the given shards (default: every shard): the latest manifest of every peer in them.

        Returns (valid manifests of other peers, rejected records). A rejection names the signer's peer ID when
        the record carried a well-formed owner marker (the signature itself was checked by hivemind).
        `records_read` holds the number of records the last poll read (own record included).
        """
        shards = range(self.config.num_shards) if shards is None else shards
        keys = [rollout_key(self.config.swarm_name, s) for s in shards]
        results = await asyncio.gather(*(self._get(k) for k in keys))
        manifests, rejections = [], []
        self.records_read = sum(len(r or {}) for r in results)
        for result in results:
            for subkey, item in (result or {}).items():
                try:
                    manifest = self._check_record(subkey, item.value)
                except RecordError as e:
                    record_id = hashlib.sha256(repr(subkey).encode() + repr(item.value).encode()).digest()
                    rejections.append(Rejection(e.reason, e.signer, e.detail, record_id))
                    continue
                if manifest.peer_id != self.peer_id:
                    manifests.append(manifest)
        return manifests, rejections

    async def _get(self, key: str) -> dict | None:
        try:
            found = await asyncio.wait_for(self.dht.get(key, latest=True, return_future=True), self.config.dht_timeout_s)
        except Exception as e:
            log.debug("DHT get %s failed: %r", key, e)
            return None
        if found is None or not isinstance(found.value, dict):
            return None
        return found.value

    @staticmethod
    def _check_record(subkey, value) -> wire.Manifest:
        """Decode a manifest whose owner key must derive the claimed peer ID. Raises RecordError."""
        owners = _OWNER_RE.findall(subkey) if isinstance(subkey, bytes) else []
        if len(owners) != 1:
            raise RecordError("unsigned", None, "record has no owner marker")
        try:
            signer = peer_id_from_public_key(owners[0]).to_base58()
        except Exception:
            raise RecordError("unsigned", None, "owner marker is not an RSA key") from None
        if not isinstance(value, bytes):
            raise RecordError("malformed", signer, "manifest value is not bytes")
        try:
            manifest = wire.decode_manifest(value)
        except wire.WireError as e:
            raise RecordError(e.reason, signer, e.detail) from None
        if signer != manifest.peer_id:
            raise RecordError("owner_mismatch", signer, f"record signed by {signer} claims {manifest.peer_id}")
        return manifest

    async def fetch(self, manifest: wire.Manifest, max_payload_bytes: int) -> wire.RolloutPayload:
        """Fetch and check a peer's payload for a manifest within `fetch_timeout_s`.

        Raises:
            FetchError: unreachable peer, timeout, size or hash mismatch, or a payload that fails to decode
                or does not belong to the manifest.
        """
        if manifest.payload_bytes > max_payload_bytes:
            raise FetchError("too_large", f"announced {manifest.payload_bytes} bytes")
        try:
            data = await asyncio.wait_for(self._download(manifest), self.config.fetch_timeout_s)
        except asyncio.TimeoutError:
            raise FetchError("fetch_timeout") from None
        except FetchError:
            raise
        except (asyncio.IncompleteReadError, ConnectionError) as e:
            raise FetchError("stream_error", repr(e)[:200]) from None
        except Exception as e:
            raise FetchError("unreachable", repr(e)[:200]) from None
        return payload_for(manifest, data, max_payload_bytes)

    async def _download(self, manifest: wire.Manifest) -> bytes:
        _, reader, writer = await self.p2p.call_binary_stream_handler(PeerID.from_base58(manifest.peer_id), STREAM_PROTOCOL)
        try:
            request = wire.encode(wire.FetchRequest(version=wire.PROTOCOL_VERSION, round=manifest.round))
            writer.write(len(request).to_bytes(HEADER_BYTES, "big") + request)
            await writer.drain()
            length = int.from_bytes(await reader.readexactly(HEADER_BYTES), "big")
            if length == 0:
                raise FetchError("not_available", "peer no longer serves that round")
            if length != manifest.payload_bytes:
                raise FetchError("size_mismatch", f"stream announces {length}, manifest {manifest.payload_bytes}")
            data = await reader.readexactly(length)
            self.bytes_in += len(data)
            return data
        finally:
            writer.close()
