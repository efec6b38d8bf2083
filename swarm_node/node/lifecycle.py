"""The node: joins the learning layer and the network layer in a round loop with no coordinator.

Lifecycle (uvicorn-style): `start()` -> `run()` -> `stop()`. Signals only set a flag; the loop checks it
between phases, so a stop finishes or abandons the current phase and then shuts down. One asyncio loop owns
the network (stream handler, DHT calls); blocking torch work (generation, training) runs on one worker
thread so peers are served while the node computes.

One round (SAPO, arXiv 2509.08721, section 3; docs/algorithm.md, docs/architecture.md "One round"): draw I task
specs from the node's own stream; GENERATE and SCORE (node/generate.py); PUBLISH; take J groups from the pool that
background collection fills (a round never waits for a peer); one GRPO step; MERGE if the schedule says so;
append a RoundRecord to metrics.jsonl (node/metrics.py, node/runlog.py). Each node keeps its own round counter and
never agrees on it with anyone, so DHT keys hold no round number.

`Node` keeps the lifecycle and the loop; each concern is a module of this package: joining (join.py), node.json
(peers_file.py), memory (memory.py), checkpoint state (state.py), the run log (runlog.py), the metrics line
(metrics.py) and generation (generate.py).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import logging
import os
import random
import time
from pathlib import Path
from typing import Callable

from swarm_node import progress
from swarm_node.checkpoint import CheckpointStore
from swarm_node.config import NodeConfig
from swarm_node.errors import OperatorError
from swarm_node.learning.sapo import Group, select_local
from swarm_node.learning.tasks import TaskSet, safe_repr, stream_seed
from swarm_node.network.collector import Collector, CollectorSettings
from swarm_node.network.groups import payload_of
from swarm_node.network.merging import Merger
from swarm_node.network.exchange import CountingSignatureValidator, RolloutExchange
from swarm_node.network.identity import Identity, load_or_create_identity, lock_identity
from swarm_node.node.generate import generate_local_groups
from swarm_node.node.join import (NetworkError, check_addresses, child_pids, new_children, start_dht,
                                  wait_for_peers)
from swarm_node.node.memory import check_memory_fits, prepare_torch, release_free_memory
from swarm_node.node.metrics import PhaseTimer, round_record
from swarm_node.node.peers_file import bootstrap_peers, write_node_info
from swarm_node.node.runlog import RunLog
from swarm_node.node.state import node_state
from swarm_node.processes import kill_and_wait, reap_recorded, record_children
from swarm_node.records import EvalRecord, RoundRecord
from swarm_node.telemetry import Telemetry

log = logging.getLogger("swarm_node")
MAX_ROUND_FAILURES_IN_A_ROW = 5  # see Node.run: a round failing this often in a row stops the node


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
        self._children = []  # psutil.Process: the DHT process, p2pd and averagers, reaped on stop
        self.telemetry = Telemetry(config.health_stall_s)
        logging.getLogger("swarm_node").addHandler(self.telemetry.problem)
        self.runlog = RunLog(self.out_dir)
        self.metrics_url: str | None = None
        self._lag_task: asyncio.Task | None = None
        self.merger: Merger | None = None  # WeightMerger, GradMerger or None (merging off)
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
        check_addresses(cfg.network)
        check_memory_fits(cfg)  # the model exists and its estimate fits
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
        self.rng = random.Random(stream_seed(cfg.tasks.task_seed, self.peer_id))
        log.info("peer ID %s; loading model %s", self.peer_id, cfg.train.model)
        with progress.task(f"loading model {cfg.train.model}"):
            self.policy, self.trainer = await self._in_thread(self._load_model)
        await self._join_swarm()  # after the model: a connected peer is a peer ready to publish
        self.collector = Collector(self.exchange, CollectorSettings.pick(cfg.network, cfg.train),
                                   random.Random(cfg.train.seed), lambda: self.validator.invalid_signatures,
                                   taskset=self.taskset,
                                   count_tokens=lambda text: len(self.policy.tokenizer(text).input_ids),
                                   worker=self._verify_worker)
        self.checkpoints = CheckpointStore(self.out_dir / "checkpoints", cfg.checkpoint_keep)
        self.state = node_state(self.policy, self.trainer, self.config.train.learning_rate, self.rng,
                                self.collector.rng, self.merger)
        with progress.task("loading the latest checkpoint"):
            await self._in_thread(self._resume)
        if self.merger is not None:  # a late or restarted node catches up with its merge group first
            with progress.task("loading the merge group's state from peers"):
                await self._in_thread(self.merger.join, self.round)
        self._start_telemetry()
        # announce readiness: peers wait for the next round of every peer that has announced itself
        await self.exchange.publish(payload_of([], self.peer_id, self.round, self.trainer.policy_version,
                                               self.policy.name))
        self.collector.start()  # background collection: poll, fetch and verify into the pool, all run long
        write_node_info(self.out_dir, self.peer_id, self.maddrs, self.policy.name, self.metrics_url)

    def _load_model(self):
        from swarm_node.learning.models import load_policy
        from swarm_node.learning.trainer import Trainer

        t = self.config.train
        prepare_torch(t.malloc_mmap_threshold_bytes, t.onednn_cache_capacity, t.torch_threads, t.seed)
        policy = load_policy(t.model, t.seed, t.precision)
        return policy, Trainer(policy, t, self.taskset)

    async def _join_swarm(self) -> None:
        net = self.config.network
        peers = functools.partial(bootstrap_peers, net, lambda: self.stopping)  # re-read before each retry
        self.validator = CountingSignatureValidator(self.identity.private_key)
        before = child_pids()
        self.dht = await start_dht(net, self.identity.path, self.validator, await peers(),
                                   peers if net.initial_peers_file else None)
        self._children = new_children(before)
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
            self._children = new_children(before)
            record_children(self.out_dir / "node.pids", self._children)
        self.maddrs = [str(a) for a in self.dht.get_visible_maddrs()]
        if not (net.initial_peers or net.initial_peers_file):
            log.info("started a new swarm; others join with --initial-peers %s", " ".join(self.maddrs))
        else:
            log.info("joined the swarm; this node's multiaddrs: %s", " ".join(self.maddrs))

    def _start_telemetry(self) -> None:
        cfg = self.config
        self.telemetry.info.update(peer_id=self.peer_id, multiaddrs=self.maddrs, model=self.policy.name,
                                   output_dir=str(self.out_dir), round=self.round)
        self.telemetry.load_history(self.out_dir)  # a resumed node's earlier rounds, for the dashboard
        if cfg.metrics_port < 0:
            return
        try:
            self.metrics_url = f"http://{cfg.metrics_host}:{self.telemetry.serve(cfg.metrics_host, cfg.metrics_port)}"
        except OSError as e:
            raise NetworkError(f"cannot serve metrics on {cfg.metrics_host}:{cfg.metrics_port} ({e.strerror}); "
                               "pass another --metrics-port, 0 for a free one, or -1 to turn it off") from None
        log.info("dashboard at %s/ (metrics, health and status at /metrics /healthz /status)", self.metrics_url)

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
        self._children += new_children({p.pid for p in self._children})
        kill_and_wait(self._children, grace_s=3)
        self._executor.shutdown(wait=False, cancel_futures=True)
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    async def _in_thread(self, fn: Callable, *args):
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    # ------------------------------------------------------------------ state
    def _save_checkpoint(self) -> None:
        t0 = time.perf_counter()
        path = self.checkpoints.save(self.round, self.state.state_dict(self.peer_id))
        self._saved_round = self.round
        log.info("saved checkpoint %s in %.1f s", path, time.perf_counter() - t0)

    def _resume(self) -> None:
        """Load the newest intact checkpoint, or start fresh. Log lines after the resume point are dropped, so
        metrics.jsonl never has duplicated or missing rounds."""
        saved = self.checkpoints.load_latest(self.peer_id) if self.config.checkpoint_every_rounds else None
        if saved is None:
            self.runlog.start_fresh()
            return
        try:
            self.state.load_state_dict(saved)
        except (RuntimeError, ValueError, KeyError) as e:
            from swarm_node.learning.models import ModelError

            raise ModelError(f"the checkpoints in {self.checkpoints.directory} do not fit --model "
                             f"{self.config.train.model} ({str(e)[:120]}); use the model they were trained with or "
                             "move that directory away to start over") from None
        self.round = self._saved_round = saved["round"]
        self.runlog.resume_at(self.round)
        log.info("resumed from checkpoint at round %d (policy version %d)", self.round, self.trainer.policy_version)

    # ------------------------------------------------------------------ main loop
    async def run(self) -> None:
        """Run rounds until `rounds` is reached or a stop is requested, then linger `linger_s` serving peers."""
        cfg = self.config
        self._lag_task = asyncio.create_task(self.telemetry.probe_loop(self.collector), name="event-loop-lag")
        await wait_for_peers(self.exchange, self.config.network.min_peers, self.config.network.min_peers_timeout_s,
                             lambda: self.stopping)
        self.telemetry.mark("running")
        await self._maybe_evaluate()  # round 0: the base policy
        while not self.stopping and (cfg.rounds == 0 or self.round < cfg.rounds):
            if self.round:
                await self._pace()
            self._round_started = time.monotonic()
            try:
                record = await self.run_round(self.round + 1)
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
            if record is None:
                break  # stopped mid-round: the round did not happen, the counter stays
            self.round += 1
            self._record(record)
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
            await self._sleep_unless_stopped(cfg.linger_s)

    async def _sleep_unless_stopped(self, seconds: float) -> None:
        try:
            await asyncio.wait_for(self._stop.wait(), seconds)
        except asyncio.TimeoutError:
            pass

    def _record(self, m: RoundRecord) -> None:
        """Append the round's line to metrics.jsonl, log it and hand it to telemetry."""
        self.runlog.append_round(m)
        log.info("round %d | reward local %.3f train %.3f | external used %d/%d | peers %d | loss %s | %.1f s",
                 m.round, m.reward_local_mean, m.reward_train_mean, m.external_groups_used,
                 m.external_groups_available, m.peers_seen, "-" if m.loss is None else f"{m.loss:.4f}", m.round_s)
        self.telemetry.observe_round(m, self.collector.accepted_total)
        self.telemetry.info.update(round=self.round, policy_version=m.policy_version, banned_peers=m.banned_peers)

    async def _pace(self) -> None:
        """Wait out the rest of `min_round_interval_s` since the last round started (a stop ends the wait)."""
        rest = self.config.min_round_interval_s - (time.monotonic() - self._round_started)
        self._pace_wait_s = max(0.0, rest)
        if rest > 0:
            await self._sleep_unless_stopped(rest)

    async def _maybe_evaluate(self) -> None:
        """Held-out evaluation before round 1, every `eval_every_rounds` rounds and after the last round; skipped
        when eval.jsonl already holds this round's evaluation (after a resume)."""
        every, rounds = self.config.tasks.eval_every_rounds, self.config.rounds
        if not every or self.stopping or (self.round % every and self.round != rounds):
            return
        if self.runlog.evaluated(self.round):
            return
        with progress.task(f"held-out evaluation after round {self.round}"):
            line = await self._in_thread(self._evaluate)
        self.runlog.append_eval(line)
        self.telemetry.observe_eval(line)
        log.info("held-out accuracy after round %d: %.3f (%d questions)", self.round, line.heldout_accuracy,
                 line.num_questions)

    def _evaluate(self) -> EvalRecord:
        """Greedy accuracy (strict verifier) on the fixed held-out sets (swarm_node/evaluation.py)."""
        from swarm_node.evaluation import evaluate

        try:
            line = evaluate(self.policy, self.trainer.prompt_text, self.taskset, self.config.tasks,
                            self.config.train.max_new_tokens)
        finally:
            release_free_memory()
        return EvalRecord(round=self.round, peer_id=self.peer_id, policy_version=self.trainer.policy_version,
                          **line, time_s=time.time())

    async def run_round(self, r: int) -> RoundRecord | None:
        """One SAPO round. Returns its metrics line, or None if a stop was requested mid-round."""
        cfg = self.config.train
        timer = PhaseTimer()
        specs = [self.taskset.draw(self.rng) for _ in range(cfg.num_local_groups * cfg.local_oversample)]
        with timer.phase("generate"), progress.task(f"round {r}: generating {len(specs)} x {cfg.num_completions} "
                                                    "completions"):
            generated, tokens_generated, format_rate = await self._in_thread(self._generate_local, r, specs)
        local = select_local(generated, cfg.num_local_groups)  # all of them unless over-sampling (control arm)
        if self.stopping:
            return None
        with timer.phase("publish"):
            self.collector.note_own(generated)  # copies of these coming back from other peers are refused
            published = await self.exchange.publish(payload_of(generated, self.peer_id, r,
                                                               self.trainer.policy_version, self.policy.name))
        with timer.phase("collect"):
            collected = self.collector.take()  # what background collection has verified so far: never waits
        with timer.phase("train"), progress.task(f"round {r}: GRPO step on {len(local) + len(collected.groups)} "
                                                 "groups"):
            stats = await self._in_thread(self._train, local + collected.groups)
        merge_fields = {}
        if self.merger is not None:
            with progress.task(f"round {r}: merging with peers of the same model"):
                merge_fields = await self._in_thread(self.merger.maybe_merge, r)
        return round_record(round_=r, peer_id=self.peer_id, model=self.policy.name, timer=timer, generated=generated,
                            local=local, collected=collected, published=published, stats=stats,
                            format_rate=format_rate, tokens_generated=tokens_generated, collector=self.collector,
                            exchange=self.exchange, rounds_failed=self.rounds_failed,
                            pace_wait_s=self._pace_wait_s, merge_fields=merge_fields)

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

    def _generate_local(self, r: int, specs) -> tuple[list[Group], int, float]:
        cfg = self.config.train
        return generate_local_groups(self.policy, self.trainer, specs, cfg.num_completions, cfg.max_new_tokens,
                                     cfg.temperature, self.peer_id, r)
