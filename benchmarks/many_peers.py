"""Many-peer benchmark: what one real node pays per round to collect rollouts from a swarm of N peers.

    python benchmarks/many_peers.py [--peers 8 16 32 64] [--rounds 8] [--label before]

Issue 14. For each N it starts, on loopback:
- one real `Node` (tiny model, its own hivemind DHT process, p2pd and verification worker), in this process;
- N lightweight protocol peers in `--procs` worker processes (`LightPeer`): each a real libp2p peer (its own p2pd
  daemon) with a real hivemind `DHTNode` (a full DHT server), an RSA identity, signed manifests in the node's DHT
  layout and a rollout stream handler. No model: every `--period-s` seconds a peer publishes a new round of
  `--groups` groups of `--completions` completions for real reasoning-gym specs of the node's task set
  (`smol`), with reasoning-style completion texts (one right, the others wrong) whose rewards are the verifier's.
  Peers of one worker share its event loop (one Python process per `--procs`), not their DHT or identity.

Per round of the real node (between two `Collector.take` calls) it records: DHT keys and value bytes read (the
records' subkeys and values as returned by `dht.get`: the manifests the node must parse, not libp2p framing),
payloads fetched and payload bytes, payloads and groups verified, verification CPU seconds (user + system time
of the verification worker process), RSS of the node (this process + its DHT, p2pd and worker processes), the
coverage (share of the groups in every peer's latest announced round that sit usable in the node's pool at
take time), the share of peers with a usable group, and the age of the chosen groups (DHT clock). Per
collection cycle it records the collect latency: from the start of a poll until every fetch-and-verify task
the cycle started has finished. The node's own training is real but irrelevant here; rounds are as long as
the tiny model makes them.

Results go to benchmarks/results/many_peers_{label}.json (git commit, settings, per-N summary and rows).
Every process started is reaped by PID (the workers, their p2pd daemons, the node's children).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
FILLER = ["First, I read the question carefully.", "Let me work through this step by step.",
          "I will check each part of the problem.", "So the intermediate result is clear.",
          "Now I combine the pieces.", "Double-checking the arithmetic once more.",
          "That gives the final value.", "Hmm, let me verify this against the question."]


# ---------------------------------------------------------------------------------------------- the light peers
def completion_text(rng: random.Random, answer: str) -> str:
    steps = " ".join(rng.choice(FILLER) for _ in range(rng.randint(2, 8)))
    return f"{steps} <answer>{answer}</answer>"


def make_payload(peer_id: str, round_: int, taskset, num_groups: int, num_completions: int, rng: random.Random):
    """A realistic honest payload: real specs of the task set, one right and several wrong answers per group,
    rewards from the local verifier (so a node's re-scoring agrees)."""
    from swarm_node.learning.tasks import recreate, score
    from swarm_node.network import wire

    groups = []
    for _ in range(num_groups):
        spec = taskset.draw(rng)
        question = recreate(spec)
        texts = [completion_text(rng, question.answer)]
        texts += [completion_text(rng, str(rng.randint(0, 99))) for _ in range(num_completions - 1)]
        rng.shuffle(texts)
        groups.append(wire.WireGroup(
            spec=wire.WireTaskSpec(dataset=spec.dataset, config=spec.config, seed=spec.seed, index=spec.index,
                                   size=spec.size, rg_version=spec.rg_version),
            completions=texts, rewards=[float(score(question, t)) for t in texts]))
    return wire.RolloutPayload(version=wire.PROTOCOL_VERSION, peer_id=peer_id, round=round_, policy_version=0,
                               model="recorded", groups=groups)


class LightPeer:
    """A protocol peer without a model: own p2pd + DHTNode, signed manifests, a rollout stream handler."""

    @classmethod
    async def create(cls, key_path: Path, initial_peers: list[str], net) -> "LightPeer":
        from hivemind.dht.crypto import RSASignatureValidator
        from hivemind.dht.node import DHTNode
        from hivemind.p2p import P2P

        from swarm_node.network.exchange import STREAM_PROTOCOL
        from swarm_node.network.identity import load_or_create_identity

        self = cls()
        identity = load_or_create_identity(key_path)
        self.peer_id = identity.peer_id.to_base58()
        self.net = net
        self.validator = RSASignatureValidator(identity.private_key)
        self.payloads: dict[int, bytes] = {}
        self.p2p = await P2P.create(initial_peers=initial_peers, host_maddrs=["/ip4/127.0.0.1/tcp/0"],
                                    identity_path=str(identity.path), check_if_identity_free=False,
                                    startup_timeout=90)
        for attempt in range(4):  # the loaded machine can miss a bootstrap ping: retry, as a restarting node would
            try:
                self.dht = await DHTNode.create(p2p=self.p2p, initial_peers=initial_peers, wait_timeout=15,
                                                num_replicas=net.dht_replicas, record_validator=self.validator)
                break
            except RuntimeError:
                if attempt == 3:
                    await self.p2p.shutdown()
                    raise
                await asyncio.sleep(2)
        await self.p2p.add_binary_stream_handler(STREAM_PROTOCOL, self._serve)
        self.fetches = 0
        return self

    async def _serve(self, info, reader, writer) -> None:
        from swarm_node.network import wire
        from swarm_node.network.exchange import HEADER_BYTES

        self.fetches += 1
        try:
            length = int.from_bytes(await reader.readexactly(HEADER_BYTES), "big")
            request = wire.decode_request(await reader.readexactly(length))
            data = self.payloads.get(request.round, b"")
            writer.write(len(data).to_bytes(HEADER_BYTES, "big") + data)
            await writer.drain()
        except Exception:
            pass
        finally:
            writer.close()

    async def publish(self, payload) -> tuple[bool, float, int]:
        """Serve the payload and store its signed manifest in the DHT; returns (stored, created_at_s, bytes)."""
        from hivemind.utils import get_dht_time

        from swarm_node.network import exchange, wire

        data = wire.encode(payload)
        self.payloads[payload.round] = data
        for old in [r for r in self.payloads if r <= payload.round - 4]:
            del self.payloads[old]
        created = get_dht_time()
        manifest = wire.Manifest(
            version=wire.PROTOCOL_VERSION, peer_id=self.peer_id, round=payload.round,
            policy_version=payload.policy_version, model=payload.model, num_groups=len(payload.groups),
            num_completions=sum(len(g.completions) for g in payload.groups), payload_bytes=len(data),
            payload_sha256=wire.sha256(data), created_at_s=created)
        key = manifest_key(exchange, self.net, self.peer_id)
        ok = await self.dht.store(key, wire.encode(manifest), created + self.net.publish_ttl_s,
                                  subkey=self.validator.local_public_key)
        return bool(ok), created, len(data)

    async def shutdown(self) -> None:
        await self.dht.shutdown()
        await self.p2p.shutdown()


def manifest_key(exchange, net, peer_id: str) -> str:
    """The DHT key a peer publishes under, through whichever rule the code on PYTHONPATH has."""
    if hasattr(exchange, "publish_key"):
        return exchange.publish_key(net, peer_id)
    return exchange.rollout_key(net.swarm_name, exchange.shard_of(peer_id, net.num_shards))


async def worker_main(args) -> None:
    """A worker process: `--count` light peers publishing a round every `--period-s` until SIGTERM."""
    from swarm_node.config import load_config
    from swarm_node.learning.tasks import TaskSet

    cfg = load_config(environ={}, overrides=json.loads(args.overrides))
    taskset = TaskSet(cfg.tasks.task_preset, cfg.tasks.tasks, cfg.tasks.num_fewshot, cfg.tasks.task_seed,
                      cfg.tasks.dataset_size)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    work = Path(args.work)
    peers = []
    for i in range(args.first, args.first + args.count):  # later peers also bootstrap from this worker's first
        boot = args.boot + ([str(a) for a in (await peers[0].p2p.get_visible_maddrs())[:1]] if peers else [])
        peers.append(await LightPeer.create(work / f"peer{i}.key", boot, cfg.network))
    print(json.dumps({"ready": [p.peer_id for p in peers]}), flush=True)
    log = open(work / f"publish_{args.first}.jsonl", "a")
    rngs = {p.peer_id: random.Random(hash(p.peer_id) & 0xFFFF) for p in peers}

    async def run_peer(k: int, peer: LightPeer) -> None:
        await asyncio.sleep(args.period_s * k / max(1, len(peers)))  # staggered, like independent nodes
        r = 0
        while not stop.is_set():
            r += 1
            t0 = time.monotonic()
            payload = make_payload(peer.peer_id, r, taskset, args.groups, args.completions, rngs[peer.peer_id])
            ok, created, nbytes = await peer.publish(payload)
            log.write(json.dumps({"peer": peer.peer_id, "round": r, "created_at_s": created, "ok": ok,
                                  "groups": len(payload.groups), "bytes": nbytes}) + "\n")
            log.flush()
            try:
                await asyncio.wait_for(stop.wait(), max(0.1, args.period_s - (time.monotonic() - t0)))
            except asyncio.TimeoutError:
                pass

    tasks = [asyncio.create_task(run_peer(k, p)) for k, p in enumerate(peers)]
    await stop.wait()
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for p in peers:
        try:
            await asyncio.wait_for(p.shutdown(), 10)
        except Exception:
            pass
    print(json.dumps({"fetches": sum(p.fetches for p in peers)}), flush=True)


# ---------------------------------------------------------------------------------------------- measuring a node
class Meter:
    """Wraps the node's exchange and collector (whatever version of the code) to count per-round costs."""

    def __init__(self, node, publish_logs: list[Path]):
        self.node, self.exchange, self.collector = node, node.exchange, node.collector
        self.publish_logs = publish_logs
        self.dht_bytes = self.dht_keys = self.dht_records = self.fetches = self.payloads_verified = 0
        self.cycle_latency_s: list[float] = []
        self.rows: list[dict] = []
        self._last = self._snapshot()
        self._t_last = time.monotonic()
        self._worker_cpu: dict[int, float] = {}
        self._wrap()

    def _wrap(self) -> None:
        ex, col = self.exchange, self.collector
        get, fetch, once, verify = ex._get, ex.fetch, col.collect_once, col._verify_and_pool

        async def _get(key):
            found = await get(key)
            self.dht_keys += 1
            self.dht_records += len(found or {})
            for subkey, item in (found or {}).items():
                self.dht_bytes += len(subkey) if isinstance(subkey, bytes) else 0
                self.dht_bytes += len(item.value) if isinstance(item.value, bytes) else 0
            return found

        async def _fetch(*a, **k):
            self.fetches += 1
            return await fetch(*a, **k)

        async def _verify(*a, **k):
            self.payloads_verified += 1
            return await verify(*a, **k)

        async def _once():
            t0 = time.monotonic()
            before, polls = set(col._inflight.values()), getattr(col, "polls", None)
            await once()
            if polls is not None and col.polls == polls:
                return  # a cycle that read nothing (its round's fetch budget spent): not a collect latency
            started = [t for t in col._inflight.values() if t not in before]
            if not started:
                self.cycle_latency_s.append(time.monotonic() - t0)
                return

            async def watch():
                await asyncio.wait(started)
                self.cycle_latency_s.append(time.monotonic() - t0)
            asyncio.create_task(watch())

        ex._get, ex.fetch, col.collect_once, col._verify_and_pool = _get, _fetch, _once, _verify
        take = col.take
        col.take = lambda: self._on_take(take)

    def _worker_cpu_s(self) -> float:
        pid = self.collector.worker.pid
        if pid is not None:
            try:
                t = psutil.Process(pid).cpu_times()
                self._worker_cpu[pid] = t.user + t.system
            except psutil.Error:
                pass
        return sum(self._worker_cpu.values())

    def _snapshot(self) -> dict:
        return dict(dht_bytes=self.dht_bytes, dht_keys=self.dht_keys, dht_records=self.dht_records, fetches=self.fetches,
                    payload_bytes=self.exchange.bytes_in, payloads_verified=self.payloads_verified,
                    groups_verified=self.collector.verified_groups, cycles=len(self.cycle_latency_s),
                    verify_cpu_s=self._worker_cpu_s() if hasattr(self, "_worker_cpu") else 0.0)

    def _latest_rounds(self) -> dict[str, tuple[int, int]]:
        latest: dict[str, tuple[int, int]] = {}
        for path in self.publish_logs:
            if not path.exists():
                continue
            for line in path.read_text().splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if row["ok"] and row["round"] > latest.get(row["peer"], (0, 0))[0]:
                    latest[row["peer"]] = (row["round"], row["groups"])
        return latest

    def _rss_mb(self) -> float:
        procs = [psutil.Process()]
        pids = {p.pid for p in getattr(self.node, "_children", [])}
        if self.collector.worker.pid:
            pids.add(self.collector.worker.pid)
        for pid in pids:
            try:
                procs.append(psutil.Process(pid))
            except psutil.Error:
                pass
        total = 0
        for p in procs:
            try:
                total += p.memory_info().rss
            except psutil.Error:
                pass
        return total / 2**20

    def _on_take(self, take):
        from hivemind.utils import get_dht_time

        pool = self.collector.pool
        filt = self.collector.settings.filter_zero_advantage
        usable = pool.usable(filt)
        usable_keys = {(g.peer_id, g.round) for g in usable}
        latest = self._latest_rounds()
        fresh = sum(n for _, n in latest.values())
        covered = sum(sum(1 for g in usable if (g.peer_id, g.round) == (p, r)) for p, (r, _) in latest.items())
        peers_covered = sum(1 for p, (r, _) in latest.items() if any(k[0] == p for k in usable_keys))
        collected = take()
        now = get_dht_time()
        ages = [now - pool._entries[(g.peer_id, g.round)].created_at_s for g in collected.groups
                if (g.peer_id, g.round) in pool._entries]
        snap = self._snapshot()
        row = {k: round(snap[k] - self._last[k], 4) for k in snap}
        row.update(round_s=round(time.monotonic() - self._t_last, 3), rss_mb=round(self._rss_mb(), 1),
                   fresh_groups=fresh, usable_groups=len(usable), coverage=round(covered / fresh, 4) if fresh else None,
                   peers_covered=round(peers_covered / len(latest), 4) if latest else None,
                   chosen=len(collected.groups), chosen_age_s=[round(a, 2) for a in ages],
                   peers_announced=len(latest))
        row["cycle_latency_s"] = [round(x, 3) for x in self.cycle_latency_s[self._last["cycles"]:snap["cycles"]]]
        self.rows.append(row)
        self._last, self._t_last = snap, time.monotonic()
        return collected


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def summarize(rows: list[dict], skip: int) -> dict:
    """Medians over the measured rounds (the first `skip` warm-up rounds dropped) and latency percentiles."""
    rows = rows[skip:] or rows
    mean = lambda k: sum(r[k] for r in rows) / len(rows)
    med = lambda k: statistics.median([r[k] for r in rows if r[k] is not None]) if any(
        r[k] is not None for r in rows) else None
    lat = [x for r in rows for x in r["cycle_latency_s"]]
    ages = [x for r in rows for x in r["chosen_age_s"]]
    return dict(rounds=len(rows), **{k: med(k) for k in (
        "round_s", "dht_keys", "dht_bytes", "fetches", "payload_bytes", "payloads_verified", "groups_verified",
        "verify_cpu_s", "rss_mb", "coverage", "peers_covered", "fresh_groups", "usable_groups", "chosen",
        "peers_announced", "cycles")},
        collect_p50_s=percentile(lat, 0.5), collect_p95_s=percentile(lat, 0.95),
        chosen_age_p50_s=percentile(ages, 0.5), chosen_age_max_s=max(ages) if ages else None,
        verify_cpu_s_mean=mean("verify_cpu_s"), dht_bytes_mean=mean("dht_bytes"), payload_bytes_mean=mean("payload_bytes"))


def node_overrides(args, n: int) -> dict:
    return dict(model="tiny", rounds=args.rounds, num_local_groups=2, num_completions=4, max_new_tokens=16,
                num_external_groups=args.j, torch_threads=1, min_peers=0, collect_interval_s=1.0,
                fetch_timeout_s=10, dht_timeout_s=10, **json.loads(args.extra))


async def run_one(args) -> dict:
    """One N: the node, the workers, R rounds, then everything reaped."""
    from swarm_node.config import load_config
    from swarm_node.node import Node

    work = Path(tempfile.mkdtemp(prefix=f"many_peers_{args.one}_"))
    overrides = node_overrides(args, args.one)
    node = Node(load_config(environ={}, overrides=dict(overrides, output_dir=str(work / "node"), initial_peers=[])))
    workers: list[subprocess.Popen] = []
    worker_children: list[psutil.Process] = []
    try:
        await node.start()
        boot = node.maddrs[:1]
        per = args.per_proc
        peer_cfg = {k: v for k, v in overrides.items() if k in ("num_shards", "dht_replicas", "swarm_name",
                                                              "publish_ttl_s", "max_shards_read_per_poll")}
        for first in range(0, args.one, per):
            cmd = [sys.executable, __file__, "--worker", "--work", str(work), "--first", str(first),
                   "--count", str(min(per, args.one - first)), "--period-s", str(args.period_s),
                   "--groups", str(args.groups), "--completions", str(args.completions),
                   "--overrides", json.dumps(peer_cfg), "--boot", *boot]
            workers.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True))
        t0 = time.monotonic()
        for w in workers:  # wait for every worker's peers to be up (their DHT joined)
            line = await asyncio.get_running_loop().run_in_executor(None, w.stdout.readline)
            if not line:
                raise RuntimeError("a peer worker died during start-up")
        startup_s = time.monotonic() - t0
        for w in workers:
            worker_children += psutil.Process(w.pid).children(recursive=True)
        await asyncio.sleep(args.period_s)  # every peer has announced once
        meter = Meter(node, [work / f"publish_{first}.jsonl" for first in range(0, args.one, per)])
        await node.run()
        peer_rss = sum(p.memory_info().rss for w in workers for p in
                       [psutil.Process(w.pid), *psutil.Process(w.pid).children(recursive=True)]) / 2**20
        result = dict(peers=args.one, startup_s=round(startup_s, 1), peer_processes_rss_mb=round(peer_rss, 1),
                      summary=summarize(meter.rows, args.warmup), rows=meter.rows,
                      rejected=dict(node.collector.trust.rejects))
    finally:
        await node.stop()
        for w in workers:
            if w.poll() is None:
                w.send_signal(signal.SIGTERM)
        for w in workers:
            try:
                w.wait(30)
            except subprocess.TimeoutExpired:
                w.kill()
                w.wait()
        for p in worker_children:  # p2pd daemons of a worker that could not shut its peers down
            try:
                p.kill()
                p.wait(5)
            except psutil.Error:
                pass
    return result


def git_commit() -> str:
    """The commit of the code measured (BENCH_GIT_COMMIT when it runs from an exported tree)."""
    if os.environ.get("BENCH_GIT_COMMIT"):
        return os.environ["BENCH_GIT_COMMIT"]
    try:
        return subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    except Exception:
        return "unknown"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--peers", type=int, nargs="+", default=[8, 16, 32, 64])
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2, help="first rounds left out of the medians")
    p.add_argument("--j", type=int, default=4, help="J: external groups per round")
    p.add_argument("--period-s", type=float, default=4.0, help="a light peer publishes a round this often")
    p.add_argument("--groups", type=int, default=4, help="groups per light-peer payload")
    p.add_argument("--completions", type=int, default=8, help="completions per group")
    p.add_argument("--per-proc", type=int, default=8, help="light peers per worker process")
    p.add_argument("--extra", default="{}", help="JSON node config overrides (same for the light peers' layout)")
    p.add_argument("--label", default="run")
    p.add_argument("--out", default=None)
    p.add_argument("--one", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    p.add_argument("--first", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--count", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--overrides", default="{}", help=argparse.SUPPRESS)
    p.add_argument("--boot", nargs="*", default=[], help=argparse.SUPPRESS)
    p.add_argument("--json", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        asyncio.run(worker_main(args))
        return
    if args.one:
        signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))  # cleanup runs
        result = asyncio.run(run_one(args))
        Path(args.json).write_text(json.dumps(result))
        return
    results = []
    for n in args.peers:
        with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
            path = f.name
        cmd = [sys.executable, __file__, "--one", str(n), "--json", path, *sys.argv[1:]]
        t0 = time.monotonic()
        proc = subprocess.run(cmd)
        if proc.returncode != 0 or not Path(path).stat().st_size:
            print(f"N={n}: failed (exit {proc.returncode})", flush=True)
            results.append(dict(peers=n, failed=True, exit_code=proc.returncode))
            continue
        result = json.loads(Path(path).read_text())
        os.unlink(path)
        result["wall_s"] = round(time.monotonic() - t0, 1)
        results.append(result)
        print_table(results)
    out = Path(args.out or ROOT / "benchmarks" / "results" / f"many_peers_{args.label}.json")
    out.write_text(json.dumps(dict(
        benchmark="many_peers", label=args.label, git_commit=git_commit(), time_s=time.time(),
        settings={k: v for k, v in vars(args).items() if k not in ("one", "worker", "work", "first", "count",
                                                                     "overrides", "boot", "json")},
        node_overrides=node_overrides(args, 0), machine=dict(cpus=os.cpu_count(), python=platform.python_version(),
                                                             load_avg=os.getloadavg()),
        results=results), indent=1))
    print(f"wrote {out}")


def print_table(results: list[dict]) -> None:
    cols = ["N", "keys", "DHT KB", "fetched", "payload KB", "verified", "verify CPU s", "p50 s", "p95 s",
            "RSS MB", "coverage", "peers cov.", "age p50 s", "round s"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in results:
        if r.get("failed"):
            print(f"| {r['peers']} | failed |")
            continue
        s = r["summary"]
        f = lambda x, d=1: "-" if x is None else f"{x:.{d}f}"
        print(f"| {r['peers']} | {f(s['dht_keys'], 0)} | {f(s['dht_bytes'] / 1024)} | {f(s['fetches'], 0)} | "
              f"{f(s['payload_bytes'] / 1024)} | {f(s['payloads_verified'], 0)} | {f(s['verify_cpu_s_mean'], 3)} | "
              f"{f(s['collect_p50_s'], 2)} | {f(s['collect_p95_s'], 2)} | {f(s['rss_mb'], 0)} | "
              f"{f(s['coverage'], 2)} | {f(s['peers_covered'], 2)} | {f(s['chosen_age_p50_s'])} | "
              f"{f(s['round_s'])} |", flush=True)


if __name__ == "__main__":
    main()
