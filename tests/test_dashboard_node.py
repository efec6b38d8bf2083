"""The dashboard endpoints of a real running tiny node, and hostile clients against it: hundreds of connections that
send nothing, a request head sent byte by byte, answers never read. The node keeps completing rounds and /healthz
keeps answering."""

import json
import socket
import threading
import time
import urllib.request

import pytest
from rich.console import Console

from nodes import Proc
from swarm_node.tools.status import render

pytestmark = pytest.mark.slow

FLAGS = ["--model", "tiny", "--num-local-groups", "2", "--num-completions", "3", "--max-new-tokens", "6",
         "--no-filter-zero-advantage", "--torch-threads", "1", "--rounds", "400", "--eval-every-rounds", "2",
         "--eval-num-questions", "4"]


def get_json(url: str, timeout_s: float = 5.0) -> tuple[int, dict]:
    with urllib.request.urlopen(url, timeout=timeout_s) as response:
        return response.status, json.loads(response.read())


class Attacker:
    """Keeps `idle` connections open that send nothing (reopening those the server closes), one that sends a request
    head a byte a second, and `unread` that ask for the largest file and never read the answer."""

    def __init__(self, port: int, idle: int = 300, unread: int = 20):
        self.port, self.idle, self.unread = port, idle, unread
        self.stop = threading.Event()
        self.opened = 0
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _connect(self) -> socket.socket | None:
        try:
            s = socket.create_connection(("127.0.0.1", self.port), timeout=2)
            self.opened += 1
            return s
        except OSError:
            return None

    def _run(self) -> None:
        socks: list[socket.socket] = []
        slow = self._connect()
        head = b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + b"X-Slow: " + b"a" * 100
        for _ in range(self.unread):
            s = self._connect()
            if s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
                s.sendall(b"GET /static/vendor/uplot/uPlot.iife.min.js HTTP/1.1\r\nHost: x\r\n\r\n")
                socks.append(s)
        i = 0
        while not self.stop.is_set():
            alive = []
            for s in socks:  # a connection the server closed reads b"" (or errors): replace it
                try:
                    s.setblocking(False)
                    closed = s.recv(1, socket.MSG_PEEK) == b""
                except BlockingIOError:
                    closed = False
                except OSError:
                    closed = True
                if closed:
                    s.close()
                else:
                    alive.append(s)
            socks = alive
            while len(socks) < self.idle + self.unread and not self.stop.is_set():
                s = self._connect()
                if s is None:
                    break
                socks.append(s)
            if slow is not None and i < len(head):
                try:
                    slow.send(head[i:i + 1])
                except OSError:
                    slow = self._connect()
                i += 1
            time.sleep(1.0)
        for s in socks + [slow]:
            if s is not None:
                s.close()


def test_real_node_endpoints_and_hostile_clients(tmp_path, reap_children):
    node = Proc(tmp_path / "node0", [], FLAGS)
    try:
        info = node.info(timeout_s=240)
        url = info["metrics_url"]
        node.wait_rounds(2, timeout_s=240)
        # /api/rounds holds the node's own metrics rows
        rows = {r["round"]: r for r in node.rows()}
        _, data = get_json(url + "/api/rounds")
        assert data["peer_id"] == info["peer_id"] and data["rounds"]
        for r in data["rounds"]:
            if r["round"] in rows:
                assert r["reward_local_mean"] == rows[r["round"]]["reward_local_mean"]
                assert r["round_s"] == rows[r["round"]]["round_s"] and r["rss_mb"] > 50
        _, evals = get_json(url + "/api/eval")
        assert evals["evals"][0]["round"] == 0 and 0 <= evals["evals"][0]["heldout_accuracy"] <= 1
        _, swarm = get_json(url + "/api/swarm")
        assert [(n["label"], n["self"], n["metrics_url"]) for n in swarm["nodes"]] == [("node0", True, url)]
        _, peers = get_json(url + "/api/peers")
        assert peers["peers"] == [] and peers["snapshot_age_s"] is not None  # alone: knows no peer, says so

        # `swarm-node status DIR` ends with the one URL of the swarm's dashboard
        console = Console(record=True, width=300)
        render(str(tmp_path), console)
        assert console.export_text().splitlines()[-1] == f"dashboard: {url}/"
        with urllib.request.urlopen(url + "/", timeout=5) as response:
            assert b"swarm-node dashboard" in response.read()

        port = int(url.rsplit(":", 1)[1])
        attacker = Attacker(port)
        try:
            before = len(node.rows())
            health_answers = 0
            deadline = time.monotonic() + 25
            while time.monotonic() < deadline:
                status, health = get_json(url + "/healthz", timeout_s=3)
                assert status == 200 and health["ok"], health
                health_answers += 1
                time.sleep(1.0)
            assert attacker.opened >= 300
            after = len(node.rows())
            assert after >= before + 3, (before, after)  # the round loop kept going under the attack
            assert health_answers >= 10
            _, data = get_json(url + f"/api/rounds?since={after - 1}")
            assert data["rounds"] and data["rounds"][-1]["round"] >= after
        finally:
            attacker.stop.set()
            attacker.thread.join(timeout=10)
    finally:
        node.cleanup()
