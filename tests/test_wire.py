"""The msgpack codec: round trips, versioning rule, and rejection reasons."""

import math

import msgpack
import pytest

from swarm_node.network import wire


def payload(**over):
    base = dict(
        version=wire.PROTOCOL_VERSION, peer_id="QmPeer", round=3, policy_version=2, model="tiny",
        groups=[wire.WireGroup(
            spec=wire.WireTaskSpec(dataset="chain_sum", config={"min_terms": 2}, seed=0, index=5, size=100,
                                   rg_version="0.1.25"),
            completions=["<answer>1</answer>", "no"], rewards=[1.0, 0.0])],
    )
    base.update(over)
    return wire.RolloutPayload(**base)


def raw(message):
    return msgpack.unpackb(wire.encode(message), raw=False)


def test_payload_round_trip():
    p = payload()
    assert wire.decode_payload(wire.encode(p), 1 << 20) == p


def test_manifest_round_trip_and_size():
    m = wire.Manifest(version=wire.PROTOCOL_VERSION, peer_id="Qm" + "x" * 44, round=10**6, policy_version=10**6,
                      model="smollm2-135m", num_groups=8, num_completions=64, payload_bytes=123456,
                      payload_sha256=b"\x01" * 32, created_at_s=1.7e9)
    data = wire.encode(m)
    assert wire.decode_manifest(data) == m
    assert len(data) < wire.MAX_MANIFEST_BYTES


def test_unknown_fields_ignored_and_minor_version_accepted():
    d = raw(payload())
    d["future_field"] = {"anything": [1, 2]}
    d["version"] = [wire.PROTOCOL_MAJOR, wire.PROTOCOL_MINOR + 5]
    d["groups"][0]["extra"] = "x"
    decoded = wire.decode_payload(msgpack.packb(d), 1 << 20)
    assert decoded.groups == payload().groups


def mutate(fn):
    d = raw(payload())
    fn(d)
    return msgpack.packb(d)


@pytest.mark.parametrize("data, reason", [
    (b"\xc1\xff\x00garbage", "malformed"),
    (msgpack.packb([1, 2, 3]), "malformed"),
    (mutate(lambda d: d.update(version=[2, 0])), "version"),
    (mutate(lambda d: d.update(round="3")), "schema"),
    (mutate(lambda d: d.update(round=-1)), "schema"),
    (mutate(lambda d: d.pop("peer_id")), "schema"),
    (mutate(lambda d: d["groups"][0].update(rewards=[math.nan, 0.0])), "schema"),
    (mutate(lambda d: d["groups"][0].update(rewards=[math.inf, 0.0])), "schema"),
    (mutate(lambda d: d["groups"][0].update(rewards=[1.0])), "schema"),
    (mutate(lambda d: d["groups"][0].update(completions=["x" * (wire.MAX_COMPLETION_CHARS + 1), "y"])), "schema"),
    (mutate(lambda d: d.update(groups=d["groups"] * (wire.MAX_GROUPS_PER_PAYLOAD + 1))), "schema"),
    (mutate(lambda d: d["groups"][0]["spec"].update(index=1.5)), "schema"),
])
def test_invalid_payloads_rejected_with_reason(data, reason):
    with pytest.raises(wire.WireError) as e:
        wire.decode_payload(data, 1 << 20)
    assert e.value.reason == reason


def test_payload_over_limit_rejected_before_parsing():
    data = wire.encode(payload())
    with pytest.raises(wire.WireError) as e:
        wire.decode_payload(data, len(data) - 1)
    assert e.value.reason == "too_large"


def test_signed_records_of_64_peers_fit_far_below_the_dht_message_cap():
    """Layout check for 64+ peers: one DHT value holds every subkey of a shard key."""
    from hivemind.dht.crypto import RSASignatureValidator
    from hivemind.dht.validation import DHTRecord

    validator = RSASignatureValidator()
    m = wire.Manifest(version=wire.PROTOCOL_VERSION, peer_id="Qm" + "x" * 44, round=2**40, policy_version=2**40,
                      model="m" * 128, num_groups=64, num_completions=4096, payload_bytes=2**32,
                      payload_sha256=b"\xff" * 32, created_at_s=1.8e9)
    value = wire.encode(m)
    record = DHTRecord(key=b"k" * 20, subkey=validator.local_public_key, value=value, expiration_time=1.8e9)
    signed = validator.sign_value(record)
    per_peer = len(signed) + len(validator.local_public_key)
    assert per_peer < 1400
    peers, shards, dht_cap = 64, 8, 4 * 1024 * 1024
    assert peers / shards * per_peer < dht_cap / 100  # ~11 KiB per value vs a 4 MiB cap


# ---------------------------------------------------------------- strict decoding (PROTOCOL.md "Decoding")
def packed_payload(**group_spec_over):
    d = raw(payload())
    d["groups"][0]["spec"].update(group_spec_over)
    return d


def test_deeply_nested_config_is_rejected_at_the_wire():
    """Hole 1 (issue 15): a config value nested 1,000 levels deep (1 KB, inside msgpack's own stack limit and the
    2,048-byte config budget) decoded fine and crashed re-creation with RecursionError."""
    d = raw(payload())
    d["groups"][0]["spec"]["config"] = {"min_terms": 2}
    data = msgpack.packb(d)
    deep = data.replace(msgpack.packb({"min_terms": 2}), b"\x81\xa9min_terms" + b"\x91" * 1000 + b"\x02")
    assert len(deep) == len(data) + 1000
    with pytest.raises(wire.WireError) as e:
        wire.decode_payload(deep, 1 << 20)
    assert e.value.reason == "malformed" and "nested deeper" in e.value.detail


@pytest.mark.parametrize("value", [[1], {"a": 1}, None, b"\x01", 2**63, 2**64 - 1, math.nan, math.inf, "x" * 129])
def test_config_values_are_bounded_scalars(value):
    with pytest.raises(wire.WireError) as e:
        wire.decode_payload(msgpack.packb(packed_payload(config={"min_terms": value})), 1 << 20)
    assert e.value.reason == "schema"


@pytest.mark.parametrize("value", [True, 0, -(2**63), 2**63 - 1, 1.5, "x" * 128])
def test_config_scalars_keep_their_type(value):
    decoded = wire.decode_payload(msgpack.packb(packed_payload(config={"k": value})), 1 << 20)
    got = decoded.groups[0].spec.config["k"]
    assert got == value and type(got) is type(value)


@pytest.mark.parametrize("created_at_s", [math.nan, math.inf, -math.inf, -1.0])
def test_manifest_created_at_must_be_finite_and_non_negative(created_at_s):
    """Hole 4 (issue 15): a manifest with created_at_s = NaN counted as fresh forever."""
    m = raw(wire.Manifest(version=wire.PROTOCOL_VERSION, peer_id="QmPeer", round=1, policy_version=0, model="tiny",
                          num_groups=1, num_completions=2, payload_bytes=10, payload_sha256=b"\x01" * 32,
                          created_at_s=1.7e9))
    m["created_at_s"] = created_at_s
    with pytest.raises(wire.WireError) as e:
        wire.decode_manifest(msgpack.packb(m))
    assert e.value.reason == "schema"


def test_float_fields_take_float32_and_integers_but_not_bools():
    d = raw(payload())
    d["groups"][0]["rewards"] = [1, 0.0]
    assert wire.decode_payload(msgpack.packb(d), 1 << 20).groups[0].rewards == [1.0, 0.0]
    assert wire.decode_payload(msgpack.packb(raw(payload()), use_single_float=True), 1 << 20) == payload()
    d["groups"][0]["rewards"] = [True, 0.0]
    with pytest.raises(wire.WireError, match="schema"):
        wire.decode_payload(msgpack.packb(d), 1 << 20)


@pytest.mark.parametrize("data", [
    b"\x82\xa1a\x01\xa1a\x02",  # duplicate key
    b"\x81\xc4\x01a\x01",  # bin key
    b"\x81\x01\x01",  # int key
    b"\x81\xa1a\xd4\x05\x01",  # ext type 5
    b"\x81\xa1a\xd6\xff\x00\x00\x00\x01",  # timestamp ext (-1)
    b"\x81\xa1a\x01\x00",  # trailing byte
    b"\x81\xa1a\xa2\xc3\x28",  # invalid UTF-8
    b"\x81\xa1a\xa3\xed\xa0\x80",  # UTF-8-encoded surrogate
    b"\x81\xa1a" + b"\x91" * 6 + b"\x01",  # depth 7 (the map is level 1)
    b"\x81\xa1a\x92\x01",  # truncated
])
def test_msgpack_level_rejections_are_malformed(data):
    for decode in (wire.decode_manifest, wire.decode_request, lambda b: wire.decode_payload(b, 1 << 20)):
        with pytest.raises(wire.WireError) as e:
            decode(data)
        assert e.value.reason == "malformed"


def test_order_of_checks_first_failure_wins():
    bad_major_and_schema = msgpack.packb({"version": [2, 0], "round": "x"})
    assert _reason(wire.decode_request, bad_major_and_schema) == "version"
    assert _reason(wire.decode_request, bad_major_and_schema + b"\x00") == "malformed"
    assert _reason(wire.decode_request, b"\xc1" * 300) == "too_large"
    assert _reason(wire.decode_request, msgpack.packb({"version": [True, 0], "round": 1})) == "schema"
    assert _reason(wire.decode_request, msgpack.packb({"version": [1, 0, 0], "round": 1})) == "schema"


def _reason(decode, data):
    with pytest.raises(wire.WireError) as e:
        decode(data)
    return e.value.reason


def test_index_at_or_over_size_is_a_schema_reject():
    with pytest.raises(wire.WireError, match="schema"):
        wire.decode_payload(msgpack.packb(packed_payload(index=100, size=100)), 1 << 20)


def test_a_task_set_whose_config_cannot_travel_is_an_operator_error():
    from swarm_node.learning.tasks import TaskError, TaskSet

    with pytest.raises(TaskError, match="operators"):
        TaskSet("custom", ['basic_arithmetic:{"operators": ["+", "-"]}'], 0, 0, 100)


def test_an_empty_container_deeper_than_the_bound_is_malformed_too():
    assert _reason(wire.decode_request, b"\x81\xa1a" + b"\x91" * 5 + b"\x90") == "malformed"  # [] at depth 7
    assert wire.decode_request(b"\x83\xa7version\x92\x01\x00\xa5round\x07\xa1a" + b"\x91" * 4 + b"\x90").round == 7
