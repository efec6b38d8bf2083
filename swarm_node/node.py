"""The node: joins the learning layer and the network layer in a round loop with no coordinator.

Lifecycle (uvicorn-style): `start()` -> `run()` -> `stop()`. Signals only set a flag; the loop checks it
between phases, so a stop finishes or abandons the current phase and then shuts down. One asyncio loop owns
the network (stream handler, DHT calls); blocking torch work (generation, training) runs on one worker
thread so peers are served while the node computes.

One round (SAPO, arXiv 2509.08721, section 3; see docs/algorithm.md):
1. draw I task specs from the node's own stream; 2. generate L completions per question in one batched call
and score them with the strict verifier; 3. publish the groups (manifest in the DHT, payload over streams);
4. take J groups from the pool that background collection fills all the time (peers' latest groups, fresh within
`max_staleness_s` on the DHT clock and `max_policy_lag` of their generator's versions, every question re-created
from its spec and every completion re-scored locally, off the event loop); a round never waits for a peer; 5. one GRPO step on
local + external groups; 6. if merging is on (`merge_mode`, swarm_node/network/merging/), merge with peers of the
same model when the schedule says so; 7. append a line to metrics.jsonl.

Each node keeps its own round counter; it never has to agree with anyone else's (a node that restarts from a
checkpoint or joins late simply continues its own count). DHT keys therefore hold no round number: readers
read every peer's latest manifest and judge freshness by time, so rounds need no coordinator or global clock
beyond hivemind's DHT time.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import os
import random
import resource
import time
from pathlib import Path
from typing import Any, Callable

import psutil

from swarm_node.checkpoint import CheckpointStore
from swarm_node.config import NodeConfig
from swarm_node.errors import OperatorError
from swarm_node.learning.sapo import Group, select_local
from swarm_node.learning.tasks import TaskSet, TaskSpec, recreate, safe_repr, score, stream_seed
from swarm_node.network import wire
from swarm_node.network.collector import Collector, CollectorSettings
from swarm_node.network.groups import group_to_wire
from swarm_node.network.exchange import CountingSignatureValidator, RolloutExchange
from swarm_node.network.identity import Identity, load_or_create_identity, lock_identity
from swarm_node import progress
from swarm_node.processes import kill_and_wait, reap_recorded, record_children, release_free_memory, tune_memory
from swarm_node.telemetry import Telemetry

log = logging.getLogger("swarm_node")
MAX_ROUND_FAILURES_IN_A_ROW = 5  # see Node.run: a round failing this often in a row stops the node


class NetworkError(OperatorError):
    """The node cannot join the swarm (daemon start, bootstrap peers, addresses); the message says what to do."""


def check_multiaddrs(addrs: list[str], what: str, need_peer_id: bool) -> None:
    """Raise NetworkError with a fix-it message for a malformed multiaddr."""
    from hivemind.utils.multiaddr import Multiaddr

    for addr in addrs:
        try:
            parsed = Multiaddr(addr)
        except Exception as e:
            raise NetworkError(f"{what} {addr!r} is not a valid multiaddr ({e}); expected e.g. "
                               "/ip4/127.0.0.1/tcp/31337/p2p/Qm...") from None
        if need_peer_id and "/p2p/" not in str(parsed):
            raise NetworkError(f"{what} {addr!r} has no /p2p/<peer ID> part; copy the full multiaddr the peer printed")


class Node:
    """A swarm node. Create, `await start()`, `await run()`, `await stop()`."""

    def __init__(self, config: NodeConfig):
        self.config = config
        self.out_dir = Path(config.output_dir)
        self._stop = asyncio.Event()
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="torch")
        self.identity: Identity | None = None
        self.dht = None
        self.exchange: RolloutExchange | None = None
        self.round = 0  # rounds completed
        self._saved_round = 0
        self.collector: Collector | None = None
        self._lock_fd: int | None = None
        self._children: list[psutil.Process] = []
        self.telemetry = Telemetry(config.health_stall_s)
        logging.getLogger("swarm_node").addHandler(self.telemetry.problem)
        self.metrics_url: str | None = None
        self._lag_task: asyncio.Task | None = None
        self.merger = None  # swarm_node.network.merging: WeightMerger, GradMerger or None
        self._verify_worker = None  # swarm_node.network.verify.VerifyWorker, launched in start()
        self.rounds_failed = 0  # rounds that raised unexpectedly and were retried (metrics `rounds_failed`)
        self._failed_in_a_row = 0
        self._round_started = time.monotonic()
        self._pace_wait_s = 0.0  # min_round_interval_s wait before the current round (metrics `pace_wait_s`)

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        """Load the identity and the model, join the DHT, register the rollout stream, resume, announce readiness.

        Raises:
            IdentityError, NetworkError, ModelError, TaskError, ConfigError: operator mistakes, with a fix.
        """
        cfg = self.config
        self.out_dir.mkdir(parents=True, exist_ok=True)
        check_multiaddrs(cfg.network.initial_peers, "bootstrap peer", need_peer_id=True)
        check_multiaddrs(cfg.network.host_maddrs, "listen address", need_peer_id=False)
        check_multiaddrs(cfg.network.announce_maddrs, "announce address", need_peer_id=False)
        from swarm_node.learning.models import check_model_name

        check_model_name(cfg.train.model)
        self._check_memory()
        self.identity = load_or_create_identity(cfg.resolved_identity_path)
        self._lock_fd = lock_identity(self.identity.path)
        # a node.json left by the previous run would send joiners (--initial-peers-file) to stale addresses
        (self.out_dir / "node.json").unlink(missing_ok=True)
        reap_recorded(self.out_dir / "node.pids")  # survivors of a previous run killed with -9
        from swarm_node.network.verify import VerifyWorker

        # the verification worker process imports reasoning-gym while the model loads (network/verify.py)
        self._verify_worker = VerifyWorker(cfg.network.verify_memory_mb, cfg.network.verify_timeout_s)
        self._verify_worker.launch()
        self.taskset = TaskSet(cfg.tasks.task_preset, cfg.tasks.tasks, cfg.tasks.num_fewshot,
                               cfg.tasks.task_seed, cfg.tasks.dataset_size, cfg.tasks.stream_tasks)
        if cfg.tasks.eval_ood_num_questions:
            from swarm_node.evaluation import ood_specs

            ood_specs(cfg.tasks.task_preset, 1, cfg.tasks.dataset_size)  # a preset without an OOD set fails now
        peer_id = self.identity.peer_id.to_base58()
        self.rng = random.Random(stream_seed(cfg.tasks.task_seed, peer_id))
        log.info("peer ID %s; loading model %s", peer_id, cfg.train.model)
        with progress.task(f"loading model {cfg.train.model}"):
            self.policy, self.trainer = await self._in_thread(self._load_model)
        await self._join_swarm()  # after the model: a connected peer is a peer ready to publish
        self.collector = Collector(self.exchange, CollectorSettings.pick(cfg.network, cfg.train),
                                   random.Random(cfg.train.seed), lambda: self.validator.invalid_signatures,
                                   taskset=self.taskset,
                                   count_tokens=lambda text: len(self.policy.tokenizer(text).input_ids),
                                   worker=self._verify_worker)
        self.checkpoints = CheckpointStore(self.out_dir / "checkpoints", cfg.checkpoint_keep)
        with progress.task("loading the latest checkpoint"):
            await self._in_thread(self._resume)
        if self.merger is not None:  # a late or restarted node catches up with its merge group first
            with progress.task("loading the merge group's state from peers"):
                await self._in_thread(self.merger.join, self.round)
        self._start_telemetry()
        # announce readiness: peers wait for the next round of every peer that has announced itself
        await self.exchange.publish(self._payload(self.round, []))
        self.collector.start()  # background collection: poll, fetch and verify into the pool, all run long
        self._write_node_info()

    async def _peers_from_file(self, path: Path, timeout_s: float) -> list[str]:
        """The multiaddrs in a bootstrap peer's node.json, once it exists (polled every 0.2 s).

        Raises:
            NetworkError: the file did not appear within `timeout_s`, or holds no valid multiaddr with a peer ID.
        """
        deadline = time.monotonic() + timeout_s
        while not path.exists():
            if time.monotonic() > deadline or self._stop.is_set():
                raise NetworkError(f"the bootstrap peer's {path} did not appear within {timeout_s:.0f} s: start "
                                   "that peer first, or raise --initial-peers-file-timeout-s")
            await asyncio.sleep(0.2)
        try:
            maddrs = json.loads(path.read_text())["multiaddrs"]
        except (OSError, ValueError, KeyError, TypeError):
            maddrs = None
        if not (isinstance(maddrs, list) and maddrs and all(isinstance(m, str) for m in maddrs)):
            raise NetworkError(f"{path} is not a swarm-node node.json with a 'multiaddrs' list")
        check_multiaddrs(maddrs, f"bootstrap peer (from {path})", need_peer_id=True)
        return maddrs

    def _check_memory(self) -> None:
        from swarm_node.learning.models import ModelError, estimate_memory_mb

        t = self.config.train
        from swarm_node.network.merging import param_copies

        need_mb = estimate_memory_mb(t.model, t.micro_batch_size, t.num_local_groups * t.num_completions,
                                     t.max_new_tokens, extra_param_copies=param_copies(self.config.merge),
                                     optimizer=t.optimizer)
        limit_mb = t.memory_limit_mb or psutil.virtual_memory().available / 2**20
        if need_mb > limit_mb:
            raise ModelError(
                f"this configuration needs about {need_mb / 1024:.1f} GB but {limit_mb / 1024:.1f} GB is available: "
                "lower --micro-batch-size, --num-local-groups x --num-completions or --max-new-tokens, use "
                "--optimizer adafactor (about 1 GB less for SmolLM2), or use a smaller --model"
            )
        log.info("memory estimate %.1f GB of %.1f GB available", need_mb / 1024, limit_mb / 1024)

    def _load_model(self):
        from swarm_node.learning.models import load_policy
        from swarm_node.learning.trainer import Trainer

        t = self.config.train
        tuned = tune_memory(t.malloc_mmap_threshold_bytes, t.onednn_cache_capacity)  # before any tensor work
        log.debug("memory tuning applied: %s", tuned)
        import torch

        if t.torch_threads:
            torch.set_num_threads(t.torch_threads)
        torch.manual_seed(t.seed)
        policy = load_policy(t.model, t.seed, t.precision)
        return policy, Trainer(policy, t, self.taskset)

    async def _join_swarm(self) -> None:
        from hivemind import DHT

        net = self.config.network
        initial_peers = list(net.initial_peers)
        if net.initial_peers_file:
            initial_peers += await self._peers_from_file(Path(net.initial_peers_file), net.initial_peers_file_timeout_s)
        self.validator = CountingSignatureValidator(self.identity.private_key)
        kwargs: dict[str, Any] = dict(
            initial_peers=initial_peers or None,
            host_maddrs=net.host_maddrs,
            identity_path=str(self.identity.path),
            client_mode=net.client_mode,
            record_validators=[self.validator],
            startup_timeout=net.startup_timeout_s,
            num_replicas=net.dht_replicas,
            use_relay=net.use_relay,
            use_auto_relay=net.use_auto_relay,
        )
        if net.announce_maddrs:
            kwargs["announce_maddrs"] = net.announce_maddrs
        before = {p.pid for p in psutil.Process().children(recursive=True)}
        for attempt in range(net.startup_retries + 1):
            try:
                self.dht = await asyncio.get_running_loop().run_in_executor(None, lambda: DHT(start=True, **kwargs))
                break
            except Exception as e:
                message, retryable = self._explain_join_failure(e)
                kill_and_wait([p for p in psutil.Process().children(recursive=True) if p.pid not in before], grace_s=0)
                if attempt == net.startup_retries or not retryable:
                    raise NetworkError(message) from None
                log.warning("joining failed (attempt %d of %d): %s; retrying", attempt + 1, net.startup_retries + 1,
                            message)
        self._children = [p for p in psutil.Process().children(recursive=True) if p.pid not in before]
        record_children(self.out_dir / "node.pids", self._children)
        p2p = await asyncio.wait_for(self.dht.replicate_p2p(), net.startup_timeout_s)
        self.exchange = RolloutExchange(self.dht, p2p, self.validator, net)
        await self.exchange.start()
        if self.config.merge.merge_mode != "off":
            from swarm_node.network.merging import create_merger

            # hivemind averagers must start in the main thread (this one) and add child processes
            self.merger = create_merger(self.config.merge, self.dht, self.policy, self.trainer,
                                        self.identity.private_key, swarm_name=net.swarm_name,
                                        total_rounds=self.config.rounds, dht_timeout_s=net.dht_timeout_s)
            self._children = [p for p in psutil.Process().children(recursive=True) if p.pid not in before]
            record_children(self.out_dir / "node.pids", self._children)
        self.maddrs = [str(a) for a in self.dht.get_visible_maddrs()]
        if not initial_peers:
            log.info("started a new swarm; others join with --initial-peers %s", " ".join(self.maddrs))
        else:
            log.info("joined the swarm; this node's multiaddrs: %s", " ".join(self.maddrs))

    def _explain_join_failure(self, e: Exception) -> tuple[str, bool]:
        """(one actionable message, whether another attempt can help) for a DHT start-up failure. hivemind
        reports these only as text, so the daemon's error text is classified here, once."""
        text = str(e)
        net = self.config.network
        if "already taken" in text:
            return (f"identity {self.identity.path} is already used by another peer in the swarm; pass another "
                    "--identity-path"), False
        if "address already in use" in text.lower():
            return f"a listen address in {net.host_maddrs} is already in use; pick another port or use tcp/0", False
        if net.initial_peers and ("bootstrap" in text.lower() or "failed to connect" in text.lower() or "dial" in text.lower()):
            return (f"could not reach any bootstrap peer in {net.initial_peers}: check that the peer is running, "
                    f"the address and port are right and reachable from here ({text.strip()[:200]})"), False
        if "failed to start" in text.lower():
            return (f"the p2p daemon did not start within {net.startup_timeout_s:.0f} s ({text.strip()[:200]}); "
                    "raise --startup-timeout-s or check that hivemind's p2pd binary runs on this machine"), True
        return f"could not join the swarm: {text.strip()[:300]}", True

    def _start_telemetry(self) -> None:
        cfg = self.config
        self.telemetry.info.update(peer_id=self.peer_id, multiaddrs=self.maddrs, model=self.policy.name,
                                   output_dir=str(self.out_dir), round=self.round)
        self.telemetry.load_history(self.out_dir)  # a resumed node's earlier rounds, for the dashboard
        if cfg.metrics_port < 0:
            return
        try:
            port = self.telemetry.serve(cfg.metrics_host, cfg.metrics_port)
        except OSError as e:
            raise NetworkError(f"cannot serve metrics on {cfg.metrics_host}:{cfg.metrics_port} ({e.strerror}); "
                               "pass another --metrics-port, 0 for a free one, or -1 to turn it off") from None
        self.metrics_url = f"http://{cfg.metrics_host}:{port}"
        log.info("dashboard at %s/ (metrics, health and status at /metrics /healthz /status)", self.metrics_url)

    async def _measure_loop_lag(self) -> None:
        self.telemetry.refresh_peers(self.collector)  # a first peer table before round 1, not a second later
        while True:
            t0 = time.perf_counter()
            await asyncio.sleep(1.0)
            self.telemetry.loop_lag_s.set(max(0.0, time.perf_counter() - t0 - 1.0))
            self.telemetry.refresh_peers(self.collector)  # the dashboard's peer table, built on this loop

    def _write_node_info(self) -> None:
        info = {"peer_id": self.identity.peer_id.to_base58(), "multiaddrs": self.maddrs, "pid": os.getpid(),
                "model": self.policy.name, "output_dir": str(self.out_dir), "metrics_url": self.metrics_url}
        tmp = self.out_dir / "node.json.tmp"
        tmp.write_text(json.dumps(info, indent=1))
        os.replace(tmp, self.out_dir / "node.json")

    def request_stop(self) -> None:
        """Ask the node to stop after the current phase (signal-safe)."""
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    async def stop(self) -> None:
        """Leave the swarm and reap every child process (DHT process and p2pd daemons) by PID."""
        self.telemetry.mark("stopping")
        if self._lag_task is not None:
            self._lag_task.cancel()
        self.telemetry.close()
        logging.getLogger("swarm_node").removeHandler(self.telemetry.problem)
        if self.collector is not None:
            await self.collector.stop()
        elif self._verify_worker is not None:
            self._verify_worker.close()
        if self.exchange is not None:
            try:
                await asyncio.wait_for(self.exchange.stop(), 5)
            except Exception as e:
                log.debug("exchange stop: %r", e)
        if self.merger is not None:
            try:
                await asyncio.wait_for(asyncio.get_running_loop().run_in_executor(None, self.merger.shutdown), 15)
            except Exception as e:
                log.debug("merger shutdown: %r", e)
        if self.dht is not None:
            await asyncio.get_running_loop().run_in_executor(None, self.dht.shutdown)
        self._children += [p for p in psutil.Process().children(recursive=True) if p not in self._children]
        kill_and_wait(self._children, grace_s=3)
        self._executor.shutdown(wait=False, cancel_futures=True)
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    async def _in_thread(self, fn: Callable, *args):
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    # ------------------------------------------------------------------ main loop
    async def run(self) -> None:
        """Run rounds until `rounds` is reached or a stop is requested, then linger `linger_s` serving peers."""
        cfg = self.config
        metrics_path = self.out_dir / "metrics.jsonl"
        self._lag_task = asyncio.create_task(self._measure_loop_lag(), name="event-loop-lag")
        await self._wait_for_peers()
        self.telemetry.mark("running")
        await self._maybe_evaluate()  # round 0: the base policy
        while not self.stopping and (cfg.rounds == 0 or self.round < cfg.rounds):
            if self.round:
                await self._pace()
            self._round_started = time.monotonic()
            try:
                metrics = await self.run_round(self.round + 1)
            except (OperatorError, MemoryError):
                raise  # the operator's to fix (e.g. out of memory): one `error:` line from the CLI
            except Exception as e:  # a round that fails for an unexpected reason is logged, counted and survived
                self.rounds_failed += 1
                self._failed_in_a_row += 1
                log.error("round %d failed (%s; %d failed so far); retrying it", self.round + 1, safe_repr(e),
                          self.rounds_failed, exc_info=True)
                if self._failed_in_a_row >= MAX_ROUND_FAILURES_IN_A_ROW:
                    raise  # the same failure every time is a local bug, not a peer's doing: stop loudly
                await asyncio.sleep(1.0)
                continue
            self._failed_in_a_row = 0
            if metrics is None:
                break  # stopped mid-round: the round did not happen, the counter stays
            metrics["rounds_failed"] = self.rounds_failed
            metrics["pace_wait_s"] = round(self._pace_wait_s, 3)
            self.round += 1
            with open(metrics_path, "a") as f:
                f.write(json.dumps(metrics) + "\n")
                f.flush()
                os.fsync(f.fileno())
            log.info(
                "round %d | reward local %.3f train %.3f | external used %d/%d | peers %d | loss %s | %.1f s",
                metrics["round"], metrics["reward_local_mean"], metrics["reward_train_mean"],
                metrics["external_groups_used"], metrics["external_groups_available"], metrics["peers_seen"],
                "-" if metrics["loss"] is None else f"{metrics['loss']:.4f}", metrics["round_s"],
            )
            self.telemetry.observe_round(metrics, self.collector.accepted_total)
            self.telemetry.info.update(round=self.round, policy_version=metrics["policy_version"],
                                       banned_peers=metrics["banned_peers"])
            await self._maybe_evaluate()
            if cfg.checkpoint_every_rounds and self.round % cfg.checkpoint_every_rounds == 0:
                with progress.task(f"saving checkpoint of round {self.round}"):
                    await self._in_thread(self._save_checkpoint)
        if cfg.checkpoint_every_rounds and self.round > self._saved_round:
            with progress.task(f"saving checkpoint of round {self.round}"):
                await self._in_thread(self._save_checkpoint)  # clean stop or last round
        if cfg.linger_s and not self.stopping:
            self.telemetry.mark("lingering")
            log.info("finished %d rounds; serving peers for %.0f s", self.round, cfg.linger_s)
            try:
                await asyncio.wait_for(self._stop.wait(), cfg.linger_s)
            except asyncio.TimeoutError:
                pass

    def _state(self) -> dict[str, Any]:
        import torch

        return {"format": 1, "peer_id": self.peer_id, "policy_version": self.trainer.policy_version,
                "model": self.policy.model.state_dict(), "optimizer": self.trainer.optimizer.state_dict(),
                "task_rng": self.rng.getstate(), "sample_rng": self.collector.rng.getstate(),
                "torch_rng": torch.get_rng_state(),
                # the merger's anchor and DiLoCo momentum (WeightMerger); GradMerger's state is the optimizer's
                "merger": self.merger.state_dict() if hasattr(self.merger, "state_dict") else None}

    def _save_checkpoint(self) -> None:
        t0 = time.perf_counter()
        path = self.checkpoints.save(self.round, self._state())
        self._saved_round = self.round
        log.info("saved checkpoint %s in %.1f s", path, time.perf_counter() - t0)

    def _resume(self) -> None:
        """Load the newest intact checkpoint, or start fresh. Metrics lines after the resume point are dropped,
        so metrics.jsonl never has duplicated or missing rounds."""
        import torch

        metrics_path = self.out_dir / "metrics.jsonl"
        state = self.checkpoints.load_latest(self.peer_id) if self.config.checkpoint_every_rounds else None
        if state is None:
            if metrics_path.exists() and metrics_path.stat().st_size:
                log.warning("no checkpoint: starting at round 1 and moving the previous metrics to metrics.jsonl.prev")
                os.replace(metrics_path, metrics_path.with_suffix(".jsonl.prev"))
            eval_path = self.out_dir / "eval.jsonl"
            if eval_path.exists():
                os.replace(eval_path, eval_path.with_suffix(".jsonl.prev"))
            return
        try:
            self.policy.model.load_state_dict(state["model"])
            self.trainer.optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as e:
            from swarm_node.learning.models import ModelError

            raise ModelError(f"the checkpoints in {self.checkpoints.directory} do not fit --model "
                             f"{self.config.train.model} ({str(e)[:120]}); use the model they were trained with or "
                             "move that directory away to start over") from None
        for group in self.trainer.base_optimizer.param_groups:  # the configured learning rate wins over the saved one
            group["lr"] = self.config.train.learning_rate
        self.trainer.policy_version = state["policy_version"]
        self.rng.setstate(state["task_rng"])
        self.collector.rng.setstate(state["sample_rng"])
        torch.set_rng_state(state["torch_rng"])
        self.round = self._saved_round = state["round"]
        if state.get("merger") is not None and hasattr(self.merger, "load_state_dict"):
            try:
                self.merger.load_state_dict(state["merger"])
            except ValueError as e:  # merging was reconfigured since the checkpoint: start its state afresh
                log.warning("not restoring the merger's state from the checkpoint: %s", e)
        for path in (metrics_path, self.out_dir / "eval.jsonl"):
            _truncate_jsonl(path, self.round)
        log.info("resumed from checkpoint at round %d (policy version %d)", self.round, self.trainer.policy_version)

    async def _pace(self) -> None:
        """Wait out the rest of `min_round_interval_s` since the last round started (a stop ends the wait)."""
        rest = self.config.min_round_interval_s - (time.monotonic() - self._round_started)
        self._pace_wait_s = max(0.0, rest)
        if rest > 0:
            try:
                await asyncio.wait_for(self._stop.wait(), rest)
            except asyncio.TimeoutError:
                pass

    async def _maybe_evaluate(self) -> None:
        """Held-out evaluation before round 1, every `eval_every_rounds` rounds and after the last round; skipped
        when eval.jsonl already holds this round's evaluation (after a resume)."""
        every, rounds = self.config.tasks.eval_every_rounds, self.config.rounds
        if not every or self.stopping or (self.round % every and self.round != rounds):
            return
        path = self.out_dir / "eval.jsonl"
        if path.exists():
            lines = path.read_text().splitlines()
            try:
                if lines and json.loads(lines[-1])["round"] == self.round:
                    return
            except (ValueError, KeyError):
                pass
        with progress.task(f"held-out evaluation after round {self.round}"):
            line = await self._in_thread(self._evaluate)
        with open(self.out_dir / "eval.jsonl", "a") as f:
            f.write(json.dumps(line) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.telemetry.observe_eval(line)
        log.info("held-out accuracy after round %d: %.3f (%d questions)", self.round, line["heldout_accuracy"],
                 line["num_questions"])

    def _evaluate(self) -> dict[str, Any]:
        """Greedy accuracy (strict verifier) on the fixed held-out sets (swarm_node/evaluation.py)."""
        from swarm_node.evaluation import evaluate

        line = evaluate(self.policy, self.trainer.prompt_text, self.taskset, self.config.tasks,
                        self.config.train.max_new_tokens)
        release_free_memory()
        return {"round": self.round, "peer_id": self.peer_id, "policy_version": self.trainer.policy_version,
                **line, "time_s": time.time()}

    async def _wait_for_peers(self) -> None:
        net = self.config.network
        if not net.min_peers:
            return
        deadline = time.monotonic() + net.min_peers_timeout_s
        while not self.stopping and time.monotonic() < deadline:
            # a peer counts once it has announced itself (it publishes after loading its model), not when its
            # DHT first connects, which can be many seconds before it is ready to exchange rollouts
            manifests, _ = await self.exchange.poll()
            if len({m.peer_id for m in manifests}) >= net.min_peers:
                return
            await asyncio.sleep(0.5)
        log.warning("fewer than %d peers after %.0f s (min_peers_timeout_s); starting anyway",
                    net.min_peers, net.min_peers_timeout_s)

    async def run_round(self, r: int) -> dict[str, Any] | None:
        """One SAPO round. Returns the metrics line, or None if a stop was requested mid-round."""
        cfg = self.config.train
        t_round, cpu_round = time.perf_counter(), _cpu_seconds()
        specs = [self.taskset.draw(self.rng) for _ in range(cfg.num_local_groups * cfg.local_oversample)]
        t0 = time.perf_counter()
        with progress.task(f"round {r}: generating {len(specs)} x {cfg.num_completions} completions"):
            generated, tokens_generated, format_rate = await self._in_thread(self._generate_local, r, specs)
        local = select_local(generated, cfg.num_local_groups)  # all of them unless over-sampling (control arm)
        generate_s = time.perf_counter() - t0
        if self.stopping:
            return None

        t0 = time.perf_counter()
        self.collector.note_own(generated)  # copies of these coming back from other peers are refused
        published = await self.exchange.publish(self._payload(r, generated))
        publish_s = time.perf_counter() - t0

        t0 = time.perf_counter()
        collected = self.collector.take()  # what background collection has verified so far: never waits
        external = collected.groups
        collect_s = time.perf_counter() - t0

        t0 = time.perf_counter()
        with progress.task(f"round {r}: GRPO step on {len(local) + len(external)} groups"):
            stats = await self._in_thread(self._train, local + external)
        train_s = time.perf_counter() - t0

        merge_metrics: dict[str, Any] = {}
        if self.merger is not None:
            with progress.task(f"round {r}: merging with peers of the same model"):
                merge_metrics = await self._in_thread(self.merger.maybe_merge, r)

        local_rewards = [x for g in generated for x in g.rewards]  # every completion this node generated
        train_rewards = [x for g in local + external for x in g.rewards]
        return {
            "round": r,
            "peer_id": self.peer_id,
            "model": self.policy.name,
            "policy_version": stats.policy_version,
            "reward_local_mean": sum(local_rewards) / len(local_rewards),
            "reward_train_mean": sum(train_rewards) / len(train_rewards),
            "format_rate_local": format_rate,
            "local_groups": len(local),
            "local_groups_generated": len(generated),
            "local_groups_with_signal": sum(g.has_signal for g in local),
            "external_groups_available": collected.available,
            "external_groups_used": len(external),
            "external_peers_used": len({g.peer_id for g in external}),
            "external_peer_ids": sorted({g.peer_id for g in external}),  # at most J distinct peer IDs
            "peers_seen": collected.peers_seen,
            "published": published,
            "rejected": dict(self.collector.trust.rejects),
            "pool_dropped": dict(self.collector.pool.dropped),
            "banned_peers": len(self.collector.trust.banned_peers),
            "verify_ms_per_group": round(1000 * self.collector.verify_s / max(1, self.collector.verified_groups), 3),
            "loss": stats.loss,
            "grad_norm": stats.grad_norm,
            "clip_fraction": stats.clip_fraction,
            "kl": stats.kl,
            "offpolicy": stats.offpolicy,
            "peer_usefulness": self.collector.peer_weight.snapshot() if self.collector.peer_weight else {},
            "train_sequences": stats.num_sequences,
            "train_tokens": stats.num_tokens,
            "tokens_generated": tokens_generated,
            "bytes_in": self.exchange.bytes_in,
            "bytes_out": self.exchange.bytes_out,
            "generate_s": round(generate_s, 3),
            "publish_s": round(publish_s, 3),
            "collect_s": round(collect_s, 3),
            "collect_wait_s": round(collected.wait_s, 3),
            "train_s": round(train_s, 3),
            "round_s": round(time.perf_counter() - t_round, 3),
            "cpu_s": round(_cpu_seconds() - cpu_round, 3),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "time_s": time.time(),
            **merge_metrics,
        }

    def _payload(self, r: int, groups: list[Group]) -> wire.RolloutPayload:
        return wire.RolloutPayload(version=wire.PROTOCOL_VERSION, peer_id=self.peer_id, round=r,
                                   policy_version=self.trainer.policy_version, model=self.policy.name,
                                   groups=[group_to_wire(g) for g in groups])

    @property
    def peer_id(self) -> str:
        return self.identity.peer_id.to_base58()

    def _train(self, groups: list[Group]):
        self.trainer.local_peer_id = self.peer_id
        try:
            stats = self.trainer.step(groups)
            if self.config.train.peer_usefulness == "on":
                from swarm_node.learning.selection import PeerUsefulness

                if self.collector.peer_weight is None:
                    self.collector.peer_weight = PeerUsefulness()
                self.collector.peer_weight.update(stats.peer_ess)
            return stats
        finally:
            release_free_memory()

    def _generate_local(self, r: int, specs: list[TaskSpec]) -> tuple[list[Group], int, float]:
        from swarm_node.learning.generation import generate
        from swarm_node.learning.tasks import has_answer_tags

        questions = [recreate(s) for s in specs]
        prompts = [self.trainer.prompt_text(s) for s in specs]
        cfg = self.config.train
        out = generate(self.policy, prompts, cfg.num_completions, cfg.max_new_tokens, cfg.temperature)
        groups, formatted, total = [], 0, 0
        from swarm_node.learning.generation import tokenizer_identity

        tokenizer_id = tokenizer_identity(self.policy.tokenizer)
        for question, completions, logprobs in zip(questions, out.completions, out.logprobs):
            rewards = [score(question, c) for c in completions]
            formatted += sum(has_answer_tags(c) for c in completions)
            total += len(completions)
            groups.append(Group(question.spec, completions, rewards, self.peer_id, r,
                                self.trainer.policy_version, self.policy.name, logprobs, tokenizer_id))
        release_free_memory()
        return groups, out.num_tokens, formatted / max(total, 1)


def _truncate_jsonl(path: Path, last_round: int) -> None:
    """Keep the lines of a per-round JSONL log up to `last_round` (and drop a torn last line), atomically."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["round"] <= last_round:
                kept.append(line)
        except (ValueError, KeyError):
            break  # a torn last line from the crash
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)


def _cpu_seconds() -> float:
    """CPU seconds (user + system) used so far by this node: its own threads plus its live child processes (the
    DHT process, p2pd and the verification worker). The per-round difference is the node's own compute,
    independent of how many other processes share the machine's cores (wall time is not)."""
    total = 0.0
    me = psutil.Process()
    for proc in [me, *me.children(recursive=True)]:
        try:
            t = proc.cpu_times()
            total += t.user + t.system
        except psutil.Error:  # a child that just exited
            pass
    return total
