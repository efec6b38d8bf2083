"""One GRPO update on a SAPO training set (local plus external groups).

External completions arrive as text; they are re-tokenised with the local tokenizer under the local prompt
for the re-created question and trained exactly like local ones (SAPO section 3). A re-tokenised completion
shorter than max_new_tokens is taken to have ended on its own and gets the EOS token appended, so the
policy also learns where to stop.

Log-probs are computed only on completion tokens: the prompt of a group runs through the decoder once and
its KV cache is shared by the group's completions (with gradients through it); the completions run on it in
buckets of similar length, so a short completion is not padded to the group's longest (padding was 44% of the
completion positions; docs/benchmarks.md); then the LM head is applied only to the positions that predict real
completion tokens, so the (B, T, vocab) logits over the prompt and the padding are never materialised. With the few-shot prompts of the `smol` preset (about 180 prompt tokens, 8 completions of 10-32
tokens) that is about 5x fewer tokens through the decoder than one full sequence per completion.
"""

from __future__ import annotations

import copy
import dataclasses
from collections import Counter
from typing import Sequence

import torch
import torch.nn.functional as F

from swarm_node.learning.generation import autocast, release_inference_model, tokenizer_identity
from swarm_node.learning.grpo import clipped_policy_loss, group_advantages, tis_weights
from swarm_node.learning.offpolicy import align_logprobs, truncate_after_answer
from swarm_node.learning.models import Policy
from swarm_node.learning.settings import pick
from swarm_node.learning.sapo import Group
from swarm_node.learning.tasks import TaskSet, TaskSpec, recreate


@dataclasses.dataclass
class TokenizedSample:
    """One completion ready for the loss: prompt and completion token ids and its advantage."""

    prompt_ids: list[int]
    completion_ids: list[int]
    advantage: float
    generator_logprobs: list[float] | None = None  # aligned with completion_ids (may be shorter: rest unknown)
    same_model_external: bool = False  # checked for plausibility under the local policy
    peer_id: str = ""


@dataclasses.dataclass
class StepStats:
    """Outcome of one round's update. `loss` is None when no group carried signal (no step taken)."""

    loss: float | None
    num_sequences: int
    num_tokens: int
    grad_norm: float
    clip_fraction: float
    kl: float
    policy_version: int
    offpolicy: dict[str, float] = dataclasses.field(default_factory=dict)  # TIS / filter counts (docs/algorithm.md)
    peer_ess: dict[str, float] = dataclasses.field(default_factory=dict)  # per external peer: ESS fraction this step


@dataclasses.dataclass(frozen=True)
class TrainerSettings:
    """The settings one GRPO update reads (same names, units and meaning as the train section of
    the node config, config.py, whose defaults apply; docs/configuration.md)."""

    optimizer: str
    learning_rate: float
    max_new_tokens: int
    micro_batch_size: int
    steps_per_round: int
    advantage_eps: float
    clip_eps_low: float
    clip_eps_high: float
    kl_coef: float
    grad_clip_norm: float
    loss_normalizer: str
    off_policy_correction: str
    tis_max_ratio: float
    tis_drop_ratio: float
    external_after_answer: str
    plausibility_margin: float


def make_optimizer(params, config: TrainerSettings) -> torch.optim.Optimizer:
    """The optimizer named by `config.optimizer`, with the absolute learning rate `config.learning_rate`.

    - adamw: `torch.optim.AdamW(fused=True)`, one fused kernel per step; state 8 bytes per parameter.
    - adafactor: transformers' Adafactor (Shazeer & Stern 2018, "Adafactor: Adaptive Learning Rates with Sublinear
      Memory Cost") with `beta1=None` (no first moment), a factored second moment for matrices ((n,) + (m,)
      floats for an (n, m) weight), update clipping at RMS 1, and `relative_step=False, scale_parameter=False`
      so that `learning_rate` means what it means for AdamW (not a step relative to the weights' RMS).
    """
    if config.optimizer == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(params, lr=config.learning_rate, beta1=None, weight_decay=0.0, relative_step=False,
                         scale_parameter=False, warmup_init=False)
    return torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=0.0, fused=True)


class Trainer:
    """Owns the optimizer and the policy version counter (number of optimizer steps taken).

    Args:
        policy: the loaded policy (trained in place).
        config: `TrainerSettings`, or any object with its fields (the node's train section; learning/settings.py).
        taskset: builds the local prompt for every question.
    """

    BUCKET_OVERHEAD_POSITIONS = 16  # one more decoder call costs about this many positions (length_buckets)

    def __init__(self, policy: Policy, config, taskset: TaskSet):
        config = pick(TrainerSettings, config)
        self.policy, self.config, self.taskset = policy, config, taskset
        self.optimizer = make_optimizer(policy.model.parameters(), config)
        self.reference = None
        if config.kl_coef > 0:
            self.reference = copy.deepcopy(policy.model).eval().requires_grad_(False)
        self.policy_version = 0
        self._collaborative = False
        self.local_peer_id = ""  # set by the node: groups from other peer IDs are external

    def use_collaborative_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Step through `optimizer` (a hivemind.Optimizer wrapping this trainer's optimizer), passing each step's
        number of sequences as its batch size (merge_mode = grad)."""
        self.optimizer, self._collaborative = optimizer, True

    @property
    def base_optimizer(self) -> torch.optim.Optimizer:
        """The torch optimizer itself (inside a hivemind.Optimizer in grad mode)."""
        return getattr(self.optimizer, "opt", self.optimizer)

    def prompt_text(self, spec: TaskSpec) -> str:
        """The local chat prompt for a question (re-created from its spec; never a peer's text)."""
        question = recreate(spec)
        return self.policy.tokenizer.apply_chat_template(
            self.taskset.messages(question), tokenize=False, add_generation_prompt=True
        )

    def _sequences(self, groups: Sequence[Group], counts: Counter | None = None) -> tuple[list[TokenizedSample], int]:
        """Tokenise every completion; returns sequences with non-zero advantage and the token normaliser N.

        External groups (another peer ID) are cut after their last </answer> when `external_after_answer` is
        truncate. Generator log-probs are kept (aligned with the tokens) when `off_policy_correction` is tis and
        the group's tokenizer identity equals ours; every fallback is counted in `counts` by reason.
        """
        tok = self.policy.tokenizer
        cfg = self.config
        counts = counts if counts is not None else Counter()
        own_tokenizer = tokenizer_identity(tok)
        own_peer = self.local_peer_id
        sequences, total_tokens, signal_tokens = [], 0, 0
        for group in groups:  # peers may use another L, so groups are normalised one by one
            rewards = torch.tensor([group.rewards], dtype=torch.float32)  # (1, L)
            adv_row = group_advantages(rewards, cfg.advantage_eps)[0].tolist()  # (L,)
            prompt_ids = tok(self.prompt_text(group.spec), add_special_tokens=False)["input_ids"]
            external = group.peer_id != own_peer
            use_lp = cfg.off_policy_correction == "tis" and group.has_signal
            if use_lp and (group.logprobs is None or group.tokenizer != own_tokenizer):
                counts["groups_without_logprobs" if group.logprobs is None else "groups_tokenizer_mismatch"] += 1
                use_lp = False
            for j, (completion, adv) in enumerate(zip(group.completions, adv_row)):
                full_ids = tok(completion, add_special_tokens=False)["input_ids"]
                text = completion
                if external and cfg.external_after_answer == "truncate":
                    text = truncate_after_answer(completion)
                    if text != completion:
                        counts["completions_truncated_after_answer"] += 1
                ids = full_ids if text == completion else tok(text, add_special_tokens=False)["input_ids"]
                ids = ids[: cfg.max_new_tokens]
                ended = len(ids) < cfg.max_new_tokens
                if ended:
                    ids = ids + [tok.eos_token_id]
                total_tokens += len(ids)
                if not group.has_signal:
                    continue
                signal_tokens += len(ids)
                lp = None
                if use_lp:
                    lp = align_logprobs(group.logprobs[j] if j < len(group.logprobs) else [], full_ids, ids,
                                        eos_appended=ended)
                    counts["completions_with_logprobs" if lp is not None else "completions_logprobs_unaligned"] += 1
                sequences.append(TokenizedSample(prompt_ids, ids, adv, lp,
                                                 external and group.model == self.policy.name, group.peer_id))
        if cfg.loss_normalizer == "signal_tokens":
            return sequences, signal_tokens
        return sequences, total_tokens

    def _completion_logprobs(self, model: torch.nn.Module, batch: list[TokenizedSample]) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-probs of completion tokens for B completions of one prompt. Returns ((B, Tc) logprobs, (B, Tc) mask).

        The prompt runs through the decoder once; its KV cache is shared by the B completions, which run on top of
        it in length buckets (`length_buckets`), so that short completions are not padded to the longest one.
        Gradients flow through the shared prompt states, so this equals the full-sequence forward of each
        (prompt + completion) (tested against it), at about Tp + sum(Tc_i) instead of B * (Tp + Tc) tokens. Only
        the positions that predict real (non-padding) completion tokens go through the LM head.
        """
        from transformers import DynamicCache

        prompt = batch[0].prompt_ids
        assert all(s.prompt_ids == prompt for s in batch), "a micro-batch shares one prompt"
        device = self.policy.device
        pad = self.policy.tokenizer.pad_token_id
        B, Tp, Tc = len(batch), len(prompt), max(len(s.completion_ids) for s in batch)
        targets = torch.full((B, Tc), pad, dtype=torch.long)
        mask = torch.zeros((B, Tc))
        for i, s in enumerate(batch):
            targets[i, : len(s.completion_ids)] = torch.tensor(s.completion_ids)
            mask[i, : len(s.completion_ids)] = 1
        targets, mask = targets.to(device), mask.to(device)
        decoder = getattr(model, model.base_model_prefix)
        prompt_cache = DynamicCache()
        prompt_hidden = decoder(input_ids=torch.tensor([prompt], device=device), cache=prompt_cache,
                                use_cache=True).last_hidden_state  # (1, Tp, H)
        prompt_kv = [(layer.keys, layer.values) for layer in prompt_cache.layers]  # (1, heads, Tp, d) each
        parts, order = [], []
        for rows, Tb in self.length_buckets([len(s.completion_ids) for s in batch]):
            nb, idx = len(rows), torch.tensor(rows, device=device)
            states = prompt_hidden[:, -1:].expand(nb, 1, -1)  # (nb, 1, H): the last prompt state predicts token 0
            if Tb > 1:
                cache = DynamicCache(ddp_cache_data=[(k.expand(nb, -1, -1, -1), v.expand(nb, -1, -1, -1))
                                                     for k, v in prompt_kv])
                attention = torch.cat([torch.ones((nb, Tp), device=device), mask[idx, : Tb - 1]], dim=1).long()
                positions = torch.arange(Tp, Tp + Tb - 1, device=device).expand(nb, -1)  # (nb, Tb - 1)
                hidden = decoder(input_ids=targets[idx, : Tb - 1], attention_mask=attention, position_ids=positions,
                                 cache=cache, use_cache=True).last_hidden_state  # (nb, Tb - 1, H)
                states = torch.cat([states, hidden], dim=1)  # (nb, Tb, H)
            parts.append(F.pad(states, (0, 0, 0, Tc - Tb)))  # (nb, Tc, H)
            order += rows
        picked = torch.cat(parts)[torch.tensor(order, device=device).argsort()]  # (B, Tc, H), batch order
        real = mask.bool()  # (B, Tc)
        logits = model.get_output_embeddings()(picked[real]).float()  # (N, V), N real completion tokens
        token_logprobs = -F.cross_entropy(logits, targets[real], reduction="none")  # (N,)
        return torch.zeros((B, Tc), device=device).masked_scatter(real, token_logprobs), mask

    def length_buckets(self, lengths: list[int]) -> list[tuple[list[int], int]]:
        """Partition completion indices into buckets of similar length: [(indices, longest length), ...].

        Sorted by length, the partition minimises sum(bucket size x its longest length + BUCKET_OVERHEAD_POSITIONS)
        by dynamic programming over the n <= micro_batch_size completions: each bucket pads only to its own longest
        completion, and a bucket costs one more decoder call (about BUCKET_OVERHEAD_POSITIONS positions' worth of
        time on CPU, measured in benchmarks/node_speed.py).
        """
        order = sorted(range(len(lengths)), key=lambda i: lengths[i])
        ls = [lengths[i] for i in order]
        n, c = len(ls), self.BUCKET_OVERHEAD_POSITIONS
        best, cut = [0.0] + [float("inf")] * n, [0] * (n + 1)
        for j in range(1, n + 1):  # best[j]: cheapest partition of the j shortest
            for i in range(j):
                cost = best[i] + (j - i) * ls[j - 1] + c
                if cost < best[j]:
                    best[j], cut[j] = cost, i
        buckets, j = [], n
        while j:
            buckets.append((order[cut[j]:j], ls[j - 1]))
            j = cut[j]
        return buckets[::-1]

    def _micro_batches(self, sequences: list[TokenizedSample]) -> list[list[TokenizedSample]]:
        """Split into micro-batches of at most `micro_batch_size` completions that share one prompt. A group
        larger than a micro-batch is sorted by completion length first, so that each micro-batch pads its
        completions to a closer length (the loss is a sum over tokens: the order does not change it)."""
        runs: list[list[TokenizedSample]] = []
        for s in sequences:
            if runs and runs[-1][0].prompt_ids == s.prompt_ids:
                runs[-1].append(s)
            else:
                runs.append([s])
        size, batches = self.config.micro_batch_size, []
        for run in runs:
            if len(run) > size:
                run = sorted(run, key=lambda s: len(s.completion_ids))
            batches += [run[i:i + size] for i in range(0, len(run), size)]
        return batches

    def step(self, groups: Sequence[Group]) -> StepStats:
        """Take `steps_per_round` optimizer steps on the groups (GRPO with token-level clipped loss).

        Groups without signal (all rewards equal) have zero advantage and zero loss with kl_coef = 0; they are
        counted in the token normaliser N but not run through the model.
        """
        cfg = self.config
        model = self.policy.model
        model.train()
        release_inference_model(self.policy)  # the bf16 generation copy is rebuilt at the next generate
        counts: Counter = Counter()
        own = [x for g in groups if g.peer_id == self.local_peer_id and g.logprobs for row in g.logprobs for x in row]
        self._plausible_floor = (sum(own) / len(own) - cfg.plausibility_margin) if own else None
        sequences, total_tokens = self._sequences(groups, counts)
        if not sequences:
            return StepStats(None, 0, total_tokens, 0.0, 0.0, 0.0, self.policy_version, dict(counts))
        micro = self._micro_batches(sequences)
        old_logprobs: list[torch.Tensor | None] = [None] * len(micro)
        ref_logprobs: list[torch.Tensor | None] = [None] * len(micro)
        with torch.no_grad(), autocast(self.policy):
            for k, batch in enumerate(micro):
                if cfg.steps_per_round > 1:  # ratio != 1 after the first step: keep the behaviour policy's logprobs
                    old_logprobs[k] = self._completion_logprobs(model, batch)[0]
                if self.reference is not None:
                    ref_logprobs[k] = self._completion_logprobs(self.reference, batch)[0]
        weights: list[tuple[torch.Tensor | None, torch.Tensor | None]] = [(None, None)] * len(micro)
        peer_ess: dict[str, list[float]] = {}
        total_loss, clip_fracs, kls, grad_norm = 0.0, [], [], 0.0
        for step in range(cfg.steps_per_round):
            total_loss = 0.0
            self.optimizer.zero_grad(set_to_none=True)
            for k, batch in enumerate(micro):
                with autocast(self.policy):
                    logprobs, mask = self._completion_logprobs(model, batch)
                old = old_logprobs[k] if old_logprobs[k] is not None else logprobs.detach()
                if step == 0:  # weights and filters from the pre-step policy, computed in the same forward pass
                    weights[k] = self._filters(batch, old, mask, counts, peer_ess)
                is_w, keep = weights[k]
                advantages = torch.tensor([s.advantage for s in batch], device=logprobs.device)
                loss, stats = clipped_policy_loss(
                    logprobs, old, advantages, keep if keep is not None else mask, cfg.clip_eps_low,
                    cfg.clip_eps_high, num_tokens=total_tokens, ref_logprobs=ref_logprobs[k], kl_coef=cfg.kl_coef,
                    is_weights=is_w,
                )
                loss.backward()
                total_loss += float(loss.detach())
                clip_fracs.append(stats["clip_fraction"])
                kls.append(stats["kl"])
            grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip_norm))
            if self._collaborative:
                self.optimizer.step(batch_size=len(sequences))
            else:
                self.optimizer.step()
            self.policy_version += 1
        self.optimizer.zero_grad(set_to_none=True)
        return StepStats(total_loss, len(sequences), total_tokens, grad_norm,
                         sum(clip_fracs) / len(clip_fracs), sum(kls) / len(kls), self.policy_version,
                         {k: round(v, 4) for k, v in counts.items()},
                         {p: sum(v) / len(v) for p, v in peer_ess.items()})

    def _filters(self, batch: list[TokenizedSample], old: torch.Tensor, mask: torch.Tensor, counts: Counter,
                 peer_ess: dict[str, list[float]]) -> tuple[torch.Tensor | None, torch.Tensor]:
        """TIS weights and the keep-mask of one micro-batch: the extreme-ratio filter (grpo.tis_weights) and the
        plausibility check of same-model external completions (mean local token log-prob at least the mean of this
        round's own sampled tokens minus `plausibility_margin`)."""
        cfg = self.config
        keep = mask.clone()
        n_tok = mask.sum(dim=1).clamp(min=1)
        mean_lp = (old * mask).sum(dim=1) / n_tok  # (B,)
        floor = getattr(self, "_plausible_floor", None)
        for i, s in enumerate(batch):
            if s.same_model_external and floor is None:
                counts["completions_plausibility_unchecked"] += 1
            elif s.same_model_external and float(mean_lp[i]) < floor:
                keep[i] = 0
                counts["completions_implausible"] += 1
        if cfg.off_policy_correction != "tis" or not any(s.generator_logprobs for s in batch):
            return None, keep
        gen = torch.zeros_like(old)
        known = torch.zeros_like(mask)
        for i, s in enumerate(batch):
            if s.generator_logprobs:
                n = min(len(s.generator_logprobs), old.shape[1])
                gen[i, :n] = torch.tensor(s.generator_logprobs[:n], dtype=old.dtype)
                known[i, :n] = 1
        w, tis_keep, stats = tis_weights(old, gen, known, keep, cfg.tis_max_ratio, cfg.tis_drop_ratio)
        for key in ("tokens_truncated", "tokens_dropped", "sequences_dropped", "tokens_known"):
            counts["tis_" + key] += stats[key]
        if batch[0].peer_id != self.local_peer_id and stats["tokens_known"] > 0:
            kept = float(tis_keep.sum() / keep.sum().clamp(min=1))  # share of tokens surviving the filter
            peer_ess.setdefault(batch[0].peer_id, []).append(stats["ess_fraction"] * kept)
        return w, tis_keep
