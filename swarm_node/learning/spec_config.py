"""What a task spec's `config` may hold: the one rule for every config that travels in a task spec.

A node's task configs are sent in every task spec it publishes (network/wire.py `WireTaskSpec`), so a task set is
checked against this rule at start-up (learning/tasks.py) and every received spec is decoded under it
(protocols/PROTOCOL.md "TaskSpec"). No imports beyond msgpack, so the wire codec can use it without loading
reasoning-gym.
"""

from __future__ import annotations

import math
import re
from typing import Any

import msgpack

MAX_CONFIG_BYTES = 2048  # canonical re-encoding of a task spec's `config` map (PROTOCOL.md "TaskSpec")
MAX_CONFIG_KEY_CHARS = 64
MAX_CONFIG_STR_CHARS = 128
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
_CONFIG_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def config_bytes(config: dict[str, Any]) -> int:
    """Length of the canonical encoding of a task config: shortest msgpack forms, floats as float64, bytes."""
    return len(msgpack.packb(config, use_bin_type=True))


def config_problem(config: dict[str, Any]) -> str:
    """Why `config` cannot be a wire TaskSpec's config, or "" if it can (PROTOCOL.md "TaskSpec").

    Keys: ASCII identifiers of 1-64 chars. Values: scalars only, typed exactly as decoded (no conversion):
    bool, int in [-2^63, 2^63), finite float, or str of at most 128 chars. Canonical encoding <= 2048 bytes.
    """
    for key, value in config.items():
        if type(key) is not str or len(key) > MAX_CONFIG_KEY_CHARS or not _CONFIG_KEY.fullmatch(key):
            return f"config key {str(key)[:80]!r} is not an identifier of 1-{MAX_CONFIG_KEY_CHARS} ASCII chars"
        kind = type(value)
        if kind is int:
            ok = INT64_MIN <= value <= INT64_MAX
        elif kind is float:
            ok = math.isfinite(value)
        elif kind is str:
            ok = len(value) <= MAX_CONFIG_STR_CHARS
        else:
            ok = kind is bool
        if not ok:
            return f"config value of {key!r} is not a bool, int64, finite float or str of <= {MAX_CONFIG_STR_CHARS} chars"
    if config_bytes(config) > MAX_CONFIG_BYTES:
        return f"config over {MAX_CONFIG_BYTES} bytes (canonical encoding)"
    return ""
