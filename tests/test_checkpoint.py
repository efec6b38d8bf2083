"""CheckpointStore: atomic saves, pruning, and falling back past corrupt or foreign checkpoints."""

import logging

import torch

from swarm_node.checkpoint import CheckpointStore


def state(peer="QmA", value=1.0):
    return {"peer_id": peer, "weights": torch.full((3,), value)}


def test_save_load_and_keep_last_n(tmp_path):
    store = CheckpointStore(tmp_path, keep=2)
    for r in (1, 2, 3):
        store.save(r, state(value=float(r)))
    assert [r for r, _ in store.list()] == [3, 2]
    loaded = store.load_latest("QmA")
    assert loaded["round"] == 3 and torch.equal(loaded["weights"], torch.full((3,), 3.0))
    assert not list(tmp_path.glob("*.tmp"))


def test_corrupt_or_partial_checkpoint_falls_back_with_warning(tmp_path, caplog):
    store = CheckpointStore(tmp_path, keep=3)
    store.save(1, state(value=1.0))
    path = store.save(2, state(value=2.0))
    path.write_bytes(path.read_bytes()[:100])  # torn write
    with caplog.at_level(logging.WARNING):
        loaded = store.load_latest("QmA")
    assert loaded["round"] == 1
    assert "skipping checkpoint round-00000002.pt" in caplog.text


def test_checkpoint_of_another_peer_is_not_loaded(tmp_path):
    store = CheckpointStore(tmp_path)
    store.save(4, state(peer="QmOther"))
    assert store.load_latest("QmA") is None
