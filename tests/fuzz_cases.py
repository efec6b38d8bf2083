"""Hypothesis strategies and properties for fuzzing the wire decoders and task re-creation (issue 15).

Shared by tests/test_fuzz.py (a short, derandomized run in CI) and benchmarks/fuzz.py (a long run). Strategies are
seeded from the field tables of protocols/PROTOCOL.md: each message is drawn as a mostly valid map whose fields
take values from the table's type and its boundaries, mixed with arbitrary msgpack values, raw byte strings,
deletions and unknown fields, so the decoders see both near-valid and hostile input.

The property of every decoder: whatever the bytes, it returns a message or raises `WireError` with one of
`REASONS`. The property of re-creation: `recreate` returns a question or raises `SpecError`, and `score` returns a
finite reward in [0, 1]. Anything else (another exception type, a crash) fails the property.
"""

from __future__ import annotations

import json
import math
import string
import time
from collections import Counter
from pathlib import Path

import msgpack
from hypothesis import strategies as st

from swarm_node.learning import tasks
from swarm_node.network import wire

REASONS = {"too_large", "malformed", "version", "schema"}
INT64 = (-(2**63), 2**63 - 1)
BASE58 = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
MAX_PAYLOAD_BYTES = 1 << 16


def boundary_ints(lo: int, hi: int) -> st.SearchStrategy[int]:
    """Ints inside [lo, hi], at its edges, and just outside (msgpack-encodable: -2^63 .. 2^64-1)."""
    edges = [x for x in (lo - 1, lo, lo + 1, hi - 1, hi, hi + 1, 0, -1, 2**63, 2**64 - 1) if -(2**63) <= x < 2**64]
    return st.one_of(st.integers(lo, hi), st.sampled_from(edges))


floats_any = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0.0, -0.0, 1.0, 1e308]))
msgpack_scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1), floats_any,
                            st.text(max_size=40), st.binary(max_size=40))
msgpack_values = st.recursive(
    msgpack_scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=24,
)


def field(valid: st.SearchStrategy) -> st.SearchStrategy:
    """A field value: usually from the table (valid or at a boundary), sometimes any msgpack value."""
    return st.one_of(*[valid] * 7, msgpack_values)


version = field(st.one_of(st.just([1, 0]), st.tuples(boundary_ints(0, 65535), boundary_ints(0, 65535)).map(list)))
peer_id = field(st.one_of(st.text(BASE58, min_size=1, max_size=130), st.text(max_size=130)))
name = field(st.text(min_size=0, max_size=130))
nonneg = field(boundary_ints(0, 2**63 - 1))
config_values = st.one_of(st.booleans(), boundary_ints(*INT64), floats_any, st.text(max_size=130), msgpack_values)
config_keys = st.one_of(st.sampled_from(["min_terms", "max_terms", "min_digits", "max_digits", "min_words",
                                         "max_words", "allow_negation", "invalid_ratio", "seed", "size"]),
                        st.text(string.ascii_letters + "_", min_size=1, max_size=66), st.text(max_size=8))


@st.composite
def specs(draw) -> dict:
    size = draw(field(boundary_ints(1, 2**63 - 1)))
    return draw(st.fixed_dictionaries({
        "dataset": field(st.sampled_from(sorted(tasks.SMOL_TASKS) + ["no_such_dataset", ""])),
        "config": field(st.dictionaries(config_keys, config_values, max_size=6)),
        "seed": field(boundary_ints(*INT64)),
        "index": field(boundary_ints(0, size if type(size) is int and 1 <= size < 2**63 else 10)),
        "size": st.just(size),
        "rg_version": field(st.sampled_from([tasks.RG_VERSION, "0.0.1"])),
    }))


groups = st.fixed_dictionaries({
    "spec": field(specs()),
    "completions": field(st.lists(st.text(max_size=60), min_size=0, max_size=6)),
    "rewards": field(st.lists(floats_any, min_size=0, max_size=6)),
})
manifests = st.fixed_dictionaries({
    "version": version, "peer_id": peer_id, "round": nonneg, "policy_version": nonneg, "model": name,
    "num_groups": field(boundary_ints(0, 64)), "num_completions": field(boundary_ints(0, 4096)),
    "payload_bytes": nonneg, "payload_sha256": field(st.binary(min_size=30, max_size=34)),
    "created_at_s": field(floats_any),
})
payloads = st.fixed_dictionaries({
    "version": version, "peer_id": peer_id, "round": nonneg, "policy_version": nonneg, "model": name,
    "groups": field(st.lists(groups, max_size=3)),
})
requests = st.fixed_dictionaries({"version": version, "round": nonneg})
fingerprint = field(st.one_of(st.text("0123456789abcdef", min_size=64, max_size=64), st.text(max_size=66)))
checksums = field(st.lists(floats_any, max_size=8))
gathers = st.fixed_dictionaries({
    "version": version, "mode": field(st.sampled_from(["params", "diloco"])), "fingerprint": fingerprint,
    "sums": checksums, "weight": field(floats_any), "anchor": field(st.lists(floats_any, max_size=3)),
    "merges": nonneg, "priority": field(floats_any), "optimizer_step": nonneg,
})
state_infos = st.fixed_dictionaries({"version": version, "mode": field(st.sampled_from(["params", "diloco"])),
                                     "fingerprint": fingerprint, "merges": nonneg, "sums": checksums})


@st.composite
def mutated(draw, base: st.SearchStrategy) -> dict:
    """A message map with some fields deleted and some unknown fields added."""
    value = dict(draw(base))
    for key in draw(st.lists(st.sampled_from(sorted(value)), max_size=2).filter(lambda keys: len(keys) < 2 or keys[0] != keys[1])) if draw(st.booleans()) else []:
        value.pop(key, None)
    value.update(draw(st.dictionaries(st.text(max_size=6), msgpack_values, max_size=2)))
    return value


VECTORS = Path(__file__).resolve().parents[1] / "protocols" / "v1"


def _from_json(value):
    if isinstance(value, dict):
        return bytes.fromhex(value["$bin"]) if set(value) == {"$bin"} else {k: _from_json(v) for k, v in value.items()}
    return [_from_json(v) for v in value] if isinstance(value, list) else value


def golden(name: str) -> dict:
    """The value of a valid golden vector (protocols/v1/NAME.json)."""
    return _from_json(json.loads((VECTORS / f"{name}.json").read_text())["value"])


@st.composite
def near_valid(draw, base: st.SearchStrategy, valid: dict) -> dict:
    """A valid golden message with 0-2 of its fields replaced by values drawn from the field table strategy."""
    other = draw(base)
    keys = draw(st.lists(st.sampled_from(sorted(valid)), max_size=2, unique=True))
    return valid | {k: other[k] for k in keys if k in other}


def encoded(base: st.SearchStrategy, valid: dict | None = None) -> st.SearchStrategy[bytes]:
    """Bytes to decode: an encoded (mutated or near-valid) message, its bytes with a splice of random bytes, its
    bytes padded past every decoder's size limit (so `too_large` is reached by design, not by luck), or random
    bytes."""
    messages = mutated(base) if valid is None else st.one_of(mutated(base), near_valid(base, valid))
    packed = messages.map(lambda v: msgpack.packb(v, use_bin_type=True))

    @st.composite
    def spliced(draw) -> bytes:
        data = draw(packed)
        at = draw(st.integers(0, len(data)))
        cut = draw(st.integers(0, 4))
        return data[:at] + draw(st.binary(max_size=6)) + data[at + cut:]

    oversized = packed.map(lambda data: data + bytes(MAX_PAYLOAD_BYTES + 1))
    return st.one_of(packed, packed, spliced(), oversized, st.binary(max_size=300))


DECODERS = {  # name -> (decoder, field-table strategy, a valid golden message to perturb)
    "manifest": (wire.decode_manifest, manifests, golden("manifest_valid")),
    "payload": (lambda data: wire.decode_payload(data, MAX_PAYLOAD_BYTES), payloads, golden("payload_valid")),
    "fetch_request": (wire.decode_request, requests, golden("fetch_request_valid")),
    "merge_gather": (wire.decode_merge_gather, gathers, golden("merge_gather_valid")),
    "merge_state_info": (wire.decode_merge_state_info, state_infos, golden("merge_state_info_valid")),
}
outcomes: Counter[str] = Counter()  # "<decoder>:<ok or reason>", for the benchmark's report


def check_decoder(name: str, data: bytes) -> None:
    """The decoder property: a message, or WireError with a known reason."""
    decode = DECODERS[name][0]
    try:
        decode(data)
    except wire.WireError as e:
        assert e.reason in REASONS, e.reason
        outcomes[f"{name}:{e.reason}"] += 1
        return
    outcomes[f"{name}:ok"] += 1


@st.composite
def decodable_specs(draw) -> wire.WireTaskSpec:
    """Specs that pass the wire decoder, drawn near the node's own tasks: re-creation's real input."""
    dataset = draw(st.sampled_from(sorted(tasks.SMOL_TASKS) + ["no_such_dataset"]))
    base = dict(tasks.SMOL_TASKS.get(dataset, {}))
    extra = draw(st.dictionaries(config_keys.filter(lambda k: k.isidentifier() and k.isascii() and len(k) <= 64),
                                 st.one_of(st.integers(-3, 40), st.booleans(), st.floats(-2, 2), st.text(max_size=8)),
                                 max_size=3))
    size = draw(st.integers(1, 1000))
    raw = {"dataset": dataset, "config": base | extra, "seed": draw(st.integers(*INT64)),
           "index": draw(st.integers(0, size - 1)), "size": size,
           "rg_version": draw(st.sampled_from([tasks.RG_VERSION, tasks.RG_VERSION, "0.0.1"]))}
    data = msgpack.packb({"version": [1, 0], "peer_id": "Qm", "round": 0, "policy_version": 0, "model": "m",
                          "groups": [{"spec": raw, "completions": ["a", "b"], "rewards": [0.0, 0.0]}]})
    try:
        return wire.decode_payload(data, MAX_PAYLOAD_BYTES).groups[0].spec
    except wire.WireError:
        return wire.WireTaskSpec.model_validate({**raw, "config": base})


completions = st.one_of(
    st.text(max_size=200),
    st.lists(st.sampled_from(["<answer>", "</answer>", "1", "9", " ", "x", "<ANSWER>", "\n"]), max_size=60).map("".join),
)


def check_recreate(spec: wire.WireTaskSpec, completion: str) -> None:
    """The re-creation property: a question or SpecError; a finite score in [0, 1]."""
    task_spec = tasks.TaskSpec(spec.dataset, dict(spec.config), spec.seed, spec.index, spec.size, spec.rg_version)
    try:
        question = tasks.recreate(task_spec)
    except tasks.SpecError:
        outcomes["recreate:bad_task_spec"] += 1
        return
    reward = tasks.score(question, completion)
    assert math.isfinite(reward) and 0.0 <= reward <= 1.0
    outcomes["recreate:ok"] += 1


def timed(fn, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start
