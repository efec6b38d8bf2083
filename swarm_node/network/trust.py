"""Trust logic: rejection counting by reason and per-peer strikes with a cooldown ban.

Only *protocol violations* count against a peer: data an honest peer running this protocol never sends
(a payload that fails to decode, breaks a limit, mismatches its manifest or hash, carries a task spec that
cannot be re-created, or claims rewards that the verifier disagrees with). Slowness, timeouts and
unreachability are normal churn and never count, so an honest but slow peer is never banned. A peer that
reaches `ban_strikes` violations is ignored for `ban_cooldown_s`; the ban is logged once with its reason.
"""

from __future__ import annotations

import logging
import time
from collections import Counter

from swarm_node.network.peermaps import PeerCounter, PeerCounters, PeerMap

log = logging.getLogger(__name__)

# Reasons that prove the sender broke the protocol (attributable, never produced by an honest peer).
VIOLATIONS = frozenset({
    "malformed", "schema", "version", "too_large", "hash_mismatch", "size_mismatch", "manifest_mismatch",
    "bad_task_spec", "reward_mismatch", "owner_mismatch", "over_limit",
    # an unexpected exception while handling the peer's data: contained, and struck, since fresh keys make a
    # crash trigger free to repeat
    "internal_error",
    # a task spec over the cost limits (network/verify.py): repeatable for free with fresh keys
    "spec_not_allowed", "prompt_too_long", "verify_timeout", "verify_memory",
})


class PeerTrust:
    """Counts rejections by reason and bans peers that keep violating the protocol.

    Args:
        ban_strikes: violations after which a peer is banned.
        ban_cooldown_s: how long a ban lasts, seconds; the strike count restarts afterwards.
        clock: monotonic clock (seconds), injectable for tests.
        max_peers: most peers whose counts, strikes and bans are remembered (least recently touched go first).
        ttl_s: how long a peer's per-peer counts and strikes are remembered after its last rejection, seconds.

    Per-peer state is bounded (swarm_node/network/peermaps.py): a Sybil flood of fresh peer IDs cannot grow it.
    """

    def __init__(self, ban_strikes: int = 3, ban_cooldown_s: float = 600.0, clock=time.monotonic,
                 max_peers: int = 4096, ttl_s: float = 1200.0):
        self.ban_strikes, self.ban_cooldown_s, self._clock = ban_strikes, ban_cooldown_s, clock
        self.rejects: Counter[str] = Counter()  # by reason only: bounded by the set of reasons
        self.rejects_by_peer = PeerCounters(max_peers, ttl_s, clock)
        self._strikes = PeerCounter(max_peers, ttl_s, clock)
        self._banned_until = PeerMap(max_peers, max(ban_cooldown_s, 1.0), clock)

    def reject(self, reason: str, peer_id: str | None = None, detail: str = "") -> None:
        """Count one rejection; a violation by a known peer adds a strike and may ban it."""
        self.rejects[reason] += 1
        if peer_id is None:
            return
        self.rejects_by_peer[peer_id][reason] += 1
        if reason not in VIOLATIONS or self.is_banned(peer_id):
            return
        self._strikes[peer_id] += 1
        if self._strikes[peer_id] >= self.ban_strikes:
            self._banned_until[peer_id] = self._clock() + self.ban_cooldown_s
            self._strikes[peer_id] = 0
            log.warning("ignoring peer %s for %.0f s: %d protocol violations, last %s %s", peer_id,
                        self.ban_cooldown_s, self.ban_strikes, reason, detail[:120])

    def is_banned(self, peer_id: str) -> bool:
        until = self._banned_until.get(peer_id)
        if until is None:
            return False
        if self._clock() >= until:
            self._banned_until.pop(peer_id, None)
            return False
        return True

    @property
    def banned_peers(self) -> list[str]:
        return [p for p in list(self._banned_until) if self.is_banned(p)]
