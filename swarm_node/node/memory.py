"""Memory of a node: the estimate checked before anything loads, and bounding the process's growth over rounds.

`check_memory_fits` refuses a configuration whose estimate (swarm_node/learning/models.py) exceeds the limit with
one actionable `ModelError`. `tune_memory` (before the first tensor) and `release_free_memory` (after every
generation, training step and evaluation) keep the resident size close to what is live; measured in
docs/benchmarks.md.
"""

from __future__ import annotations

import functools
import logging
import os

import psutil

log = logging.getLogger("swarm_node")

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


def check_memory_fits(config) -> None:
    """Raise ModelError if `config.train.model` does not exist, or (with what to lower) if the memory estimate of
    `config` (a NodeConfig) exceeds `memory_limit_mb`, or the available memory when that is 0."""
    from swarm_node.learning.models import ModelError, check_model_name, estimate_memory_mb
    from swarm_node.network.merging import param_copies

    t = config.train
    check_model_name(t.model)
    need_mb = estimate_memory_mb(t.model, t.micro_batch_size, t.num_local_groups * t.num_completions,
                                 t.max_new_tokens, extra_param_copies=param_copies(config.merge),
                                 optimizer=t.optimizer)
    limit_mb = t.memory_limit_mb or psutil.virtual_memory().available / 2**20
    if need_mb > limit_mb:
        raise ModelError(
            f"this configuration needs about {need_mb / 1024:.1f} GB but {limit_mb / 1024:.1f} GB is available: "
            "lower --micro-batch-size, --num-local-groups x --num-completions or --max-new-tokens, use "
            "--optimizer adafactor (about 1 GB less for SmolLM2), or use a smaller --model"
        )
    log.info("memory estimate %.1f GB of %.1f GB available", need_mb / 1024, limit_mb / 1024)


def prepare_torch(malloc_mmap_threshold_bytes: int, onednn_cache_capacity: int, torch_threads: int, seed: int) -> None:
    """Before the first tensor: memory tuning, torch's thread count (0 keeps torch's default) and its seed."""
    tuned = tune_memory(malloc_mmap_threshold_bytes, onednn_cache_capacity)
    log.debug("memory tuning applied: %s", tuned)
    import torch

    if torch_threads:
        torch.set_num_threads(torch_threads)
    torch.manual_seed(seed)
