"""`swarm-node swarm`: a local swarm of N real node processes on 127.0.0.1.

Node 0 starts a new swarm (the bootstrap peer); once it has written `node.json` with its multiaddrs the
others start with `--initial-peers` pointing at it. Every run starts fresh: the nodes keep their identities
but not their metrics or checkpoints (run `swarm-node run` per node to resume). Each node runs in its own session (process group), so a
stop reaches its DHT process and p2pd too. The launcher streams every node's per-round line from its
`metrics.jsonl`, and stops all nodes with SIGTERM (then SIGKILL of the process group after a deadline) when
every node has finished its rounds, when one node crashes, on Ctrl-C, or when the launcher itself gets SIGTERM
(it forwards the signal to every node, waits for them and reaps them, so no node, DHT process or p2pd outlives it).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from swarm_node.config import flag_argv, load_config
from swarm_node.errors import OperatorError
from swarm_node.records import RoundRecord, read_evals, read_rounds

STOP_DEADLINE_S = 30.0
START_DEADLINE_S = 600.0
console = Console(stderr=False, highlight=False)


class LauncherError(OperatorError):
    """The local swarm could not be started or a node failed; the message points at the node's log."""


class Terminated(Exception):
    """The launcher received SIGTERM: its nodes are stopped the same way as after Ctrl-C."""


class LocalSwarm:
    """Owns the node processes of one local swarm. Use `start()`, `wait()`, `stop()`."""

    def __init__(self, num_nodes: int, rounds: int, output_dir: str, config_file: str | None,
                 overrides: dict[str, Any], resume: bool = False,
                 node_overrides: list[dict[str, Any]] | None = None):
        if num_nodes < 1:
            raise LauncherError("--nodes must be at least 1")
        if rounds < 1:
            raise LauncherError("--rounds must be at least 1")
        self.num_nodes, self.rounds = num_nodes, rounds
        self.out = Path(output_dir)
        self.config_file = config_file
        self.overrides = dict(overrides)
        self.config = load_config(config_file, self.overrides)  # file, env and flags, as each node will see them
        if self.config.train.torch_threads == 0:  # unset anywhere: share the cores between the nodes
            self.overrides["torch_threads"] = max(1, (os.cpu_count() or 1) // num_nodes)
        if self.config.network.min_peers == 0:  # start all nodes together
            self.overrides["min_peers"] = num_nodes - 1
        if self.config.merge.merge_mode != "off" and self.config.merge.merge_target_group_size == 0:
            self.overrides["merge_target_group_size"] = max(num_nodes, self.config.merge.merge_min_group_size)
        self.resume = resume
        # per-node settings on top of the shared ones (e.g. each agent's own task in an experiment)
        self.node_overrides = list(node_overrides or [])
        if self.node_overrides and len(self.node_overrides) != num_nodes:
            raise LauncherError(f"{len(self.node_overrides)} per-node settings for {num_nodes} nodes")
        for extra in self.node_overrides:  # validate every node's settings before any process starts
            load_config(config_file, {**self.overrides, **extra})
        self.procs: list[subprocess.Popen] = []
        self._printed: list[int] = [0] * num_nodes

    def node_dir(self, i: int) -> Path:
        return self.out / f"node{i}"

    def _spawn(self, i: int, bootstrap_file: Path | None) -> subprocess.Popen:
        d = self.node_dir(i)
        d.mkdir(parents=True, exist_ok=True)
        (d / "node.json").unlink(missing_ok=True)
        if not self.resume:  # each local swarm run starts fresh unless resuming (experiments)
            for stale in ("metrics.jsonl", "metrics.jsonl.prev", "eval.jsonl", "eval.jsonl.prev"):
                (d / stale).unlink(missing_ok=True)
            shutil.rmtree(d / "checkpoints", ignore_errors=True)
        argv = [sys.executable, "-m", "swarm_node.cli", "run", "--output-dir", str(d), "--rounds", str(self.rounds),
                "--linger-s", "3600"]
        if self.config_file:
            argv += ["--config", self.config_file]
        if bootstrap_file is not None:
            argv += ["--initial-peers-file", str(bootstrap_file)]
        argv += flag_argv({**self.overrides, **(self.node_overrides[i] if self.node_overrides else {})})
        log = open(d / "node.log", "a" if self.resume else "w")
        return subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def _wait_for_info(self, i: int) -> dict[str, Any]:
        path = self.node_dir(i) / "node.json"
        deadline = time.monotonic() + START_DEADLINE_S
        while time.monotonic() < deadline:
            if self.procs[i].poll() is not None:
                raise LauncherError(f"node{i} exited during start-up:\n{self._log_tail(i)}")
            if path.exists():
                return json.loads(path.read_text())
            time.sleep(0.2)
        raise LauncherError(f"node{i} did not start within {START_DEADLINE_S:.0f} s; see {self.node_dir(i) / 'node.log'}")

    def _log_tail(self, i: int, lines: int = 15) -> str:
        try:
            return "\n".join((self.node_dir(i) / "node.log").read_text().splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def start(self) -> None:
        """Start every node at once; nodes 1.. load their models meanwhile and join node 0 (the bootstrap peer) once
        its node.json appears (--initial-peers-file)."""
        self.out.mkdir(parents=True, exist_ok=True)
        self.procs.append(self._spawn(0, None))
        for i in range(1, self.num_nodes):
            self.procs.append(self._spawn(i, self.node_dir(0) / "node.json"))
        info = self._wait_for_info(0)
        console.print(f"[bold]bootstrap peer[/] node0 {info['peer_id']} at {' '.join(info['multiaddrs'])}")
        for i in range(1, self.num_nodes):
            peer = self._wait_for_info(i)
            console.print(f"node{i} {peer['peer_id']} joined")
        if info.get("metrics_url"):  # node0's page shows every node of this swarm (it reads its siblings' endpoints)
            console.print(f"[bold]dashboard[/] of the whole swarm: {info['metrics_url']}/")
        console.print(f"watch it live: swarm-node status {self.out}   (metrics: {info.get('metrics_url')}/metrics)")

    def _read_metrics(self, i: int) -> list[RoundRecord]:
        return read_rounds(self.node_dir(i) / "metrics.jsonl")

    def _evaluated(self, i: int) -> bool:
        """Whether node i wrote its held-out evaluation of the last round (always true with evaluation off)."""
        if not self.config.tasks.eval_every_rounds:
            return True
        return any(row.round == self.rounds for row in read_evals(self.node_dir(i) / "eval.jsonl"))

    def _print_progress(self) -> list[int]:
        done = []
        for i in range(self.num_nodes):
            rows = self._read_metrics(i)
            for m in rows[self._printed[i]:]:
                console.print(
                    f"node{i} round {m.round:>3} | reward local {m.reward_local_mean:.3f} "
                    f"train {m.reward_train_mean:.3f} | external used {m.external_groups_used}"
                    f"/{m.external_groups_available} | peers {m.peers_seen} | "
                    f"gen {m.generate_s:.1f}s collect {m.collect_s:.1f}s train {m.train_s:.1f}s "
                    f"| {m.round_s:.1f}s"
                    + (f" | merge {m.merge_outcome} ({m.merge_group_size} peers, {m.merge_s:.1f}s)"
                       if m.merge_outcome else "")
                )
            self._printed[i] = len(rows)
            done.append(len(rows))
        return done

    def wait(self) -> int:
        """Stream progress until every node finished its rounds (0) or a node crashed (1)."""
        while True:
            done = self._print_progress()
            if all(n >= self.rounds and self._evaluated(i) for i, n in enumerate(done)):
                return 0
            for i, proc in enumerate(self.procs):
                if proc.poll() is not None:
                    console.print(f"[red]node{i} exited with status {proc.returncode}[/]\n{self._log_tail(i)}")
                    return 1
            time.sleep(0.5)

    def stop(self) -> None:
        """SIGTERM every node, wait up to STOP_DEADLINE_S, then SIGKILL each node's process group."""
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_DEADLINE_S
        for proc in self.procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for proc in self.procs:
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # the node's DHT process and p2pd share its session
            except (ProcessLookupError, PermissionError):
                pass
            proc.wait()

    def run(self, interrupted_message: str = "interrupted: stopping all nodes") -> int:
        """start(), wait() and always stop(). Returns wait()'s status, 130 after Ctrl-C or 143 after SIGTERM
        (forwarded to every node by stop(); the nodes are waited for and reaped before this returns).

        Raises:
            LauncherError: a node did not start (the nodes already started are stopped).
        """
        # own SIGTERM only where nobody else handles it (signal handlers work in the main thread only; an experiment
        # installs its own, which stops the swarm like Ctrl-C)
        in_main = (threading.current_thread() is threading.main_thread()
                   and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL)
        stopping = False

        def on_sigterm(signum, frame):
            nonlocal stopping
            if not stopping:  # once is enough, and never inside stop(): it forwards SIGTERM to every node itself
                stopping = True
                raise Terminated()

        previous = signal.signal(signal.SIGTERM, on_sigterm) if in_main else None
        try:
            self.start()
            return self.wait()
        except KeyboardInterrupt:
            console.print(interrupted_message)
            return 130
        except Terminated:
            console.print("SIGTERM: stopping all nodes")
            return 128 + signal.SIGTERM
        finally:
            stopping = True
            self.stop()
            if in_main:
                signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)

    def summary(self) -> Table:
        table = Table(title=f"local swarm: {self.num_nodes} nodes, output in {self.out}")
        for col in ("node", "rounds", "reward local (mean)", "external used / round", "round s (mean)", "peak RSS MB"):
            table.add_column(col)
        for i in range(self.num_nodes):
            rows = self._read_metrics(i)
            if not rows:
                table.add_row(f"node{i}", "0", "-", "-", "-", "-")
                continue
            n = len(rows)
            table.add_row(
                f"node{i}", str(n),
                f"{sum(m.reward_local_mean for m in rows) / n:.3f}",
                " ".join(str(m.external_groups_used) for m in rows),
                f"{sum(m.round_s for m in rows) / n:.1f}",
                f"{max(m.peak_rss_mb for m in rows):.0f}",
            )
        return table


def run_local_swarm(num_nodes: int, rounds: int, output_dir: str, config_file: str | None,
                    overrides: dict[str, Any]) -> int:
    """Run a local swarm to completion. Returns the exit status (0 when every node finished its rounds)."""
    from swarm_node.learning.models import EMBEDDED_MODEL, TINY_MODEL, embedded_model_dir

    swarm = LocalSwarm(num_nodes, rounds, output_dir, config_file, overrides)
    if swarm.config.train.model in (EMBEDDED_MODEL, TINY_MODEL):
        console.print("preparing the embedded model (converted once, then cached)")
        embedded_model_dir()
    try:
        status = swarm.run()
    finally:
        console.print(swarm.summary())
    return status
