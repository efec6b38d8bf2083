"""Work around hivemind 1.1.12's pipe desync under uvloop (shared/HIVEMIND.md section 1).

hivemind's DHT and DecentralizedAverager children read requests from a multiprocessing pipe whose fd uvloop
switches to non-blocking mode in `add_reader`. A pickled message over ~16 KiB can then be half-read
(`BlockingIOError`, then `EOFError`), the child dies and callers without a timeout hang (rl-swarm issues
#77, #102, #227, #357; unfixed upstream). The fix keeps uvloop and puts the fd back into blocking mode right
after the reader is registered. `apply()` must run before any DHT or averager is created; importing
`swarm_node.network` does it.
"""

from __future__ import annotations

import asyncio
import os

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


def apply() -> None:
    """Patch hivemind's DHT and averager modules (idempotent)."""
    global _applied
    if _applied:
        return
    import hivemind.averaging.averager
    import hivemind.dht.dht

    hivemind.dht.dht.switch_to_uvloop = _switch_to_patched_uvloop
    hivemind.averaging.averager.switch_to_uvloop = _switch_to_patched_uvloop
    _applied = True
