"""Merge benchmark: averaging SmolLM2-135M's weights among 2 and 4 hivemind peers on loopback, per compression.

    python benchmarks/merge.py [--peers 2 4] [--compressions none fp16 8bit] [--repeats 2]

Each peer is a hivemind DHT plus swarm-node's instrumented DecentralizedAverager (network/merging/averager.py)
over its own fp32 copy of every SmolLM2-135M parameter (tied embeddings once: 134.5M values, 538 MB); the
peers hold different random values. One merge is one averaging step of all peers (target group size = peers,
so the group forms as soon as everyone has joined), timed from the call to the slowest peer's result.

In the same run the script measures loopback bandwidth two ways: a plain TCP socket pair on 127.0.0.1 (once),
and a libp2p stream between two hivemind p2p daemons (the path averaging traffic takes), right before each
setting's merges, because on a shared machine it moves with the load. The bound for a merge is the bytes one
peer sends (counted by the averager) divided by that libp2p bandwidth; the ratio is the measured time over
that bound. On one machine all peers share the cores and the loopback device, so the table also shows an
aggregate bound: all peers' bytes over the same bandwidth.

Prints a table and writes benchmarks/results/merge.json.

    python benchmarks/merge.py --checks [--robust-values 16000000]

measures instead what issue 16's checks cost per merge and robust aggregation vs the plain mean
(benchmarks/merge_checks.py; writes benchmarks/results/merge_checks.json).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import threading
import time
from pathlib import Path

os.environ.setdefault("HIVEMIND_MEMORY_SHARING_STRATEGY", "file_descriptor")

import psutil  # noqa: E402
import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

import swarm_node.network  # noqa: E402,F401  (hivemind patches before any DHT exists)
from hivemind import DHT  # noqa: E402
from hivemind.p2p import P2P  # noqa: E402

from swarm_node.network.merging.averager import MergeAverager, make_compression, start_in_main_thread  # noqa: E402

MiB = 2**20


def smollm2_shapes() -> list[tuple[str, tuple[int, ...]]]:
    """Names and shapes of SmolLM2-135M's parameters (tied embeddings once), without loading its weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from swarm_node.learning.models import embedded_model_dir

    config = AutoConfig.from_pretrained(embedded_model_dir())
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return [(name, tuple(p.shape)) for name, p in model.named_parameters()]


def tcp_bandwidth(total_bytes: int = 1 << 30, chunk: int = 4 * MiB) -> float:
    """Bytes/s through one TCP connection on 127.0.0.1 (sender and receiver threads in this process)."""
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    received = [0]

    def receive():
        conn, _ = server.accept()
        buf = bytearray(chunk)
        while received[0] < total_bytes:
            n = conn.recv_into(buf)
            if not n:
                break
            received[0] += n
        conn.close()

    thread = threading.Thread(target=receive)
    thread.start()
    client = socket.create_connection(("127.0.0.1", port))
    payload = os.urandom(chunk)
    t0 = time.perf_counter()
    for _ in range(total_bytes // chunk):
        client.sendall(payload)
    thread.join()
    seconds = time.perf_counter() - t0
    client.close()
    server.close()
    return received[0] / seconds


async def _libp2p_bandwidth(total_bytes: int, chunk: int) -> float:
    a = await P2P.create(host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    b = await P2P.create(initial_peers=[str(m) for m in await a.get_visible_maddrs()],
                         host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    done = asyncio.get_running_loop().create_future()

    async def sink(_info, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        got = 0
        while got < total_bytes:
            data = await reader.read(chunk)
            if not data:
                break
            got += len(data)
        writer.write(b"k")
        await writer.drain()
        writer.close()
        done.set_result(got)

    try:
        await b.add_binary_stream_handler("bench-sink", sink)
        _, reader, writer = await a.call_binary_stream_handler(b.peer_id, "bench-sink")
        payload = os.urandom(chunk)
        t0 = time.perf_counter()
        for _ in range(total_bytes // chunk):
            writer.write(payload)
            await writer.drain()
        await reader.read(1)
        got = await asyncio.wait_for(done, 60)
        seconds = time.perf_counter() - t0
        writer.close()
        return got / seconds
    finally:
        await a.shutdown()
        await b.shutdown()


def libp2p_bandwidth(total_bytes: int = 512 * MiB, chunk: int = 1 * MiB) -> float:
    """Bytes/s through one libp2p stream between two p2p daemons on 127.0.0.1."""
    return asyncio.run(_libp2p_bandwidth(total_bytes, chunk))


def state_fn():
    return b"", []


def run_merges(shapes, num_peers: int, compression: str, repeats: int) -> dict:
    dhts = [DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"])]
    boot = [str(m) for m in dhts[0].get_visible_maddrs()]
    dhts += [DHT(start=True, initial_peers=boot, host_maddrs=["/ip4/127.0.0.1/tcp/0"]) for _ in range(num_peers - 1)]
    averagers = []
    try:
        for i, dht in enumerate(dhts):
            generator = torch.Generator().manual_seed(i)
            tensors = [torch.randn(shape, generator=generator) * 0.02 for _, shape in shapes]
            averagers.append(start_in_main_thread(lambda: MergeAverager(
                tensors, dht, state_fn=state_fn, prefix=f"bench_{compression}_{num_peers}",
                target_group_size=num_peers, min_group_size=num_peers, min_matchmaking_time=10.0,
                request_timeout=3.0, allreduce_timeout=900.0, next_chunk_timeout=120.0,
                compression=make_compression(compression))))
        for averager in averagers:
            averager.run_in_background(await_ready=True, timeout=120)
        time.sleep(2.0)  # let the averagers' DHT announcements settle
        runs = []
        for _ in range(repeats):
            sent0 = [a.traffic.totals() for a in averagers]
            t0 = time.perf_counter()
            controls = [a.step(weight=1.0, timeout=60.0, allow_retries=False, wait=False) for a in averagers]
            finished = []
            for control in controls:
                control.result(timeout=1200)
                finished.append(time.perf_counter() - t0)
            sent = [a.traffic.totals()[0] - s0[0] for a, s0 in zip(averagers, sent0)]
            received = [a.traffic.totals()[1] - s0[1] for a, s0 in zip(averagers, sent0)]
            faults = [a.faults() for a in averagers]
            assert all(f[0] == 0 and f[2] == num_peers for f in faults), f"a merge did not complete cleanly: {faults}"
            runs.append({"seconds": max(finished), "bytes_sent_per_peer": statistics.mean(sent),
                         "bytes_received_per_peer": statistics.mean(received)})
        return {"peers": num_peers, "compression": compression, "runs": runs}
    finally:
        for averager in averagers:
            averager.shutdown()
        for dht in dhts:
            dht.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--peers", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--compressions", nargs="+", default=["none", "fp16", "8bit"])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/results/merge.json")
    parser.add_argument("--checks", action="store_true", help="measure the merge checks and robust aggregation")
    parser.add_argument("--robust-values", type=int, default=16_000_000)
    args = parser.parse_args()
    shapes = smollm2_shapes()
    if args.checks:
        import sys

        sys.path.insert(0, str(Path(__file__).parent))
        from merge_checks import run

        out = args.out if args.out != "benchmarks/results/merge.json" else "benchmarks/results/merge_checks.json"
        run(shapes, out, args.robust_values)
        return
    values = sum(torch.Size(s).numel() for _, s in shapes)
    load_before = os.getloadavg()
    tcp = tcp_bandwidth()
    rows = []
    for num_peers in args.peers:
        for compression in args.compressions:
            p2p = libp2p_bandwidth()
            result = run_merges(shapes, num_peers, compression, args.repeats)
            result["libp2p_stream_bytes_per_s"] = p2p
            best = min(result["runs"], key=lambda r: r["seconds"])
            result["seconds_best"] = best["seconds"]
            result["seconds_median"] = statistics.median(r["seconds"] for r in result["runs"])
            result["bytes_sent_per_peer"] = best["bytes_sent_per_peer"]
            result["bound_s"] = best["bytes_sent_per_peer"] / p2p
            result["ratio"] = best["seconds"] / result["bound_s"]
            result["aggregate_bound_s"] = best["bytes_sent_per_peer"] * num_peers / p2p
            result["aggregate_ratio"] = best["seconds"] / result["aggregate_bound_s"]
            rows.append(result)
            print(json.dumps({k: v for k, v in result.items() if k != "runs"}), flush=True)
    load_after = os.getloadavg()
    table = Table(title=f"merging SmolLM2-135M ({values / 1e6:.1f}M fp32 values, {values * 4 / MiB:.0f} MiB) on "
                        f"loopback; TCP {tcp / MiB:.0f} MiB/s")
    for col in ("peers", "compression", "best s", "median s", "sent/peer MiB", "libp2p MiB/s", "bound s", "ratio",
                "aggr. bound s", "aggr. ratio"):
        table.add_column(col)
    for r in rows:
        table.add_row(str(r["peers"]), r["compression"], f"{r['seconds_best']:.1f}", f"{r['seconds_median']:.1f}",
                      f"{r['bytes_sent_per_peer'] / MiB:.0f}", f"{r['libp2p_stream_bytes_per_s'] / MiB:.0f}",
                      f"{r['bound_s']:.2f}", f"{r['ratio']:.1f}", f"{r['aggregate_bound_s']:.2f}",
                      f"{r['aggregate_ratio']:.1f}")
    Console(width=160).print(table)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({
        "model": "smollm2-135m", "values": values, "bytes_fp32": values * 4,
        "tcp_loopback_bytes_per_s": tcp,
        "machine": {"cpus": os.cpu_count(), "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
                    "python": platform.python_version(), "torch": torch.__version__,
                    "load_average_before": load_before, "load_average_after": load_after},
        "results": rows}, indent=1))


if __name__ == "__main__":
    main()
