"""Child processes of a node (hivemind's DHT process and its p2pd daemon): recording and reaping them by PID.

After `kill -9` of a node, its DHT process and p2pd outlive it (for 40 s or more, docs/hivemind.md
section 6) and keep its peer ID alive in the swarm, which would make a restart fail with "identity already
taken". So a node records its children's PIDs and start times in `<output_dir>/node.pids`, and a restarting
node kills the survivors of its previous run, checked by PID *and* start time so a reused PID is never hit.
"""

from __future__ import annotations

import functools
import json
import logging
import os
from pathlib import Path

import psutil

log = logging.getLogger(__name__)


def record_children(path: Path, procs: list[psutil.Process]) -> None:
    entries = []
    for proc in procs:
        try:
            entries.append({"pid": proc.pid, "create_time": proc.create_time(), "name": proc.name()})
        except psutil.NoSuchProcess:
            pass
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(entries))
    os.replace(tmp, path)


def reap_recorded(path: Path) -> int:
    """Kill processes recorded in `path` that are still running (same PID and start time). Returns how many."""
    try:
        entries = json.loads(path.read_text())
    except (OSError, ValueError):
        return 0
    victims = []
    for entry in entries:
        try:
            proc = psutil.Process(entry["pid"])
            if abs(proc.create_time() - entry["create_time"]) < 0.01:
                victims.append(proc)
        except (psutil.NoSuchProcess, KeyError, TypeError):
            continue
    names = sorted({_name(p) for p in victims})
    kill_and_wait(victims, grace_s=0)
    if victims:
        log.warning("killed %d processes (%s) left running by a previous run of this node", len(victims),
                    ", ".join(names))
    path.unlink(missing_ok=True)
    return len(victims)


def _name(proc: psutil.Process) -> str:
    try:
        return proc.name()
    except psutil.NoSuchProcess:
        return "exited"


def kill_and_wait(procs: list[psutil.Process], grace_s: float = 3.0, timeout_s: float = 5.0) -> None:
    """Give processes `grace_s` to exit on their own, then SIGKILL the rest and wait for them."""
    _, alive = psutil.wait_procs(procs, timeout=grace_s) if grace_s > 0 else ([], procs)
    for proc in alive:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=timeout_s)


M_MMAP_THRESHOLD = -3  # glibc mallopt parameter (malloc.h)


@functools.cache
def _libc():
    """The C library (loaded once), or None where it cannot be loaded."""
    import ctypes
    import ctypes.util

    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def tune_memory(mmap_threshold_bytes: int, onednn_cache_capacity: int) -> dict[str, bool]:
    """Bound a node's memory growth over rounds. Call before the first tensor operation.

    - glibc `mallopt(M_MMAP_THRESHOLD, mmap_threshold_bytes)`: allocations at least that large (tensors) get
      their own mapping and return to the OS when freed. glibc's default threshold adapts upwards to 32 MiB, so
      the hundreds of MB of activations a step frees stay in its heaps and the next phase's peak adds to them.
      0 leaves glibc's default.
    - `ONEDNN_PRIMITIVE_CACHE_CAPACITY`: oneDNN (the CPU bf16/AMX matmul path) keeps a kernel per input shape, 1024
      by default. Every (prompt, completion) length pair is a new shape, so the cache grew by 20-50 MB per round
      here. 0 leaves oneDNN's default; an operator's own environment variable wins.

    Measured in docs/benchmarks.md. Returns which of the two took effect (glibc only; no-op elsewhere).
    """
    done = {"mmap_threshold": False, "onednn_cache": False}
    if onednn_cache_capacity > 0 and "ONEDNN_PRIMITIVE_CACHE_CAPACITY" not in os.environ:
        os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] = str(onednn_cache_capacity)  # read at the first primitive
        done["onednn_cache"] = True
    mallopt = getattr(_libc(), "mallopt", None)
    if mmap_threshold_bytes > 0 and mallopt is not None:
        done["mmap_threshold"] = bool(mallopt(M_MMAP_THRESHOLD, mmap_threshold_bytes))
    return done


def release_free_memory() -> None:
    """Return freed heap memory to the OS (glibc `malloc_trim`); a no-op on other C libraries.

    Generation and training allocate and free hundreds of MB of tensors per phase. glibc keeps much of it in its
    heaps, so a SmolLM2 node's RSS crept from 3.6 to 5.7 GB over 12 rounds in the first experiment run (and
    one of four agents was OOM-killed). Trimming after each phase keeps the resident size at what is live.
    """
    malloc_trim = getattr(_libc(), "malloc_trim", None)
    if malloc_trim is not None:
        malloc_trim(0)
