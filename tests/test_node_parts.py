"""The node's parts outside the round loop: explaining a failed join (retry or not), the hard deadline on
hivemind's DHT start, and checkpoint state gathered from parts that own it (format 2, and format 1 still loads)."""

from __future__ import annotations

import asyncio
import random
import types
from pathlib import Path

import pytest
import torch

from swarm_node.config import NetworkConfig
from swarm_node.node import join
from swarm_node.node.join import DhtStartHung, NetworkError, explain_join_failure
from swarm_node.node.state import node_state

DEAD = "/ip4/127.0.0.1/tcp/9/p2p/QmXf2tinhvF778V2YdBTCPoPwGmbWrEpXTYhHqfiASa9PV"


def test_join_failures_are_classified_from_hivemind_text_only():
    net, ident = NetworkConfig(initial_peers=[DEAD]), Path("/x/identity.key")
    explain = lambda text: explain_join_failure(RuntimeError(text), net, ident, 70.0)  # noqa: E731
    assert not explain("P2PDaemonError: peer ID already taken").retryable
    assert not explain("listen tcp: address already in use").retryable
    assert not explain("failed to connect to bootstrap peers").retryable
    assert explain("P2PDaemonError: Daemon failed to start in 0.001 seconds").retryable
    assert explain("something new").retryable
    hung = explain_join_failure(DhtStartHung(), net, ident, 70.0)
    assert hung.retryable and "within 70 s" in hung.message and "--startup-timeout-s" in hung.message
    # a message of ours is never re-classified: wrapping one in an exception does not make it "not retryable"
    ours = explain("failed to start").message
    assert explain(ours).retryable


@pytest.mark.slow
def test_a_dht_start_past_its_deadline_is_abandoned_and_reaped(reap_children, tmp_path):
    """The DHT process cannot be ready within 10 ms: the start raises DhtStartHung instead of waiting forever,
    and the caller kills what the attempt started (the reap_children fixture fails the test otherwise)."""
    before = join.child_pids()
    with pytest.raises(DhtStartHung):
        join._start_dht(dict(host_maddrs=["/ip4/127.0.0.1/tcp/0"], startup_timeout=30,
                             identity_path=None, record_validators=[]), deadline_s=0.01)
    join.kill_and_wait(join.new_children(before), grace_s=0)


def test_a_hung_start_becomes_one_network_error_after_the_retries(monkeypatch):
    attempts = []

    def hang(kwargs, deadline_s):
        attempts.append(deadline_s)
        raise DhtStartHung()

    monkeypatch.setattr(join, "_start_dht", hang)
    monkeypatch.setattr(join, "JOIN_BACKOFF_S", 0.0)
    net = NetworkConfig(startup_timeout_s=5.0, startup_retries=1)
    with pytest.raises(NetworkError, match=r"did not start within 65 s .*--startup-timeout-s"):
        asyncio.run(join.start_dht(net, Path("identity.key"), validator=None, initial_peers=[]))
    assert attempts == [5.0 + join.JOIN_DEADLINE_MARGIN_S] * 2


def test_an_unreachable_bootstrap_peer_from_a_file_is_retried_and_named():
    """A bootstrap peer given on the command line that cannot be reached is final; one read from
    --initial-peers-file is retried (the file may be a stopped peer's, rewritten when it restarts)."""
    ident = Path("/x/identity.key")
    from_file = explain_join_failure(RuntimeError("failed to connect to bootstrap peers"),
                                     NetworkConfig(initial_peers_file="/swarm/node0/node.json"), ident, 70.0, [DEAD])
    assert from_file.retryable and "/swarm/node0/node.json" in from_file.message and DEAD in from_file.message
    flag = explain_join_failure(RuntimeError("failed to connect to bootstrap peers"),
                                NetworkConfig(initial_peers=[DEAD]), ident, 70.0, [DEAD])
    assert not flag.retryable and "/swarm" not in flag.message


@pytest.mark.slow
def test_a_join_retry_dials_the_rewritten_bootstrap_peers(reap_children, monkeypatch, tmp_path):
    """A real DHT start whose first bootstrap address is dead (a stale node.json): the retry re-reads the peers
    and joins the live DHT they now name."""
    from hivemind import DHT

    from swarm_node.network.exchange import CountingSignatureValidator
    from swarm_node.network.identity import load_or_create_identity

    monkeypatch.setattr(join, "JOIN_BACKOFF_S", 0.1)
    identity = load_or_create_identity(tmp_path / "identity.key")
    live = DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    reads = []

    async def reload():
        reads.append(1)
        return [str(a) for a in live.get_visible_maddrs()]

    net = NetworkConfig(initial_peers_file="node.json", startup_timeout_s=15.0, startup_retries=2)
    dht = None
    try:
        dht = asyncio.run(join.start_dht(net, identity.path, CountingSignatureValidator(identity.private_key),
                                         initial_peers=[DEAD], reload_peers=reload))
        assert reads == [1]  # exactly one failed attempt, then the re-read peers worked
        assert dht.peer_id != live.peer_id and dht.is_alive()
    finally:
        for d in (dht, live):
            if d is not None:
                d.shutdown()


def _parts(seed: int):
    torch.manual_seed(seed)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    trainer = types.SimpleNamespace(optimizer=optimizer, base_optimizer=optimizer, policy_version=seed)
    return types.SimpleNamespace(model=model), trainer, random.Random(seed), random.Random(seed + 100)


class Anchor:
    """A merger with state of its own (like WeightMerger's anchor and outer momentum)."""

    def __init__(self, value):
        self.value = value

    def state_dict(self):
        return {"value": self.value}

    def load_state_dict(self, state):
        if state["value"] < 0:
            raise ValueError("merging was reconfigured")
        self.value = state["value"]


def test_checkpoint_state_is_gathered_from_parts_and_restored_into_them():
    policy, trainer, task_rng, sample_rng = _parts(1)
    saved = node_state(policy, trainer, 0.5, task_rng, sample_rng, Anchor(7)).state_dict("QmA")
    assert saved["format"] == 2 and set(saved["parts"]) == {"trainer", "task_stream", "sampler", "torch_rng", "merger"}
    expected_draws = (task_rng.random(), sample_rng.random())

    policy2, trainer2, task_rng2, sample_rng2 = _parts(2)
    anchor = Anchor(0)
    node_state(policy2, trainer2, 0.01, task_rng2, sample_rng2, anchor).load_state_dict(saved)
    assert torch.equal(policy2.model.weight, policy.model.weight) and trainer2.policy_version == 1
    assert trainer2.optimizer.param_groups[0]["lr"] == 0.01  # the configured learning rate wins
    assert (task_rng2.random(), sample_rng2.random()) == expected_draws and anchor.value == 7

    saved["parts"]["merger"] = {"value": -1}  # a merger that refuses its old state starts afresh, with a warning
    policy3, trainer3, task_rng3, sample_rng3 = _parts(3)
    node_state(policy3, trainer3, 0.01, task_rng3, sample_rng3, anchor).load_state_dict(saved)
    assert anchor.value == 7


def test_a_format_1_checkpoint_still_loads():
    policy, trainer, task_rng, sample_rng = _parts(1)
    flat = {"format": 1, "peer_id": "QmA", "policy_version": 4, "model": policy.model.state_dict(),
            "optimizer": trainer.optimizer.state_dict(), "task_rng": task_rng.getstate(),
            "sample_rng": sample_rng.getstate(), "torch_rng": torch.get_rng_state(), "merger": None, "round": 4}
    policy2, trainer2, task_rng2, sample_rng2 = _parts(2)
    node_state(policy2, trainer2, 0.01, task_rng2, sample_rng2, Anchor(3)).load_state_dict(flat)
    assert torch.equal(policy2.model.bias, policy.model.bias) and trainer2.policy_version == 4
    assert task_rng2.random() == task_rng.random()
    with pytest.raises(KeyError):  # a required part missing: the node turns this into a ModelError
        node_state(policy2, trainer2, 0.01, task_rng2, sample_rng2).load_state_dict({"format": 2, "parts": {}})
