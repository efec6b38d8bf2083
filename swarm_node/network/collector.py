"""The trust boundary: collecting peers' groups, verifying every value, and pooling what survives.

For each peer's latest manifest that is fresh on the DHT clock, the collector fetches the payload (bounded
in time and bytes), enforces the node's limits, re-creates every question from its task spec and re-scores every
completion with the local verifier, drops groups whose claimed rewards disagree with the verifier, and
dedupes groups by content (a group re-published or copied from another peer counts once). Every drop is
counted by reason in `PeerTrust`, which bans peers that keep violating the protocol. Nothing from a peer
reaches the trainer unverified, and no peer error escapes as an exception.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
import time
from collections import Counter
from typing import Callable

from swarm_node.config import NetworkConfig, TrainConfig
from swarm_node.learning.sapo import Group, select_external
from swarm_node.learning.tasks import RG_VERSION, TaskError, TaskSpec, recreate, score
from hivemind.utils import get_dht_time

from swarm_node.network import wire
from swarm_node.network.exchange import FetchError, RolloutExchange
from swarm_node.network.trust import PeerTrust

log = logging.getLogger(__name__)
REWARD_TOLERANCE = 1e-6


@dataclasses.dataclass
class Collected:
    """Result of one round's collection."""

    groups: list[Group]  # the J (or fewer) sampled external groups
    available: int  # usable groups in the pool before sampling
    peers_seen: int  # distinct peers with a valid manifest in the window
    wait_s: float = 0.0  # time spent idle, waiting for peers' next round (not swarm work)


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


class ExpiringSet:
    """A set whose members are forgotten `ttl_s` after they were added, so long runs use bounded memory.

    The collector's ttl is twice `max_staleness_s`: anything older is rejected as stale anyway.
    """

    def __init__(self, ttl_s: float):
        self.ttl_s = ttl_s
        self._added: dict = {}

    def add(self, item) -> None:
        self._added.setdefault(item, time.monotonic())

    def __contains__(self, item) -> bool:
        return item in self._added

    def __len__(self) -> int:
        return len(self._added)

    def prune(self) -> None:
        horizon = time.monotonic() - self.ttl_s
        self._added = {k: t for k, t in self._added.items() if t >= horizon}


QUIET_MARGIN_S = 5.0  # see Collector._quiet


class Collector:
    """Owns the external-group pool of one node.

    Args:
        exchange: the node's rollout exchange.
        network: network config (freshness, limits, timeouts, bans).
        train: train config (J, zero-advantage filter).
        rng: random source for sampling J groups.
        invalid_signatures: callable returning the DHT validator's running count of bad signatures.
    """

    def __init__(self, exchange: RolloutExchange, network: NetworkConfig, train: TrainConfig, rng: random.Random,
                 invalid_signatures: Callable[[], int] = lambda: 0):
        self.exchange, self.net, self.train, self.rng = exchange, network, train, rng
        self.trust = PeerTrust(network.ban_strikes, network.ban_cooldown_s)
        self._invalid_signatures = invalid_signatures
        self._signatures_counted = 0
        self.peer_weight = None  # per-peer usefulness (learning/selection.PeerUsefulness), set by the node
        self._pool: dict[tuple[str, int], tuple[float, list[Group]]] = {}  # (peer, round) -> (received_at, groups)
        ttl_s = 2 * network.max_staleness_s
        self._seen_manifests = ExpiringSet(ttl_s)  # (peer, round, sha256) fetched or skipped
        self._flood_counted = ExpiringSet(ttl_s)
        self._announced_at: dict[tuple[str, int], float] = {}  # of the payloads fetched in the current poll
        self._seen_bad_records = ExpiringSet(ttl_s)
        self._seen_content = ExpiringSet(ttl_s)  # group content keys, for dedupe
        self._good_peers: set[str] = set()  # peers that delivered a valid payload before
        self._failures: Counter[str] = Counter()  # fetches or payloads of a peer that gave us nothing
        self._tries: Counter[str] = Counter()  # fetches attempted per peer
        self._last_seen: set[str] = set()  # peers with a fresh manifest in the previous collect call
        self._published_at: dict[str, list[float]] = {}  # peer -> creation times (DHT clock) of its last 2 rounds
        self.peers_announced: set[str] = set()  # every peer with a valid manifest seen so far
        self._used = ExpiringSet(ttl_s)  # content keys of groups already trained on
        self.verify_s = 0.0
        self.verified_groups = 0
        self.accepted_by_peer: Counter[str] = Counter()  # groups that passed verification, per peer ID

    async def collect(self, r: int, stopping: Callable[[], bool]) -> Collected:
        """Gather verified groups from peers' latest manifests, then sample J.

        Waits (polling every 0.5 s) until J usable groups are pooled, or every connected peer with a fresh manifest
        (in this call or the previous one) has published something new during this call, or no peer is connected,
        or `collect_timeout_s` passes. A peer that has gone quiet (see `_quiet`: it finished its rounds and only
        serves, or stalled) is not waited for. Remembering the previous call's peers keeps a DHT read that briefly misses
        a peer's record (a timeout on a loaded machine) from ending the wait early.
        """
        horizon = time.monotonic() - self.net.max_staleness_s
        self._pool = {k: v for k, v in self._pool.items() if v[0] >= horizon}
        for seen in (self._seen_manifests, self._flood_counted, self._seen_bad_records, self._seen_content, self._used):
            seen.prune()
        self._announced_at.clear()
        deadline = time.monotonic() + self.net.collect_timeout_s
        want = self.train.num_external_groups
        fetched, delivered, peers_seen = 0, set(), set()
        wait_s = 0.0
        while True:
            manifests, rejections = await self.exchange.poll()
            for rej in rejections:
                self._reject_record_once(rej.record_id, rej.reason, rej.peer_id, rej.detail)
            self._count_bad_signatures()
            self.peers_announced.update(m.peer_id for m in manifests)
            manifests = [m for m in manifests if self._is_fresh(m)]
            peers_seen.update(m.peer_id for m in manifests)
            for m in manifests:
                times = self._published_at.setdefault(m.peer_id, [])
                if not times or m.created_at_s > times[-1]:
                    times[:] = [*times[-1:], m.created_at_s]
            new = [m for m in manifests if (m.peer_id, m.round, m.payload_sha256) not in self._seen_manifests]
            for m in new:
                if m.num_groups == 0:  # a peer announcing itself ("hello"): nothing to fetch, wait for its round
                    self._seen_manifests.add((m.peer_id, m.round, m.payload_sha256))
            new = [m for m in new if m.num_groups > 0]
            fresh = self._admit(new, self.net.max_manifests_per_round - fetched)
            fetched += len(fresh)
            delivered.update(m.peer_id for m in fresh)
            if fresh:
                payloads = await asyncio.gather(*(self._fetch(m) for m in fresh))
                # verify in announcement order, so a copy published later never displaces the original
                for payload in sorted(filter(None, payloads), key=lambda p: self._announced_at[p.peer_id, p.round]):
                    self._verify_and_pool(payload)
            if want == 0 or len(self.usable()) >= want or stopping() or time.monotonic() >= deadline:
                break
            live = {info.peer_id.to_base58() for info in await self.exchange.p2p.list_peers()}
            expected = peers_seen | self._last_seen
            waiting_for = {p for p in expected if p in live and not self.trust.is_banned(p) and not self._quiet(p)}
            if not live or waiting_for <= delivered:
                break  # alone, or every live peer already delivered its newest round
            t_wait = time.monotonic()
            await asyncio.sleep(0.5)
            wait_s += time.monotonic() - t_wait
        self._last_seen = peers_seen
        usable = self.usable()
        chosen = select_external(usable, want, self.rng, self.train.filter_zero_advantage,
                                 self.train.external_selection, self.peer_weight)
        for g in chosen:
            self._used.add(g.content_key())
        return Collected(chosen, len(usable), len(peers_seen), wait_s)

    def _quiet(self, peer_id: str) -> bool:
        """Has this peer stopped publishing rounds (finished its run, or stalled)? True once its newest manifest is
        older than two of its own round periods plus QUIET_MARGIN_S; unknown periods count as active."""
        times = self._published_at.get(peer_id, [])
        if len(times) < 2:
            return False
        period_s = max(0.0, times[1] - times[0])
        return get_dht_time() - times[1] > 2 * period_s + QUIET_MARGIN_S

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

    def usable(self) -> list[Group]:
        """Verified, not yet used, not stale groups (with signal, if the zero-advantage filter is on)."""
        keep_all = not self.train.filter_zero_advantage
        return [g for _, groups in self._pool.values() for g in groups
                if (keep_all or g.has_signal) and g.content_key() not in self._used]

    def _count_bad_signatures(self) -> None:
        total = self._invalid_signatures()
        for _ in range(total - self._signatures_counted):
            self.trust.reject("bad_signature")
        self._signatures_counted = total

    def _admit(self, manifests: list[wire.Manifest], budget: int) -> list[wire.Manifest]:
        """Skip banned peers and admit at most `budget` new manifests: peers that delivered valid data before first,
        then by how often a peer failed us, then least tried first, ties broken at random.

        Manifests over the budget stay unseen, so they can be admitted in a later poll or round; each is counted
        once as `flood`. A Sybil flood therefore delays newcomers but cannot starve known-good peers.
        """
        admitted = []
        manifests = sorted(manifests, key=lambda m: (
            m.peer_id not in self._good_peers, self._failures[m.peer_id], self._tries[m.peer_id], self.rng.random()))
        for m in manifests:
            key = (m.peer_id, m.round, m.payload_sha256)
            if self.trust.is_banned(m.peer_id):
                self._seen_manifests.add(key)
                self.trust.reject("banned_peer", None)
            elif len(admitted) < budget:
                self._seen_manifests.add(key)
                self._tries[m.peer_id] += 1
                admitted.append(m)
            elif key not in self._flood_counted:
                self._flood_counted.add(key)
                self.trust.reject("flood", None)
        return admitted

    async def _fetch(self, manifest: wire.Manifest) -> wire.RolloutPayload | None:
        self._announced_at[manifest.peer_id, manifest.round] = manifest.created_at_s
        try:
            return await self.exchange.fetch(manifest, self.net.max_payload_bytes)
        except FetchError as e:
            self._failures[manifest.peer_id] += 1
            self.trust.reject(e.reason, manifest.peer_id, str(e))
            log.debug("dropped payload of %s round %d: %s", manifest.peer_id, manifest.round, e)
            return None

    def _verify_and_pool(self, payload: wire.RolloutPayload) -> None:
        t0 = time.perf_counter()
        groups = self.verify_payload(payload)
        self.verify_s += time.perf_counter() - t0
        if groups:
            self._good_peers.add(payload.peer_id)
            self._pool[(payload.peer_id, payload.round)] = (time.monotonic(), groups)
        else:
            self._failures[payload.peer_id] += 1

    def verify_payload(self, payload: wire.RolloutPayload) -> list[Group] | None:
        """Limits, re-creation, re-scoring and dedupe. Returns the surviving groups, or None if the whole payload
        is rejected (a limit broken or a reward forged: the peer is not honest, so none of its groups is used)."""
        peer = payload.peer_id
        if len(payload.groups) > self.net.max_groups_per_payload:
            self.trust.reject("over_limit", peer, f"{len(payload.groups)} groups")
            return None
        for wg in payload.groups:
            if len(wg.completions) > self.net.max_completions_per_group or any(
                    len(c) > self.net.max_completion_chars for c in wg.completions):
                self.trust.reject("over_limit", peer, "completions per group or characters per completion")
                return None
        groups = []
        for wg in payload.groups:
            spec = TaskSpec(wg.spec.dataset, dict(wg.spec.config), wg.spec.seed, wg.spec.index, wg.spec.size,
                            wg.spec.rg_version)
            if spec.rg_version != RG_VERSION:  # an honest peer on another release: useless here, not hostile
                self.trust.reject("rg_version_mismatch", peer, spec.rg_version)
                continue
            try:
                question = recreate(spec)
            except TaskError as e:
                self.trust.reject("bad_task_spec", peer, str(e))
                continue
            rewards = [score(question, c) for c in wg.completions]
            self.verified_groups += 1
            if any(abs(a - b) > REWARD_TOLERANCE for a, b in zip(rewards, wg.rewards)):
                self.trust.reject("reward_mismatch", peer, f"claimed {wg.rewards[:4]} verified {rewards[:4]}")
                return None
            group = Group(spec, list(wg.completions), rewards, peer, payload.round, payload.policy_version,
                          payload.model, [list(x) for x in wg.logprobs] if wg.logprobs is not None else None,
                          wg.tokenizer_sha256)
            key = group.content_key()
            if key in self._seen_content:
                self.trust.reject("duplicate", peer)
                continue
            self._seen_content.add(key)
            groups.append(group)
        self.accepted_by_peer[peer] += len(groups)
        return groups
