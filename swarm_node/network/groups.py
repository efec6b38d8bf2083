"""Conversion between the `Group` the learning layer uses and the `WireGroup` peers exchange (network/wire.py)."""

from __future__ import annotations

from swarm_node.learning.sapo import Group
from swarm_node.learning.tasks import TaskSpec
from swarm_node.network import wire


def group_to_wire(group: Group) -> wire.WireGroup:
    """A local group as sent to peers (rewards as floats, log-probs within the wire limits)."""
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


def group_from_wire(payload: wire.RolloutPayload, i: int, spec: TaskSpec, rewards: list[float]) -> Group:
    """Group `i` of a payload with the locally verified `rewards` (never the peer's claim)."""
    wg = payload.groups[i]
    return Group(spec, list(wg.completions), rewards, payload.peer_id, payload.round, payload.policy_version,
                 payload.model, [list(x) for x in wg.logprobs] if wg.logprobs is not None else None,
                 wg.tokenizer_sha256)


def payload_of(groups: list[Group], peer_id: str, round_: int, policy_version: int, model: str) -> wire.RolloutPayload:
    """The rollout payload a node publishes for one round: its groups, stamped with its identity and policy."""
    return wire.RolloutPayload(version=wire.PROTOCOL_VERSION, peer_id=peer_id, round=round_,
                               policy_version=policy_version, model=model, groups=[group_to_wire(g) for g in groups])
