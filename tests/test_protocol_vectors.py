"""The code against every golden vector in protocols/v1/: a wire change shows up as a spec diff."""

import json
from pathlib import Path

import pytest

from swarm_node.network import wire

VECTORS = sorted((Path(__file__).resolve().parents[1] / "protocols" / "v1").glob("*.json"))
DECODERS = {
    "Manifest": wire.decode_manifest,
    "RolloutPayload": lambda data: wire.decode_payload(data, wire.MAX_GROUPS_PER_PAYLOAD * 1 << 20),
    "FetchRequest": wire.decode_request,
    "MergeGather": wire.decode_merge_gather,
    "MergeStateInfo": wire.decode_merge_state_info,
}


def from_json(value):
    if isinstance(value, dict):
        if set(value) == {"$bin"}:
            return bytes.fromhex(value["$bin"])
        return {k: from_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [from_json(v) for v in value]
    return value


def normalise(value):
    if isinstance(value, tuple):
        return [normalise(v) for v in value]
    if isinstance(value, dict):
        return {k: normalise(v) for k, v in value.items()}
    if isinstance(value, list):
        return [normalise(v) for v in value]
    return value


def test_there_are_valid_and_invalid_vectors():
    twins = [json.loads(p.read_text()) for p in VECTORS]
    assert sum(t["valid"] for t in twins) >= 3 and sum(not t["valid"] for t in twins) >= 10


@pytest.mark.parametrize("path", VECTORS, ids=[p.stem for p in VECTORS])
def test_vector(path):
    twin = json.loads(path.read_text())
    data = path.with_suffix(".msgpack").read_bytes()
    decode = DECODERS[twin["message"]]
    if twin["valid"]:
        message = decode(data)
        assert normalise(message.model_dump()) == from_json(twin["value"])
        if path.stem.endswith("_valid"):  # canonical encodings: the encoder reproduces the bytes exactly
            assert wire.encode(message) == data
    else:
        with pytest.raises(wire.WireError) as e:
            decode(data)
        assert e.value.reason == twin["reason"], twin["why"]
