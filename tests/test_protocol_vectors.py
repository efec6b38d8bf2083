"""The code against every golden vector in protocols/v1/: a wire change shows up as a spec diff."""

import json
from pathlib import Path

import pytest

from swarm_node.network import wire

ALL = sorted((Path(__file__).resolve().parents[1] / "protocols" / "v1").glob("*.json"))
KIND = {p: json.loads(p.read_text())["message"] for p in ALL}
VECTORS = [p for p in ALL if KIND[p] not in ("Answer", "DhtRecord", "ShardKey")]
ANSWERS = [p for p in ALL if KIND[p] == "Answer"]
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
    assert len(VECTORS) >= 45 and sum(p.stem.startswith("msgpack_") for p in VECTORS) >= 10  # issue 15 target


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


@pytest.mark.parametrize("path", ANSWERS, ids=[p.stem for p in ANSWERS])
def test_answer_extraction_vector(path):
    from swarm_node.learning.tasks import extract_answer

    twin = json.loads(path.read_text())
    assert extract_answer(twin["completion"]) == twin["answer"]


def _msgpack_bin(data: bytes) -> bytes:
    n = len(data)
    head = b"\xc4" + n.to_bytes(1, "big") if n < 256 else b"\xc5" + n.to_bytes(2, "big") if n < 65536 else b"\xc6" + n.to_bytes(4, "big")
    return head + data


def test_dht_record_signed_bytes_follow_the_spec_and_verify():
    """PROTOCOL.md "Signed bytes of a DHT record", rebuilt without hivemind, then checked with hivemind."""
    import hashlib
    import struct

    from hivemind.dht.crypto import RSASignatureValidator
    from hivemind.dht.validation import DHTRecord

    v = json.loads((ALL[0].parent / "dht_record_signed.json").read_text())
    key_str = v["key"].encode()
    key_bytes = hashlib.sha1(bytes([0xA0 | len(key_str)]) + key_str).digest()  # fixstr (key < 32 bytes)
    subkey_bytes = _msgpack_bin(v["owner_marker"].encode())
    value_bytes = _msgpack_bin(bytes.fromhex(v["manifest"]))
    items = b"\x94" + b"".join(_msgpack_bin(b) for b in (key_bytes, subkey_bytes, value_bytes))
    items += b"\xcb" + struct.pack(">d", v["expiration"])
    n = len(items)
    ext = (b"\xc7" + n.to_bytes(1, "big") if n < 256 else b"\xc8" + n.to_bytes(2, "big")) + b"\x40" + items
    assert (key_bytes.hex(), subkey_bytes.hex(), value_bytes.hex()) == (v["key_bytes"], v["subkey_bytes"], v["value_bytes"])
    assert ext.hex() == v["signed_message"]
    signed_value = bytes.fromhex(v["signed_value"])
    assert signed_value.startswith(value_bytes + b"[signature:") and signed_value.endswith(b"]")
    record = DHTRecord(key_bytes, subkey_bytes, signed_value, v["expiration"])
    assert RSASignatureValidator().validate(record)
    tampered = DHTRecord(key_bytes, subkey_bytes, signed_value.replace(b"smollm2", b"smollm3"), v["expiration"])
    assert not RSASignatureValidator().validate(tampered)


def test_dht_record_signature_is_rsa_pss_sha256_with_222_byte_salt():
    import base64

    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import padding

    v = json.loads((ALL[0].parent / "dht_record_signed.json").read_text())
    key = serialization.load_ssh_public_key(v["owner_marker"].removeprefix("[owner:").removesuffix("]").encode())
    signed_value = bytes.fromhex(v["signed_value"])
    signature = base64.b64decode(signed_value[signed_value.rindex(b"[signature:") + 11 : -1])
    pss = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=222)
    key.verify(signature, bytes.fromhex(v["signed_message"]), pss, hashes.SHA256())  # raises if not
