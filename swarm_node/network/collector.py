"""The trust boundary: collecting peers' groups in the background, verifying every value, pooling what survives.

Collection runs continuously as one named asyncio task that the node owns (`Collector.start`/`stop`): every
`collect_interval_s` it polls a random sample of the DHT shards for peers' latest manifests, admits a few of the
fresh new ones (a per-round fetch budget of O(J) payloads, known-good peers preferred with random newcomers
mixed in: network/sampling.py), fetches their payloads (bounded in time and bytes), enforces the node's
limits, re-creates every question from its task spec and re-scores every completion with the local verifier
(off the event loop), drops groups whose claimed rewards disagree, dedupes groups by content, and puts the
survivors into a `GroupPool`. A round never waits for a peer: at training time `take` samples J groups from what
is already verified, within the pool's staleness bounds (`max_staleness_s`, `max_policy_lag`).

Every drop is counted by reason in `PeerTrust`, which bans peers that keep violating the protocol. Nothing from a
peer reaches the trainer unverified, and no exception from one peer's data escapes.
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

from swarm_node.config import NetworkConfig, TrainConfig
from swarm_node.learning.sapo import Group
from swarm_node.learning.tasks import RG_VERSION, SMOL_SYSTEM_PROMPT, TaskSet, TaskSpec, safe_repr
from swarm_node.network import wire
from swarm_node.network.exchange import FetchError, RolloutExchange
from swarm_node.network.peermaps import BoundedSet, PeerCounter, PeerMap, content_digest, manifest_digest
from swarm_node.network.pool import GroupPool
from swarm_node.network.sampling import ShardSampler, choose_fetches, fetch_budget
from swarm_node.network.trust import PeerTrust
from swarm_node.network.verify import PROMPT_BYTES_PER_TOKEN, SpecPolicy, VerifyBudgetError, VerifyWorker, rescore

log = logging.getLogger(__name__)
REWARD_TOLERANCE = 1e-6
SLOW_REASONS = frozenset({"fetch_timeout", "unreachable", "stream_error"})  # churn: back-off, never a strike
MAX_BACKOFF_S = 120.0  # longest a repeatedly slow peer waits before its next fetch


@dataclasses.dataclass
class Collected:
    """The external groups one round trains on."""

    groups: list[Group]  # the J (or fewer) sampled external groups
    available: int  # usable groups in the pool before sampling
    peers_seen: int  # distinct peers whose verified groups are in the pool
    wait_s: float = 0.0  # time the round spent waiting for peers: always 0 (collection runs in the background)


def group_to_wire(group: Group) -> wire.WireGroup:
    s = group.spec
    return wire.WireGroup(
        spec=wire.WireTaskSpec(dataset=s.dataset, config=s.config, seed=s.seed, index=s.index, size=s.size,
                               rg_version=s.rg_version),
        completions=group.completions,
        rewards=[float(x) for x in group.rewards],
        logprobs=_wire_logprobs(group.logprobs),
        tokenizer_sha256=group.tokenizer if group.logprobs is not None else "",
    )


def _wire_logprobs(logprobs: list[list[float]] | None) -> list[list[float]] | None:
    """A group's log-probs within the wire limits: clamped to [-MAX_ABS_LOGPROB, 0], cut at MAX_LOGPROB_TOKENS."""
    if logprobs is None:
        return None
    lim = wire.MAX_ABS_LOGPROB
    return [[min(0.0, max(-lim, float(x))) for x in row[: wire.MAX_LOGPROB_TOKENS]] for row in logprobs]


class Collector:
    """Owns the external-group pool of one node and the background task that fills it.

    Args:
        exchange: the node's rollout exchange.
        network: network config (freshness, limits, timeouts, bans, collection interval, staleness bounds).
        train: train config (J, zero-advantage filter).
        rng: random source for sampling J groups.
        invalid_signatures: callable returning the DHT validator's running count of bad signatures.
        taskset: the node's own task set (allowed specs, prompt style); None: only `SAFE_CONFIG_RANGES`, smol style.
        count_tokens: the local tokenizer's token count of a text; None counts UTF-8 bytes (an upper bound).
        worker: the verification worker (network/verify.py), possibly launched early; None creates one.
    """

    def __init__(self, exchange: RolloutExchange, network: NetworkConfig, train: TrainConfig, rng: random.Random,
                 invalid_signatures: Callable[[], int] = lambda: 0, taskset: TaskSet | None = None,
                 count_tokens: Callable[[str], int] | None = None, worker: VerifyWorker | None = None):
        self.exchange, self.net, self.train, self.rng = exchange, network, train, rng
        self.peer_weight = None  # per-peer usefulness (learning/selection.PeerUsefulness), set by the node
        # every per-peer map is bounded (TTL + LRU, network/peermaps.py): fresh peer IDs are free
        peers, peer_ttl_s = network.max_tracked_peers, max(network.ban_cooldown_s, 2 * network.max_staleness_s, 1.0)
        records, contents = 4 * peers, 16 * peers
        self.trust = PeerTrust(network.ban_strikes, network.ban_cooldown_s, max_peers=peers, ttl_s=peer_ttl_s)
        self.pool = GroupPool(network.max_staleness_s, network.max_policy_lag)
        self._invalid_signatures = invalid_signatures
        self._signatures_counted = 0
        ttl_s = 2 * network.max_staleness_s  # anything older is rejected as stale anyway
        self._seen_manifests = BoundedSet(records, ttl_s)  # manifest_digest of those fetched or skipped
        self._flood_counted = BoundedSet(records, ttl_s)
        self._seen_bad_records = BoundedSet(records, ttl_s)
        self._seen_content = BoundedSet(contents, ttl_s)  # digests of group content, for dedupe
        self._own_content = BoundedSet(contents, ttl_s)  # digests of this node's own published groups
        self._good_peers = PeerMap(peers, peer_ttl_s)  # peers that delivered a valid payload before
        self._failures = PeerCounter(peers, peer_ttl_s)  # fetches or payloads of a peer that gave us nothing
        self._tries = PeerCounter(peers, peer_ttl_s)  # fetches attempted per peer
        self._admitted_this_round = 0  # manifests admitted since the last take (the round's fetch budget)
        # sampled reads and fetches (network/sampling.py): a round costs O(J), not O(swarm size)
        self.shards = ShardSampler(network.num_shards, network.max_shard_reads_per_poll,
                                   max(network.target_manifests_per_poll, 2 * train.num_external_groups), rng)
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
        self._timeouts = PeerCounter(peers, peer_ttl_s)  # consecutive slow fetches per peer (back-off exponent)
        self._backoff_until = PeerMap(peers, MAX_BACKOFF_S)  # peer -> monotonic time before which it is not fetched
        # the cost bounds of a peer's task spec (network/verify.py)
        self.spec_policy = SpecPolicy(taskset.tasks if taskset is not None else {})
        self._prompt_style = (taskset.system_prompt, taskset.num_fewshot) if taskset is not None else (
            SMOL_SYSTEM_PROMPT, 2)
        self._count_tokens = count_tokens or (lambda text: len(text.encode()))
        self.worker = worker or VerifyWorker(network.verify_memory_mb, network.verify_timeout_s)
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
            await asyncio.sleep(max(0.0, self.net.collect_interval_s - (time.monotonic() - t0)))

    # ------------------------------------------------------------------ the round's side
    def take(self) -> Collected:
        """Sample J verified groups from the pool for this round's training; never waits."""
        self._admitted_this_round = 0
        chosen, available = self.pool.take(self.train.num_external_groups, self.rng, self.train.filter_zero_advantage,
                                           self.train.external_selection, self.peer_weight)
        return Collected(chosen, available, len(self.pool.peers()))

    def note_own(self, groups: list[Group]) -> None:
        """Remember this node's own groups (before publishing them), so copies republished by others are refused."""
        for g in groups:
            self._own_content.add(content_digest(g.content_key()))

    def usable(self) -> list[Group]:
        """Verified, not yet used groups within the staleness bounds."""
        return self.pool.usable(self.train.filter_zero_advantage)

    # ------------------------------------------------------------------ one background cycle
    async def collect_once(self) -> None:
        """Poll a sample of the DHT shards, fetch the chosen new manifests' payloads and verify them into the pool.

        A cycle whose round has spent its fetch budget, or whose fetch slots are all busy, reads nothing."""
        for seen in (self._seen_manifests, self._flood_counted, self._seen_bad_records, self._seen_content,
                     self._own_content):
            seen.prune()
        if self._round_budget is not None and (self._admitted_this_round >= self._round_budget
                                               or len(self._inflight) >= self.net.max_inflight_fetches):
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
        new = [m for m in manifests if manifest_digest(m) not in self._seen_manifests]
        for m in new:
            if m.num_groups == 0:  # a peer announcing itself ("hello"): nothing to fetch
                self._seen_manifests.add(manifest_digest(m))
        # a peer with a fetch in flight or in back-off waits: its manifest stays unseen for a later cycle
        now = time.monotonic()
        new = [m for m in new if m.num_groups > 0 and m.peer_id not in self._inflight
               and self._backoff_until.get(m.peer_id, 0.0) <= now]
        self._round_budget = fetch_budget(self.net.fetches_per_round, self.net.fetch_margin,
                                          self.train.num_external_groups, [m.num_groups for m in new])
        budget = min(self._round_budget - self._admitted_this_round,
                     self.net.max_inflight_fetches - len(self._inflight))
        admitted = self._admit(new, budget)
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
        if age_s > self.net.max_staleness_s:
            self._reject_record_once(b"stale" + m.payload_sha256 + m.peer_id.encode(), "stale", m.peer_id)
            return False
        if age_s < -self.net.max_clock_skew_s:
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

    def _admit(self, manifests: list[wire.Manifest], budget: int) -> list[wire.Manifest]:
        """Skip banned peers, then admit at most `budget` of the new manifests, drawn by `sampling.choose_fetches`:
        known-good peers (weighted by usefulness / (1 + failures)) with a share of slots for random newcomers.

        If one poll finds more new manifests than `max_manifests_per_round`, only that many are considered: peers
        that delivered valid data before first, then by how often a peer failed us, then least tried first, ties
        at random; the rest are counted once each as `flood`. A Sybil flood therefore delays newcomers but cannot
        starve known-good peers. Manifests not admitted stay unseen, so a later cycle or round may admit them.
        """
        live = []
        for m in manifests:
            if self.trust.is_banned(m.peer_id):
                self._seen_manifests.add(manifest_digest(m))
                self.trust.reject("banned_peer", None)
            else:
                live.append(m)
        cap = self.net.max_manifests_per_round
        if len(live) > cap:
            live.sort(key=lambda m: (m.peer_id not in self._good_peers, self._failures[m.peer_id],
                                     self._tries[m.peer_id], self.rng.random()))
            for m in live[cap:]:
                key = manifest_digest(m)
                if key not in self._flood_counted:
                    self._flood_counted.add(key)
                    self.trust.reject("flood", None)
            live = live[:cap]
        weight = self.peer_weight or (lambda peer_id: 1.0)
        admitted = choose_fetches(live, max(0, budget), self.rng, lambda m: m.peer_id,
                                  lambda peer_id: peer_id in self._good_peers,
                                  lambda peer_id: weight(peer_id) / (1 + self._failures[peer_id]),
                                  self.net.explore_share)
        for m in admitted:
            self._seen_manifests.add(manifest_digest(m))
            self._tries[m.peer_id] += 1
        return admitted

    async def _fetch(self, manifest: wire.Manifest) -> wire.RolloutPayload | None:
        try:
            return await self.exchange.fetch(manifest, self.net.max_payload_bytes)
        except FetchError as e:
            self._failures[manifest.peer_id] += 1
            self.trust.reject(e.reason, manifest.peer_id, str(e))
            if e.reason in SLOW_REASONS:  # slowness is no violation, but it costs the peer, not the node
                self._timeouts[manifest.peer_id] += 1
                delay_s = min(MAX_BACKOFF_S, self.net.collect_interval_s * 2 ** self._timeouts[manifest.peer_id])
                self._backoff_until[manifest.peer_id] = time.monotonic() + delay_s
            log.debug("dropped payload of %s round %d: %s", manifest.peer_id, manifest.round, e)
        except Exception as e:  # no exception from one peer's data leaves that peer's handling
            self._internal_error(manifest.peer_id, e)
        return None

    def _internal_error(self, peer_id: str, e: BaseException) -> None:
        """An unexpected exception while handling one peer's data: counted as `internal_error` (a strike: fresh keys
        make any crash trigger free to repeat), logged once at warning, and contained."""
        self._failures[peer_id] += 1
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
            self._good_peers[payload.peer_id] = True
            self._timeouts.pop(payload.peer_id, None)
            self._backoff_until.pop(payload.peer_id, None)
            self.pool.add(payload.peer_id, payload.round, manifest.created_at_s, payload.policy_version, groups)
        else:
            self._failures[payload.peer_id] += 1

    # ------------------------------------------------------------------ verification
    def _prompt_fits(self, prompt: str | None) -> bool:
        """The re-created prompt's message texts within `max_prompt_tokens`: a prompt of at most that many UTF-8
        bytes fits without tokenising (a token covers at least one byte); the worker already dropped prompts over
        PROMPT_BYTES_PER_TOKEN bytes per token (None); the rest is tokenised with the local tokenizer."""
        if prompt is None:
            return False
        limit = self.net.max_prompt_tokens
        return len(prompt.encode()) <= limit or self._count_tokens(prompt) <= limit

    def _check_limits(self, payload: wire.RolloutPayload) -> bool:
        peer = payload.peer_id
        if len(payload.groups) > self.net.max_groups_per_payload:
            self.trust.reject("over_limit", peer, f"{len(payload.groups)} groups")
            return False
        for wg in payload.groups:
            if len(wg.completions) > self.net.max_completions_per_group or any(
                    len(c) > self.net.max_completion_chars for c in wg.completions):
                self.trust.reject("over_limit", peer, "completions per group or characters per completion")
                return False
        return True

    def _specs(self, payload: wire.RolloutPayload) -> list[tuple[int, TaskSpec]]:
        """The specs worth re-creating, by group index (another reasoning-gym release is skipped, not struck)."""
        out = []
        for i, wg in enumerate(payload.groups):
            spec = TaskSpec(wg.spec.dataset, dict(wg.spec.config), wg.spec.seed, wg.spec.index, wg.spec.size,
                            wg.spec.rg_version)
            if spec.rg_version != RG_VERSION:  # an honest peer on another release: useless here, not hostile
                self.trust.reject("rg_version_mismatch", payload.peer_id, safe_repr(spec.rg_version))
                continue
            refused = self.spec_policy.check(spec)  # cost bound before any work (network/verify.py)
            if refused is not None:
                self.trust.reject("spec_not_allowed", payload.peer_id, refused)
                continue
            out.append((i, spec))
        return out

    def verify_payload(self, payload: wire.RolloutPayload) -> list[Group] | None:
        """Limits, re-creation, re-scoring and dedupe, inline (tests and tools). Returns the surviving groups, or None
        if the whole payload is rejected (a limit broken or a reward forged: none of its groups is used)."""
        if not self._check_limits(payload):
            return None
        specs = self._specs(payload)
        results = rescore([(spec, list(payload.groups[i].completions)) for i, spec in specs], *self._prompt_style,
                          self._max_prompt_bytes)
        return self._apply(payload, specs, results)

    @property
    def _max_prompt_bytes(self) -> int:
        return PROMPT_BYTES_PER_TOKEN * self.net.max_prompt_tokens

    async def verify_payload_async(self, payload: wire.RolloutPayload) -> list[Group] | None:
        """As `verify_payload`, with re-creation and scoring off the event loop."""
        if not self._check_limits(payload):
            return None
        specs = self._specs(payload)
        if not specs:
            return self._apply(payload, [], [])
        work = [(spec, list(payload.groups[i].completions)) for i, spec in specs]
        try:
            results = await asyncio.get_running_loop().run_in_executor(
                self._verifier, self.worker.run, work, *self._prompt_style, self._max_prompt_bytes)
        except VerifyBudgetError as e:
            self.trust.reject(e.reason, payload.peer_id, e.detail)
            return None
        return self._apply(payload, specs, results)

    def _apply(self, payload: wire.RolloutPayload, specs: list[tuple[int, TaskSpec]],
               results: list[tuple[str, object, object]]) -> list[Group] | None:
        peer = payload.peer_id
        groups = []
        for (i, spec), (status, value, prompt) in zip(specs, results):
            wg = payload.groups[i]
            if status != "ok":
                self.trust.reject(status, peer, str(value))
                continue
            if not self._prompt_fits(prompt):
                self.trust.reject("prompt_too_long", peer, f"{spec.dataset}: over {self.net.max_prompt_tokens} tokens")
                continue
            rewards = list(value)
            self.verified_groups += 1
            if any(abs(a - b) > REWARD_TOLERANCE for a, b in zip(rewards, wg.rewards)):
                self.trust.reject("reward_mismatch", peer, f"claimed {wg.rewards[:4]} verified {rewards[:4]}")
                return None
            group = Group(spec, list(wg.completions), rewards, peer, payload.round, payload.policy_version,
                          payload.model, [list(x) for x in wg.logprobs] if wg.logprobs is not None else None,
                          wg.tokenizer_sha256)
            key = content_digest(group.content_key())
            if key in self._own_content:  # our own group, republished under another peer's ID
                self.trust.reject("own_group", peer)
                continue
            if key in self._seen_content:
                self.trust.reject("duplicate", peer)
                continue
            self._seen_content.add(key)
            groups.append(group)
        if groups:
            self.accepted_by_peer[peer] += len(groups)
            self.accepted_total += len(groups)
        return groups
