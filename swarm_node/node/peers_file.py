"""The node's `node.json`: written once the node is ready (peer ID, multiaddrs, PID, model, metrics URL), and read by
a joining node (`--initial-peers-file`), the local swarm launcher, `swarm-node status` and the compose file.

A joiner polls for the file, so a swarm can be started all at once; the file is written atomically, so a reader
sees the whole file or none.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path
from typing import Any, Callable

from swarm_node.node.join import NetworkError, check_multiaddrs
from swarm_node.records import write_atomic

NODE_INFO = "node.json"


def write_node_info(out_dir: Path, peer_id: str, multiaddrs: list[str], model: str, metrics_url: str | None) -> None:
    """Write `<out_dir>/node.json` atomically (the readiness signal for launchers and joiners)."""
    info: dict[str, Any] = {"peer_id": peer_id, "multiaddrs": multiaddrs, "pid": os.getpid(), "model": model,
                            "output_dir": str(out_dir), "metrics_url": metrics_url}
    write_atomic(out_dir / NODE_INFO, json.dumps(info, indent=1))


async def peers_from_file(path: Path, timeout_s: float, stopping: Callable[[], bool]) -> list[str]:
    """The multiaddrs in a bootstrap peer's node.json, once it exists (polled every 0.2 s).

    Raises:
        NetworkError: the file did not appear within `timeout_s` (or a stop was requested), or holds no valid
            multiaddr with a peer ID.
    """
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        if time.monotonic() > deadline or stopping():
            raise NetworkError(f"the bootstrap peer's {path} did not appear within {timeout_s:.0f} s: start "
                               "that peer first, or raise --initial-peers-file-timeout-s")
        await asyncio.sleep(0.2)
    try:
        maddrs = json.loads(path.read_text())["multiaddrs"]
    except (OSError, ValueError, KeyError, TypeError):
        maddrs = None
    if not (isinstance(maddrs, list) and maddrs and all(isinstance(m, str) for m in maddrs)):
        raise NetworkError(f"{path} is not a swarm-node node.json with a 'multiaddrs' list")
    check_multiaddrs(maddrs, f"bootstrap peer (from {path})", need_peer_id=True)
    return maddrs


async def bootstrap_peers(net, stopping: Callable[[], bool]) -> list[str]:
    """The bootstrap multiaddrs to dial: `net.initial_peers` plus those in `net.initial_peers_file`, if set (read
    now: the file may be rewritten when its peer restarts, so a join retry reads it again). Raises NetworkError
    as `peers_from_file` does."""
    from_file = (await peers_from_file(Path(net.initial_peers_file), net.initial_peers_file_timeout_s, stopping)
                 if net.initial_peers_file else [])
    return list(net.initial_peers) + from_file
