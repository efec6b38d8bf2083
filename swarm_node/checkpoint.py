"""Checkpoints: everything a node needs to resume after a crash, written atomically.

A checkpoint holds the model and optimizer state, the round counter, the policy version, the RNG states
(task stream, external-group sampling, torch) and the peer ID it belongs to (the identity key itself stays in
its own file). It is written to a temporary file, fsynced and renamed into place, so a crash mid-write never
leaves a half checkpoint under a valid name. A sha256 of the file is stored next to it. Loading walks from
the newest checkpoint to the oldest, skipping (with a warning) any that is truncated, corrupt or belongs to
another peer. The last `keep` checkpoints are kept.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from pathlib import Path
from typing import Any

import torch

from swarm_node.records import write_atomic

log = logging.getLogger(__name__)
_NAME = re.compile(r"^round-(\d{8})\.pt$")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class CheckpointStore:
    """Checkpoints of one node under `directory`, named `round-XXXXXXXX.pt`.

    Args:
        directory: where checkpoints live (created on first save).
        keep: how many of the newest checkpoints to keep (older ones are deleted after a save).
    """

    def __init__(self, directory: Path, keep: int = 2):
        self.directory, self.keep = Path(directory), keep

    def list(self) -> list[tuple[int, Path]]:
        """(round, path) of every checkpoint, newest first."""
        if not self.directory.exists():
            return []
        found = [(int(m.group(1)), p) for p in self.directory.iterdir() if (m := _NAME.match(p.name))]
        return sorted(found, reverse=True)

    def save(self, round_: int, state: dict[str, Any]) -> Path:
        """Write the state for `round_` atomically, then prune old checkpoints. Returns the path."""
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / f"round-{round_:08d}.pt"
        tmp = path.with_suffix(".pt.tmp")
        with open(tmp, "wb") as f:
            torch.save({**state, "round": round_}, f)
            f.flush()
            os.fsync(f.fileno())
        sha = _sha256(tmp)
        os.replace(tmp, path)
        write_atomic(path.with_suffix(".pt.sha256"), sha)
        for _, old in self.list()[self.keep:]:
            old.unlink(missing_ok=True)
            old.with_suffix(".pt.sha256").unlink(missing_ok=True)
        return path

    def load_latest(self, peer_id: str) -> dict[str, Any] | None:
        """The newest checkpoint that is intact and belongs to `peer_id`, or None. Bad ones are skipped with a warning."""
        for round_, path in self.list():
            sidecar = path.with_suffix(".pt.sha256")
            try:
                if not sidecar.exists() or sidecar.read_text().strip() != _sha256(path):
                    raise ValueError("checksum missing or wrong (partial write?)")
                state = torch.load(path, map_location="cpu", weights_only=False)
                if state.get("peer_id") != peer_id:
                    raise ValueError(f"belongs to peer {state.get('peer_id')}, not {peer_id}")
                if state.get("round") != round_:
                    raise ValueError("round in the file differs from its name")
                return state
            except Exception as e:
                log.warning("skipping checkpoint %s: %s; trying an older one", path.name, e)
        return None
