"""Memory tuning applied at node start-up (glibc mmap threshold, oneDNN primitive cache)."""

import json
import os
import subprocess
import sys

PROBE = """
import json, os, sys
from swarm_node.node.memory import tune_memory
done = tune_memory(int(sys.argv[1]), int(sys.argv[2]))
print(json.dumps({"done": done, "env": os.environ.get("ONEDNN_PRIMITIVE_CACHE_CAPACITY")}))
"""


def probe(threshold: int, capacity: int, env: dict | None = None) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE, str(threshold), str(capacity)], capture_output=True,
                         text=True, check=True, env=env or {k: v for k, v in os.environ.items()
                                                             if k != "ONEDNN_PRIMITIVE_CACHE_CAPACITY"})
    return json.loads(out.stdout)


def test_tuning_sets_the_threshold_and_the_cache_capacity():
    result = probe(131072, 64)
    assert result == {"done": {"mmap_threshold": True, "onednn_cache": True}, "env": "64"}


def test_zero_keeps_library_defaults_and_the_operators_environment_wins():
    assert probe(0, 0) == {"done": {"mmap_threshold": False, "onednn_cache": False}, "env": None}
    env = {**os.environ, "ONEDNN_PRIMITIVE_CACHE_CAPACITY": "512"}
    assert probe(131072, 64, env) == {"done": {"mmap_threshold": True, "onednn_cache": False}, "env": "512"}
