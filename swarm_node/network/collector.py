"""The trust boundary's loop: collecting peers' groups in the background and pooling what survives verification.

Collection runs continuously as one named asyncio task that the node owns (`Collector.start`/`stop`): every
`collect_interval_s` it polls a random sample of the DHT shards for peers' latest manifests, drops stale and
future ones, lets `Admission` (network/admission.py) choose a few of the fresh new ones (a per-round fetch budget
of O(J) payloads, known-good peers preferred with random newcomers mixed in: network/sampling.py), fetches their
payloads (bounded in time and bytes), verifies them (network/checks.py: limits, re-creation and re-scoring in the
budgeted worker process of network/verify.py, reward check, dedupe) and puts the survivors into a `GroupPool`
(network/pool.py). A round never waits for a peer: at training time `take` samples J groups from what is already
verified, within the pool's staleness bounds (`max_staleness_s`, `max_policy_lag`).

Every drop is counted by reason in `PeerTrust`, which bans peers that keep violating the protocol. Nothing from a
peer reaches the trainer unverified, and no exception from one peer's data escapes. The exchange is only used
through `poll(shards)` and `fetch(manifest, max_payload_bytes)`, so the loop runs against an in-memory exchange
in tests (tests/test_collection.py).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import logging
import random
import time
from typing import Callable

from hivemind.utils import get_dht_time

from swarm_node.learning.sapo import Group
from swarm_node.learning.settings import pick
from swarm_node.learning.tasks import SMOL_SYSTEM_PROMPT, TaskSet, safe_repr
from swarm_node.network import checks, wire
from swarm_node.network.admission import Admission
from swarm_node.network.exchange import FetchError, Rejection
from swarm_node.network.peermaps import BoundedSet, PeerCounter, PeerMap
from swarm_node.network.pool import GroupPool
from swarm_node.network.sampling import ShardSampler, fetch_budget
from swarm_node.network.trust import PeerTrust
from swarm_node.network.verify import SpecPolicy, VerifyBudgetError, VerifyWorker

log = logging.getLogger(__name__)
SLOW_REASONS = frozenset({"fetch_timeout", "unreachable", "stream_error"})  # churn: back-off, never a strike


@dataclasses.dataclass(frozen=True)
class CollectorSettings:
    """The settings the collector reads (same names, units and meaning as in the node config, config.py; build it with
    `CollectorSettings.pick(config.network, config.train)`)."""

    # freshness and pooling
    max_staleness_s: float
    max_clock_skew_s: float
    max_policy_lag: int
    # admission and fetching
    collect_interval_s: float
    num_shards: int
    max_shard_reads_per_poll: int
    target_manifests_per_poll: int
    max_manifests_per_round: int
    fetches_per_round: int
    fetch_margin: float
    max_inflight_fetches: int
    explore_share: float
    max_payload_bytes: int
    # receiver limits and the verification budget
    max_groups_per_payload: int
    max_completions_per_group: int
    max_completion_chars: int
    max_prompt_tokens: int
    verify_memory_mb: int
    verify_timeout_s: float
    # trust
    ban_strikes: int
    ban_cooldown_s: float
    max_tracked_peers: int
    # sampling J (the train section)
    num_external_groups: int
    filter_zero_advantage: bool
    external_selection: str

    @classmethod
    def pick(cls, *sections) -> CollectorSettings:
        """The fields read by name from config sections (learning/settings.py)."""
        return pick(cls, *sections)


@dataclasses.dataclass
class Collected:
    """The external groups one round trains on."""

    groups: list[Group]  # the J (or fewer) sampled external groups
    available: int  # usable groups in the pool before sampling
    peers_seen: int  # distinct peers whose verified groups are in the pool
    wait_s: float = 0.0  # time the round spent waiting for peers: always 0 (collection runs in the background)


class Collector:
    """Owns the external-group pool of one node and the background task that fills it.

    Args:
        exchange: the rollout exchange, or anything with its `poll(shards)` and `fetch(manifest, max_bytes)`
            (network/exchange.py; tests use in-memory ones).
        settings: the collector's settings (`CollectorSettings.pick(config.network, config.train)`).
        rng: random source for sampling shards, fetches and J groups.
        invalid_signatures: callable returning the DHT validator's running count of bad signatures.
        taskset: the node's own task set (allowed specs, prompt style); None: only `SAFE_CONFIG_RANGES`, smol style.
        count_tokens: the local tokenizer's token count of a text; None counts UTF-8 bytes (an upper bound).
        worker: the verification worker (network/verify.py), possibly launched early; None creates one.
    """

    def __init__(self, exchange, settings: CollectorSettings, rng: random.Random,
                 invalid_signatures: Callable[[], int] = lambda: 0, taskset: TaskSet | None = None,
                 count_tokens: Callable[[str], int] | None = None, worker: VerifyWorker | None = None):
        self.exchange, self.settings, self.rng = exchange, settings, rng
        s = settings
        self.peer_weight = None  # per-peer usefulness (learning/selection.PeerUsefulness), set by the node
        # every per-peer map is bounded (TTL + LRU, network/peermaps.py): fresh peer IDs are free
        peers, peer_ttl_s = s.max_tracked_peers, max(s.ban_cooldown_s, 2 * s.max_staleness_s, 1.0)
        records, contents = 4 * peers, 16 * peers
        ttl_s = 2 * s.max_staleness_s  # anything older is rejected as stale anyway
        self.trust = PeerTrust(s.ban_strikes, s.ban_cooldown_s, max_peers=peers, ttl_s=peer_ttl_s)
        self.pool = GroupPool(s.max_staleness_s, s.max_policy_lag)
        self.admission = Admission(self.trust, rng, s.max_manifests_per_round, s.explore_share, s.collect_interval_s,
                                   peers, peer_ttl_s, records, ttl_s)
        self.seen = checks.Seen(contents, ttl_s)  # content digests: own groups and accepted ones (dedupe)
        system_prompt, num_fewshot = (taskset.system_prompt, taskset.num_fewshot) if taskset is not None else (
            SMOL_SYSTEM_PROMPT, 2)
        # the receiver's limits and the cost bounds of a peer's task spec (network/checks.py, network/verify.py)
        self.limits = checks.Limits(s.max_groups_per_payload, s.max_completions_per_group, s.max_completion_chars,
                                    s.max_prompt_tokens, SpecPolicy(taskset.tasks if taskset is not None else {}),
                                    system_prompt, num_fewshot, count_tokens)
        self._invalid_signatures = invalid_signatures
        self._signatures_counted = 0
        self._seen_bad_records = BoundedSet(records, ttl_s)
        self._admitted_this_round = 0  # manifests admitted since the last take (the round's fetch budget)
        # sampled reads and fetches (network/sampling.py): a round costs O(J), not O(swarm size)
        self.shards = ShardSampler(s.num_shards, s.max_shard_reads_per_poll,
                                   max(s.target_manifests_per_poll, 2 * s.num_external_groups), rng)
        self._round_budget: int | None = None  # B: payloads fetched per round (sampling.fetch_budget)
        self.polls = self.polls_skipped = 0
        self.peers_announced = BoundedSet(peers, peer_ttl_s)  # peers with a valid manifest seen recently
        # peer -> (model, round, policy_version, created_at_s) of its latest valid manifest (the dashboard's peers)
        self.peer_latest = PeerMap(peers, peer_ttl_s)
        self.verify_s = 0.0
        self.verified_groups = 0
        self.cycles = 0  # background collection cycles completed
        self.accepted_by_peer = PeerCounter(peers, peer_ttl_s)  # groups that passed verification, per peer ID
        self.accepted_total = 0  # groups that passed verification, all peers
        self._task: asyncio.Task | None = None
        self._inflight: dict[str, asyncio.Task] = {}  # peer -> its one fetch-and-verify task
        self.worker = worker or VerifyWorker(s.verify_memory_mb, s.verify_timeout_s)
        # re-creation and scoring run in the worker process; this thread waits for it, off the event loop
        self._verifier = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="verify")

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Start the background collection task ("rollout-collector") in the running event loop."""
        if self._task is None:
            self._verifier.submit(self.worker._ensure)  # import reasoning-gym in the worker before the first payload
            self._task = asyncio.create_task(self._run(), name="rollout-collector")

    async def stop(self) -> None:
        """Cancel the background task and wait for it; shut the verification worker down."""
        tasks = [t for t in [self._task, *self._inflight.values()] if t is not None]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._task = None
        self._inflight.clear()
        self._verifier.shutdown(wait=False, cancel_futures=True)
        self.worker.close()

    async def _run(self) -> None:
        while True:
            t0 = time.monotonic()
            try:
                await self.collect_once()
            except asyncio.CancelledError:
                raise
            except Exception as e:  # never let one cycle's surprise end collection
                self.trust.reject("collect_cycle_error", None, safe_repr(e))
                log.warning("collection cycle failed (%s); continuing", safe_repr(e))
            self.cycles += 1
            await asyncio.sleep(max(0.0, self.settings.collect_interval_s - (time.monotonic() - t0)))

    async def drain(self) -> None:
        """Wait for every fetch-and-verify task in flight (tests and benchmarks drive cycles by hand)."""
        await asyncio.gather(*list(self._inflight.values()), return_exceptions=True)

    # ------------------------------------------------------------------ the round's side
    def take(self) -> Collected:
        """Sample J verified groups from the pool for this round's training; never waits."""
        self._admitted_this_round = 0
        s = self.settings
        chosen, available = self.pool.take(s.num_external_groups, self.rng, s.filter_zero_advantage,
                                           s.external_selection, self.peer_weight)
        return Collected(chosen, available, len(self.pool.peers()))

    def note_own(self, groups: list[Group]) -> None:
        """Remember this node's own groups (before publishing them), so copies republished by others are refused."""
        self.seen.add_own(groups)

    def usable(self) -> list[Group]:
        """Verified, not yet used groups within the staleness bounds."""
        return self.pool.usable(self.settings.filter_zero_advantage)

    # ------------------------------------------------------------------ one background cycle
    async def collect_once(self) -> None:
        """Poll a sample of the DHT shards, fetch the chosen new manifests' payloads and verify them into the pool.

        A cycle whose round has spent its fetch budget, or whose fetch slots are all busy, reads nothing."""
        s = self.settings
        self.admission.prune()
        self.seen.prune()
        self._seen_bad_records.prune()
        if self._round_budget is not None and (self._admitted_this_round >= self._round_budget
                                               or len(self._inflight) >= s.max_inflight_fetches):
            self.polls_skipped += 1
            return
        shards = self.shards.next_shards()
        manifests, rejections = await self.exchange.poll(shards)
        self.polls += 1
        self.shards.observe(len(shards), getattr(self.exchange, "records_read", len(manifests) + len(rejections)))
        for rej in rejections:
            self._reject_record_once(rej.record_id, rej.reason, rej.peer_id, rej.detail)
        self._count_bad_signatures()
        for m in manifests:
            self.peers_announced.add(m.peer_id)
            if m.created_at_s >= self.peer_latest.get(m.peer_id, (None, None, None, -1.0))[3]:  # shards: newest
                self.peer_latest[m.peer_id] = (m.model, m.round, m.policy_version, m.created_at_s)
        manifests = [m for m in manifests if self._is_fresh(m)]
        for m in manifests:
            self.pool.note_version(m.peer_id, m.policy_version)
        new = [m for m in manifests if self.admission.is_new(m)]
        for m in new:
            if m.num_groups == 0:  # a peer announcing itself ("hello"): nothing to fetch
                self.admission.mark_seen(m)
        # a peer with a fetch in flight or in back-off waits: its manifest stays unseen for a later cycle
        now = time.monotonic()
        new = [m for m in new if m.num_groups > 0 and m.peer_id not in self._inflight
               and not self.admission.in_backoff(m.peer_id, now)]
        self._round_budget = fetch_budget(s.fetches_per_round, s.fetch_margin, s.num_external_groups,
                                          [m.num_groups for m in new])
        budget = min(self._round_budget - self._admitted_this_round, s.max_inflight_fetches - len(self._inflight))
        admitted = self.admission.admit(new, budget, self.peer_weight)
        self._admitted_this_round += len(admitted)
        # one task per payload: a slow or stalling peer delays only itself, never the cycle or other peers.
        # Announcement order is kept within a cycle's batch start; a copy published later than its original is the
        # one counted as `duplicate` unless the original's fetch is the slower one (a duplicate is never a strike).
        for m in sorted(admitted, key=lambda m: m.created_at_s):
            self._inflight[m.peer_id] = asyncio.create_task(self._handle(m), name=f"fetch-{m.peer_id[-8:]}")

    async def _handle(self, manifest: wire.Manifest) -> None:
        """Fetch, verify and pool one peer payload; nothing raised here leaves this peer's handling."""
        try:
            payload = await self._fetch(manifest)
            if payload is not None:
                await self._verify_and_pool(manifest, payload)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            self._internal_error(manifest.peer_id, e)
        finally:
            self._inflight.pop(manifest.peer_id, None)

    def _is_fresh(self, m: wire.Manifest) -> bool:
        """Freshness on the DHT clock (all peers share it within seconds): neither stale nor from the future."""
        age_s = get_dht_time() - m.created_at_s
        if age_s > self.settings.max_staleness_s:
            self._reject_record_once(b"stale" + m.payload_sha256 + m.peer_id.encode(), "stale", m.peer_id)
            return False
        if age_s < -self.settings.max_clock_skew_s:
            self._reject_record_once(b"future" + m.payload_sha256 + m.peer_id.encode(), "future", m.peer_id)
            return False
        return True

    def _reject_record_once(self, record_id: bytes, reason: str, peer_id: str | None, detail: str = "") -> None:
        if record_id not in self._seen_bad_records:  # a record is read again on every poll: count it once
            self._seen_bad_records.add(record_id)
            self.trust.reject(reason, peer_id, detail)

    def _count_bad_signatures(self) -> None:
        total = self._invalid_signatures()
        for _ in range(total - self._signatures_counted):
            self.trust.reject("bad_signature")
        self._signatures_counted = total

    async def _fetch(self, manifest: wire.Manifest) -> wire.RolloutPayload | None:
        try:
            return await self.exchange.fetch(manifest, self.settings.max_payload_bytes)
        except FetchError as e:
            self.admission.failed(manifest.peer_id)
            self.trust.reject(e.reason, manifest.peer_id, str(e))
            if e.reason in SLOW_REASONS:  # slowness is no violation, but it costs the peer, not the node
                self.admission.slow(manifest.peer_id)
            log.debug("dropped payload of %s round %d: %s", manifest.peer_id, manifest.round, e)
        except Exception as e:  # no exception from one peer's data leaves that peer's handling
            self._internal_error(manifest.peer_id, e)
        return None

    def _internal_error(self, peer_id: str, e: BaseException) -> None:
        """An unexpected exception while handling one peer's data: counted as `internal_error` (a strike: fresh keys
        make any crash trigger free to repeat), logged once at warning, and contained."""
        self.admission.failed(peer_id)
        self.trust.reject("internal_error", peer_id, safe_repr(e))
        log.warning("unexpected error handling data of peer %s (dropped, counted as internal_error): %s", peer_id,
                    safe_repr(e))

    async def _verify_and_pool(self, manifest: wire.Manifest, payload: wire.RolloutPayload) -> None:
        t0 = time.perf_counter()
        try:
            groups = await self.verify_payload_async(payload)
        except Exception as e:  # no exception from one peer's data leaves that peer's handling
            self._internal_error(payload.peer_id, e)
            return
        finally:
            self.verify_s += time.perf_counter() - t0
        if groups:
            self.admission.delivered(payload.peer_id)
            self.pool.add(payload.peer_id, payload.round, manifest.created_at_s, payload.policy_version, groups)
        else:
            self.admission.failed(payload.peer_id)

    # ------------------------------------------------------------------ verification (network/checks.py)
    def _count(self, rejections: list[Rejection], groups: list[Group] | None, peer_id: str) -> list[Group] | None:
        for r in rejections:
            self.trust.reject(r.reason, r.peer_id, r.detail)
        if groups:
            self.accepted_by_peer[peer_id] += len(groups)
            self.accepted_total += len(groups)
        return groups

    def verify_payload(self, payload: wire.RolloutPayload) -> list[Group] | None:
        """`checks.verify` inline (tests and tools), its rejections counted. Returns the surviving groups, or None
        if the whole payload is rejected (a limit broken or a reward forged: none of its groups is used)."""
        groups, rejections = checks.verify(payload, self.limits, self.seen)
        self.verified_groups += len(groups or []) + sum(r.reason in checks.RESCORED for r in rejections)
        return self._count(rejections, groups, payload.peer_id)

    async def verify_payload_async(self, payload: wire.RolloutPayload) -> list[Group] | None:
        """As `verify_payload`, with re-creation and scoring in the budgeted worker process, off the event loop."""
        rejections = checks.check_limits(payload, self.limits)
        if rejections:
            return self._count(rejections, None, payload.peer_id)
        specs, rejections = checks.specs_to_rescore(payload, self.limits)
        results = []
        if specs:
            try:
                results = await asyncio.get_running_loop().run_in_executor(
                    self._verifier, self.worker.run, checks.rescore_work(payload, specs), self.limits.system_prompt,
                    self.limits.num_fewshot, self.limits.max_prompt_bytes)
            except VerifyBudgetError as e:
                return self._count(rejections + [Rejection(e.reason, payload.peer_id, e.detail)], None,
                                   payload.peer_id)
            except Exception:  # counted as internal_error by the caller; the specs refused before still count
                self._count(rejections, None, payload.peer_id)
                raise
        groups, judged, verified = checks.judge(payload, specs, results, self.limits, self.seen)
        self.verified_groups += verified
        return self._count(rejections + judged, groups, payload.peer_id)
