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


def assert_one_line_error(result, *fragments):
    assert result.returncode == 2, result.stdout[-1500:] + result.stderr[-1500:]
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(error_lines) == 1, result.stderr[-1500:]
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in error_lines[0], error_lines[0]


def _listening_socket() -> socket.socket:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    return s


@pytest.fixture(scope="module")
def mistakes(tmp_path_factory):
    """Every independent mistake's CLI run, started at once (each spends most of its time importing torch, so
    they overlap well), keyed by case name. The ports stay taken until all of them have finished."""
    tmp = tmp_path_factory.mktemp("mistakes")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead_port = s.getsockname()[1]
    dead = f"/ip4/127.0.0.1/tcp/{dead_port}/p2p/QmXf2tinhvF778V2YdBTCPoPwGmbWrEpXTYhHqfiASa9PV"
    taken_listen, taken_metrics = _listening_socket(), _listening_socket()
    (tmp / "unreadable").mkdir()
    (tmp / "unreadable" / "identity.key").write_bytes(b"this is not a key")
    cases = {
        "unreachable_bootstrap": [*TINY, "--initial-peers", dead, "--startup-timeout-s", "10"],
        "daemon_start_timeout": [*TINY, "--startup-timeout-s", "0.001", "--startup-retries", "1"],
        "listen_port_in_use": [*TINY, "--host-maddrs", f"/ip4/127.0.0.1/tcp/{taken_listen.getsockname()[1]}"],
        "metrics_port_in_use": [*TINY, "--metrics-port", str(taken_metrics.getsockname()[1])],
        "unreadable": [*TINY],
        "unknown_task": [*TINY, "--task-preset", "custom", "--tasks", "no_such_task"],
        "memory": ["--model", "smollm2-135m", "--memory-limit-mb", "1000"],
        "bad_multiaddr": ["--initial-peers", "not-a-multiaddr"],
        "no_peer_id": ["--initial-peers", "/ip4/127.0.0.1/tcp/9"],
        "unknown_model": ["--model", "/nonexistent/model"],
        "no_bootstrap_file": [*TINY, "--initial-peers-file", str(tmp / "never" / "node.json"),
                              "--initial-peers-file-timeout-s", "1"],
    }

    def start(name, args, out_name=None, stderr=subprocess.PIPE):
        out = tmp / (out_name or name)
        out.mkdir(exist_ok=True)
        return subprocess.Popen([sys.executable, "-m", "swarm_node.cli", "run", "--output-dir", str(out), *args],
                                stdout=subprocess.PIPE if stderr == subprocess.PIPE else subprocess.DEVNULL,
                                stderr=stderr, text=True, start_new_session=True)

    # a node that keeps running (0 rounds: it waits for a stop signal), whose identity a second node then reuses
    running_log = (tmp / "running.log").open("w")
    running = start("running", [*TINY, "--rounds", "0"], stderr=running_log)
    procs = {name: start(name, args) for name, args in cases.items()}
    results = {}
    try:
        deadline = time.monotonic() + 240
        while not (tmp / "running" / "node.json").exists():
            assert running.poll() is None and time.monotonic() < deadline, (tmp / "running.log").read_text()[-1500:]
            time.sleep(0.2)
        procs["identity_in_use"] = start("identity_in_use", TINY, out_name="running")
        for name, proc in list(procs.items()):
            # hivemind's DHT start once hung here under load (the 1 ms start-up timeout case); the node now gives up
            # on a start after --startup-timeout-s + 60 s (swarm_node/node/join.py), so every case ends within this
            stdout, stderr = proc.communicate(timeout=240)  # (two attempts of at most 60 s each)
            results[name] = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    finally:
        running.terminate()
        try:
            running.wait(60)
        except subprocess.TimeoutExpired:
            pass
        for proc in [running, *procs.values()]:
            try:
                os.killpg(proc.pid, 9)  # the node's session: its DHT process and p2pd daemon
            except ProcessLookupError:
                pass
            proc.wait()
        running_log.close()
        taken_listen.close()
        taken_metrics.close()
    results["dead"] = dead
    return results


def test_unreachable_bootstrap_peer(mistakes):
    assert_one_line_error(mistakes["unreachable_bootstrap"], "could not reach any bootstrap peer", mistakes["dead"])


def test_daemon_start_timeout_is_retried_then_explained(mistakes):
    result = mistakes["daemon_start_timeout"]
    assert_one_line_error(result, "did not start within", "--startup-timeout-s")
    assert "retrying" in result.stderr


@pytest.mark.parametrize("case, fragments", [
    ("listen_port_in_use", ["already in use"]),
    ("metrics_port_in_use", ["cannot serve metrics", "--metrics-port"]),
    ("identity_in_use", ["already used by a running node", "--identity-path"]),
    ("unreadable", ["not a libp2p RSA private key"]),
    ("unknown_task", ["unknown task 'no_such_task'"]),
    ("memory", ["GB is available", "--micro-batch-size"]),
    ("no_bootstrap_file", ["did not appear within 1 s", "--initial-peers-file-timeout-s"]),
    ("bad_multiaddr", ["is not a valid multiaddr"]),
    ("no_peer_id", ["no /p2p/<peer ID>"]),
    ("unknown_model", ["unknown model"]),
])
def test_operator_mistake_is_one_actionable_line(mistakes, case, fragments):
    assert_one_line_error(mistakes[case], *fragments)
