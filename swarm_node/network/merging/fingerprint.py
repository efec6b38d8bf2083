"""Model identity for merging: a fingerprint of the architecture and every parameter's name, shape and dtype.

Two peers may average tensors only if their fingerprints are equal. The fingerprint goes into the DHT prefix
under which averagers meet (`merge_prefix`), so peers that run another model never even see each other's
matchmaking records; they keep exchanging rollouts, which are text and work across models. The weights'
values are not part of the fingerprint: peers with the same architecture but different weights (other seeds,
other training) are exactly the ones that merging brings together.
"""

from __future__ import annotations

import hashlib
import json

import torch


def merged_parameters(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """The parameters a merge averages: every trainable parameter once (tied weights appear once), by name."""
    return [(name, p) for name, p in model.named_parameters() if p.requires_grad]


def model_fingerprint(model: torch.nn.Module) -> str:
    """sha256 hex of the architecture (class, model_type) and each merged parameter's name, shape and dtype."""
    config = getattr(model, "config", None)
    description = {
        "class": type(model).__qualname__,
        "model_type": getattr(config, "model_type", None),
        "parameters": [[name, list(p.shape), str(p.dtype)] for name, p in merged_parameters(model)],
    }
    return hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()


def merge_prefix(swarm_name: str, fingerprint: str, mode: str, layout: str = "") -> str:
    """DHT prefix of the averaging groups: one per (swarm, model, merge mode, tensor layout). hivemind forbids '.'.

    The mode is part of it because params, diloco and grad peers average different tensors (and grad mode
    uses hivemind.Optimizer's own keys below this prefix). `layout` (see `merge_layout`) holds every setting
    that changes the bytes on the wire: peers that disagree on it would meet, split the tensors into parts
    differently and stall the all-reduce until its timeouts (issue 16), so they must never meet."""
    safe_swarm = "".join(c if c.isalnum() or c in "-_" else "_" for c in swarm_name)
    suffix = f"_{layout}" if layout else ""
    return f"{safe_swarm}_merge_{mode}_{fingerprint[:16]}{suffix}"


def merge_layout(compression: str, optimizer_state: str, mode: str, aggregation: str = "mean") -> str:
    """The group-key part of the wire layout: compression (part boundaries depend on it), for params and
    diloco whether the AdamW moments are averaged too (three times the tensors), and the reducers' rule
    (`c` suffix for centered_clip: members must agree on what the all-reduce computes)."""
    moments = "m" if optimizer_state == "average" and mode != "grad" else "w"
    return f"{compression}{moments}" + ("c" if aggregation == "centered_clip" and mode != "grad" else "")
