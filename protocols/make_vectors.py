"""Regenerate the golden vectors in protocols/v1/ from the reference encoder (swarm_node.network.wire).

    python protocols/make_vectors.py

Each vector is `NAME.msgpack` (the exact bytes on the wire) next to `NAME.json`, its twin:
{"message": "Manifest" | "RolloutPayload" | "FetchRequest" | "MergeGather" | "MergeStateInfo", "valid": bool, "value": {...} (valid only),
 "reason": "<reject reason>" (invalid only), "why": "..."}. In JSON, a msgpack bin field is {"$bin": "<hex>"}.
A wire change shows up as a diff of these files; tests/test_protocol_vectors.py checks the code against them.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import msgpack

from swarm_node.network import wire

OUT = Path(__file__).parent / "v1"
SPEC = {"dataset": "chain_sum", "config": {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1},
        "seed": 0, "index": 41, "size": 100000, "rg_version": "0.1.25"}
GROUP = {"spec": SPEC, "completions": ["<answer>9</answer>", "<answer>8</answer>", "nine"], "rewards": [1.0, 0.0, 0.0]}
PAYLOAD = {"version": [1, 0], "peer_id": "QmXf2tinhvF778V2YdBTCPoPwGmbWrEpXTYhHqfiASa9PV", "round": 7,
           "policy_version": 6, "model": "smollm2-135m", "groups": [GROUP]}


FINGERPRINT = "5d41402abc4b2a76b9719d911017c592" * 2


def manifest_for(payload_bytes: bytes) -> dict:
    return {"version": [1, 0], "peer_id": PAYLOAD["peer_id"], "round": 7, "policy_version": 6,
            "model": "smollm2-135m", "num_groups": 1, "num_completions": 3, "payload_bytes": len(payload_bytes),
            "payload_sha256": wire.sha256(payload_bytes), "created_at_s": 1795000000.5}


def to_json(value):
    if isinstance(value, bytes):
        return {"$bin": value.hex()}
    if isinstance(value, dict):
        return {k: to_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_json(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return {"$float": repr(value)}
    return value


def write(name: str, message: str, data: bytes, valid: bool, value=None, reason: str = "", why: str = "") -> None:
    (OUT / f"{name}.msgpack").write_bytes(data)
    twin = {"message": message, "valid": valid, "why": why}
    if valid:
        twin["value"] = to_json(value)
    else:
        twin["reason"] = reason
    (OUT / f"{name}.json").write_text(json.dumps(twin, indent=1, sort_keys=True) + "\n")


def main() -> None:
    OUT.mkdir(exist_ok=True)
    for old in OUT.iterdir():
        old.unlink()
    payload = wire.RolloutPayload.model_validate({**PAYLOAD, "version": (1, 0)})
    payload_bytes = wire.encode(payload)
    write("payload_valid", "RolloutPayload", payload_bytes, True, PAYLOAD, why="one chain_sum group, three completions")
    manifest = manifest_for(payload_bytes)
    write("manifest_valid", "Manifest", wire.encode(wire.Manifest.model_validate({**manifest, "version": (1, 0)})),
          True, manifest, why="announces payload_valid: its size and sha256")
    request = {"version": [1, 0], "round": 7}
    write("fetch_request_valid", "FetchRequest", msgpack.packb(request), True, request, why="ask a peer for round 7")

    extra = dict(PAYLOAD, future_field={"added_in": "1.3"}, version=[1, 3])
    write("payload_unknown_field_minor_version", "RolloutPayload", msgpack.packb(extra), True, PAYLOAD | {"version": [1, 3]},
          why="unknown fields are ignored and a newer minor version is accepted")

    def bad(name, message, value, reason, why):
        write(name, message, msgpack.packb(value) if not isinstance(value, bytes) else value, False, reason=reason, why=why)

    bad("payload_major_version", "RolloutPayload", dict(PAYLOAD, version=[2, 0]), "version", "major version 2 != 1")
    bad("payload_not_msgpack", "RolloutPayload", b"\xc1\xc1\xc1", "malformed", "0xc1 is never used in msgpack")
    bad("payload_not_a_map", "RolloutPayload", [1, 2, 3], "malformed", "top level must be a map")
    bad("payload_round_is_string", "RolloutPayload", dict(PAYLOAD, round="7"), "schema", "round must be an integer")
    bad("payload_missing_peer_id", "RolloutPayload", {k: v for k, v in PAYLOAD.items() if k != "peer_id"}, "schema",
        "peer_id is required")
    bad("payload_nan_reward", "RolloutPayload", dict(PAYLOAD, groups=[dict(GROUP, rewards=[math.nan, 0.0, 0.0])]),
        "schema", "rewards must be finite")
    bad("payload_inf_reward", "RolloutPayload", dict(PAYLOAD, groups=[dict(GROUP, rewards=[math.inf, 0.0, 0.0])]),
        "schema", "rewards must be finite")
    bad("payload_length_mismatch", "RolloutPayload", dict(PAYLOAD, groups=[dict(GROUP, rewards=[1.0])]), "schema",
        "one reward per completion")
    bad("payload_one_completion", "RolloutPayload", dict(PAYLOAD, groups=[dict(GROUP, completions=["a"], rewards=[1.0])]),
        "schema", "a group needs at least 2 completions")
    bad("payload_too_many_groups", "RolloutPayload", dict(PAYLOAD, groups=[GROUP] * 65), "schema", "at most 64 groups")
    bad("payload_too_many_completions", "RolloutPayload",
        dict(PAYLOAD, groups=[dict(GROUP, completions=["x"] * 65, rewards=[0.0] * 65)]), "schema",
        "at most 64 completions per group")
    bad("payload_completion_too_long", "RolloutPayload",
        dict(PAYLOAD, groups=[dict(GROUP, completions=["x" * 8193, "y", "z"])]), "schema", "at most 8192 characters")
    bad("payload_negative_index", "RolloutPayload", dict(PAYLOAD, groups=[dict(GROUP, spec=dict(SPEC, index=-1))]),
        "schema", "index must be >= 0")
    bad("manifest_sha256_short", "Manifest", {**manifest, "payload_sha256": b"\x00" * 31}, "schema",
        "payload_sha256 is exactly 32 bytes")
    bad("manifest_too_large", "Manifest", msgpack.packb(manifest) + b"\x00" * 1024, "too_large",
        "a manifest is at most 1024 bytes")
    bad("manifest_negative_round", "Manifest", {**manifest, "round": -1}, "schema", "round must be >= 0")

    gather = {"version": [1, 0], "mode": "params", "fingerprint": FINGERPRINT, "sums": [12.5, -0.25, 3.0, 0.125],
              "weight": 1.0, "anchor": [], "merges": 2, "priority": 2.3125, "optimizer_step": 10}
    write("merge_gather_valid", "MergeGather",
          wire.encode(wire.MergeGather.model_validate({**gather, "version": (1, 0)})), True, gather,
          why="checksums (sum, alternating sum) of two segments, sent in hivemind's gather when a merge starts")
    info = {"version": [1, 0], "mode": "diloco", "fingerprint": FINGERPRINT, "merges": 3, "sums": [1.5, 0.5]}
    write("merge_state_info_valid", "MergeStateInfo",
          wire.encode(wire.MergeStateInfo.model_validate({**info, "version": (1, 0)})), True, info,
          why="metadata of a downloaded merge state: the checksums of the tensors that follow")
    bad("merge_gather_nan_checksum", "MergeGather", dict(gather, sums=[math.nan, 0.0]), "schema",
        "checksums must be finite")
    bad("merge_gather_bad_fingerprint", "MergeGather", dict(gather, fingerprint="not-hex"), "schema",
        "the fingerprint is 64 lowercase hex characters (sha256)")
    bad("merge_gather_odd_checksums", "MergeGather", dict(gather, sums=[1.0, 2.0, 3.0]), "schema",
        "checksums come in (sum, alternating sum) pairs")
    print(f"wrote {len(list(OUT.glob('*.json')))} vectors to {OUT}")


if __name__ == "__main__":
    main()
