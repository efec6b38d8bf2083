"""The wire protocol in one place: typed, frozen message structs and their msgpack codec.

Messages that cross the network (spec: protocols/PROTOCOL.md):
- `Manifest`: a small per-peer, per-round record stored in the DHT (signed by the publisher through
  hivemind's RSASignatureValidator). It announces how many groups a peer published and the sha256 and size
  of the payload.
- `RolloutPayload`: the round's groups, moved over a libp2p stream from the publisher to each reader.
- `MergeGather`: what a peer tells its averaging group when a merge starts (hivemind's `gather`): the
  checksums of the tensors it contributes, so every member can verify the result (network/merging/).
- `MergeStateInfo`: the metadata that comes with a peer's merged state when another peer downloads it.

Versioning: every message carries `version = [major, minor]`. Decoders ignore unknown fields, default
missing optional fields, and reject another major version. Nothing is ever pickled.

`decode_*` raise `WireError(reason)` with a short reason code that the node counts per reason.
"""

from __future__ import annotations

import hashlib
import math
from typing import Annotated, Any

import msgpack
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictFloat, StrictInt, StrictStr, ValidationError, field_validator
from pydantic import model_serializer

PROTOCOL_MAJOR = 1
PROTOCOL_MINOR = 1  # 1.1: optional WireGroup.logprobs / tokenizer_sha256 (off-policy correction)
PROTOCOL_VERSION = (PROTOCOL_MAJOR, PROTOCOL_MINOR)

# Hard limits of protocol v1 (a receiver may set tighter ones).
MAX_MANIFEST_BYTES = 1024
MAX_GROUPS_PER_PAYLOAD = 64
MAX_COMPLETIONS_PER_GROUP = 64
MAX_COMPLETION_CHARS = 8192
MAX_NAME_CHARS = 128
MAX_CONFIG_BYTES = 2048
MAX_MERGE_SEGMENTS = 256  # checksum segments per merge (tensors are grouped to at most this many)
MAX_MERGE_MESSAGE_BYTES = 16 * 1024
MAX_LOGPROB_TOKENS = 4096  # per completion (the largest max_new_tokens)
MAX_ABS_LOGPROB = 100.0  # a claimed log-prob lies in [-100, 0]


class WireError(Exception):
    """A message that must be dropped. `reason` is a short, countable code (e.g. "malformed", "schema")."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail = reason, detail


class _Message(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore", strict=True)

    version: tuple[StrictInt, StrictInt]

    @field_validator("version")
    @classmethod
    def _major(cls, v: tuple[int, int]) -> tuple[int, int]:
        if v[0] != PROTOCOL_MAJOR:
            raise ValueError(f"major version {v[0]} != {PROTOCOL_MAJOR}")
        return v


Name = Annotated[StrictStr, Field(min_length=1, max_length=MAX_NAME_CHARS)]
NonNegInt = Annotated[StrictInt, Field(ge=0, lt=2**63)]


class Manifest(_Message):
    """Per-peer, per-round DHT record announcing a rollout payload.

    Fields: peer_id (base58), round, policy_version (optimizer steps), model (name), num_groups,
    num_completions (total over groups), payload_bytes, payload_sha256 (32 bytes), created_at_s (unix time).
    """

    peer_id: Name
    round: NonNegInt
    policy_version: NonNegInt
    model: Name
    num_groups: Annotated[StrictInt, Field(ge=0, le=MAX_GROUPS_PER_PAYLOAD)]
    num_completions: Annotated[StrictInt, Field(ge=0, le=MAX_GROUPS_PER_PAYLOAD * MAX_COMPLETIONS_PER_GROUP)]
    payload_bytes: NonNegInt
    payload_sha256: Annotated[bytes, Field(min_length=32, max_length=32)]
    created_at_s: StrictFloat = 0.0


class WireTaskSpec(BaseModel):
    """A task spec on the wire (see learning.tasks.TaskSpec)."""

    model_config = ConfigDict(frozen=True, extra="ignore", strict=True)

    dataset: Name
    config: dict[StrictStr, Any]
    seed: StrictInt
    index: NonNegInt
    size: Annotated[StrictInt, Field(gt=0)]
    rg_version: Name

    @field_validator("config")
    @classmethod
    def _small_config(cls, v: dict[str, Any]) -> dict[str, Any]:
        if len(msgpack.packb(v)) > MAX_CONFIG_BYTES:
            raise ValueError(f"config over {MAX_CONFIG_BYTES} bytes")
        return v


class WireGroup(BaseModel):
    """One question group: its task spec, L completion texts and the publisher's claimed rewards."""

    model_config = ConfigDict(frozen=True, extra="ignore", strict=True)

    spec: WireTaskSpec
    completions: Annotated[
        list[Annotated[StrictStr, Field(max_length=MAX_COMPLETION_CHARS)]],
        Field(min_length=2, max_length=MAX_COMPLETIONS_PER_GROUP),
    ]
    rewards: list[StrictFloat]
    # v1.1 (optional): the generator's per-token log-probs of each completion ([] = unknown for that completion)
    # and the sha256 (hex) of its tokenizer (see PROTOCOL.md "Generator log-probs").
    logprobs: Annotated[
        list[Annotated[list[Annotated[StrictFloat, Field(ge=-MAX_ABS_LOGPROB, le=0.0, allow_inf_nan=False)]],
                       Field(max_length=MAX_LOGPROB_TOKENS)]],
        Field(max_length=MAX_COMPLETIONS_PER_GROUP),
    ] | None = None
    tokenizer_sha256: Annotated[StrictStr, Field(pattern=r"^([0-9a-f]{64})?$")] = ""

    @field_validator("rewards")
    @classmethod
    def _finite(cls, v: list[float]) -> list[float]:
        if not all(math.isfinite(r) for r in v):
            raise ValueError("non-finite reward")
        return v

    def model_post_init(self, __context: Any) -> None:
        if len(self.rewards) != len(self.completions):
            raise ValueError("rewards and completions differ in length")
        if self.logprobs is not None and len(self.logprobs) != len(self.completions):
            raise ValueError("logprobs and completions differ in length")

    @model_serializer(mode="wrap")
    def _omit_unset_v11(self, handler):
        """The v1.1 fields are written only when set, so a group without log-probs encodes exactly as in v1.0."""
        data = handler(self)
        if data.get("logprobs") is None:
            data.pop("logprobs", None)
            data.pop("tokenizer_sha256", None)
        return data


class RolloutPayload(_Message):
    """All groups a peer published for one round; moved over a libp2p stream."""

    peer_id: Name
    round: NonNegInt
    policy_version: NonNegInt
    model: Name
    groups: Annotated[list[WireGroup], Field(max_length=MAX_GROUPS_PER_PAYLOAD)]


class FetchRequest(_Message):
    """Reader -> publisher on the rollout stream: send me your payload for `round`."""

    round: NonNegInt


FiniteFloat = Annotated[StrictFloat, Field(allow_inf_nan=False)]
Fingerprint = Annotated[StrictStr, Field(pattern=r"^[0-9a-f]{64}$")]


def _pairs(v: list[float]) -> list[float]:
    if len(v) % 2:
        raise ValueError("checksums come in (sum, alternating sum) pairs")
    return v


Checksums = Annotated[list[FiniteFloat], Field(min_length=2, max_length=2 * MAX_MERGE_SEGMENTS), AfterValidator(_pairs)]


class MergeGather(_Message):
    """A peer's contribution to one averaging round, sent to every group member before the all-reduce.

    `sums` holds two float64 linear checksums per segment of the averaged tensors (the plain sum and the
    alternating-sign sum, flattened as [s0, a0, s1, a1, ...]); the mean of the members' sums, weighted by
    `weight`, is what every member's averaged tensors must sum to. `anchor` is the (sum, L2 norm) of the
    weights at the last sync (diloco only). `priority` is the peer's state-sharing priority (verified merges
    plus a tie-breaker), `optimizer_step` its AdamW step count.
    """

    mode: Name
    fingerprint: Fingerprint
    sums: Checksums
    weight: Annotated[FiniteFloat, Field(gt=0, le=1e6)] = 1.0
    anchor: Annotated[list[FiniteFloat], Field(max_length=2)] = []
    merges: NonNegInt = 0
    priority: FiniteFloat = 0.0
    optimizer_step: NonNegInt = 0


class MergeStateInfo(_Message):
    """Metadata of a peer's shared state (the weights at its last verified merge, plus the DiLoCo momentum).

    `sums` are the checksums (as in MergeGather) of the tensors that follow it, so the downloader can check
    that it received what the peer meant to send.
    """

    mode: Name
    fingerprint: Fingerprint
    merges: NonNegInt
    sums: Checksums


def encode(message: BaseModel) -> bytes:
    """msgpack encoding of a message (maps with string keys, bytes as bin, tuples as arrays)."""
    return msgpack.packb(message.model_dump(mode="python"), use_bin_type=True)


def _decode(cls: type[BaseModel], data: bytes, max_bytes: int) -> Any:
    if len(data) > max_bytes:
        raise WireError("too_large", f"{len(data)} bytes > {max_bytes}")
    try:
        raw = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except Exception as e:  # msgpack raises several types on garbage
        raise WireError("malformed", str(e)[:200]) from None
    if not isinstance(raw, dict):
        raise WireError("malformed", "top level is not a map")
    version = raw.get("version")
    if isinstance(version, list) and len(version) == 2 and isinstance(version[0], int) and version[0] != PROTOCOL_MAJOR:
        raise WireError("version", f"major version {version[0]}")
    if isinstance(version, list):
        raw["version"] = tuple(version)
    try:
        return cls.model_validate(raw)
    except ValidationError as e:
        raise WireError("schema", str(e.errors()[0]["loc"]) + " " + e.errors()[0]["msg"]) from None
    except ValueError as e:
        raise WireError("schema", str(e)[:200]) from None


def decode_manifest(data: bytes) -> Manifest:
    """Decode a DHT manifest value. Raises WireError."""
    return _decode(Manifest, data, MAX_MANIFEST_BYTES)


def decode_payload(data: bytes, max_bytes: int) -> RolloutPayload:
    """Decode a rollout payload of at most `max_bytes`. Raises WireError."""
    return _decode(RolloutPayload, data, max_bytes)


def decode_request(data: bytes) -> FetchRequest:
    return _decode(FetchRequest, data, 256)


def sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def decode_merge_gather(data: bytes) -> MergeGather:
    """Decode a group member's MergeGather. Raises WireError."""
    return _decode(MergeGather, data, MAX_MERGE_MESSAGE_BYTES)


def decode_merge_state_info(data: bytes) -> MergeStateInfo:
    """Decode the metadata of a downloaded state. Raises WireError."""
    return _decode(MergeStateInfo, data, MAX_MERGE_MESSAGE_BYTES)
