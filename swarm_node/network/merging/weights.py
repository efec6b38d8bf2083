"""Weight merging (`params`) and DiLoCo outer steps (`diloco`) over hivemind's DecentralizedAverager.

One scheduled merge, run on the node's torch thread after the round's training step:
1. **Fill** the averaging buffer (CPU fp32): the weights (params) or the pseudo-gradient anchor - weights
   (diloco), plus the AdamW moments when merge_optimizer_state = average.
2. **Alone?** If the DHT lists no other same-model averager, skip at once (logged once, counted).
3. **Average** with a group (min size, target size, matchmaking window, all-reduce deadline), sending a
   `MergeGather` (linear checksums of the buffer) that every member receives.
4. **Verify** (checksum.py, guard.py): hivemind reported no un-averaged parts, every member's gather decodes and
   has our fingerprint and mode, our result's checksums equal the mean of the members' checksums (any NaN
   fails), and the result is finite and within the trust region of our own contribution (guard.py). A
   rejected round keeps our weights, is counted by reason and strikes the members it can be blamed on.
5. **Apply** only a verified result: params copy the mean into the model; diloco takes the outer Nesterov
   step (learning/diloco.py) from the anchor and sets the model to the new anchor. The model is untouched
   until then, so a failed round leaves each peer with its own, self-consistent weights.
6. **Repair** a failed round: average once more (the other members of a broken round fail too and do the
   same, so they meet again), else download the state that a majority of the online members agree on, if it
   lies within the trust region (guard.py).

Shared state (what late joiners and repairs download): the weights at this peer's last verified merge (the
"anchor"), plus the DiLoCo outer momentum, with a `MergeStateInfo` carrying their checksums. A peer's state
sharing priority is its merge level (one more than the lower median of the levels in its last group, or its
donors' lower median after a download) plus a per-peer tie-breaker below 0.5. Levels and priorities are
claims: they are bounded and logged, never used to choose whose state to adopt (guard.py).

Optimizer state (merge_optimizer_state): `keep` leaves AdamW's moments as they are (DiLoCo keeps its inner
optimizer state); `reset` clears them after every applied merge or state load; `average` averages the
moments with the weights (the second moment is clamped at 0 after lossy compression; a peer without
moments yet contributes zeros; a state download never carries moments).
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import logging
import math
import threading
import time
from typing import Any

import torch
from hivemind.averaging.allreduce import AllreduceException
from pydantic import ValidationError

from swarm_node.learning.diloco import nesterov_outer_step, pseudo_gradient
from swarm_node.network import wire
from swarm_node.network.merging import checksum, guard, moments
from swarm_node.network.merging.averager import MergeAverager, make_compression, start_in_main_thread
from swarm_node.network.merging.fingerprint import merge_layout, merge_prefix, merged_parameters, model_fingerprint
from swarm_node.network.merging.registry import MergeRegistry
from swarm_node.network.merging.state import StateSharing, _RoundFailed
from swarm_node.network.merging.schedule import MergeSchedule
from swarm_node.network.merging.settings import MergeSettings
from swarm_node.network.merging.stats import MergeResult, MergeStats

log = logging.getLogger(__name__)

FINAL_MERGE_WINDOW_FACTOR = 3.0  # the last merge of a `late` run waits longer for every peer
DECLARE_STATE_PERIOD_S = 10.0  # how often an averager re-announces itself as a state donor (and how stale that is)


def _tie_breaker(peer_id: bytes) -> float:
    return int.from_bytes(hashlib.sha256(peer_id).digest()[:4], "big") / 2**33  # [0, 0.5)


def _chunk_timeout_s(config: MergeSettings) -> float:
    """hivemind's next_chunk_timeout: a sender silent this long is dropped from the round (reducers: twice that)."""
    return max(1.0, config.merge_allreduce_timeout_s / 6)


class WeightMerger(StateSharing):
    """Merges a model's weights with same-model peers (`params` or `diloco`). Create in the main thread.

    Args:
        config: `MergeSettings`, or the node's merge section (its fields are picked by name).
        dht: the node's running hivemind DHT.
        model: the policy model (trained in place by the node; only touched by the merger in its calls).
        optimizer: the node's AdamW (for merge_optimizer_state).
        swarm_name: namespace of the DHT keys.
        total_rounds: the run's length (0 = open-ended), for the `late` schedule.
        private_key: the node's identity key (signs this node's record in the merge registry; the DHT must run
            with an RSASignatureValidator of the same key and the same identity, as the node's does).
    """

    averager_cls = MergeAverager  # the hivemind averager class (tests substitute a hostile one)

    def __init__(self, config, dht, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 swarm_name: str, total_rounds: int = 0, dht_timeout_s: float = 10.0, *, private_key):
        config = MergeSettings.pick(config)
        assert config.merge_mode in ("params", "diloco"), config.merge_mode
        self.config, self.mode, self.dht = config, config.merge_mode, dht
        self.optimizer, self.dht_timeout_s = optimizer, dht_timeout_s
        self.params = [p for _, p in merged_parameters(model)]
        self.fingerprint = model_fingerprint(model)
        self.prefix = merge_prefix(swarm_name, self.fingerprint, self.mode,
                                   merge_layout(config.merge_compression, config.merge_optimizer_state, self.mode,
                                                config.merge_aggregation))
        self.schedule = MergeSchedule(config.merge_schedule, config.merge_every_rounds, total_rounds)
        self.stats = MergeStats(self.mode)
        self.level = 0  # verified group merges behind this node's anchor (its own or a donor's); sharing priority
        self.rounds_since_merge = 0  # rounds since the last merge attempt with peers, or since joining
        self._lock = threading.Lock()  # guards the anchor/momentum against concurrent state downloads
        self._update_norm = 0.0  # ||own contribution - anchor|| at the current merge (guard.TrustRegion's u)
        self.trust = guard.TrustRegion(config.merge_trust_factor, config.merge_trust_min_rel)
        self.strikes = guard.Strikes()
        self._alone_logged = False
        self._restored = False  # anchor and momentum came from this node's checkpoint (load_state_dict)
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
        self.registry = MergeRegistry(dht, self.prefix, private_key, self.averager.peer_id.to_base58(), self.mode,
                                      self.fingerprint, dht_timeout_s, max_merging_s=FINAL_MERGE_WINDOW_FACTOR * mm + 1.0)
        self._set_priority()
        self.registry.announce(self.level)
        log.info("merging (%s, schedule %s) with peers of model fingerprint %s under DHT prefix %s",
                 self.mode, config.merge_schedule, self.fingerprint[:12], self.prefix)

    def _start_averager(self, matchmaking_s: float) -> MergeAverager:
        cfg = self.config
        averager = self.averager_cls(
            self.buffer, self.dht, state_fn=self._shared_state, prefix=self.prefix,
            target_group_size=cfg.merge_target_group_size or None, min_group_size=cfg.merge_min_group_size,
            min_matchmaking_time=matchmaking_s, request_timeout=min(3.0, max(1.0, matchmaking_s / 2)),
            allreduce_timeout=cfg.merge_allreduce_timeout_s,
            next_chunk_timeout=_chunk_timeout_s(cfg),
            compression=make_compression(cfg.merge_compression), declare_state_period=DECLARE_STATE_PERIOD_S,
            shutdown_timeout=5, aggregation=cfg.merge_aggregation,
        )
        averager.run_in_background(await_ready=True, timeout=60)
        return averager

    # ------------------------------------------------------------------ public
    def join(self, completed_rounds: int) -> bool:
        """Before the first round: load the group's state (see load_state); the every_k count starts now. With
        no agreed state online, a node restored from its checkpoint keeps its restored anchor and momentum
        (load_state_dict); a fresh node takes its own weights as the anchor."""
        self.rounds_since_merge = 0
        return self.load_state(own_weights_as_anchor=not self._restored)

    def maybe_merge(self, round_: int) -> dict[str, Any]:
        """At the end of `round_`: merge if the schedule says so, or join peers that are merging right now.

        Returns the metrics line's merge fields."""
        self.rounds_since_merge += 1
        self.registry.announce(self.level)  # refresh this node's signed record (it expires after REGISTRY_TTL_S)
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
            self.registry.announce(self.level, merging_for_s=window)
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

    def _reject(self, peers: list[bytes], reason: str, detail: str = "") -> None:
        """Count a rejection by reason and strike the peers it is blamed on."""
        self.stats.reject(reason)
        self.strikes.strike(peers, reason)
        log.warning("rejected a merge or state (%s): %s", reason, detail[:200])

    def _check_trust(self, result: list[torch.Tensor], own: list[torch.Tensor]) -> float:
        """Raise _RoundFailed("non_finite" / "trust_region") unless `result` is finite and within the trust
        region of `own` (guard.py). Returns the distance."""
        dist = guard.distance(result, own)
        if not math.isfinite(dist):
            raise _RoundFailed("non_finite", "the result holds non-finite values")
        radius = self.trust.radius(self._update_norm, guard.norm(self.anchor))
        if dist > radius:
            raise _RoundFailed("trust_region", f"the result is {dist:.4g} from our weights, trust radius {radius:.4g}")
        return dist

    def metrics(self, result: MergeResult | None) -> dict[str, Any]:
        """The metrics line's merge fields; the weights' checksum only in rounds with a merge (it reads them all)."""
        sent, received = self.averager.traffic.totals()
        return self.stats.metrics(result, sent, received, self.weights_checksum() if result else None)

    def weights_checksum(self) -> list[float]:
        """[sum, L2 norm] of the model's merged parameters (float64); equal across peers right after a merge."""
        return checksum.digest(self.params)

    def shutdown(self) -> None:
        """Stop the averager's process. hivemind terminates one that outlives its grace period without waiting
        for it; the join makes sure it is gone (and answers no more matchmaking) when this returns."""
        if self.averager.is_alive():
            self.averager.shutdown()
            self.averager.join(timeout=5)

    # ------------------------------------------------------------------ one round
    def _encoded_gather(self) -> bytes:
        """This node's gather, encoded. Everything derived from peers is clamped, so only our own non-finite
        weights can make it fail (pydantic ValidationError)."""
        return wire.encode(wire.MergeGather(
            version=wire.PROTOCOL_VERSION, mode=self.mode, fingerprint=self.fingerprint,
            sums=checksum.checksums(self.buffer, self.groups),
            anchor=checksum.digest(self.anchor) if self.mode == "diloco" else [], merges=min(self.level, wire.MAX_MERGE_LEVEL),
            priority=min(float(self.averager.state_sharing_priority), wire.MAX_MERGE_LEVEL + 1.0),
            optimizer_step=min(self._optimizer_step(), wire.MAX_MERGE_LEVEL)))

    def _average_and_apply(self, window_s: float) -> MergeResult:
        self._fill_buffer()
        segment_norms = checksum.norms(self.buffer, self.groups)
        try:
            gather = self._encoded_gather()
        except ValidationError:
            self.stats.reject("own_weights_non_finite")
            return MergeResult("failed", detail="this node's own weights are not finite: nothing to merge")
        self.averager.reset_faults()
        control = None
        try:
            control = self.averager.step(gather=gather, weight=1.0, timeout=window_s + 0.5,
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
        n = len(self.anchor)
        try:
            mismatch, members = self._verify(gathered, segment_norms)
            if self.mode == "params":
                own = [p.detach() for p in self.params]
            else:
                own = [a - p.detach().to("cpu", torch.float32) for a, p in zip(self.anchor, self.params)]
            self._check_trust(self.buffer[:n], own)
            if not all(torch.isfinite(b).all() for b in self.buffer[n:]):
                raise _RoundFailed("non_finite", "averaged optimizer moments hold non-finite values")
        except _RoundFailed as e:
            self._reject(e.peers, e.reason, str(e))
            return MergeResult("failed", group_size=len(gathered), detail=str(e))
        finally:
            self.trust.note(self._update_norm)
        own_anchor = checksum.digest(self.anchor) if self.mode == "diloco" else []
        if self.mode == "diloco" and not guard.anchor_agreed(own_anchor, [m.anchor for m in members]):
            # our anchor is not the one most of the group shares (e.g. another initialisation): adopt the state
            # a majority of the online members agree on instead
            if self.load_state(own_weights_as_anchor=False):
                return MergeResult("repaired", group_size=len(members), mismatch=mismatch,
                                   detail="anchor differed from the group's; loaded the group's state")
            self.stats.reject("anchor")
            return MergeResult("failed", group_size=len(members), detail="anchor differs from the group's")
        self._apply(members)
        self.level = guard.next_level([m.merges for m in members])
        return MergeResult("merged", group_size=len(members), mismatch=mismatch)

    def _fill_buffer(self) -> None:
        n = len(self.anchor)
        with torch.no_grad(), self.averager.get_tensors():
            if self.mode == "params":
                for b, p in zip(self.buffer, self.params):
                    b.copy_(p.detach())
                self._update_norm = guard.distance(self.buffer[:n], self.anchor)
            else:
                pseudo_gradient(self.anchor, [p.detach() for p in self.params], self.buffer[:n])
                self._update_norm = guard.norm(self.buffer[:n])
            if self.config.merge_optimizer_state == "average":
                moments.read(self.optimizer, self.params, self.buffer[n:])

    def _verify(self, gathered: dict, segment_norms: list[float]) -> tuple[float, list[wire.MergeGather]]:
        """Raise _RoundFailed unless the buffer now holds the verified group mean. Returns (mismatch, members)."""
        members = []
        for peer, raw in gathered.items():
            blame = [peer.to_base58().encode()] if hasattr(peer, "to_base58") else []
            if not isinstance(raw, bytes):
                raise _RoundFailed("bad_gather", f"peer {peer} sent a gather that is not bytes", blame)
            try:
                member = wire.decode_merge_gather(raw)
            except wire.WireError as e:
                raise _RoundFailed("bad_gather", f"peer {peer} sent a bad gather ({e})", blame) from None
            if member.fingerprint != self.fingerprint or member.mode != self.mode:
                raise _RoundFailed("bad_gather", f"peer {peer} merges another model or mode", blame)
            if len(member.sums) != 2 * len(self.groups):
                raise _RoundFailed("bad_gather", f"peer {peer} sent {len(member.sums)} checksums, expected "
                                   f"{2 * len(self.groups)}", blame)
            members.append(member)
        failed_values, banned, _ = self.averager.faults()
        if failed_values:
            raise _RoundFailed("unaveraged", f"hivemind left {failed_values} values un-averaged (a peer failed "
                               "mid-round or sent a refused part)")
        expected = checksum.expected_checksums([(m.sums, 1.0) for m in members])  # every member counts once
        observed = checksum.checksums(self.buffer, self.groups)
        worst = checksum.mismatch(observed, expected, segment_norms, self.config.merge_compression)
        if self.config.merge_aggregation == "centered_clip" and math.isfinite(worst):
            return worst, members  # the clipped result legitimately differs from the mean: the trust region rules
        if not worst <= 1.0:
            reason = f"checksums off by {worst:.1f}x the tolerance"
            raise _RoundFailed("checksum", reason + (f"; {banned} senders dropped mid-round" if banned else ""))
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
            moments.write(self.optimizer, self.params, self.buffer[n:],
                          guard.lower_median([m.optimizer_step for m in members]))

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
        """Does the signed registry list another member of this model and layout? (True when unsure.)"""
        if self.averager.client_mode:
            return True
        members = self.registry.members()
        return True if members is None else bool(members)

    def _peers_merging(self) -> bool:
        """Is another verified member looking for a group right now? (One DHT read of the signed registry.)"""
        return any(m.merging for m in self.registry.members() or [])

    def _optimizer_step(self) -> int:
        steps = [int(s["step"]) for s in self.optimizer.state.values() if "step" in s]
        return max(steps, default=0)

    def _set_priority(self) -> None:
        if not self.averager.client_mode:
            self.averager.state_sharing_priority = min(self.level, wire.MAX_MERGE_LEVEL) + _tie_breaker(self.peer_key)
