"""SIGTERM to `swarm-node swarm` reaches its nodes: the launcher forwards it, waits for them and reaps them, so
no node, DHT process or p2pd outlives the launcher (what `docker stop`, systemd or a CI timeout send)."""

import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from tests.nodes import session_processes

pytestmark = pytest.mark.slow


def _node_pids(out, n, launcher, timeout_s=300.0) -> list[int]:
    """PIDs of the n nodes once every node has written node.json (it has joined the swarm)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert launcher.poll() is None, f"launcher exited early: {launcher.stdout.read()[-3000:]}"
        infos = [out / f"node{i}" / "node.json" for i in range(n)]
        if all(p.exists() for p in infos):
            return [json.loads(p.read_text())["pid"] for p in infos]
        time.sleep(0.5)
    raise AssertionError("the nodes did not start in time")


def test_sigterm_to_the_launcher_stops_and_reaps_every_node(tmp_path):
    out = tmp_path / "swarm"
    cmd = [sys.executable, "-m", "swarm_node.cli", "swarm", "--nodes", "2", "--rounds", "1000", "--model", "tiny",
           "--output-dir", str(out), "--num-local-groups", "1", "--num-external-groups", "1",
           "--num-completions", "2", "--max-new-tokens", "4"]
    launcher = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    pids: list[int] = []
    try:
        pids = _node_pids(out, 2, launcher)
        children = {p.pid for p in psutil.Process(launcher.pid).children()}
        assert set(pids) <= children  # the nodes are the launcher's own children (each in its own session)
        assert all(session_processes(pid, settle_s=0) for pid in pids)
        launcher.send_signal(signal.SIGTERM)
        output, _ = launcher.communicate(timeout=90)
        assert launcher.returncode == 128 + signal.SIGTERM, output[-3000:]
        assert "SIGTERM: stopping all nodes" in output
        # reaped by the launcher (not left as zombies re-parented to init), and nothing left in their sessions
        for pid in pids:
            assert not psutil.pid_exists(pid), f"node {pid} outlived the launcher"
            assert session_processes(pid) == [], f"node {pid} left processes (DHT, p2pd) behind"
        # the nodes got SIGTERM (a clean stop), not only the SIGKILL fallback: each logged its clean shutdown
        for i in range(2):
            log = (out / f"node{i}" / "node.log").read_text()
            assert "stopping after the current phase" in log, log[-2000:]
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()
        for pid in pids:  # clean up after a failure, by PID and session only
            for leftover in session_processes(pid, settle_s=0):
                try:
                    os.kill(leftover, signal.SIGKILL)
                except ProcessLookupError:
                    pass
