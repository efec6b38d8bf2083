"""Child processes of a node (hivemind's DHT process and its p2pd daemon): recording and reaping them by PID.

After `kill -9` of a node, its DHT process and p2pd outlive it (for 40 s or more, docs/hivemind.md
section 6) and keep its peer ID alive in the swarm, which would make a restart fail with "identity already
taken". So a node records its children's PIDs and start times in `<output_dir>/node.pids`, and a restarting
node kills the survivors of its previous run, checked by PID *and* start time so a reused PID is never hit.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import psutil

from swarm_node.records import write_atomic

log = logging.getLogger(__name__)


def record_children(path: Path, procs: list[psutil.Process]) -> None:
    entries = []
    for proc in procs:
        try:
            entries.append({"pid": proc.pid, "create_time": proc.create_time(), "name": proc.name()})
        except psutil.NoSuchProcess:
            pass
    write_atomic(path, json.dumps(entries))


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
