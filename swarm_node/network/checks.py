"""Verification of one peer payload as pure functions: `verify(payload, limits, seen) -> (groups, rejections)`.

A payload passes three stages (docs/architecture.md, "One round", COLLECT):

1. `check_limits`, then `specs_to_rescore`: the receiver's size limits and the task-spec cost policy
   (network/verify.py), before any work. A broken size limit drops the whole payload (`over_limit`); a spec of
   another reasoning-gym release is skipped (`rg_version_mismatch`, no strike); a spec over the cost limits is
   skipped (`spec_not_allowed`).
2. `rescore` (network/verify.py): re-create each question from its spec and score every completion with the
   local verifier. The collector runs this stage in the budgeted worker process, off the event loop.
3. `judge`: the re-created prompt within `max_prompt_tokens`; claimed rewards equal to the verifier's (one
   mismatch over `REWARD_TOLERANCE` drops the whole payload: `reward_mismatch`); no copy of this node's own groups
   (`own_group`) and no content seen before (`duplicate`).

Nothing here counts, strikes or logs: each stage returns its `Rejection`s and the caller (network/collector.py)
hands them to `PeerTrust`. The only state touched is the `Seen` passed in, which remembers accepted content.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from swarm_node.learning.sapo import Group
from swarm_node.learning.tasks import RG_VERSION, SMOL_SYSTEM_PROMPT, TaskSpec, safe_repr
from swarm_node.network import wire
from swarm_node.network.exchange import Rejection
from swarm_node.network.groups import group_from_wire
from swarm_node.network.peermaps import BoundedSet, content_digest
from swarm_node.network.verify import PROMPT_BYTES_PER_TOKEN, SpecPolicy, rescore

REWARD_TOLERANCE = 1e-6  # largest difference between a claimed and a verified reward
RESCORED = frozenset({"reward_mismatch", "own_group", "duplicate"})  # rejections of groups re-scored in full


@dataclasses.dataclass(frozen=True)
class Limits:
    """What a receiver accepts in one payload (the `max_*` settings of the network section).

    Attributes:
        max_groups_per_payload, max_completions_per_group, max_completion_chars: size limits (`over_limit`).
        max_prompt_tokens: longest re-created prompt, in local tokens (`prompt_too_long`).
        spec_policy: the task-spec allow-list (network/verify.py); the default allows only `SAFE_CONFIG_RANGES`.
        system_prompt, num_fewshot: the local prompt style the question is re-created in.
        count_tokens: the local tokenizer's token count of a text; None counts UTF-8 bytes (an upper bound).
    """

    max_groups_per_payload: int
    max_completions_per_group: int
    max_completion_chars: int
    max_prompt_tokens: int
    spec_policy: SpecPolicy = dataclasses.field(default_factory=lambda: SpecPolicy({}))
    system_prompt: str = SMOL_SYSTEM_PROMPT
    num_fewshot: int = 2
    count_tokens: Callable[[str], int] | None = None

    @property
    def max_prompt_bytes(self) -> int:
        """Prompts longer than this many UTF-8 bytes are dropped in the worker without tokenising."""
        return PROMPT_BYTES_PER_TOKEN * self.max_prompt_tokens

    def prompt_fits(self, prompt: str | None) -> bool:
        """The re-created prompt's message texts within `max_prompt_tokens`: at most that many UTF-8 bytes fit
        without tokenising (a token covers at least one byte); None (over `max_prompt_bytes`) never fits."""
        if prompt is None:
            return False
        limit = self.max_prompt_tokens
        count = self.count_tokens or (lambda text: len(text.encode()))
        return len(prompt.encode()) <= limit or count(prompt) <= limit


class Seen:
    """Content digests for dedupe: this node's own published groups and every accepted group (both bounded).

    Args:
        max_entries: most digests remembered per set (least recently used go first).
        ttl_s: how long a digest is remembered, seconds.
    """

    def __init__(self, max_entries: int, ttl_s: float):
        self.own = BoundedSet(max_entries, ttl_s)
        self.accepted = BoundedSet(max_entries, ttl_s)

    def add_own(self, groups: list[Group]) -> None:
        for g in groups:
            self.own.add(content_digest(g.content_key()))

    def prune(self) -> None:
        self.own.prune()
        self.accepted.prune()


def _reject(reason: str, payload: wire.RolloutPayload, detail: str = "") -> Rejection:
    return Rejection(reason, payload.peer_id, detail)


def check_limits(payload: wire.RolloutPayload, limits: Limits) -> list[Rejection]:
    """The receiver's size limits: [] if the payload is within them, else the one `over_limit` rejection."""
    if len(payload.groups) > limits.max_groups_per_payload:
        return [_reject("over_limit", payload, f"{len(payload.groups)} groups")]
    for wg in payload.groups:
        if len(wg.completions) > limits.max_completions_per_group or any(
                len(c) > limits.max_completion_chars for c in wg.completions):
            return [_reject("over_limit", payload, "completions per group or characters per completion")]
    return []


def specs_to_rescore(payload: wire.RolloutPayload, limits: Limits) -> tuple[list[tuple[int, TaskSpec]],
                                                                             list[Rejection]]:
    """The specs worth re-creating, by group index, and the rejections of the others (another reasoning-gym
    release: `rg_version_mismatch`, not a strike; over the cost policy: `spec_not_allowed`)."""
    out, rejections = [], []
    for i, wg in enumerate(payload.groups):
        spec = TaskSpec(wg.spec.dataset, dict(wg.spec.config), wg.spec.seed, wg.spec.index, wg.spec.size,
                        wg.spec.rg_version)
        if spec.rg_version != RG_VERSION:  # an honest peer on another release: useless here, not hostile
            rejections.append(_reject("rg_version_mismatch", payload, safe_repr(spec.rg_version)))
            continue
        refused = limits.spec_policy.check(spec)  # cost bound before any work (network/verify.py)
        if refused is not None:
            rejections.append(_reject("spec_not_allowed", payload, refused))
            continue
        out.append((i, spec))
    return out, rejections


def rescore_work(payload: wire.RolloutPayload, specs: list[tuple[int, TaskSpec]]) -> list[tuple[TaskSpec, list[str]]]:
    """The (spec, completions) pairs `rescore` takes."""
    return [(spec, list(payload.groups[i].completions)) for i, spec in specs]


def judge(payload: wire.RolloutPayload, specs: list[tuple[int, TaskSpec]], results: list[tuple[str, Any, Any]],
          limits: Limits, seen: Seen) -> tuple[list[Group] | None, list[Rejection], int]:
    """Compare the `rescore` results with the payload's claims and dedupe.

    Returns (groups, rejections, verified): the surviving groups (None if a forged reward drops the whole
    payload), the rejections, and how many groups were re-scored and checked against their claims. Accepted
    groups' content is added to `seen.accepted`."""
    groups, rejections, verified = [], [], 0
    for (i, spec), (status, value, prompt) in zip(specs, results):
        if status != "ok":
            rejections.append(_reject(status, payload, str(value)))
            continue
        if not limits.prompt_fits(prompt):
            rejections.append(_reject("prompt_too_long", payload,
                                      f"{spec.dataset}: over {limits.max_prompt_tokens} tokens"))
            continue
        rewards, claimed = list(value), payload.groups[i].rewards
        verified += 1
        if any(abs(a - b) > REWARD_TOLERANCE for a, b in zip(rewards, claimed)):
            rejections.append(_reject("reward_mismatch", payload, f"claimed {claimed[:4]} verified {rewards[:4]}"))
            return None, rejections, verified
        group = group_from_wire(payload, i, spec, rewards)
        key = content_digest(group.content_key())
        if key in seen.own:  # our own group, republished under another peer's ID
            rejections.append(_reject("own_group", payload))
            continue
        if key in seen.accepted:
            rejections.append(_reject("duplicate", payload))
            continue
        seen.accepted.add(key)
        groups.append(group)
    return groups, rejections, verified


def verify(payload: wire.RolloutPayload, limits: Limits, seen: Seen) -> tuple[list[Group] | None, list[Rejection]]:
    """All three stages inline, `rescore` in this process (tests and tools; the node runs it in the worker).

    Returns (groups, rejections): the surviving groups, or None if the whole payload is rejected (a limit broken
    or a reward forged: none of its groups is used), and every rejection by reason."""
    rejections = check_limits(payload, limits)
    if rejections:
        return None, rejections
    specs, rejections = specs_to_rescore(payload, limits)
    results = rescore(rescore_work(payload, specs), limits.system_prompt, limits.num_fewshot, limits.max_prompt_bytes)
    groups, judged, _ = judge(payload, specs, results, limits, seen)
    return groups, rejections + judged
