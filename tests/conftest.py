"""Shared fixtures: a real tokenizer (SmolLM2's, converted from the embedded GGUF) and tiny models."""

from __future__ import annotations

import os

import psutil
import pytest

os.environ.setdefault("HIVEMIND_MEMORY_SHARING_STRATEGY", "file_descriptor")


@pytest.fixture(scope="session")
def tiny_policy_factory():
    from swarm_node.learning.models import load_policy

    def make(seed: int = 0):
        return load_policy("tiny", seed=seed, precision="fp32")

    return make


@pytest.fixture
def reap_children():
    """Kill any child process (DHT processes, p2pd daemons) a test leaves behind, by PID, and fail the test."""
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    yield
    leftover = [p for p in psutil.Process().children(recursive=True) if p.pid not in before]
    gone, alive = psutil.wait_procs(leftover, timeout=5)
    for proc in alive:
        proc.kill()
    psutil.wait_procs(alive, timeout=5)
    assert not alive, f"test left child processes running: {[p.pid for p in alive]}"
