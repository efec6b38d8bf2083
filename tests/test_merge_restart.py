"""A merger's own state (anchor, DiLoCo outer momentum, level) survives a restart with no peers online.

Real hivemind DHT and averager processes on 127.0.0.1; a real tiny node for the checkpoint round trip.
"""

from __future__ import annotations

import asyncio

import pytest
import torch

from merge_peers import assert_close_lists, config, merger, model, shutdown, start_peers, weights
from swarm_node.config import load_config
from swarm_node.node import Node

pytestmark = pytest.mark.slow


def test_restored_diloco_state_is_kept_when_no_peer_state_is_online(reap_children):
    peers = start_peers(1)
    first = merger(config(merge_mode="diloco"), peers[0], model(seed=0))
    with torch.no_grad():  # an outer state that no fresh merger would have
        for a, m in zip(first.anchor, first.momentum):
            a.add_(torch.randn_like(a))
            m.copy_(torch.randn_like(m))
    first.level = 3
    saved = first.state_dict()
    shutdown([first], peers)

    peers = start_peers(1)
    restarted = model(seed=1)  # the node's current weights differ from the anchor it saved
    second = merger(config(merge_mode="diloco"), peers[0], restarted)
    try:
        second.load_state_dict(saved)
        assert second.join(0) is False  # alone: nothing to adopt from peers
        assert_close_lists(second.anchor, saved["anchor"], atol=0)
        assert_close_lists(second.momentum, saved["momentum"], atol=0)
        assert second.level == 3
        assert_close_lists(weights(restarted), weights(model(seed=1)), atol=0)  # the model itself is untouched
        with pytest.raises(ValueError, match="does not fit"):
            second.load_state_dict({**saved, "mode": "params"})
        with pytest.raises(ValueError, match="do not fit"):
            second.load_state_dict({**saved, "anchor": saved["anchor"][:-1]})
    finally:
        shutdown([second], peers)


def test_node_checkpoint_carries_the_merger_state(tmp_path, reap_children):
    def node_config(rounds: int):
        return load_config(environ={}, overrides=dict(
            output_dir=str(tmp_path / "node"), model="tiny", rounds=rounds, num_local_groups=2, num_completions=3,
            max_new_tokens=6, num_external_groups=0, checkpoint_every_rounds=1, torch_threads=1, metrics_port=-1,
            merge_mode="diloco", merge_every_rounds=1, merge_matchmaking_timeout_s=1.0, linger_s=0))

    async def run_then_restart():
        node = Node(node_config(2))
        await node.start()
        try:
            await node.run()
            with torch.no_grad():  # alone, DiLoCo never stepped: give its outer state values to survive
                for m in node.merger.momentum:
                    m.copy_(torch.randn_like(m))
            saved = node.merger.state_dict()
            node._save_checkpoint()
        finally:
            await node.stop()
        again = Node(node_config(3))
        await again.start()
        try:
            assert again.round == 2
            assert_close_lists(again.merger.anchor, saved["anchor"], atol=0)
            assert_close_lists(again.merger.momentum, saved["momentum"], atol=0)
            assert any(m.abs().sum() > 0 for m in again.merger.momentum)
        finally:
            await again.stop()

    asyncio.run(run_then_restart())
