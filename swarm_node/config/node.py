"""The whole node's config (`NodeConfig`): run-wide settings, the four sections and their cross-checks."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from swarm_node.config.base import Section
from swarm_node.config.learning import TaskConfig, TrainConfig
from swarm_node.config.merge import MergeConfig
from swarm_node.config.network import NetworkConfig


class NodeConfig(Section):
    """The whole node: where it writes, how long it runs, and its sections."""

    output_dir: str = Field(
        "runs/node", description="Directory for metrics.jsonl, node.json, checkpoints and the identity (logs go to stderr)."
    )
    rounds: int = Field(0, ge=0, description="Stop after this many rounds; 0 runs until stopped.")
    stop_deadline_s: float = Field(
        120.0, gt=0, description="After Ctrl-C or SIGTERM, the longest wait for the current phase, the checkpoint and "
        "the shutdown before the node abandons them and kills its children, seconds."
    )
    linger_s: float = Field(
        0.0, ge=0, description="After the last round, keep serving rollouts to peers for this long, seconds."
    )
    min_round_interval_s: float = Field(
        0.0, ge=0, description="Shortest time from the start of one round to the start of the next, seconds; a "
        "faster round waits out the rest while background collection goes on (logged as `pace_wait_s`). 0 never "
        "waits. For capping a node's CPU share, and for smoke tests whose tiny-model rounds finish faster than "
        "one collection cycle (the `tiny` experiment preset)."
    )
    metrics_host: str = Field("127.0.0.1", description="Address of the /metrics, /healthz and /status endpoint.")
    metrics_port: int = Field(
        0, ge=-1, le=65535, description="Port of the /metrics, /healthz and /status endpoint: 0 picks a free port "
        "(written to node.json as metrics_url), -1 turns the endpoint off."
    )
    health_stall_s: float = Field(900.0, gt=0, description="/healthz reports a stuck node after this long without a finished round, seconds.")
    checkpoint_every_rounds: int = Field(
        5, ge=0, description="Save a checkpoint every K rounds (and on a clean stop); 0 disables checkpoints and resume."
    )
    checkpoint_keep: int = Field(2, ge=1, description="Newest checkpoints kept on disk.")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="Log level.")
    log_format: Literal["text", "json"] = Field("text", description="Log lines as text or as JSON objects (for log collectors).")
    tasks: TaskConfig = Field(default_factory=TaskConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    network: NetworkConfig = Field(default_factory=NetworkConfig)
    merge: MergeConfig = Field(default_factory=MergeConfig)

    @model_validator(mode="after")
    def _cross_checks(self) -> "NodeConfig":
        if self.tasks.tasks and self.tasks.task_preset != "custom":
            raise ValueError("`tasks` is set but task_preset is not `custom`: add --task-preset custom")
        if self.tasks.task_preset == "custom" and not self.tasks.tasks:
            raise ValueError("task_preset=custom needs at least one entry in `tasks` (e.g. --tasks chain_sum)")
        if self.network.max_payload_bytes < 1024:
            raise ValueError("max_payload_bytes below 1 KiB cannot carry a single group; raise it")
        m = self.merge
        if m.merge_mode in ("params", "diloco") and m.merge_schedule == "late" and self.rounds == 0:
            raise ValueError("merge_schedule=late places merges relative to the end of the run: set --rounds, or use "
                             "--merge-schedule every_k for an open-ended run")
        if m.merge_target_group_size and m.merge_target_group_size < m.merge_min_group_size:
            raise ValueError("merge_target_group_size is below merge_min_group_size: raise it or set 0 (no limit)")
        if m.merge_mode == "grad" and self.train.steps_per_round > 1:
            raise ValueError("merge_mode=grad takes one shared optimizer step per accumulated batch: set "
                             "--steps-per-round 1")
        if m.merge_mode == "grad" and m.merge_optimizer_state != "keep":
            raise ValueError("merge_optimizer_state applies to params and diloco; in grad mode the group shares one "
                             "optimizer: leave it at keep")
        if self.train.optimizer == "adafactor" and m.merge_mode == "grad":
            raise ValueError("merge_mode=grad is tested with AdamW only (the group averages its optimizer state): "
                             "use --optimizer adamw, or merge weights with --merge-mode params or diloco")
        if self.train.optimizer == "adafactor" and m.merge_mode != "off" and m.merge_optimizer_state == "average":
            raise ValueError("merge_optimizer_state=average averages AdamW's two moments; Adafactor has none of that "
                             "shape: use --merge-optimizer-state keep or reset, or --optimizer adamw")
        return self

    @property
    def resolved_identity_path(self) -> Path:
        return Path(self.network.identity_path or Path(self.output_dir) / "identity.key")


SECTIONS = ("tasks", "train", "network", "merge")
