"""The merge section: merging weights or averaging gradients with same-model peers (`MergeConfig`)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from swarm_node.config.base import Section


class MergeConfig(Section):
    """Merging weights or averaging gradients with peers that run the same model (docs/merging.md).

    Only peers whose model fingerprint (architecture, parameter names, shapes and dtypes) matches meet in an
    averaging group; all peers keep sharing rollouts whatever their model.
    """

    merge_mode: Literal["off", "params", "diloco", "grad"] = Field(
        "off",
        description="`off`: no merging. `params`: on schedule, replace the weights with the group mean. `diloco`: "
        "on schedule, average pseudo-gradients (weights at the last sync minus weights now) and take an outer "
        "Nesterov step (DiLoCo). `grad`: hivemind.Optimizer averages gradients every grad_target_batch_size "
        "samples so the group trains one model.",
    )
    merge_schedule: Literal["every_k", "late", "off"] = Field(
        "every_k",
        description="When params/diloco merges happen. `every_k`: after merge_every_rounds rounds since the last "
        "merge, and whenever same-model peers are merging as a round ends. `late`: the same "
        "number of merges (rounds // merge_every_rounds) placed more densely toward the end of the run, the last "
        "one in the final round (needs --rounds). `off`: never merge, but still load the group's state at start.",
    )
    merge_every_rounds: int = Field(
        5, ge=1, description="K: merge every K rounds (every_k); for `late`, rounds // K is the number of merges."
    )
    merge_compression: Literal["none", "fp16", "8bit"] = Field(
        "fp16",
        description="Compression of averaged tensors on the wire: `none` (exact to float32 rounding), `fp16` (half "
        "the bytes, about 3e-4 relative error per value), `8bit` (hivemind's uniform 8-bit quantization, a quarter "
        "of the bytes, with swarm-node's fix for numpy >= 2.4; about 1.5% of a part's standard deviation per value "
        "and more for outliers, so meant for diloco's pseudo-gradients rather than params' absolute weights).",
    )
    merge_min_group_size: int = Field(
        2, ge=2, description="Smallest averaging group (this node included); with fewer peers the merge is skipped."
    )
    merge_target_group_size: int = Field(
        0, ge=0, description="A group starts averaging as soon as it has this many peers; 0 means no limit (groups "
        "form when the matchmaking window closes). Keep it >= the number of same-model peers: hivemind 1.1.12 "
        "splits larger swarms unreliably. The local swarm launcher sets it to --nodes.",
    )
    merge_matchmaking_timeout_s: float = Field(
        20.0, gt=0, description="How long a merge waits for same-model peers to form a group, seconds. Peers that "
        "end a round within it join (a group of merge_target_group_size peers starts at once)."
    )
    merge_allreduce_timeout_s: float = Field(
        60.0, gt=0, description="Deadline for the all-reduce once a group has formed, seconds; a peer silent for a "
        "sixth of it is dropped from the round."
    )
    merge_state_load_timeout_s: float = Field(
        60.0, gt=0, description="Deadline for downloading the group's state from a peer (late join, restart, "
        "repair), seconds."
    )
    merge_optimizer_state: Literal["keep", "reset", "average"] = Field(
        "keep",
        description="What a params/diloco merge does to the local AdamW state. `keep`: leave it (DiLoCo's choice). "
        "`reset`: clear it after every applied merge. `average`: average the AdamW moments with the group too "
        "(three times the traffic).",
    )
    merge_aggregation: Literal["mean", "centered_clip"] = Field(
        "mean",
        description="params/diloco: what each reducer computes from the group's parts. `mean`: hivemind's plain "
        "mean, verified exactly by the members' checksums. `centered_clip`: CenteredClip (Karimireddy et al. 2021; "
        "Gorbunov et al. 2022) with a radius of twice the parts' median spread, so one far-away member is clipped; "
        "equal to the mean when nobody is far off, checked by the trust region instead of exact checksums "
        "(docs/merging.md). Part of the group key.",
    )
    merge_trust_factor: float = Field(
        4.0, gt=0, description="Trust region of a merge: a merge result or a repair's downloaded state is adopted only "
        "if it is finite and its L2 distance from this node's own weights (params) or pseudo-gradient (diloco) is at "
        "most this factor times the node's largest own update since a merge over its last 8 merges (docs/merging.md).",
    )
    merge_trust_min_rel: float = Field(
        0.01, ge=0, description="Floor of the merge trust region, relative to the L2 norm of the node's weights at its "
        "last merge (what a node that has not trained since may still accept).",
    )
    diloco_outer_lr: float = Field(0.7, gt=0, description="DiLoCo outer learning rate (0.7 in the DiLoCo paper).")
    diloco_outer_momentum: float = Field(
        0.9, ge=0, lt=1, description="DiLoCo outer Nesterov momentum (0.9 in the DiLoCo paper)."
    )
    grad_target_batch_size: int = Field(
        64, ge=1, description="grad mode: sequences the whole group accumulates before one shared optimizer step."
    )
