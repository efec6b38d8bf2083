"""Node processes for multi-peer tests: start `swarm-node run`, wait for states, restart, reap by session."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil


class Proc:
    """One `swarm-node run` process in its own session, with helpers that wait for states (node.json, rounds)."""

    def __init__(self, out: Path, initial_peers: list[str], flags: list[str], bootstrap: Proc | None = None):
        """Start the node. `bootstrap`: join that node once its node.json appears (--initial-peers-file), so both
        can start at once; used for this launch only (a restart gets explicit initial peers)."""
        self.out, self.flags = out, flags
        out.mkdir(parents=True, exist_ok=True)
        (out / "node.json").unlink(missing_ok=True)
        argv = [sys.executable, "-m", "swarm_node.cli", "run", "--output-dir", str(out), *flags]
        if initial_peers:
            argv += ["--initial-peers", *initial_peers]
        if bootstrap is not None:
            argv += ["--initial-peers-file", str(bootstrap.out / "node.json")]
        self.log = open(out / "node.log", "a")
        self.popen = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        self.sessions = {self.popen.pid}

    def info(self, timeout_s=120) -> dict:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.popen.poll() is None, (self.out / "node.log").read_text()[-2000:]
            if (self.out / "node.json").exists():
                return json.loads((self.out / "node.json").read_text())
            time.sleep(0.2)
        raise AssertionError(f"{self.out} did not start")

    def rows(self) -> list[dict]:
        path = self.out / "metrics.jsonl"
        rows = []
        for line in path.read_text().splitlines() if path.exists() else []:
            try:
                rows.append(json.loads(line))
            except ValueError:
                break
        return rows

    def wait_rounds(self, n: int, timeout_s=120) -> list[dict]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            rows = self.rows()
            if len(rows) >= n:
                return rows
            assert self.popen.poll() is None, (self.out / "node.log").read_text()[-2000:]
            time.sleep(0.2)
        raise AssertionError(f"{self.out}: fewer than {n} rounds after {timeout_s} s: {len(self.rows())}")

    def restart(self, initial_peers: list[str]) -> None:
        self.log.close()
        sessions = self.sessions
        self.__init__(self.out, initial_peers, self.flags)
        self.sessions |= sessions

    def cleanup(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(30)
            except subprocess.TimeoutExpired:
                pass
        for sid in self.sessions:
            try:
                os.killpg(sid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        self.popen.wait()
        self.log.close()


def session_processes(sid: int, settle_s: float = 15.0) -> list[int]:
    """Live (non-zombie) processes of a session. A process SIGKILLed a moment ago can take a while to go on a
    loaded machine, so this polls for up to `settle_s` seconds before returning what is still there."""
    deadline = time.monotonic() + settle_s
    while True:
        found = []
        for proc in psutil.process_iter():
            try:
                if os.getsid(proc.pid) == sid and proc.status() != psutil.STATUS_ZOMBIE:
                    found.append(proc.pid)
            except (ProcessLookupError, PermissionError, psutil.NoSuchProcess):
                pass
        if not found or time.monotonic() >= deadline:
            return found
        time.sleep(0.2)
