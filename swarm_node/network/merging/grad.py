"""Gradient averaging (`grad`): hivemind.Optimizer around the node's AdamW, so a group trains one model.

Each peer accumulates gradients of its GRPO steps; when the group has accumulated grad_target_batch_size
sequences in total (hivemind's ProgressTracker counts them through the DHT), the peers average their
gradients in one all-reduce and all take the same AdamW step (an "epoch" in hivemind's terms). Parameters and
optimizer state are averaged once per epoch as well (average_state_every = 1), which pulls back any peer that
drifted, and a peer whose epoch is behind downloads the group's state before continuing (hivemind's own
catch-up, also used before the first round).

Verification is hivemind's: this mode has no checksum exchange of its own. The averagers are instrumented
(averager.py), so each round's un-averaged values (a peer died mid-round) are counted as failed rounds; the
next epoch's state averaging is the repair. Bytes are counted for both averagers.

Interplay with SAPO rounds: the node calls the optimizer's `step(batch_size=...)` once per round with the
number of sequences it trained on; the model only changes at epoch boundaries, so `policy_version` (local
optimizer steps) counts rounds here, and `merge_grad_epoch` counts shared steps.
"""

from __future__ import annotations

import functools
import logging
import time
from typing import Any

import hivemind
import torch
from hivemind.optim.grad_averager import GradientAverager
from hivemind.optim.state_averager import TrainingStateAverager

from swarm_node.network.merging.averager import Instrumented, make_compression, start_in_main_thread
from swarm_node.network.merging.fingerprint import merge_layout, merge_prefix, model_fingerprint
from swarm_node.network.merging.settings import MergeSettings
from swarm_node.network.merging.stats import MergeResult, MergeStats

log = logging.getLogger(__name__)


class _GradAverager(Instrumented, GradientAverager):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **self._instrument(kwargs))


class _StateAverager(Instrumented, TrainingStateAverager):
    def __init__(self, **kwargs):
        super().__init__(**self._instrument(kwargs))


class _Optimizer(hivemind.Optimizer):
    """hivemind.Optimizer whose state averager is instrumented (same arguments as hivemind 1.1.12's)."""

    def _make_state_averager(self, **kwargs) -> TrainingStateAverager:
        return _StateAverager(
            dht=self.dht, prefix=f"{self.run_id}_state_averager", min_matchmaking_time=self.matchmaking_time,
            allreduce_timeout=self.allreduce_timeout, shutdown_timeout=self.shutdown_timeout,
            offload_optimizer=self.offload_optimizer, custom_gradients=self.offload_optimizer,
            status_loglevel=self.status_loglevel, next_chunk_timeout=self.next_chunk_timeout,
            client_mode=self.client_mode, auxiliary=self.auxiliary, start=True, **kwargs)


class GradMerger:
    """Replaces the trainer's optimizer with a hivemind.Optimizer over the same AdamW. Create in the main thread.

    Args:
        config: `MergeSettings`, or the node's merge section (its fields are picked by name).
        dht: the node's running DHT.
        model: the policy model.
        trainer: the node's Trainer (its optimizer is wrapped; see Trainer.use_collaborative_optimizer).
        swarm_name: namespace of the DHT keys.
        private_key: the node's identity key. hivemind's ProgressTracker signs its DHT records; they must carry
            the same key as the node's record validator (otherwise they go unsigned and peers drop them), and
            every peer needs its own key (hivemind's default is one key per process).
    """

    def __init__(self, config, dht, model: torch.nn.Module, trainer, swarm_name: str,
                 private_key, dht_timeout_s: float = 10.0):
        config = MergeSettings.pick(config)
        self.config, self.trainer = config, trainer
        self.fingerprint = model_fingerprint(model)
        self.prefix = merge_prefix(swarm_name, self.fingerprint, "grad",
                                   merge_layout(config.merge_compression, config.merge_optimizer_state, "grad"))
        self.stats = MergeStats("grad")
        mm = config.merge_matchmaking_timeout_s
        compression = make_compression(config.merge_compression)
        averager_opts = dict(min_group_size=config.merge_min_group_size,
                             target_group_size=config.merge_target_group_size or None,
                             request_timeout=min(3.0, max(1.0, mm / 2)), declare_state_period=10.0)
        self.optimizer: _Optimizer = start_in_main_thread(lambda: _Optimizer(
            dht=dht, run_id=self.prefix, target_batch_size=config.grad_target_batch_size,
            optimizer=trainer.optimizer, matchmaking_time=mm,
            averaging_timeout=mm + config.merge_allreduce_timeout_s, allreduce_timeout=config.merge_allreduce_timeout_s,
            next_chunk_timeout=max(1.0, config.merge_allreduce_timeout_s / 6),
            load_state_timeout=config.merge_state_load_timeout_s, offload_optimizer=False,
            grad_compression=compression, state_averaging_compression=compression, average_state_every=1,
            delay_state_averaging=False,  # average parameters inside the step: a round is long, and this way the
            # group's weights agree as soon as the step returns
            # hivemind 1.1.12 forwards averager_opts to the state averager only, so the gradient averager gets
            # them through its factory
            grad_averager_factory=functools.partial(_GradAverager, **averager_opts), averager_opts=averager_opts,
            shutdown_timeout=5,
            tracker_opts=dict(private_key=private_key)))
        trainer.use_collaborative_optimizer(self.optimizer)
        self._epoch_seen = 0
        self._rounds_seen = 0
        log.info("averaging gradients with peers of model fingerprint %s (run %s, target batch %d sequences)",
                 self.fingerprint[:12], self.prefix, config.grad_target_batch_size)

    def _averagers(self) -> list[Instrumented]:
        return [a for a in (self.optimizer.grad_averager, self.optimizer.state_averager) if a is not None]

    def join(self, completed_rounds: int) -> bool:
        """Before the first round: if the group is ahead (a later epoch), download its state."""
        return self.load_state()

    def load_state(self) -> bool:
        """If the group is ahead (a later epoch), download its state (hivemind.Optimizer's own catch-up)."""
        tracker = self.optimizer.tracker
        tracker.fetched_global_progress_this_epoch.wait(timeout=self.config.merge_matchmaking_timeout_s)
        if tracker.global_epoch <= self.optimizer.local_epoch:
            return False
        t0 = time.perf_counter()
        self.optimizer.load_state_from_peers()
        self.stats.state_loads += 1
        log.info("loaded the group's state (epoch %d) in %.1f s", self.optimizer.local_epoch, time.perf_counter() - t0)
        return True

    def maybe_merge(self, round_: int) -> dict[str, Any]:
        """Called after the round's training step (which ran the optimizer); reports what hivemind did."""
        epoch = self.optimizer.local_epoch
        rounds, faulted = map(sum, zip(*(a.round_totals() for a in self._averagers())))
        result = None
        if epoch > self._epoch_seen:
            group = self.optimizer.grad_averager.faults()[2] if rounds > self._rounds_seen else 1
            result = MergeResult("merged" if rounds > self._rounds_seen else "alone", group_size=group)
            self.stats.record(result, 0)
        self.stats.failed = faulted
        self._epoch_seen, self._rounds_seen = epoch, rounds
        return self.metrics(result)

    def metrics(self, result: MergeResult | None) -> dict[str, Any]:
        sent = received = 0
        for averager in self._averagers():
            s, r = averager.traffic.totals()
            sent, received = sent + s, received + r
        out = self.stats.metrics(result, sent, received, None)
        out["merge_grad_epoch"] = self.optimizer.local_epoch
        return out

    def shutdown(self) -> None:
        self.optimizer.shutdown()
