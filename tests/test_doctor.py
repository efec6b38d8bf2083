"""`swarm-node doctor` on loopback: a healthy set-up against a real node, and three broken ones, each reported
with its fix. Every doctor run is a real CLI process in its own session, checked to leave nothing running."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

from nodes import Proc, session_processes

pytestmark = pytest.mark.slow

UNREACHABLE = "/ip4/127.0.0.1/tcp/9/p2p/QmXRmYoxrCEbm9NGJkhoGpADMeX1wyFfz3WFC8aaJAAoXy"


def doctor(*flags: str) -> subprocess.CompletedProcess:
    proc = subprocess.Popen([sys.executable, "-m", "swarm_node.cli", "doctor", "--model", "tiny", *flags],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env={**os.environ, "COLUMNS": "400"})
    out, err = proc.communicate(timeout=120)
    assert session_processes(proc.pid) == [], "doctor left its p2p daemon running"
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def lines(result: subprocess.CompletedProcess, prefix: str) -> list[str]:
    return [line for line in result.stdout.splitlines() if line.startswith(prefix)]


@pytest.fixture
def running_node(tmp_path):
    node = Proc(tmp_path / "boot", [], ["--model", "tiny", "--rounds", "2", "--num-completions", "2",
                                         "--max-new-tokens", "4", "--linger-s", "120", "--metrics-port", "-1"])
    try:
        maddr = node.info()["multiaddrs"][0]
        node.wait_rounds(1)
        yield maddr
    finally:
        node.cleanup()


def test_healthy_setup_passes_every_check(running_node):
    result = doctor("--initial-peers", running_node)
    assert result.returncode == 0, result.stdout + result.stderr
    assert not lines(result, "FAIL"), result.stdout
    for name in ("PASS p2pd", f"PASS bootstrap {running_node}: dialled in", "PASS clock vs", "PASS protocol",
                 "PASS reasoning-gym", "PASS memory", "PASS model", "PASS disk"):
        assert lines(result, name), f"{name!r} missing in\n{result.stdout}"


def test_unreachable_bootstrap_peer_fails_with_fix():
    result = doctor("--skip-model", "--initial-peers", UNREACHABLE)
    assert result.returncode == 1
    assert lines(result, f"FAIL bootstrap {UNREACHABLE}: cannot dial"), result.stdout
    assert lines(result, "FAIL join"), result.stdout
    assert "fix: check that the peer runs" in result.stdout


def test_port_in_use_fails_with_fix():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = doctor("--skip-model", "--host-maddrs", f"/ip4/127.0.0.1/tcp/{port}")
    assert result.returncode == 1
    assert lines(result, f"FAIL listen /ip4/127.0.0.1/tcp/{port}: cannot bind tcp port {port}"), result.stdout
    assert "fix: stop the program that holds it" in result.stdout


def test_memory_limit_below_estimate_fails_with_fix():
    result = doctor("--skip-model", "--memory-limit-mb", "100")
    assert result.returncode == 1
    failed = lines(result, "FAIL")
    assert len(failed) == 1 and failed[0].startswith("FAIL memory: needs about"), result.stdout
    assert "--optimizer adafactor" in result.stdout


def test_contradicting_options_fail_without_network():
    result = doctor("--skip-model", "--no-use-relay", "--use-auto-relay")
    assert result.returncode == 1
    assert lines(result, "FAIL options: --use-auto-relay needs relays"), result.stdout
