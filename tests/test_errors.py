"""Operator mistakes get one actionable `error:` line (exit status 2), never a traceback. Real CLI, tiny model."""

import os
import socket
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.slow

TINY = ["--model", "tiny", "--rounds", "1", "--num-local-groups", "1", "--num-completions", "2",
        "--max-new-tokens", "2", "--torch-threads", "1"]


def run_cli(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "swarm_node.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def assert_one_line_error(result, *fragments):
    assert result.returncode == 2, result.stdout[-1500:] + result.stderr[-1500:]
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(error_lines) == 1, result.stderr[-1500:]
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in error_lines[0], error_lines[0]


def test_unreachable_bootstrap_peer(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead_port = s.getsockname()[1]
    dead = f"/ip4/127.0.0.1/tcp/{dead_port}/p2p/QmXf2tinhvF778V2YdBTCPoPwGmbWrEpXTYhHqfiASa9PV"
    result = run_cli("run", "--output-dir", str(tmp_path), *TINY, "--initial-peers", dead, "--startup-timeout-s", "10")
    assert_one_line_error(result, "could not reach any bootstrap peer", dead)


def test_daemon_start_timeout_is_retried_then_explained(tmp_path):
    result = run_cli("run", "--output-dir", str(tmp_path), *TINY, "--startup-timeout-s", "0.001",
                     "--startup-retries", "1")
    assert_one_line_error(result, "did not start within", "--startup-timeout-s")
    assert "retrying" in result.stderr


def test_listen_port_in_use(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        result = run_cli("run", "--output-dir", str(tmp_path), *TINY, "--host-maddrs", f"/ip4/127.0.0.1/tcp/{port}")
    assert_one_line_error(result, "already in use")


def test_metrics_port_in_use(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        result = run_cli("run", "--output-dir", str(tmp_path), *TINY, "--metrics-port", str(port))
    assert_one_line_error(result, "cannot serve metrics", "--metrics-port")


def test_identity_in_use_by_a_running_node(tmp_path):
    first = subprocess.Popen([sys.executable, "-m", "swarm_node.cli", "run", "--output-dir", str(tmp_path), *TINY,
                              "--rounds", "0"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "node.json").exists():
            assert first.poll() is None and time.monotonic() < deadline
            time.sleep(0.2)
        result = run_cli("run", "--output-dir", str(tmp_path), *TINY)
        assert_one_line_error(result, "already used by a running node", "--identity-path")
    finally:
        first.terminate()
        first.wait(60)
        try:
            os.killpg(first.pid, 9)
        except ProcessLookupError:
            pass


def test_unreadable_identity_file(tmp_path):
    (tmp_path / "identity.key").write_bytes(b"this is not a key")
    assert_one_line_error(run_cli("run", "--output-dir", str(tmp_path), *TINY), "not a libp2p RSA private key")


def test_unknown_task(tmp_path):
    result = run_cli("run", "--output-dir", str(tmp_path), *TINY, "--task-preset", "custom", "--tasks", "no_such_task")
    assert_one_line_error(result, "unknown task 'no_such_task'")


def test_memory_estimate_that_does_not_fit(tmp_path):
    result = run_cli("run", "--output-dir", str(tmp_path), "--model", "smollm2-135m", "--memory-limit-mb", "1000")
    assert_one_line_error(result, "GB is available", "--micro-batch-size")
