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

Decoding is strict and runs its checks in the spec's order (PROTOCOL.md "Decoding"): size (`too_large`), then
msgpack (`malformed`: invalid or truncated bytes, trailing bytes, duplicate or non-string map keys, ext types,
invalid UTF-8, containers nested deeper than `MAX_DEPTH`), then the major version (`version`), then the field
tables (`schema`). The first failing check gives the reason. `decode_*` raise only `WireError(reason)`, whatever
the input, so one peer's bytes can never raise anything else in its handler.
"""

from __future__ import annotations

import hashlib
from typing import Annotated, Any

import msgpack
from pydantic import (AfterValidator, BaseModel, ConfigDict, Field, StrictFloat, StrictInt, StrictStr,
                      ValidationError, field_validator, model_serializer, model_validator)

# the rule for a task spec's config (and its limits) lives with the task spec: learning/spec_config.py
from swarm_node.learning.spec_config import INT64_MAX, INT64_MIN, config_problem

PROTOCOL_MAJOR = 1
PROTOCOL_MINOR = 1  # 1.1: optional WireGroup.logprobs / tokenizer_sha256 (off-policy correction)
PROTOCOL_VERSION = (PROTOCOL_MAJOR, PROTOCOL_MINOR)

# Hard limits of protocol v1 (a receiver may set tighter ones).
MAX_MANIFEST_BYTES = 1024
MAX_GROUPS_PER_PAYLOAD = 64
MAX_COMPLETIONS_PER_GROUP = 64
MAX_COMPLETION_CHARS = 8192
MAX_NAME_CHARS = 128
MAX_REQUEST_BYTES = 256
MAX_DEPTH = 6  # containers (maps/arrays) nested in one message, the top-level map counting as 1
MAX_VERSION = 2**16 - 1  # major and minor are each 0..65535
MAX_MERGE_SEGMENTS = 256  # checksum segments per merge (tensors are grouped to at most this many)
MAX_MERGE_MESSAGE_BYTES = 16 * 1024
MAX_LOGPROB_TOKENS = 4096  # per completion (the largest max_new_tokens)
MAX_ABS_LOGPROB = 100.0  # a claimed log-prob lies in [-100, 0]


class WireError(Exception):
    """A message that must be dropped. `reason` is a short, countable code (e.g. "malformed", "schema")."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail = reason, detail


VersionPart = Annotated[StrictInt, Field(ge=0, le=MAX_VERSION)]


class _Message(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore", strict=True)

    version: tuple[VersionPart, VersionPart]

    @field_validator("version")
    @classmethod
    def _major(cls, v: tuple[int, int]) -> tuple[int, int]:
        if v[0] != PROTOCOL_MAJOR:
            raise ValueError(f"major version {v[0]} != {PROTOCOL_MAJOR}")
        return v


Name = Annotated[StrictStr, Field(min_length=1, max_length=MAX_NAME_CHARS)]  # chars = Unicode code points
PeerIdStr = Annotated[StrictStr, Field(min_length=1, max_length=MAX_NAME_CHARS, pattern=r"^[1-9A-HJ-NP-Za-km-z]+$")]
NonNegInt = Annotated[StrictInt, Field(ge=0, le=INT64_MAX)]
Int64 = Annotated[StrictInt, Field(ge=INT64_MIN, le=INT64_MAX)]
# A float field takes a msgpack float64 or float32 (widened exactly) or an integer (converted to the nearest float64),
# never a bool, and must be finite (PROTOCOL.md "Decoding").
WireFloat = Annotated[StrictFloat, Field(allow_inf_nan=False)]


class Manifest(_Message):
    """Per-peer, per-round DHT record announcing a rollout payload.

    Fields: peer_id (base58), round, policy_version (optimizer steps), model (name), num_groups,
    num_completions (total over groups), payload_bytes, payload_sha256 (32 bytes), created_at_s (unix time).
    """

    peer_id: PeerIdStr
    round: NonNegInt
    policy_version: NonNegInt
    model: Name
    num_groups: Annotated[StrictInt, Field(ge=0, le=MAX_GROUPS_PER_PAYLOAD)]
    num_completions: Annotated[StrictInt, Field(ge=0, le=MAX_GROUPS_PER_PAYLOAD * MAX_COMPLETIONS_PER_GROUP)]
    payload_bytes: NonNegInt
    payload_sha256: Annotated[bytes, Field(min_length=32, max_length=32)]
    created_at_s: Annotated[WireFloat, Field(ge=0)] = 0.0


class WireTaskSpec(BaseModel):
    """A task spec on the wire (see learning.tasks.TaskSpec)."""

    model_config = ConfigDict(frozen=True, extra="ignore", strict=True)

    dataset: Name
    config: dict[StrictStr, Any]
    seed: Int64
    index: NonNegInt
    size: Annotated[StrictInt, Field(gt=0, le=INT64_MAX)]
    rg_version: Name

    @field_validator("config")
    @classmethod
    def _scalar_config(cls, v: dict[str, Any]) -> dict[str, Any]:
        problem = config_problem(v)
        if problem:
            raise ValueError(problem)
        return v

    @model_validator(mode="after")
    def _index_in_range(self) -> "WireTaskSpec":
        if self.index >= self.size:
            raise ValueError(f"index {self.index} >= size {self.size}")
        return self


def check_config(config: dict[str, Any]) -> None:
    """Raise WireError("schema") unless `config` can be a wire TaskSpec's config."""
    if type(config) is not dict:
        raise WireError("schema", "config is not a map")
    problem = config_problem(config)
    if problem:
        raise WireError("schema", problem)


class WireGroup(BaseModel):
    """One question group: its task spec, L completion texts and the publisher's claimed rewards."""

    model_config = ConfigDict(frozen=True, extra="ignore", strict=True)

    spec: WireTaskSpec
    completions: Annotated[
        list[Annotated[StrictStr, Field(max_length=MAX_COMPLETION_CHARS)]],
        Field(min_length=2, max_length=MAX_COMPLETIONS_PER_GROUP),
    ]
    rewards: Annotated[list[WireFloat], Field(max_length=MAX_COMPLETIONS_PER_GROUP)]
    # v1.1 (optional): the generator's per-token log-probs of each completion ([] = unknown for that completion)
    # and the sha256 (hex) of its tokenizer (see PROTOCOL.md "Generator log-probs").
    logprobs: Annotated[
        list[Annotated[list[Annotated[StrictFloat, Field(ge=-MAX_ABS_LOGPROB, le=0.0, allow_inf_nan=False)]],
                       Field(max_length=MAX_LOGPROB_TOKENS)]],
        Field(max_length=MAX_COMPLETIONS_PER_GROUP),
    ] | None = None
    tokenizer_sha256: Annotated[StrictStr, Field(pattern=r"^([0-9a-f]{64})?$")] = ""

    @model_validator(mode="after")
    def _same_length(self) -> "WireGroup":
        if len(self.rewards) != len(self.completions):
            raise ValueError("rewards and completions differ in length")
        if self.logprobs is not None and len(self.logprobs) != len(self.completions):
            raise ValueError("logprobs and completions differ in length")
        return self

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

    peer_id: PeerIdStr
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


MAX_MERGE_LEVEL = 2**31 - 1  # merge levels and optimizer steps a peer may announce (a receiver clamps what it derives)
MergeLevel = Annotated[StrictInt, Field(ge=0, le=MAX_MERGE_LEVEL)]


class MergeGather(_Message):
    """A peer's contribution to one averaging round, sent to every group member before the all-reduce.

    `sums` holds two float64 linear checksums per segment of the averaged tensors (the plain sum and the
    alternating-sign sum, flattened as [s0, a0, s1, a1, ...]); the plain mean of the members' sums is what every
    member's averaged tensors must sum to. `weight` is fixed at 1.0: every member counts once (a receiver also
    forces weight 1 in the all-reduce itself, whatever a sender puts in its tensor parts). `anchor` is the
    (sum, L2 norm) of the weights at the last sync (diloco only). `merges` is the peer's merge level and
    `priority` its state-sharing priority (level plus a tie-breaker below 0.5): both are claims, used only for
    logging and as a bounded hint (a receiver takes the lower median of the group's levels, see
    protocols/PROTOCOL.md), never to choose whose state to adopt. `optimizer_step` is its AdamW step count.
    """

    mode: Name
    fingerprint: Fingerprint
    sums: Checksums
    weight: Annotated[FiniteFloat, Field(ge=1.0, le=1.0)] = 1.0
    anchor: Annotated[list[FiniteFloat], Field(max_length=2)] = []
    merges: MergeLevel = 0
    priority: Annotated[FiniteFloat, Field(ge=0, le=MAX_MERGE_LEVEL + 1)] = 0.0
    optimizer_step: MergeLevel = 0


class MergeStateInfo(_Message):
    """Metadata of a peer's shared state (the weights at its last verified merge, plus the DiLoCo momentum).

    `sums` are the checksums (as in MergeGather) of the tensors that follow it, so the downloader can check
    that it received what the peer meant to send, and can compare donors' states before downloading one
    (a state is adopted only when a majority of the donors asked agree on its checksums).
    """

    mode: Name
    fingerprint: Fingerprint
    merges: MergeLevel
    sums: Checksums


def encode(message: BaseModel) -> bytes:
    """msgpack encoding of a message (maps with string keys, bytes as bin, tuples as arrays)."""
    return msgpack.packb(message.model_dump(mode="python"), use_bin_type=True)


_SCALARS = frozenset({str, bytes, int, float, bool, type(None)})


def _strict_map(pairs: list[tuple[Any, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if type(key) is not str:
            raise ValueError(f"map key of type {type(key).__name__}")
        if key in out:
            raise ValueError(f"duplicate map key {key[:64]!r}")
        out[key] = value
    return out


def _no_ext(code: int, data: bytes) -> Any:
    raise ValueError(f"ext type {code}")


_CONTAINERS = (dict, list)
_ALLOWED = _SCALARS | {dict, list}


def _check_tree(root: Any) -> None:
    """Reject containers nested deeper than MAX_DEPTH and any value that is not a plain msgpack type
    (msgpack decodes the timestamp ext type -1 itself, past `ext_hook`).

    Level by level, without recursion on peer data; the type test of a node's children runs in C
    (`set(map(type, ...))`), so 4 MiB of tiny containers costs ~0.2 s, not seconds.
    """
    level, depth = [root], 1
    while level:
        deeper: list = []
        for node in level:
            children = node.values() if type(node) is dict else node
            kinds = set(map(type, children))
            if kinds <= _SCALARS:
                continue
            if not kinds <= _ALLOWED:
                raise WireError("malformed", f"value of type {sorted(k.__name__ for k in kinds - _ALLOWED)[0]}")
            if depth >= MAX_DEPTH:  # a container child would sit at depth + 1
                raise WireError("malformed", f"containers nested deeper than {MAX_DEPTH}")
            deeper += [c for c in children if type(c) in _CONTAINERS and c]
        level, depth = deeper, depth + 1


def unpack(data: bytes) -> Any:
    """Strict msgpack decoding (PROTOCOL.md "Decoding"). Raises WireError("malformed")."""
    try:
        raw = msgpack.unpackb(data, raw=False, strict_map_key=True, object_pairs_hook=_strict_map, ext_hook=_no_ext,
                              use_list=True)
    except Exception as e:  # msgpack raises several types on garbage (ExtraData, StackError, UnicodeDecodeError, ...)
        raise WireError("malformed", f"{type(e).__name__}: {str(e)[:200]}") from None
    kind = type(raw)
    if kind is dict or kind is list:
        _check_tree(raw)
    elif kind not in _SCALARS:
        raise WireError("malformed", f"value of type {kind.__name__}")
    return raw


def _first_error(e: ValidationError) -> str:
    err = e.errors(include_input=False, include_url=False)[0]
    return (".".join(str(x) for x in err["loc"]) + " " + err["msg"])[:300]


def _decode(cls: type[BaseModel], data: bytes, max_bytes: int) -> Any:
    """size -> msgpack -> top-level map -> major version -> schema; the first failing check names the reason."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise WireError("malformed", f"expected bytes, got {type(data).__name__}")
    if len(data) > max_bytes:
        raise WireError("too_large", f"{len(data)} bytes > {max_bytes}")
    raw = unpack(bytes(data))
    if not isinstance(raw, dict):
        raise WireError("malformed", "top level is not a map")
    version = raw.get("version")
    if isinstance(version, list) and len(version) == 2 and type(version[0]) is int and version[0] != PROTOCOL_MAJOR:
        raise WireError("version", f"major version {version[0]}")
    if isinstance(version, list):
        raw["version"] = tuple(version)
    try:
        return cls.model_validate(raw)
    except ValidationError as e:
        raise WireError("schema", _first_error(e)) from None
    except (ValueError, TypeError) as e:
        raise WireError("schema", str(e)[:200]) from None


def decode_manifest(data: bytes) -> Manifest:
    """Decode a DHT manifest value. Raises WireError."""
    return _decode(Manifest, data, MAX_MANIFEST_BYTES)


def decode_payload(data: bytes, max_bytes: int) -> RolloutPayload:
    """Decode a rollout payload of at most `max_bytes`. Raises WireError."""
    return _decode(RolloutPayload, data, max_bytes)


def decode_request(data: bytes) -> FetchRequest:
    """Decode a FetchRequest (at most MAX_REQUEST_BYTES). Raises WireError."""
    return _decode(FetchRequest, data, MAX_REQUEST_BYTES)


def sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def decode_merge_gather(data: bytes) -> MergeGather:
    """Decode a group member's MergeGather. Raises WireError."""
    return _decode(MergeGather, data, MAX_MERGE_MESSAGE_BYTES)


def decode_merge_state_info(data: bytes) -> MergeStateInfo:
    """Decode the metadata of a downloaded state. Raises WireError."""
    return _decode(MergeStateInfo, data, MAX_MERGE_MESSAGE_BYTES)
