"""Helpers for merging tests between real hivemind peers on 127.0.0.1 (DHT and averager processes, no mocks).

Each peer is a DHT with its own identity key and an RSASignatureValidator of that key (as a node runs it), plus a
WeightMerger over a small model. Merges run on threads, as on a node's torch thread.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import signal
import tempfile
import time
from pathlib import Path

import psutil
import torch

import swarm_node.network  # noqa: F401  (hivemind patches before any DHT exists)
from hivemind import DHT
from hivemind.dht.crypto import RSASignatureValidator

from swarm_node.config import MergeConfig
from swarm_node.network.identity import load_or_create_identity
from swarm_node.network.merging.weights import WeightMerger


@dataclasses.dataclass
class Peer:
    dht: DHT
    key: object  # the identity's RSAPrivateKey


def model(width: int = 256, layers: int = 2, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)])


def weights(m: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in m.parameters()]


def start_peers(n: int, initial_peers: list[str] | None = None) -> list[Peer]:
    peers: list[Peer] = []
    for _ in range(n):
        path = Path(tempfile.mkdtemp(prefix="merge-peer-")) / "identity.key"
        identity = load_or_create_identity(path)
        initial = initial_peers or ([str(a) for a in peers[0].dht.get_visible_maddrs()] if peers else None)
        dht = DHT(start=True, initial_peers=initial, host_maddrs=["/ip4/127.0.0.1/tcp/0"], identity_path=str(path),
                  record_validators=[RSASignatureValidator(identity.private_key)])
        peers.append(Peer(dht, identity.private_key))
    return peers


def maddrs(peer: Peer) -> list[str]:
    return [str(a) for a in peer.dht.get_visible_maddrs()]


def config(**overrides) -> MergeConfig:
    base = dict(merge_mode="params", merge_compression="none", merge_matchmaking_timeout_s=3.0,
                merge_allreduce_timeout_s=6.0, merge_state_load_timeout_s=20.0, merge_target_group_size=3)
    return MergeConfig(**{**base, **overrides})


def merger(cfg: MergeConfig, peer: Peer, m: torch.nn.Module, optimizer=None, cls=WeightMerger) -> WeightMerger:
    return cls(cfg, peer.dht, m, optimizer or torch.optim.AdamW(m.parameters()), "test", private_key=peer.key)


def wait_visible(mergers: list[WeightMerger], timeout_s: float = 30, count: int = 1) -> None:
    """Wait until every merger sees `count` other members in the signed registry."""
    deadline = time.monotonic() + timeout_s
    while not all(len(mg.registry.members() or []) >= count for mg in mergers):
        assert time.monotonic() < deadline, "mergers did not see each other in the registry"
        time.sleep(0.2)


def merge_all(mergers: list[WeightMerger]) -> list:
    with concurrent.futures.ThreadPoolExecutor(len(mergers)) as pool:
        return list(pool.map(lambda mg: mg.merge(), mergers))


def shutdown(mergers, peers) -> None:
    with concurrent.futures.ThreadPoolExecutor(max(1, len(peers))) as pool:
        list(pool.map(lambda mg: mg.shutdown(), mergers))
        list(pool.map(lambda p: p.dht.shutdown(), peers))


def assert_close_lists(a, b, atol):
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=0, atol=atol)


def train_a_little(m: torch.nn.Module, scale: float = 0.01, seed: int | None = None) -> None:
    """Local training, simulated: move every weight a little (independent noise per peer)."""
    g = torch.Generator().manual_seed(seed) if seed is not None else None
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)


def kill_peer(peer: Peer, mg: WeightMerger) -> None:
    """SIGKILL a peer's averager, DHT process and p2pd: the machine is gone."""
    victims = [psutil.Process(mg.averager.pid), psutil.Process(peer.dht.pid)]
    victims += psutil.Process(peer.dht.pid).children(recursive=True)
    for proc in victims:
        try:
            os.kill(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    psutil.wait_procs(victims, timeout=5)
