"""Sybil memory benchmark: the node's RSS while 100k distinct fake peer IDs pass through the collector and trust code.

    python benchmarks/sybil_memory.py [--peers 100000] [--batch 1000] [--label branch]

Issue 15, hole 6: the collector's and the trust tracker's per-peer maps grew with every peer ID ever seen. This
feeds the real `Collector` (and its `PeerTrust`) `--peers` fresh peer IDs, `--batch` per collection cycle, through
a stand-in for the rollout exchange (the network boundary: no DHT is needed to produce records): each cycle's DHT
poll returns `batch` fresh manifests of new IDs (all admitted: max_manifests_per_round = fetches_per_round = batch) plus `batch`
malformed records signed by other new IDs, and every fetch fails with `hash_mismatch` (a strike). So every ID
lands in the announcement, admission, failure and strike maps. RSS (psutil, after gc) is sampled every 10% of the
run. It runs against whichever swarm_node is first on PYTHONPATH (today's main or this branch), so both can be
recorded: results are merged into benchmarks/results/sybil_memory.json under `--label`.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import platform
import random
import subprocess
import time
from pathlib import Path

import psutil

import swarm_node
from hivemind.utils import get_dht_time
from swarm_node.config import NetworkConfig, TrainConfig
from swarm_node.network import wire
from swarm_node.network.collector import Collector, CollectorSettings
from swarm_node.network.exchange import FetchError, Rejection

ALPHABET = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"


def fake_peer_id(rng: random.Random) -> str:
    return "Qm" + "".join(rng.choice(ALPHABET) for _ in range(44))


class FakeExchange:
    """The exchange's poll/fetch interface with made-up peers (stands in for the DHT and libp2p)."""

    def __init__(self, batch: int, seed: int = 0):
        self.batch, self.rng, self.fed = batch, random.Random(seed), 0

        class _P2P:
            async def list_peers(self):
                return []

        self.p2p = _P2P()

    async def poll(self, shards=None):
        manifests, rejections = [], []
        for _ in range(self.batch):
            pid = fake_peer_id(self.rng)
            manifests.append(wire.Manifest.model_construct(
                version=wire.PROTOCOL_VERSION, peer_id=pid, round=1, policy_version=0, model="m", num_groups=1,
                num_completions=2, payload_bytes=100, payload_sha256=self.rng.randbytes(32),
                created_at_s=get_dht_time()))
            rejections.append(Rejection("malformed", fake_peer_id(self.rng), "", self.rng.randbytes(32)))
        self.fed += 2 * self.batch
        return manifests, rejections

    async def fetch(self, manifest, max_payload_bytes):
        raise FetchError("hash_mismatch")


def rss_mb() -> float:
    gc.collect()
    return psutil.Process().memory_info().rss / 2**20


async def feed(peers: int, batch: int) -> dict:
    exchange = FakeExchange(batch)
    net = NetworkConfig(max_manifests_per_round=batch, fetches_per_round=batch, max_inflight_fetches=batch,
                        ban_strikes=1000)
    collector = Collector(exchange, CollectorSettings.pick(net, TrainConfig(model="tiny")), random.Random(0))
    samples = [(0, rss_mb())]
    t0 = time.perf_counter()
    cycles = peers // (2 * batch)
    for cycle in range(cycles):
        if hasattr(collector, "collect_once"):  # this branch: background cycles, `take` once per round
            await collector.collect_once()
            await asyncio.gather(*list(getattr(collector, "_inflight", {}).values()))
            collector.take()
        else:  # today's main: one collect call per round
            await collector.collect(cycle + 1, lambda: False)
        if (cycle + 1) % max(1, cycles // 10) == 0:
            samples.append((exchange.fed, rss_mb()))
    sizes = {}
    owners = [("collector", collector), ("trust", collector.trust)]
    if hasattr(collector, "admission"):  # since issue 13 the admission maps live in network/admission.py
        owners.append(("admission", collector.admission))
    for owner, obj in owners:
        for name, value in vars(obj).items():
            if hasattr(value, "__len__") and not isinstance(value, (str, bytes)):
                sizes[f"{owner}.{name}"] = len(value)
    if hasattr(collector, "stop"):
        await collector.stop()
    return dict(peer_ids_fed=exchange.fed, seconds=time.perf_counter() - t0, rss_mb_by_ids_fed=samples,
                rss_growth_mb=samples[-1][1] - samples[0][1], map_sizes=sizes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peers", type=int, default=100_000)
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--label", default="branch")
    args = parser.parse_args()
    result = asyncio.run(feed(args.peers, args.batch))
    source = Path(swarm_node.__file__).resolve().parent.parent
    commit = subprocess.run(["git", "-C", str(source), "rev-parse", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    result.update(commit=commit, swarm_node_path=str(source), settings=vars(args), machine=platform.platform())
    print(f"{'IDs fed':>10} {'RSS MB':>8}")
    for fed, mb in result["rss_mb_by_ids_fed"]:
        print(f"{fed:>10} {mb:>8.1f}")
    print(f"growth {result['rss_growth_mb']:.1f} MB in {result['seconds']:.1f} s; largest maps:",
          sorted(result["map_sizes"].items(), key=lambda kv: -kv[1])[:6])
    out = Path(__file__).resolve().parent / "results" / "sybil_memory.json"
    data = json.loads(out.read_text()) if out.exists() else {}
    data[args.label] = result
    out.write_text(json.dumps(data, indent=1))
    print("wrote", out)


if __name__ == "__main__":
    main()
