"""Which new manifests a node fetches: seen-before, back-off, bans, the flood cap and the sampled admission.

`Admission` keeps the collector's per-peer memory of what each peer gave it (delivered valid data before, failed,
was tried, was slow) and decides, each cycle, which of the new manifests are fetched:

- a manifest already fetched or skipped (same peer, round and payload hash) is not new;
- a peer whose fetch is in flight, or who is in back-off after slow fetches, waits (its manifest stays unseen);
- banned peers are skipped (`banned_peer`);
- over `max_manifests_per_round`, known-good peers come first, then the least failed and least tried, ties at
  random; the rest are counted once each as `flood`, so a Sybil flood delays newcomers but cannot starve
  known-good peers;
- of those, at most the cycle's budget are drawn by `sampling.choose_fetches`: known-good peers weighted by
  usefulness / (1 + failures), with a share of slots for random newcomers.

Every map is bounded (network/peermaps.py): fresh peer IDs are free, forgetting one is always safe.
"""

from __future__ import annotations

import random
import time
from typing import Callable

from swarm_node.network import wire
from swarm_node.network.peermaps import BoundedSet, PeerCounter, PeerMap, manifest_digest
from swarm_node.network.sampling import choose_fetches
from swarm_node.network.trust import PeerTrust

MAX_BACKOFF_S = 120.0  # longest a repeatedly slow peer waits before its next fetch


class Admission:
    """Per-peer admission state and the admission decision of one collection cycle.

    Args:
        trust: the node's rejection counts and bans (`banned_peer` and `flood` are counted there).
        rng: random source for tie-breaking and the newcomers' share.
        max_manifests_per_round: most new manifests considered per cycle (the rest count as `flood`).
        explore_share: share of fetch slots kept for peers not yet known to be good.
        collect_interval_s: the collection interval, seconds; back-off after n slow fetches is 2^n of it.
        max_peers: most peers remembered per map; peer_ttl_s: how long, seconds.
        max_records: most manifest digests remembered; record_ttl_s: how long, seconds.
    """

    def __init__(self, trust: PeerTrust, rng: random.Random, max_manifests_per_round: int, explore_share: float,
                 collect_interval_s: float, max_peers: int, peer_ttl_s: float, max_records: int, record_ttl_s: float):
        self.trust, self.rng = trust, rng
        self.max_manifests_per_round, self.explore_share = max_manifests_per_round, explore_share
        self.collect_interval_s = collect_interval_s
        self.seen_manifests = BoundedSet(max_records, record_ttl_s)  # manifest_digest of those fetched or skipped
        self.flood_counted = BoundedSet(max_records, record_ttl_s)
        self.good_peers = PeerMap(max_peers, peer_ttl_s)  # peers that delivered a valid payload before
        self.failures = PeerCounter(max_peers, peer_ttl_s)  # fetches or payloads of a peer that gave us nothing
        self.tries = PeerCounter(max_peers, peer_ttl_s)  # fetches attempted per peer
        self.timeouts = PeerCounter(max_peers, peer_ttl_s)  # consecutive slow fetches per peer (back-off exponent)
        self.backoff_until = PeerMap(max_peers, MAX_BACKOFF_S)  # peer -> monotonic time before which it waits

    def prune(self) -> None:
        self.seen_manifests.prune()
        self.flood_counted.prune()

    def is_new(self, m: wire.Manifest) -> bool:
        return manifest_digest(m) not in self.seen_manifests

    def mark_seen(self, m: wire.Manifest) -> None:
        self.seen_manifests.add(manifest_digest(m))

    def in_backoff(self, peer_id: str, now: float | None = None) -> bool:
        return self.backoff_until.get(peer_id, 0.0) > (time.monotonic() if now is None else now)

    def admit(self, manifests: list[wire.Manifest], budget: int,
              peer_weight: Callable[[str], float] | None = None) -> list[wire.Manifest]:
        """Skip banned peers, cap the cycle at `max_manifests_per_round` (the rest: `flood`, counted once), and
        draw at most `budget` manifests. Manifests not admitted stay unseen, so a later cycle may admit them."""
        live = []
        for m in manifests:
            if self.trust.is_banned(m.peer_id):
                self.mark_seen(m)
                self.trust.reject("banned_peer", None)
            else:
                live.append(m)
        cap = self.max_manifests_per_round
        if len(live) > cap:
            live.sort(key=lambda m: (m.peer_id not in self.good_peers, self.failures[m.peer_id],
                                     self.tries[m.peer_id], self.rng.random()))
            for m in live[cap:]:
                key = manifest_digest(m)
                if key not in self.flood_counted:
                    self.flood_counted.add(key)
                    self.trust.reject("flood", None)
            live = live[:cap]
        weight = peer_weight or (lambda peer_id: 1.0)
        admitted = choose_fetches(live, max(0, budget), self.rng, lambda m: m.peer_id,
                                  lambda peer_id: peer_id in self.good_peers,
                                  lambda peer_id: weight(peer_id) / (1 + self.failures[peer_id]),
                                  self.explore_share)
        for m in admitted:
            self.mark_seen(m)
            self.tries[m.peer_id] += 1
        return admitted

    def delivered(self, peer_id: str) -> None:
        """A peer's payload yielded verified groups: it is known-good, and its back-off ends."""
        self.good_peers[peer_id] = True
        self.timeouts.pop(peer_id, None)
        self.backoff_until.pop(peer_id, None)

    def failed(self, peer_id: str) -> None:
        """A fetch or payload of this peer gave us nothing."""
        self.failures[peer_id] += 1

    def slow(self, peer_id: str) -> None:
        """A fetch timed out or the peer was unreachable: churn, never a strike, but the peer waits
        collect_interval_s * 2^(slow fetches in a row), at most MAX_BACKOFF_S, before its next fetch."""
        self.timeouts[peer_id] += 1
        delay_s = min(MAX_BACKOFF_S, self.collect_interval_s * 2 ** self.timeouts[peer_id])
        self.backoff_until[peer_id] = time.monotonic() + delay_s
