"""Work around two hivemind 1.1.12 bugs: the pipe desync under uvloop and the 8-bit decoders on numpy >= 2.4.

1. Pipe desync (docs/hivemind.md section 1).

hivemind's DHT and DecentralizedAverager children read requests from a multiprocessing pipe whose fd uvloop
switches to non-blocking mode in `add_reader`. A pickled message over ~16 KiB can then be half-read
(`BlockingIOError`, then `EOFError`), the child dies and callers without a timeout hang (rl-swarm issues
#77, #102, #227, #357; unfixed upstream). The fix keeps uvloop and puts the fd back into blocking mode right
after the reader is registered.

2. 8-bit compression (docs/hivemind.md section 4). `Quantization.extract` reads the codebook size with
`int(np.frombuffer(..., count=1))`, a 1-element array, which numpy 2.4 refuses to convert (`TypeError: only
0-dimensional arrays can be converted to Python scalars`). The replacement reads element 0 and is otherwise
the same code, so bytes on the wire are unchanged and unpatched peers stay compatible. Upstream fixed this
after 1.1.12.

`apply()` must run before any DHT or averager is created (their child processes are forked and inherit the
patches); importing `swarm_node.network` does it.
"""

from __future__ import annotations

import asyncio
import os
import warnings

import numpy as np
import torch
import uvloop

_applied = False


class _BlockingPipeLoop(uvloop.Loop):
    """uvloop loop whose `add_reader` leaves the fd in blocking mode, so `Connection.recv` reads whole messages."""

    def add_reader(self, fd, callback, *args):
        super().add_reader(fd, callback, *args)
        os.set_blocking(fd if isinstance(fd, int) else fd.fileno(), True)


def _switch_to_patched_uvloop() -> asyncio.AbstractEventLoop:
    try:
        asyncio.get_event_loop().stop()
    except RuntimeError:
        pass
    loop = _BlockingPipeLoop()
    asyncio.set_event_loop(loop)
    return loop


def _extract_8bit(self, serialized_tensor) -> torch.Tensor:
    """hivemind's `Quantization.extract` with the codebook size read as a scalar (numpy >= 2.4)."""
    codebook_size = int(np.frombuffer(serialized_tensor.buffer, count=1, dtype=np.int64)[0])
    codebook = np.frombuffer(serialized_tensor.buffer, offset=8, count=codebook_size, dtype=self.codebook_dtype)
    quantized = np.frombuffer(serialized_tensor.buffer, offset=8 + codebook.nbytes, dtype=self.indices_dtype)
    quantized = torch.as_tensor(quantized, dtype=torch.int64).reshape(tuple(serialized_tensor.size))
    codebook = torch.as_tensor(codebook).to(dtype=getattr(torch, serialized_tensor.dtype))
    return codebook[quantized].requires_grad_(serialized_tensor.requires_grad)


def apply() -> None:
    """Patch hivemind's DHT and averager modules and the 8-bit decoder (idempotent)."""
    global _applied
    if _applied:
        return
    import hivemind.averaging.averager
    import hivemind.compression.quantization
    import hivemind.dht.dht

    hivemind.dht.dht.switch_to_uvloop = _switch_to_patched_uvloop
    hivemind.averaging.averager.switch_to_uvloop = _switch_to_patched_uvloop
    hivemind.compression.quantization.Quantization.extract = _extract_8bit
    warnings.filterwarnings("ignore", message=r"torch\.quantize_per_tensor", category=UserWarning)
    _applied = True
