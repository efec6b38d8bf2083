"""State sharing of a weight merger: what a peer serves, and loading the state a majority of donors agree on.

`StateSharing` is a mixin of `weights.WeightMerger` (it uses the merger's anchor, momentum, registry, averager,
trust region and counters). Donors are chosen by evidence, never by a peer's claimed level or priority: up to
MAX_DONORS members of the signed registry send their state's checksums (`MergeStateInfo`, the first message of
their state stream), and a state is downloaded only when at least two donors and more than half of those that
answered agree on it (guard.agreeing_states). protocols/PROTOCOL.md (merge section) specifies the rule.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from swarm_node.network import wire
from swarm_node.network.merging import checksum, guard

log = logging.getLogger("swarm_node.network.merging.weights")

MAX_DONORS = 5  # donors asked for their state's checksums before a download


class _RoundFailed(Exception):
    """A merge round or state that cannot be applied: `reason` is a countable code, `peers` the peer IDs
    (bytes) it is blamed on (empty when it cannot be attributed, e.g. a checksum or trust-region failure)."""

    def __init__(self, reason: str, detail: str = "", peers: list[bytes] | None = None):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.peers = reason, list(peers or [])


class StateSharing:
    """Mixin: serving this node's state and adopting the group's (see the module docstring)."""

    def state_dict(self) -> dict[str, Any]:
        """The merger's own state, for the node's checkpoint: the anchor (weights at the last verified merge,
        CPU fp32, one tensor per merged parameter), the DiLoCo outer momentum (same shapes; empty in params
        mode) and the merge level. Without it a restart with no peers online would silently reset DiLoCo's
        momentum and re-anchor on the current weights (DiLoCo, arXiv 2311.08455, Algorithm 1: the outer state
        persists across outer steps)."""
        with self._lock:
            return {"format": 1, "mode": self.mode, "fingerprint": self.fingerprint, "level": self.level,
                    "anchor": [a.clone() for a in self.anchor], "momentum": [m.clone() for m in self.momentum]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` saved. Raises ValueError when it belongs to another merge mode or model
        (fingerprint) or its tensors do not fit; the merger is then unchanged."""
        if state.get("mode") != self.mode or state.get("fingerprint") != self.fingerprint:
            raise ValueError(f"merger state of mode {state.get('mode')!r} and model {str(state.get('fingerprint'))[:12]}"
                             f" does not fit mode {self.mode!r} and model {self.fingerprint[:12]}")
        anchor, momentum = list(state["anchor"]), list(state["momentum"])
        if len(anchor) != len(self.anchor) or len(momentum) != len(self.momentum) or any(
                a.shape != b.shape for a, b in zip(anchor + momentum, self.anchor + self.momentum)):
            raise ValueError("merger state tensors do not fit this model")
        with self._lock, torch.no_grad():
            for dst, src in zip(self.anchor + self.momentum, anchor + momentum):
                dst.copy_(src)
            self.level = min(max(0, int(state["level"])), wire.MAX_MERGE_LEVEL)
        self._restored = True
        self._set_priority()
        self.registry.announce(self.level)

    def load_state(self, own_weights_as_anchor: bool = True, require_newer: bool = False) -> bool:
        """Download the state that a majority of the online members agree on, check it and adopt it.

        Donors are the verified members of the signed registry (never a peer's own claim of level or priority):
        up to MAX_DONORS of them send their state's checksums, and a state is downloaded only when at least two
        donors and more than half of those that answered agree on it (guard.agreeing_states); the tensors must
        then match the checksums exactly. One peer alone is never believed, so a late joiner whose only donor is
        hostile starts from its own weights. Called before the first round (late join, restart) and by repairs.
        A repair (`require_newer`) also requires the state to be newer (majority level above ours) and within
        the trust region of our own weights. Returns False when nothing was adopted; then, if
        `own_weights_as_anchor` (start-up), the node's own weights become its anchor."""
        adopted = self._load_agreed_state(repair=require_newer)
        if not adopted and own_weights_as_anchor:
            with self._lock, torch.no_grad():  # nobody to learn from: our own weights are the reference
                for a, p in zip(self.anchor, self.params):
                    a.copy_(p.detach())
            log.info("no state that a majority of peers agree on: starting from this node's own weights")
        return adopted

    def _load_agreed_state(self, repair: bool) -> bool:
        members = self.registry.members() or []
        donors = [m.peer_id for m in members if not self.strikes.banned(m.peer_id.encode())][:MAX_DONORS]
        if not donors:
            return False
        timeout = self.config.merge_state_load_timeout_s
        try:
            raw = self.averager.fetch_state_infos(donors, timeout=min(timeout, 3 * self.dht_timeout_s))
        except Exception as e:
            log.warning("asking peers for their state failed (%r)", e)
            return False
        infos = {}
        for peer, metadata in raw.items():
            try:
                infos[peer] = self._check_info(metadata)
            except _RoundFailed as e:
                self._reject([peer.encode()], "bad_state_info", f"{peer}: {e}")
        scale = checksum.norms(self.anchor + self.momentum, self.state_groups)
        agreeing = guard.agreeing_states(infos, scale, self.config.merge_compression)
        if not agreeing:
            if infos:
                self.stats.reject("no_state_majority")
                log.info("no state that a majority of %d donors agree on: not loading one", len(infos))
            return False
        level = guard.lower_median([infos[p].merges for p in agreeing])
        if repair and level <= self.level:
            log.info("the group's agreed state is no newer than this node's (level %d): keeping own weights",
                     self.level)
            return False
        reference = infos[agreeing[0]]
        for peer in agreeing[:2]:  # a donor that fails to deliver what the majority agreed on is skipped
            got = self.averager.download_state(peer, timeout=timeout)
            if got is None:
                continue
            metadata, tensors = got
            try:
                info = self._check_state(metadata, tensors)
                if checksum.mismatch(info.sums, reference.sums, scale, self.config.merge_compression) > 1.0:
                    raise _RoundFailed("state differs from the one the majority agreed on")
                if repair:
                    self._check_trust(tensors[: len(self.anchor)], [p.detach() for p in self.params])
            except _RoundFailed as e:
                self._reject([peer.encode()], e.reason, f"{peer}: {e}")
                continue
            self._adopt(tensors, level)
            log.info("loaded the state %d of %d donors agree on (merge level %d)", len(agreeing), len(infos), level)
            return True
        return False

    def _adopt(self, tensors: list[torch.Tensor], level: int) -> None:
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
        self.level = min(level, wire.MAX_MERGE_LEVEL)
        self.stats.state_loads += 1
        self._set_priority()

    def _shared_state(self) -> tuple[bytes, list[torch.Tensor]]:
        """What a downloading peer gets: the anchor (+ DiLoCo momentum) and its checksums. Any thread."""
        with self._lock:
            tensors = [t.clone() for t in self.anchor + self.momentum]
        info = wire.MergeStateInfo(version=wire.PROTOCOL_VERSION, mode=self.mode, fingerprint=self.fingerprint,
                                   merges=min(self.level, wire.MAX_MERGE_LEVEL),
                                   sums=checksum.checksums(tensors, self.state_groups))
        return wire.encode(info), tensors

    def _check_info(self, metadata: Any) -> wire.MergeStateInfo:
        if not isinstance(metadata, bytes):
            raise _RoundFailed("bad_state_info", "metadata is not bytes")
        try:
            info = wire.decode_merge_state_info(metadata)
        except wire.WireError as e:
            raise _RoundFailed("bad_state_info", f"bad metadata ({e})") from None
        if info.fingerprint != self.fingerprint or info.mode != self.mode:
            raise _RoundFailed("bad_state_info", "state of another model or mode")
        if len(info.sums) != 2 * len(self.state_groups):
            raise _RoundFailed("bad_state_info", f"{len(info.sums)} checksums, expected {2 * len(self.state_groups)}")
        return info

    def _check_state(self, metadata: Any, tensors: list[torch.Tensor]) -> wire.MergeStateInfo:
        info = self._check_info(metadata)
        ours = self.anchor + self.momentum
        if len(tensors) != len(ours) or any(t.shape != o.shape or t.dtype != o.dtype for t, o in zip(tensors, ours)):
            raise _RoundFailed("bad_state", "tensor shapes differ from this model's")
        if not all(torch.isfinite(t).all() for t in tensors):
            raise _RoundFailed("non_finite", "state holds non-finite values")
        worst = checksum.mismatch(checksum.checksums(tensors, self.state_groups), info.sums,
                                  checksum.norms(tensors, self.state_groups), "none")
        if not worst <= 1.0:
            raise _RoundFailed("bad_state", f"state does not match its checksums ({worst:.1f}x the tolerance)")
        return info

