"""Swarm simulator: a node's per-round collection cost and the swarm's coverage at N = 1k, 10k, 100k peers.

    python benchmarks/swarm_sim.py [--peers 1000 10000 100000] [--label after]

Issue 14. It drives the node's own selection, admission and trust code (network/sampling.py: `ShardSampler`,
`fetch_budget`, `choose_fetches`; network/trust.py: `PeerTrust`; network/exchange.py: `shard_of`;
config.py: `NetworkConfig` defaults) against a simulated DHT and network. Mode `sampled` is the collector's
logic since issue 14; mode `all` is the logic before it (every poll reads every shard; every fresh new manifest
is fetched, up to `max_manifests_per_round`, known-good first).

Assumptions (the model, stated):
- Time runs in steps of `collect_interval_s`. Every publisher publishes a new round every `period_s` at its own
  random phase; the DHT holds each peer's latest manifest (a record of `record_bytes`) under `shard_of(peer)`.
- `observers` of the N peers run the collector logic in full (all of them up to 2,000); the others only publish.
  A node's round lasts `round_s` (random phase); at each round's end it takes J groups uniformly from its pool
  (groups within `max_staleness_s`, not used before). Per-node figures are means over observers; swarm-wide
  traffic = mean per node x N (+ one manifest store per peer per period, `dht_replicas` copies).
- Churn: per period each publisher is replaced by a fresh peer ID with probability `churn`; the departed peer's
  last manifest stays readable until it is stale, and a fetch of it fails (unreachable: back-off, no strike).
- Sybils: a `sybil_share` of publishers serve payloads that fail verification (a strike in `PeerTrust`;
  `ban_strikes` strikes ban the ID); with `sybil_rekey` they come back under a fresh ID when banned.
- Latency: a DHT get takes rtt x (1 + ceil(log_20 N)) (Kademlia, bucket size 20); a fetch 2 rtt + bytes /
  bandwidth; verification `verify_cpu_s` per payload in one worker (sequential). A collect cycle's latency is
  its poll + the slowest fetch + the verification of everything it fetched; the next cycle starts
  max(collect_interval_s, that latency, min_cycle_s) later (the collector's loop). Fetches finish within a step.
- Coverage: the share of honest fresh payloads (published in the measured window, at least one period before its
  end) fetched by at least one node. With M < N observers (N = 100k) a payload is fetched by c of them; the
  mean of c over payloads, times N / M, is taken as every payload's Poisson rate λ, and coverage = 1 - e^-λ (uniform, independent choices; at N = 10k, where every node is observed, the direct count
  and this estimate are both reported).
- Per-node coverage: the share of the honest publishers' latest groups that sit usable in a node's pool at take
  time (a node needs J, not all: this is small at large N by design).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import random
import statistics
import subprocess
import time
from collections import Counter, defaultdict
from pathlib import Path

from swarm_node.config import NetworkConfig
from swarm_node.network.exchange import shard_of
from swarm_node.network.sampling import ShardSampler, choose_fetches, fetch_budget, shard_count_for
from swarm_node.network.trust import PeerTrust

ROOT = Path(__file__).resolve().parents[1]
COVERAGE_OBSERVERS = 20  # observers whose per-node coverage is measured


@dataclasses.dataclass
class SimParams:
    peers: int
    mode: str = "sampled"  # "sampled" (since issue 14) or "all" (before)
    observers: int = 2000
    rounds: int = 10
    warmup_rounds: int = 3
    round_s: float = 30.0
    period_s: float = 30.0
    collect_interval_s: float = 1.0
    min_cycle_s: float = 0.0  # a collection cycle lasts at least this long (the loaded harness: its p50 latency)
    groups_per_payload: int = 4
    num_external_groups: int = 4
    num_shards: int = 0  # 0: the rule, shard_count_for(peers)
    record_bytes: int = 610  # measured (benchmarks/results/many_peers_before.json)
    payload_bytes: int = 7500  # measured: 4 groups x 8 completions
    verify_cpu_s: float = 0.0008  # measured per payload (smol tasks)
    rtt_s: float = 0.05
    bandwidth_bytes_s: float = 10e6
    churn: float = 0.0
    sybil_share: float = 0.0
    sybil_rekey: bool = True
    dht_replicas: int = 10
    seed: int = 0


class Publisher:
    __slots__ = ("peer_id", "phase", "honest", "shard")

    def __init__(self, peer_id: str, phase: float, honest: bool, shard: int):
        self.peer_id, self.phase, self.honest, self.shard = peer_id, phase, honest, shard


class Observer:
    """One node's collector state, driven by the real sampling and trust code."""

    def __init__(self, p: SimParams, net: NetworkConfig, rng: random.Random, peer_id: str, index: int):
        self.p, self.net, self.rng, self.peer_id, self.index = p, net, rng, peer_id, index
        self.sampler = ShardSampler(p.num_shards, net.max_shard_reads_per_poll,
                                    max(net.target_manifests_per_poll, 2 * p.num_external_groups), rng)
        self.trust = PeerTrust(net.ban_strikes, net.ban_cooldown_s, clock=lambda: self.now)
        self.good: set[str] = set()
        self.failures: Counter[str] = Counter()
        self.seen: set[tuple[str, int]] = set()
        self.pool: list[list] = []  # [peer, round, created_s, groups left]
        self.admitted = 0
        self.budget: int | None = None
        self.phase = rng.uniform(0, p.round_s)
        self.next_take = self.phase + p.round_s
        self.next_cycle = 0.0
        self.now = 0.0
        self.acc = Counter()
        self.latencies: list[float] = []
        self.rows: list[dict] = []


class Swarm:
    def __init__(self, p: SimParams):
        if not p.num_shards:
            p.num_shards = shard_count_for(p.peers)
        self.p = p
        self.rng = random.Random(p.seed)
        self.net = NetworkConfig(num_shards=min(p.num_shards, 65536))
        self.shards: dict[int, list[Publisher]] = defaultdict(list)
        self.ghosts: dict[int, list[tuple[str, int, float]]] = defaultdict(list)  # departed peers' last manifests
        self.publishers: list[Publisher] = []
        self.next_id = 0
        for _ in range(p.peers):
            self._add(self.rng.random() >= p.sybil_share, self.rng.uniform(0, p.period_s))
        m = min(p.observers, p.peers)
        self.observers = [Observer(p, self.net, random.Random(p.seed * 1000 + i), self.publishers[i].peer_id, i)
                          for i in range(m)]
        for pub in self.publishers[:m]:  # observers are honest nodes
            pub.honest = True
        self.fetch_counts: Counter[tuple[str, int]] = Counter()
        self.stores = 0

    def _new_id(self) -> str:
        self.next_id += 1
        return f"Qm{self.p.seed}x{self.next_id:08d}"

    def _add(self, honest: bool, phase: float) -> Publisher:
        pid = self._new_id()
        pub = Publisher(pid, phase, honest, shard_of(pid, self.p.num_shards))
        self.publishers.append(pub)
        self.shards[pub.shard].append(pub)
        return pub

    def latest(self, pub: Publisher, t: float) -> tuple[int, float] | None:
        if t < pub.phase:
            return None
        k = int((t - pub.phase) // self.p.period_s)
        return k, pub.phase + k * self.p.period_s

    def churn_step(self, t: float) -> None:
        """Replace each publisher with probability churn per period (scaled to one step)."""
        p = self.p
        q = p.churn * p.collect_interval_s / p.period_s
        if q <= 0:
            return
        for i in range(len(self.observers), len(self.publishers)):
            pub = self.publishers[i]
            if self.rng.random() < q:
                last = self.latest(pub, t)
                if last is not None:
                    self.ghosts[pub.shard].append((pub.peer_id, last[0], last[1]))
                self.shards[pub.shard].remove(pub)
                new_id = self._new_id()
                pub2 = Publisher(new_id, t + self.rng.uniform(0, p.period_s), pub.honest, shard_of(new_id, p.num_shards))
                self.publishers[i] = pub2
                self.shards[pub2.shard].append(pub2)

    def read(self, shard: int, t: float) -> list[tuple[str, int, float, bool, bool]]:
        """Records of a shard: (peer, round, created_s, honest, alive)."""
        out = []
        for pub in self.shards.get(shard, ()):
            last = self.latest(pub, t)
            if last is not None:
                out.append((pub.peer_id, last[0], last[1], pub.honest, True))
        ghosts = self.ghosts.get(shard)
        if ghosts:
            ghosts[:] = [g for g in ghosts if t - g[2] <= self.net.max_staleness_s]
            out += [(g[0], g[1], g[2], True, False) for g in ghosts]
        return out

    def rekey(self, peer_id: str, t: float) -> None:
        """A banned Sybil comes back under a fresh ID."""
        for i, pub in enumerate(self.publishers):
            if pub.peer_id == peer_id:
                self.shards[pub.shard].remove(pub)
                new_id = self._new_id()
                self.publishers[i] = Publisher(new_id, pub.phase, False, shard_of(new_id, self.p.num_shards))
                self.shards[self.publishers[i].shard].append(self.publishers[i])
                return


def dht_get_s(p: SimParams, rng: random.Random) -> float:
    hops = 1 + math.ceil(math.log(max(2, p.peers), 20))
    return p.rtt_s * hops * rng.uniform(0.8, 1.5)


def cycle(sw: Swarm, o: Observer, t: float) -> None:
    """One collection cycle of one observer: the collector's collect_once, on the simulated DHT."""
    p, net, rng = sw.p, sw.net, o.rng
    o.now = t
    sampled = p.mode == "sampled"
    if sampled and o.budget is not None and o.admitted >= o.budget:
        return
    shards = o.sampler.next_shards() if sampled else list(range(p.num_shards))
    records = [r for s in shards for r in sw.read(s, t)]
    o.sampler.observe(len(shards), len(records))
    o.acc["dht_keys"] += len(shards)
    o.acc["dht_bytes"] += len(records) * p.record_bytes
    o.acc["polls"] += 1
    poll_s = max(dht_get_s(p, rng) for _ in range(min(len(shards), 16)))
    fresh = [r for r in records if r[0] != o.peer_id and t - r[2] <= net.max_staleness_s]
    new = [r for r in fresh if (r[0], r[1]) not in o.seen]
    live = []
    for r in new:
        if o.trust.is_banned(r[0]):
            o.seen.add((r[0], r[1]))
        else:
            live.append(r)
    if sampled:
        o.budget = fetch_budget(net.fetches_per_round, net.fetch_margin, p.num_external_groups,
                                [p.groups_per_payload] * len(live))
        cap = net.max_manifests_per_round
        if len(live) > cap:
            live.sort(key=lambda r: (r[0] not in o.good, o.failures[r[0]], rng.random()))
            live = live[:cap]
        chosen = choose_fetches(live, min(o.budget - o.admitted, net.max_inflight_fetches), rng, lambda r: r[0],
                                lambda peer: peer in o.good, lambda peer: 1.0 / (1 + o.failures[peer]),
                                net.explore_share)
    else:
        live.sort(key=lambda r: (r[0] not in o.good, o.failures[r[0]], rng.random()))
        chosen = live[: max(0, net.max_manifests_per_round - o.admitted)]
    o.admitted += len(chosen)
    slowest, verify_s = 0.0, 0.0
    for peer, k, created, honest, alive in chosen:
        o.seen.add((peer, k))
        o.acc["fetches"] += 1
        if not alive:
            o.failures[peer] += 1  # unreachable: churn, no strike
            slowest = max(slowest, 4 * p.rtt_s)
            continue
        o.acc["payload_bytes"] += p.payload_bytes
        o.acc["payloads_verified"] += 1
        o.acc["verify_cpu_s"] += p.verify_cpu_s
        verify_s += p.verify_cpu_s
        slowest = max(slowest, 2 * p.rtt_s * rng.uniform(0.8, 1.5) + p.payload_bytes / p.bandwidth_bytes_s)
        if honest:
            o.good.add(peer)
            o.pool.append([peer, k, created, p.groups_per_payload])
            sw.fetch_counts[peer, k] += 1
        else:
            o.failures[peer] += 1
            o.trust.reject("reward_mismatch", peer)
            if o.trust.is_banned(peer) and p.sybil_rekey:
                sw.rekey(peer, t)
    o.latencies.append(poll_s + slowest + verify_s)


def take(sw: Swarm, o: Observer, t: float, measure: bool) -> None:
    p = sw.p
    o.pool = [e for e in o.pool if t - e[2] <= sw.net.max_staleness_s and e[3] > 0]
    usable = sum(e[3] for e in o.pool)
    latest_groups = covered = 0
    if o.index < COVERAGE_OBSERVERS:  # per-node coverage is O(N) to measure: on a few observers only
        pooled = {(e[0], e[1]): e[3] for e in o.pool}
        for pub in sw.publishers:
            if pub.honest and pub.peer_id != o.peer_id:
                last = sw.latest(pub, t)
                if last is not None:
                    latest_groups += p.groups_per_payload
                    covered += pooled.get((pub.peer_id, last[0]), 0)
    ages = []
    for _ in range(min(p.num_external_groups, usable)):
        weights = [e[3] for e in o.pool]
        e = o.rng.choices(o.pool, weights=weights)[0]
        e[3] -= 1
        ages.append(t - e[2])
    if measure:
        o.rows.append(dict(o.acc, usable=usable, coverage=covered / latest_groups if latest_groups else None,
                           ages=ages, latency=list(o.latencies)))
    o.acc = Counter()
    o.latencies = []
    o.admitted = 0


def simulate(p: SimParams) -> dict:
    """Run the model; returns per-node medians/means, latency percentiles, swarm coverage and traffic."""
    t0 = time.monotonic()
    sw = Swarm(p)
    end = p.round_s * (p.rounds + p.warmup_rounds + 1)
    warm = p.round_s * (p.warmup_rounds + 1)
    t = 0.0
    while t < end:
        sw.churn_step(t)
        for o in sw.observers:
            if t >= o.next_take:
                take(sw, o, t, t >= warm)
                o.next_take += p.round_s
            if t >= o.next_cycle - 1e-9:
                n_lat = len(o.latencies)
                cycle(sw, o, t)
                took = o.latencies[-1] if len(o.latencies) > n_lat else 0.0
                o.next_cycle = t + max(p.collect_interval_s, took, p.min_cycle_s)
        t += p.collect_interval_s
    rows = [r for o in sw.observers for r in o.rows]
    mean = lambda k: sum(r.get(k, 0) for r in rows) / len(rows) if rows else 0.0
    lat = sorted(x for r in rows for x in r["latency"])
    ages = sorted(x for r in rows for x in r["ages"])
    pct = lambda xs, q: xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))] if xs else None
    # swarm coverage over honest payloads published in [warm, end - period]
    m, n = len(sw.observers), p.peers
    payloads = []
    for pub in sw.publishers:
        if not pub.honest:
            continue
        k = 0 if pub.phase >= warm else math.ceil((warm - pub.phase) / p.period_s)
        while pub.phase + k * p.period_s <= end - p.period_s:
            payloads.append((pub.peer_id, k))
            k += 1
    # publishers replaced by churn are left out (their IDs are gone); honest observers' own payloads count
    rate = sum(sw.fetch_counts[x] for x in payloads) / max(1, len(payloads)) * n / m
    coverage_uniform_estimate = 1 - math.exp(-rate)
    if m >= n:
        coverage = sum(sw.fetch_counts[x] > 0 for x in payloads) / max(1, len(payloads))
    else:  # the observers' mean fetches per payload, scaled to N nodes, spread uniformly (Poisson)
        rate = sum(sw.fetch_counts[x] for x in payloads) / max(1, len(payloads)) * n / m
        coverage = 1 - math.exp(-rate)
    per_node_bytes = mean("dht_bytes") + mean("payload_bytes")
    rounds_per_period = p.period_s / p.round_s
    stores_per_round = p.dht_replicas * p.record_bytes / rounds_per_period
    cov = [r["coverage"] for r in rows if r["coverage"] is not None]
    return dict(
        params=dataclasses.asdict(p), observers=m, node_rounds=len(rows),
        dht_keys=mean("dht_keys"), dht_bytes=mean("dht_bytes"), polls=mean("polls"), fetches=mean("fetches"),
        payload_bytes=mean("payload_bytes"), payloads_verified=mean("payloads_verified"),
        verify_cpu_s=mean("verify_cpu_s"), per_node_bytes=per_node_bytes,
        collect_p50_s=pct(lat, 0.5), collect_p95_s=pct(lat, 0.95), chosen_age_p50_s=pct(ages, 0.5),
        node_coverage=statistics.mean(cov) if cov else None, swarm_coverage=coverage,
        swarm_coverage_uniform_estimate=coverage_uniform_estimate,
        swarm_bytes_per_round=n * (per_node_bytes + stores_per_round), sim_wall_s=round(time.monotonic() - t0, 1))


def print_table(results: list[dict]) -> None:
    cols = ["N", "mode", "S", "keys", "DHT KB", "fetched", "payload KB", "verify CPU s", "node KB", "p50 s",
            "p95 s", "age p50 s", "node cov.", "swarm cov.", "swarm MB/round"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in results:
        p = r["params"]
        f = lambda x, d=1: "-" if x is None else f"{x:.{d}f}"
        print(f"| {p['peers']} | {p['mode']} | {p['num_shards']} | {f(r['dht_keys'])} | {f(r['dht_bytes'] / 1024)} | "
              f"{f(r['fetches'])} | {f(r['payload_bytes'] / 1024)} | {f(r['verify_cpu_s'], 3)} | "
              f"{f(r['per_node_bytes'] / 1024)} | {f(r['collect_p50_s'], 2)} | {f(r['collect_p95_s'], 2)} | "
              f"{f(r['chosen_age_p50_s'])} | {f(r['node_coverage'], 4)} | {f(r['swarm_coverage'], 4)} | "
              f"{f(r['swarm_bytes_per_round'] / 2**20)} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--peers", type=int, nargs="+", default=[1000, 10000, 100000])
    ap.add_argument("--modes", nargs="+", default=["sampled"])
    ap.add_argument("--label", default="after")
    ap.add_argument("--out", default=None)
    fields = {f.name: f for f in dataclasses.fields(SimParams)}
    for name, f in fields.items():
        if name not in ("peers", "mode"):
            ap.add_argument("--" + name.replace("_", "-"), type=type(f.default) if f.default is not None else float,
                            default=f.default)
    args = ap.parse_args()
    results = []
    for n in args.peers:
        for mode in args.modes:
            kw = {k: getattr(args, k) for k in fields if k not in ("peers", "mode")}
            if mode == "all":  # the old logic reads all N records per poll: a few observers, few rounds
                kw.update(observers=min(kw["observers"], 5), rounds=min(kw["rounds"], 2),
                          warmup_rounds=min(kw["warmup_rounds"], 1))
            if mode == "all" and n > 10_000:
                continue  # every poll reads all N records: N x 610 bytes per poll, no simulation needed
            results.append(simulate(SimParams(peers=n, mode=mode, **kw)))
            print_table(results)
            commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True,
                                    text=True).stdout.strip()
            out = Path(args.out or ROOT / "benchmarks" / "results" / f"swarm_sim_{args.label}.json")
            out.write_text(json.dumps(dict(
                benchmark="swarm_sim", label=args.label, git_commit=commit, time_s=time.time(),
                machine=dict(cpus=os.cpu_count(), python=platform.python_version()), results=results), indent=1))
            print(f"wrote {out}", flush=True)


if __name__ == "__main__":
    main()


def harness_params(result: dict, settings: dict, overrides: dict, mode: str, seed: int) -> SimParams:
    """SimParams for one N of a many_peers.py result: its measured sizes, round length and peer period."""
    rows = result["rows"][settings.get("warmup", 2):] or result["rows"]
    n, shards = result["peers"], overrides.get("num_shards", 8)
    keys = sum(r["dht_keys"] for r in rows)
    records = sum(r.get("dht_records", 0) for r in rows) or keys / shards * (n + 1)  # before: all shards per poll
    verified = sum(r["payloads_verified"] for r in rows)
    return SimParams(
        peers=n + 1, mode=mode, observers=1, rounds=len(rows), warmup_rounds=settings.get("warmup", 2),
        round_s=statistics.mean(r["round_s"] for r in rows), period_s=settings["period_s"],
        collect_interval_s=overrides.get("collect_interval_s", 1.0), groups_per_payload=settings["groups"],
        num_external_groups=settings["j"], num_shards=shards,
        record_bytes=round(sum(r["dht_bytes"] for r in rows) / max(1, records)),
        payload_bytes=round(sum(r["payload_bytes"] for r in rows) / max(1, verified)),
        verify_cpu_s=sum(r["verify_cpu_s"] for r in rows) / max(1, verified), rtt_s=0.005, seed=seed,
        min_cycle_s=result["summary"]["collect_p50_s"] or 0.0)


def compare_with_harness(data: dict, mode: str, seeds: int = 8):
    """Yield (N, measured means per round, simulated means per round) for every N of a many_peers.py result."""
    for result in data["results"]:
        if result.get("failed"):
            continue
        rows = result["rows"][data["settings"].get("warmup", 2):] or result["rows"]
        measured = {k: statistics.mean(r[k] for r in rows) for k in ("dht_bytes", "fetches", "payload_bytes")}
        sims = [simulate(harness_params(result, data["settings"], data["node_overrides"], mode, s))
                for s in range(seeds)]
        predicted = {k: statistics.mean(s[k] for s in sims) for k in measured}
        yield result["peers"], measured, predicted
