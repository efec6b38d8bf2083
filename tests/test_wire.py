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
