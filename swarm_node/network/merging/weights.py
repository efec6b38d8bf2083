"""Weight merging (`params`) and DiLoCo outer steps (`diloco`) over hivemind's DecentralizedAverager.

One scheduled merge, run on the node's torch thread after the round's training step:
1. **Fill** the averaging buffer (CPU fp32): the weights (params) or the pseudo-gradient anchor - weights
   (diloco), plus the AdamW moments when merge_optimizer_state = average.
2. **Alone?** If the DHT lists no other same-model averager, skip at once (logged once, counted).
3. **Average** with a group (min size, target size, matchmaking window, all-reduce deadline), sending a
   `MergeGather` (linear checksums of the buffer) that every member receives.
4. **Verify** (checksum.py): hivemind reported no un-averaged parts, every member's gather decodes and has our
   fingerprint and mode, and our result's checksums equal the weighted mean of the members' checksums.
5. **Apply** only a verified result: params copy the mean into the model; diloco takes the outer Nesterov
   step (learning/diloco.py) from the anchor and sets the model to the new anchor. The model is untouched
   until then, so a failed round leaves each peer with its own, self-consistent weights.
6. **Repair** a failed round: average once more (the other members of a broken round fail too and do the
   same, so they meet again), else download the state of the peer with the most verified merges.

Shared state (what late joiners and repairs download): the weights at this peer's last verified merge (the
"anchor"), plus the DiLoCo outer momentum, with a `MergeStateInfo` carrying their checksums. A peer's state
sharing priority is its merge level (the most verified group merges behind its anchor: one more than the
highest level in its last group, or its donor's level after a download) plus a per-peer tie-breaker below
0.5, so downloads go to the most up-to-date peer.

Optimizer state (merge_optimizer_state): `keep` leaves AdamW's moments as they are (DiLoCo keeps its inner
optimizer state); `reset` clears them after every applied merge or state load; `average` averages the
moments with the weights (the second moment is clamped at 0 after lossy compression; a peer without
moments yet contributes zeros; a state download never carries moments).
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import logging
import threading
import time
from typing import Any

import torch
from hivemind.averaging.allreduce import AllreduceException

from swarm_node.config import MergeConfig
from swarm_node.learning.diloco import nesterov_outer_step, pseudo_gradient
from swarm_node.network import wire
from swarm_node.network.merging import checksum
from swarm_node.network.merging.averager import MergeAverager, make_compression, start_in_main_thread
from swarm_node.network.merging.fingerprint import merge_prefix, merged_parameters, model_fingerprint
from swarm_node.network.merging.schedule import MergeSchedule
from swarm_node.network.merging.stats import MergeResult, MergeStats

log = logging.getLogger(__name__)

FINAL_MERGE_WINDOW_FACTOR = 3.0  # the last merge of a `late` run waits longer for every peer
DECLARE_STATE_PERIOD_S = 10.0  # how often an averager re-announces itself as a state donor (and how stale that is)


def _tie_breaker(peer_id: bytes) -> float:
    return int.from_bytes(hashlib.sha256(peer_id).digest()[:4], "big") / 2**33  # [0, 0.5)


def _chunk_timeout_s(config: MergeConfig) -> float:
    """hivemind's next_chunk_timeout: a sender silent this long is dropped from the round (reducers: twice that)."""
    return max(1.0, config.merge_allreduce_timeout_s / 6)


class _RoundFailed(Exception):
    """A merge round that cannot be applied; `reason` says why (logged, counted, then repaired)."""


class WeightMerger:
    """Merges a model's weights with same-model peers (`params` or `diloco`). Create in the main thread.

    Args:
        config: the merge section.
        dht: the node's running hivemind DHT.
        model: the policy model (trained in place by the node; only touched by the merger in its calls).
        optimizer: the node's AdamW (for merge_optimizer_state).
        swarm_name: namespace of the DHT keys.
        total_rounds: the run's length (0 = open-ended), for the `late` schedule.
    """

    def __init__(self, config: MergeConfig, dht, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 swarm_name: str, total_rounds: int = 0, dht_timeout_s: float = 10.0):
        assert config.merge_mode in ("params", "diloco"), config.merge_mode
        self.config, self.mode, self.dht = config, config.merge_mode, dht
        self.optimizer, self.dht_timeout_s = optimizer, dht_timeout_s
        self.params = [p for _, p in merged_parameters(model)]
        self.fingerprint = model_fingerprint(model)
        self.prefix = merge_prefix(swarm_name, self.fingerprint, self.mode)
        self.schedule = MergeSchedule(config.merge_schedule, config.merge_every_rounds, total_rounds)
        self.stats = MergeStats(self.mode)
        self.level = 0  # verified group merges behind this node's anchor (its own or a donor's); sharing priority
        self.rounds_since_merge = 0  # rounds since the last merge attempt with peers, or since joining
        self._lock = threading.Lock()  # guards the anchor/momentum against concurrent state downloads
        self._alone_logged = False
        with torch.no_grad():
            self.anchor = [p.detach().to("cpu", torch.float32).clone() for p in self.params]
            self.momentum = [torch.zeros_like(a) for a in self.anchor] if self.mode == "diloco" else []
            n_moments = 2 * len(self.anchor) if config.merge_optimizer_state == "average" else 0
            self.buffer = [torch.zeros_like(a) for a in self.anchor] + [
                torch.zeros_like(self.anchor[i % len(self.anchor)]) for i in range(n_moments)]
        self.groups = checksum.segments(self.buffer)
        self.state_groups = checksum.segments(self.anchor + self.momentum)
        mm = config.merge_matchmaking_timeout_s
        self.averager = start_in_main_thread(lambda: self._start_averager(mm))
        self.peer_key = self.averager.peer_id.to_bytes()
        self._set_priority()
        log.info("merging (%s, schedule %s) with peers of model fingerprint %s under DHT prefix %s",
                 self.mode, config.merge_schedule, self.fingerprint[:12], self.prefix)

    def _start_averager(self, matchmaking_s: float) -> MergeAverager:
        cfg = self.config
        averager = MergeAverager(
            self.buffer, self.dht, state_fn=self._shared_state, prefix=self.prefix,
            target_group_size=cfg.merge_target_group_size or None, min_group_size=cfg.merge_min_group_size,
            min_matchmaking_time=matchmaking_s, request_timeout=min(3.0, max(1.0, matchmaking_s / 2)),
            allreduce_timeout=cfg.merge_allreduce_timeout_s,
            next_chunk_timeout=_chunk_timeout_s(cfg),
            compression=make_compression(cfg.merge_compression), declare_state_period=DECLARE_STATE_PERIOD_S,
            shutdown_timeout=5,
        )
        averager.run_in_background(await_ready=True, timeout=60)
        return averager

    # ------------------------------------------------------------------ public
    def join(self, completed_rounds: int) -> bool:
        """Before the first round: load the group's state (see load_state); the every_k count starts now."""
        self.rounds_since_merge = 0
        return self.load_state()

    def maybe_merge(self, round_: int) -> dict[str, Any]:
        """At the end of `round_`: merge if the schedule says so, or join peers that are merging right now.

        Returns the metrics line's merge fields."""
        self.rounds_since_merge += 1
        result = None
        if self.schedule.is_due(round_, self.rounds_since_merge):
            result = self.merge(final=self.schedule.is_final(round_))
        elif self.schedule.joins_peers and self._peers_merging():
            result = self.merge()
            result.detail = result.detail or "joined a merge that peers started"
            result.joined = True
        if result is not None and result.outcome != "alone":
            self.rounds_since_merge = 0  # merged, or tried with peers online: the next try is K rounds away
        return self.metrics(result)

    def merge(self, final: bool = False) -> MergeResult:
        """One verified merge with whoever is online (or a quick skip). Never raises for peer failures."""
        t0 = time.perf_counter()
        failed_rounds = 0
        if not self._others_online():
            result = MergeResult("alone")
            if not self._alone_logged:
                log.info("no peer with this model (fingerprint %s) is online: training alone, merges skipped",
                         self.fingerprint[:12])
                self._alone_logged = True
        else:
            self._alone_logged = False
            window = self.config.merge_matchmaking_timeout_s * (FINAL_MERGE_WINDOW_FACTOR if final else 1.0)
            result = self._average_and_apply(window)
            if result.outcome == "failed":
                failed_rounds = 1
                log.warning("merge failed verification (%s); repairing", result.detail)
                result = self._repair(result)
        result.seconds = time.perf_counter() - t0
        self.stats.record(result, failed_rounds)
        if result.outcome in ("merged", "repaired"):
            self._set_priority()
            log.info("merged with %d peers (%s) in %.1f s", result.group_size, result.outcome, result.seconds)
        elif result.outcome == "no_group":
            log.info("no merge group formed within %.0f s; merge skipped", self.config.merge_matchmaking_timeout_s)
        elif result.outcome == "failed":
            log.warning("merge and its repair failed (%s): keeping local weights", result.detail)
        return result

    def load_state(self, own_weights_as_anchor: bool = True, require_newer: bool = False) -> bool:
        """Download the group's state (anchor, DiLoCo momentum) from the most merged peer and adopt it.

        Called before the first round (late join, restart) and by repairs. Returns False when no peer offered a
        state that checks out; then, if `own_weights_as_anchor` (start-up), the node's own weights become its
        anchor (they may come from a checkpoint). A repair sets `require_newer`: a donor whose merge level is not
        above ours has nothing newer than our own weights, and adopting them would only discard our training."""
        for attempt in range(2):  # hivemind picks the donor; a bad one is skipped by trying again
            try:
                got = self.averager.load_state_from_peers(timeout=self.config.merge_state_load_timeout_s)
            except (concurrent.futures.TimeoutError, TimeoutError) as e:
                log.warning("downloading state from peers timed out (%r)", e)
                got = None
            if got is None:
                break
            metadata, tensors = got
            try:
                info = self._check_state(metadata, tensors)
            except _RoundFailed as e:
                log.warning("rejected a peer's state: %s", e)
                continue
            if require_newer and info.merges <= self.level:
                log.info("the most merged peer has no newer merge than this node (level %d): keeping own weights",
                         self.level)
                break
            n = len(self.anchor)
            with self._lock, torch.no_grad():
                for a, t in zip(self.anchor, tensors[:n]):
                    a.copy_(t)
                for m, t in zip(self.momentum, tensors[n:]):
                    m.copy_(t)
                for p, a in zip(self.params, self.anchor):
                    p.copy_(a)
            if self.config.merge_optimizer_state == "reset":
                self.optimizer.state.clear()
            self.level = info.merges
            self.stats.state_loads += 1
            self._set_priority()
            log.info("loaded the group's state from a peer (merge level %d)", info.merges)
            return True
        if own_weights_as_anchor:
            with self._lock, torch.no_grad():  # nobody to learn from: our own weights are the reference
                for a, p in zip(self.anchor, self.params):
                    a.copy_(p.detach())
            log.info("no peer offered a state to load: starting from this node's own weights")
        return False

    def metrics(self, result: MergeResult | None) -> dict[str, Any]:
        """The metrics line's merge fields; the weights' checksum only in rounds with a merge (it reads them all)."""
        sent, received = self.averager.traffic.totals()
        return self.stats.metrics(result, sent, received, self.weights_checksum() if result else None)

    @torch.no_grad()
    def weights_checksum(self) -> list[float]:
        """[sum, L2 norm] of the model's merged parameters (float64); equal across peers right after a merge."""
        total = sum(p.detach().sum(dtype=torch.float64).item() for p in self.params)
        norm = sum(torch.linalg.vector_norm(p.detach(), dtype=torch.float64).item() ** 2 for p in self.params) ** 0.5
        return [total, norm]

    def shutdown(self) -> None:
        if self.averager.is_alive():
            self.averager.shutdown()

    # ------------------------------------------------------------------ one round
    def _average_and_apply(self, window_s: float) -> MergeResult:
        self._fill_buffer()
        sums = checksum.checksums(self.buffer, self.groups)
        segment_norms = checksum.norms(self.buffer, self.groups)
        gather = wire.MergeGather(
            version=wire.PROTOCOL_VERSION, mode=self.mode, fingerprint=self.fingerprint, sums=sums,
            anchor=self._anchor_digest() if self.mode == "diloco" else [], merges=self.level,
            priority=self.averager.state_sharing_priority, optimizer_step=self._optimizer_step())
        self.averager.reset_faults()
        control = None
        try:
            control = self.averager.step(gather=wire.encode(gather), weight=1.0, timeout=window_s + 0.5,
                                         allow_retries=False, wait=False)
            gathered = control.result(timeout=window_s + self.config.merge_allreduce_timeout_s + 10)
        except (concurrent.futures.TimeoutError, TimeoutError):
            if control is not None:
                control.cancel()
            return MergeResult("failed", detail="the averaging step overran its deadline")
        except AllreduceException as e:
            if "could not find a group" in str(e):
                return MergeResult("no_group")
            return MergeResult("failed", detail=f"all-reduce error {e!r}"[:200])
        except Exception as e:  # hivemind raises many types when a peer disappears mid-round
            return MergeResult("failed", detail=f"averaging error {e!r}"[:200])
        try:
            mismatch, members = self._verify(gathered, segment_norms)
        except _RoundFailed as e:
            return MergeResult("failed", group_size=len(gathered), detail=str(e))
        reference = max(members, key=lambda m: m.priority)
        if self.mode == "diloco" and not self._same_anchor(reference.anchor):
            # our anchor is not the group's (e.g. another initialisation): adopt the group's state instead
            if self.load_state(own_weights_as_anchor=False):
                return MergeResult("repaired", group_size=len(members), mismatch=mismatch,
                                   detail="anchor differed from the group's; loaded the group's state")
            return MergeResult("failed", group_size=len(members), detail="anchor differs from the group's")
        self._apply(members)
        self.level = max(m.merges for m in members) + 1
        return MergeResult("merged", group_size=len(members), mismatch=mismatch)

    def _fill_buffer(self) -> None:
        n = len(self.anchor)
        with torch.no_grad(), self.averager.get_tensors():
            if self.mode == "params":
                for b, p in zip(self.buffer, self.params):
                    b.copy_(p.detach())
            else:
                pseudo_gradient(self.anchor, [p.detach() for p in self.params], self.buffer[:n])
            if self.config.merge_optimizer_state == "average":
                for i, p in enumerate(self.params):
                    state = self.optimizer.state.get(p, {})
                    for k, key in enumerate(("exp_avg", "exp_avg_sq")):
                        target = self.buffer[n + k * n + i]
                        if key in state:
                            target.copy_(state[key])
                        else:
                            target.zero_()

    def _verify(self, gathered: dict, segment_norms: list[float]) -> tuple[float, list[wire.MergeGather]]:
        """Raise _RoundFailed unless the buffer now holds the verified group mean. Returns (mismatch, members)."""
        members = []
        for peer, raw in gathered.items():
            if not isinstance(raw, bytes):
                raise _RoundFailed(f"peer {peer} sent a gather that is not bytes")
            try:
                member = wire.decode_merge_gather(raw)
            except wire.WireError as e:
                raise _RoundFailed(f"peer {peer} sent a bad gather ({e})") from None
            if member.fingerprint != self.fingerprint or member.mode != self.mode:
                raise _RoundFailed(f"peer {peer} merges another model or mode")
            if len(member.sums) != 2 * len(self.groups):
                raise _RoundFailed(f"peer {peer} sent {len(member.sums)} checksums, expected {2 * len(self.groups)}")
            members.append(member)
        failed_values, banned, _ = self.averager.faults()
        if failed_values:
            raise _RoundFailed(f"hivemind left {failed_values} values un-averaged (a peer failed mid-round)")
        expected = checksum.expected_checksums([(m.sums, m.weight) for m in members])
        observed = checksum.checksums(self.buffer, self.groups)
        worst = checksum.mismatch(observed, expected, segment_norms, self.config.merge_compression)
        if worst > 1.0:
            reason = f"checksums off by {worst:.1f}x the tolerance"
            raise _RoundFailed(reason + (f"; {banned} senders dropped mid-round" if banned else ""))
        return worst, members

    def _apply(self, members: list[wire.MergeGather]) -> None:
        n = len(self.anchor)
        cfg = self.config
        with self._lock, torch.no_grad():
            if self.mode == "params":
                for a, b in zip(self.anchor, self.buffer[:n]):
                    a.copy_(b)
            else:
                nesterov_outer_step(self.anchor, self.buffer[:n], self.momentum, cfg.diloco_outer_lr,
                                    cfg.diloco_outer_momentum)
            for p, a in zip(self.params, self.anchor):
                p.copy_(a)
        if cfg.merge_optimizer_state == "reset":
            self.optimizer.state.clear()
        elif cfg.merge_optimizer_state == "average":
            step = round(sum(m.optimizer_step for m in members) / len(members))
            with torch.no_grad():
                for i, p in enumerate(self.params):
                    state = self.optimizer.state[p]
                    if "step" not in state:
                        state["step"] = torch.tensor(float(max(step, 1)))
                    state["exp_avg"] = self.buffer[n + i].to(p.device).clone()
                    state["exp_avg_sq"] = self.buffer[2 * n + i].to(p.device).clamp_min(0).clone()

    def _repair(self, first: MergeResult) -> MergeResult:
        # the other members of a broken round notice at different times, up to a sender plus a reducer timeout
        # (3 chunk timeouts) apart, so the re-average waits that much longer for them
        cfg = self.config
        second = self._average_and_apply(cfg.merge_matchmaking_timeout_s + 3 * _chunk_timeout_s(cfg))
        if second.outcome in ("merged", "repaired"):
            second.outcome = "repaired"
            return second
        log.info("re-averaging did not fix the merge (%s); loading the group's state", second.detail or second.outcome)
        if self.load_state(own_weights_as_anchor=False, require_newer=True):
            return MergeResult("repaired", group_size=first.group_size, detail="loaded the group's state")
        return MergeResult("failed", group_size=first.group_size, detail=first.detail)

    # ------------------------------------------------------------------ helpers
    def _others_online(self) -> bool:
        """Does the DHT list another averager of this model and mode as a state donor? (True when unsure.)"""
        if self.averager.client_mode:
            return True
        try:
            found = self.dht.get(f"{self.prefix}.all_averagers", latest=True, return_future=True).result(
                timeout=self.dht_timeout_s)
        except Exception as e:
            log.debug("could not read the averager list: %r", e)
            return True
        if found is None or not isinstance(found.value, dict):
            return False
        return any(key != self.peer_key and isinstance(getattr(entry, "value", None), (int, float))
                   for key, entry in found.value.items())

    def _peers_merging(self) -> bool:
        """Is another averager of this model and mode looking for a group right now? (One DHT read.)"""
        try:
            found = self.dht.get(f"{self.prefix}.0b", latest=True, return_future=True).result(timeout=self.dht_timeout_s)
        except Exception as e:
            log.debug("could not read the matchmaking key: %r", e)
            return False
        if found is None or not isinstance(found.value, dict):
            return False
        return any(key != self.peer_key and getattr(entry, "value", None) is True for key, entry in found.value.items())

    def _shared_state(self) -> tuple[bytes, list[torch.Tensor]]:
        """What a downloading peer gets: the anchor (+ DiLoCo momentum) and its checksums. Any thread."""
        with self._lock:
            tensors = [t.clone() for t in self.anchor + self.momentum]
        info = wire.MergeStateInfo(version=wire.PROTOCOL_VERSION, mode=self.mode, fingerprint=self.fingerprint,
                                   merges=self.level, sums=checksum.checksums(tensors, self.state_groups))
        return wire.encode(info), tensors

    def _check_state(self, metadata: Any, tensors: list[torch.Tensor]) -> wire.MergeStateInfo:
        if not isinstance(metadata, bytes):
            raise _RoundFailed("metadata is not bytes")
        try:
            info = wire.decode_merge_state_info(metadata)
        except wire.WireError as e:
            raise _RoundFailed(f"bad metadata ({e})") from None
        if info.fingerprint != self.fingerprint or info.mode != self.mode:
            raise _RoundFailed("state of another model or mode")
        ours = self.anchor + self.momentum
        if len(tensors) != len(ours) or any(t.shape != o.shape or t.dtype != o.dtype for t, o in zip(tensors, ours)):
            raise _RoundFailed("tensor shapes differ from this model's")
        if not all(torch.isfinite(t).all() for t in tensors):
            raise _RoundFailed("state holds non-finite values")
        worst = checksum.mismatch(checksum.checksums(tensors, self.state_groups), info.sums,
                                  checksum.norms(tensors, self.state_groups), "none")
        if worst > 1.0:
            raise _RoundFailed(f"state does not match its checksums ({worst:.1f}x the tolerance)")
        return info

    def _anchor_digest(self) -> list[float]:
        total = sum(a.sum(dtype=torch.float64).item() for a in self.anchor)
        norm = sum(torch.linalg.vector_norm(a, dtype=torch.float64).item() ** 2 for a in self.anchor) ** 0.5
        return [total, norm]

    def _same_anchor(self, reference: list[float]) -> bool:
        if len(reference) != 2:
            return False
        total, norm = self._anchor_digest()
        return abs(total - reference[0]) <= 1e-4 * max(norm, reference[1]) + 1e-9

    def _optimizer_step(self) -> int:
        steps = [int(s["step"]) for s in self.optimizer.state.values() if "step" in s]
        return max(steps, default=0)

    def _set_priority(self) -> None:
        if not self.averager.client_mode:
            self.averager.state_sharing_priority = self.level + _tie_breaker(self.peer_key)
