"""The trust boundary: collecting peers' groups, verifying every value, and pooling what survives.

For each manifest in the node's round window the collector fetches the payload (bounded in time and
bytes), enforces the node's limits, re-creates every question from its task spec and re-scores every
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


def group_to_wire(group: Group) -> wire.WireGroup:
    s = group.spec
    return wire.WireGroup(
        spec=wire.WireTaskSpec(dataset=s.dataset, config=s.config, seed=s.seed, index=s.index, size=s.size,
                               rg_version=s.rg_version),
        completions=group.completions,
        rewards=[float(x) for x in group.rewards],
    )


class Collector:
    """Owns the external-group pool of one node.

    Args:
        exchange: the node's rollout exchange.
        network: network config (window, limits, timeouts, bans).
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
        self._pool: dict[tuple[str, int], list[Group]] = {}  # (peer ID, round) -> verified groups
        self._seen_manifests: set[tuple[str, int]] = set()
        self._flood_counted: set[tuple[str, int]] = set()
        self._announced_at: dict[tuple[str, int], float] = {}
        self._seen_bad_records: set[bytes] = set()
        self._seen_content: set = set()
        self._good_peers: set[str] = set()  # peers that delivered a valid payload before
        self._used: set[int] = set()
        self.verify_s = 0.0
        self.verified_groups = 0
        self.accepted_by_peer: Counter[str] = Counter()  # groups that passed verification, per peer ID

    def window(self, r: int) -> range:
        return range(max(1, r - self.net.max_staleness_rounds), r + self.net.max_future_rounds + 1)

    async def collect(self, r: int, stopping: Callable[[], bool]) -> Collected:
        """Gather verified groups until J usable ones are pooled, every peer seen has published round r, no peer
        is connected, or `collect_timeout_s` passes; then sample J."""
        window = self.window(r)
        self._pool = {k: v for k, v in self._pool.items() if k[1] >= window.start}
        deadline = time.monotonic() + self.net.collect_timeout_s
        latest_round: dict[str, int] = {}  # peer ID -> newest round it published in the window
        want = self.train.num_external_groups
        fetched = 0
        while True:
            manifests, rejections = await self.exchange.poll(window)
            for rej in rejections:
                if rej.record_id not in self._seen_bad_records:
                    self._seen_bad_records.add(rej.record_id)
                    self.trust.reject(rej.reason, rej.peer_id, rej.detail)
            self._count_bad_signatures()
            for m in manifests:
                latest_round[m.peer_id] = max(m.round, latest_round.get(m.peer_id, 0))
            fresh = self._admit([m for m in manifests if (m.peer_id, m.round) not in self._seen_manifests],
                                self.net.max_manifests_per_round - fetched)
            fetched += len(fresh)
            if fresh:
                payloads = await asyncio.gather(*(self._fetch(m) for m in fresh))
                # verify in announcement order, so a copy published later never displaces the original
                for payload in sorted(filter(None, payloads), key=lambda p: (p.round, self._announced_at[p.peer_id, p.round])):
                    self._verify_and_pool(payload)
            if want == 0 or len(self.usable()) >= want or stopping() or time.monotonic() >= deadline:
                break
            if latest_round and min(latest_round.values()) >= r:
                break  # every peer has published this round: nothing new will come soon
            if not await self.exchange.p2p.list_peers():  # alone: do not wait for nobody
                break
            await asyncio.sleep(0.5)
        usable = self.usable()
        chosen = select_external(usable, want, self.rng, self.train.filter_zero_advantage)
        self._used.update(id(g) for g in chosen)
        return Collected(chosen, len(usable), len(latest_round))

    def usable(self) -> list[Group]:
        """Verified, not yet used groups in the window (with signal, if the zero-advantage filter is on)."""
        keep_all = not self.train.filter_zero_advantage
        return [g for groups in self._pool.values() for g in groups
                if (keep_all or g.has_signal) and id(g) not in self._used]

    def _count_bad_signatures(self) -> None:
        total = self._invalid_signatures()
        for _ in range(total - self._signatures_counted):
            self.trust.reject("bad_signature")
        self._signatures_counted = total

    def _admit(self, manifests: list[wire.Manifest], budget: int) -> list[wire.Manifest]:
        """Skip banned peers and admit at most `budget` new manifests, peers that delivered before first.

        Manifests over the budget stay unseen, so they can be admitted in a later poll or round; each is counted
        once as `flood`. A Sybil flood therefore delays newcomers but cannot starve known-good peers.
        """
        admitted = []
        manifests = sorted(manifests, key=lambda m: (m.peer_id not in self._good_peers, self.rng.random()))
        for m in manifests:
            key = (m.peer_id, m.round)
            if self.trust.is_banned(m.peer_id):
                self._seen_manifests.add(key)
                self.trust.reject("banned_peer", None)
            elif len(admitted) < budget:
                self._seen_manifests.add(key)
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
            self.trust.reject(e.reason, manifest.peer_id, str(e))
            log.debug("dropped payload of %s round %d: %s", manifest.peer_id, manifest.round, e)
            return None

    def _verify_and_pool(self, payload: wire.RolloutPayload) -> None:
        t0 = time.perf_counter()
        groups = self.verify_payload(payload)
        self.verify_s += time.perf_counter() - t0
        if groups is not None:
            self._good_peers.add(payload.peer_id)
            self._pool[(payload.peer_id, payload.round)] = groups

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
                          payload.model)
            key = group.content_key()
            if key in self._seen_content:
                self.trust.reject("duplicate", peer)
                continue
            self._seen_content.add(key)
            groups.append(group)
        self.accepted_by_peer[peer] += len(groups)
        return groups
