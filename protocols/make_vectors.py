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
        if old.name != DHT_VECTOR:  # RSA-PSS signatures are randomised: keep the committed one
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
    decisions(payload_bytes, manifest, bad)
    answers()
    shard_keys()
    if not (OUT / DHT_VECTOR).exists():
        dht_record(wire.encode(wire.Manifest.model_validate({**manifest, "version": (1, 0)})))
    print(f"wrote {len(list(OUT.glob('*.json')))} vectors to {OUT}")


def raw_vector(name, message, data: bytes, reason: str, why: str, value=None) -> None:
    """A vector written as raw bytes (msgpack level): valid if `value` is given."""
    write(name, message, data, value is not None, value=value, reason=reason, why=why)


def decisions(payload_bytes: bytes, manifest: dict, bad) -> None:
    """Vectors for every decision of PROTOCOL.md "Decoding" and the field tables (issue 15)."""
    req = msgpack.packb({"version": [1, 0], "round": 7})
    # ---- msgpack level: raw bytes -> reason
    raw_vector("msgpack_duplicate_key", "FetchRequest", b"\x83\xa7version\x92\x01\x00\xa5round\x07\xa5round\x08",
               "malformed", "a map key appears twice (here `round`): malformed, never last-wins")
    raw_vector("msgpack_duplicate_key_nested", "RolloutPayload",
               msgpack.packb(PAYLOAD).replace(
                   b"\x84\xa9min_terms\x02\xa9max_terms\x02", b"\x84\xa9min_terms\x02\xa9min_terms\x02"),
               "malformed", "duplicate keys are malformed at any depth (here inside the task config)")
    raw_vector("msgpack_bin_key", "FetchRequest", b"\x82\xc4\x07version\x92\x01\x00\xa5round\x07", "malformed",
               "map keys are str; a bin key is malformed")
    raw_vector("msgpack_int_key", "FetchRequest", b"\x83\xa7version\x92\x01\x00\xa5round\x07\x01\x01", "malformed",
               "map keys are str; an int key is malformed even in an unknown field")
    raw_vector("msgpack_ext_type", "FetchRequest", b"\x83\xa7version\x92\x01\x00\xa5round\x07\xa1x\xd4\x05\x01",
               "malformed", "no ext types, even in an unknown field (here type 5)")
    raw_vector("msgpack_timestamp_ext", "Manifest", b"\x81\xa7version\xd6\xff\x00\x00\x00\x01", "malformed",
               "the msgpack timestamp ext type (-1) is an ext type too: malformed")
    raw_vector("msgpack_trailing_bytes", "FetchRequest", req + b"\xc0", "malformed",
               "one msgpack object and nothing after it: a trailing nil is malformed")
    raw_vector("msgpack_truncated", "FetchRequest", req[:-1], "malformed", "the object ends early")
    raw_vector("msgpack_invalid_utf8", "RolloutPayload",
               msgpack.packb(PAYLOAD).replace(b"\xacsmollm2-135m", b"\xacsmollm2-13\xc3\x28"), "malformed",
               "a str must be valid UTF-8 (0xc3 0x28 is not)")
    raw_vector("msgpack_utf8_surrogate", "RolloutPayload",
               msgpack.packb(PAYLOAD).replace(b"\xacsmollm2-135m", b"\xacsmollm2-\xed\xa0\x80m"), "malformed",
               "UTF-8-encoded surrogates (U+D800 as ED A0 80) are invalid UTF-8")
    deep = dict(PAYLOAD, groups=[dict(GROUP, spec=dict(SPEC, config={"min_terms": 2}))])
    raw_vector("msgpack_depth_7", "RolloutPayload",
               msgpack.packb(deep).replace(b"\xa9min_terms\x02", b"\xa9min_terms\x91\x91\x02"), "malformed",
               "payload(1) > groups(2) > group(3) > spec(4) > config(5) > [6] > [7]: deeper than 6")
    raw_vector("msgpack_depth_1000", "RolloutPayload",
               msgpack.packb(deep).replace(b"\xa9min_terms\x02", b"\xa9min_terms" + b"\x91" * 1000 + b"\x02"),
               "malformed", "issue 15 hole 1: a config value nested 1,000 deep (inside msgpack's stack limit)")
    raw_vector("msgpack_depth_6_unknown_field", "FetchRequest",
               b"\x83\xa7version\x92\x01\x00\xa5round\x07\xa1x" + b"\x91" * 4 + b"\x80", "",
               "an unknown field nested to depth 6 exactly (map, 4 arrays, map) is ignored", value={"version": [1, 0], "round": 7})
    raw_vector("msgpack_not_a_map_at_depth", "FetchRequest", b"\x92\xa7version\xa5round", "malformed",
               "the top level must be a map")
    raw_vector("msgpack_float32_reward", "RolloutPayload",
               msgpack.packb(dict(PAYLOAD, groups=[dict(GROUP, rewards=[1.0, 0.0, 0.5])]), use_single_float=True),
               "", "float32 where float64 is written is accepted and widened exactly",
               value=dict(PAYLOAD, groups=[dict(GROUP, rewards=[1.0, 0.0, 0.5])]))
    raw_vector("msgpack_int_reward", "RolloutPayload", msgpack.packb(dict(PAYLOAD, groups=[dict(GROUP, rewards=[1, 0, 0])])),
               "", "an integer where a float is written is accepted and converted (JavaScript encoders write 1.0 as 1)",
               value=PAYLOAD)
    raw_vector("msgpack_uint64_round", "FetchRequest", b"\x82\xa7version\x92\x01\x00\xa5round\xcf\x80" + b"\x00" * 7,
               "schema", "round is at most 2^63-1; a uint64 2^63 is out of range")
    raw_vector("msgpack_int64_encoded_small_round", "FetchRequest",
               b"\x82\xa7version\x92\x01\x00\xa5round\xd3" + (7).to_bytes(8, "big"), "",
               "any msgpack integer width is accepted (here int64 for 7)", value={"version": [1, 0], "round": 7})
    raw_vector("msgpack_version_2_duplicate_key", "FetchRequest",
               b"\x83\xa7version\x92\x02\x00\xa5round\x07\xa5round\x07", "malformed",
               "order of checks: decode (malformed) before version")

    # ---- order of checks and field tables
    bad("fetch_request_too_large", "FetchRequest", b"\xc1" * 257, "too_large", "size is checked before decoding")
    bad("fetch_request_major_version_bad_round", "FetchRequest", {"version": [2, 0], "round": "x"}, "version",
        "version is checked before the schema")
    bad("fetch_request_bool_round", "FetchRequest", {"version": [1, 0], "round": True}, "schema",
        "a bool is never an int")
    bad("fetch_request_float_round", "FetchRequest", {"version": [1, 0], "round": 7.0}, "schema",
        "a float is never an int")
    bad("fetch_request_version_three_items", "FetchRequest", {"version": [1, 0, 0], "round": 7}, "schema",
        "version is exactly [major, minor]")
    bad("fetch_request_version_bool_major", "FetchRequest", {"version": [True, 0], "round": 7}, "schema",
        "a bool major is not an int: schema, not version")
    bad("fetch_request_version_minor_too_big", "FetchRequest", {"version": [1, 65536], "round": 7}, "schema",
        "major and minor are 0..65535")
    bad("fetch_request_nil_round", "FetchRequest", {"version": [1, 0], "round": None}, "schema",
        "nil is not a missing field")
    bad("manifest_nan_created_at", "Manifest", {**manifest, "created_at_s": math.nan}, "schema",
        "issue 15 hole 4: created_at_s must be finite (NaN counted as fresh forever)")
    bad("manifest_inf_created_at", "Manifest", {**manifest, "created_at_s": math.inf}, "schema",
        "created_at_s must be finite")
    bad("manifest_negative_created_at", "Manifest", {**manifest, "created_at_s": -1.0}, "schema",
        "created_at_s is >= 0")
    bad("manifest_peer_id_not_base58", "Manifest", {**manifest, "peer_id": "Qm0OIl"}, "schema",
        "peer_id uses the base58 alphabet (no 0, O, I, l)")
    bad("manifest_sha256_is_str", "Manifest", {**manifest, "payload_sha256": "ab" * 16}, "schema",
        "a str is not a bin")
    no_time = {k: v for k, v in manifest.items() if k != "created_at_s"}
    write("manifest_default_created_at", "Manifest", msgpack.packb(no_time), True, {**no_time, "created_at_s": 0.0},
          why="created_at_s is optional and defaults to 0 (such a manifest is stale)")
    hello = dict(PAYLOAD, groups=[])
    hello_bytes = msgpack.packb(hello)
    hello_manifest = dict(manifest_for(hello_bytes), num_groups=0, num_completions=0)
    write("manifest_hello_valid", "Manifest",
          wire.encode(wire.Manifest.model_validate({**hello_manifest, "version": (1, 0)})), True, hello_manifest,
          why="readiness: num_groups 0, and the size and sha256 of the empty payload served for that round")

    def spec_payload(**over):
        return dict(PAYLOAD, groups=[dict(GROUP, spec=dict(SPEC, **over))])

    bad("payload_index_equals_size", "RolloutPayload", spec_payload(index=100000), "schema",
        "index >= size is a schema reject of the whole payload")
    bad("payload_config_list_value", "RolloutPayload", spec_payload(config={"operators": ["+", "-"]}), "schema",
        "config values are scalars")
    bad("payload_config_nil_value", "RolloutPayload", spec_payload(config={"min_terms": None}), "schema",
        "nil is not a config value")
    bad("payload_config_uint64_value", "RolloutPayload", spec_payload(config={"min_terms": 2**63}), "schema",
        "config ints are int64")
    bad("payload_config_nan_value", "RolloutPayload", spec_payload(config={"p": math.nan}), "schema",
        "config floats are finite")
    bad("payload_config_bad_key", "RolloutPayload", spec_payload(config={"min-terms": 2}), "schema",
        "config keys are ASCII identifiers")
    bad("payload_config_too_large", "RolloutPayload", spec_payload(config={f"k{i}": "x" * 100 for i in range(20)}),
        "schema", "the canonical encoding of config is over 2048 bytes")
    scalars = {"flag": True, "n": -(2**63), "p": 0.25, "name": "é" * 128}
    write("payload_config_scalars", "RolloutPayload", msgpack.packb(spec_payload(config=scalars)), True,
          spec_payload(config=scalars), why="every allowed config type at its limit: bool, int64, float, 128-char str")
    write("payload_negative_seed", "RolloutPayload", msgpack.packb(spec_payload(seed=-5)), True, spec_payload(seed=-5),
          why="seed is int64")
    wide = dict(GROUP, completions=["é" * 8192, "b", "c"])
    write("payload_completion_8192_code_points", "RolloutPayload", msgpack.packb(dict(PAYLOAD, groups=[wide])), True,
          dict(PAYLOAD, groups=[wide]), why="a char is a code point: 8192 chars of 2 UTF-8 bytes each are allowed")
    bad("payload_completion_8193_code_points", "RolloutPayload",
        dict(PAYLOAD, groups=[dict(wide, completions=["é" * 8193, "b", "c"])]), "schema", "8193 code points")
    bad("payload_bool_reward", "RolloutPayload", dict(PAYLOAD, groups=[dict(GROUP, rewards=[True, False, False])]),
        "schema", "a bool is not a float")


ANSWERS = [
    ("single", "<answer>9</answer>", "9"),
    ("last_pair_counts", "<answer>8</answer> no wait <answer>9</answer>", "9"),
    ("unclosed_then_pair", "<answer>8 <answer>9</answer>", "9"),
    ("extra_close", "<answer>9</answer></answer>", "9"),
    ("ascii_whitespace_stripped", "<answer>\n 9\t</answer>", "9"),
    ("nbsp_kept", "<answer>\u00a09</answer>", "\u00a09"),
    ("case_sensitive", "<ANSWER>9</ANSWER>", None),
    ("close_before_open", "</answer><answer>9", None),
    ("empty", "<answer></answer>", ""),
    ("none", "9", None),
]


def answers() -> None:
    for name, completion, answer in ANSWERS:
        (OUT / f"answer_{name}.json").write_text(json.dumps(
            {"message": "Answer", "completion": completion, "answer": answer,
             "why": "PROTOCOL.md Answer extraction"}, indent=1, sort_keys=True, ensure_ascii=False) + "\n")


DHT_VECTOR = "dht_record_signed.json"


def dht_record(manifest_bytes: bytes) -> None:
    """A signed DHT record as hivemind writes it: the exact signed bytes and one signature that verifies."""
    from hivemind.dht.crypto import RSASignatureValidator
    from hivemind.dht.routing import DHTID
    from hivemind.dht.validation import DHTRecord
    from hivemind.utils import MSGPackSerializer
    from hivemind.utils.crypto import RSAPrivateKey

    validator = RSASignatureValidator(RSAPrivateKey())
    key = "sapo/v1/rollouts/3"
    record = DHTRecord(DHTID.generate(source=key).to_bytes(), MSGPackSerializer.dumps(validator.local_public_key),
                       MSGPackSerializer.dumps(manifest_bytes), 1795000600.5)
    signed_value = validator.sign_value(record)
    (OUT / DHT_VECTOR).write_text(json.dumps({
        "message": "DhtRecord", "key": key, "owner_marker": validator.local_public_key.decode(),
        "manifest": manifest_bytes.hex(), "expiration": record.expiration_time,
        "key_bytes": record.key.hex(), "subkey_bytes": record.subkey.hex(), "value_bytes": record.value.hex(),
        "signed_message": validator._serialize_record(record).hex(), "signed_value": signed_value.hex(),
        "why": "PROTOCOL.md Signed bytes of a DHT record"}, indent=1, sort_keys=True) + "\n")



def shard_keys() -> None:
    """The DHT key of a peer's manifest for several shard counts (PROTOCOL.md, DHT layout and Sampled reads)."""
    import hashlib

    from swarm_node.network.exchange import rollout_key, shard_of

    ids = ["QmXf2tinhvF778V2YdBTCPoPwGmbWrEpXTYhHqfiASa9PV"] + [
        "Qm" + hashlib.sha256(str(i).encode()).hexdigest()[:44] for i in range(3)]
    cases = [{"peer_id": pid, "num_shards": s, "sha256_hex": hashlib.sha256(pid.encode()).hexdigest(),
              "shard": shard_of(pid, s), "key": rollout_key("sapo", shard_of(pid, s))}
             for pid in ids for s in (8, 3, 256, 512, 4096)]
    (OUT / "shard_keys.json").write_text(json.dumps({
        "message": "ShardKey", "why": "shard = sha256(utf8(peer_id))[0] mod S for S <= 256, else the first 4 digest "
        "bytes as a little-endian integer mod S; key = \"{swarm_name}/v1/rollouts/{shard}\"", "cases": cases},
        indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()

