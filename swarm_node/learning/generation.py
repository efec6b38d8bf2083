"""Batched sampling of L completions per question."""

from __future__ import annotations

import contextlib
import dataclasses

import torch

from swarm_node.learning.models import Policy


@dataclasses.dataclass
class Generated:
    """Completions for a batch of prompts: `completions[i]` holds the L texts of prompt i."""

    completions: list[list[str]]
    num_tokens: int


def autocast(policy: Policy):
    """bf16 autocast context when the policy runs in bf16, else a no-op."""
    if policy.autocast_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(policy.device.type, dtype=policy.autocast_dtype)


@torch.no_grad()
def generate(policy: Policy, prompts: list[str], num_completions: int, max_new_tokens: int,
             temperature: float) -> Generated:
    """Sample `num_completions` completions for every prompt in one batched `generate` call.

    Args:
        prompts: P chat-formatted prompt strings (generation prompt already appended).
        num_completions: L samples per prompt (pure sampling: top_k=0, top_p=1).
        max_new_tokens: cap on new tokens per completion.
        temperature: sampling temperature.

    Returns:
        Generated with P lists of L decoded texts (special tokens stripped) and the number of new tokens
        generated (padding after EOS excluded).
    """
    tok = policy.tokenizer
    batch = tok(prompts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
    batch = {k: v.to(policy.device) for k, v in batch.items()}
    model = policy.model
    was_training = model.training
    model.eval()
    with autocast(policy):
        out = model.generate(
            **batch,
            do_sample=True,
            temperature=temperature,
            top_k=0,
            top_p=1.0,
            max_new_tokens=max_new_tokens,
            num_return_sequences=num_completions,
            pad_token_id=tok.pad_token_id,
        )  # (P * L, prompt_len + new)
    model.train(was_training)
    new = out[:, batch["input_ids"].shape[1]:]  # (P * L, new)
    eos = tok.eos_token_id
    finished = (new == eos).cumsum(dim=1)  # tokens after the first EOS are padding
    num_tokens = int(((finished == 0) | ((finished == 1) & (new == eos))).sum())
    texts = tok.batch_decode(new, skip_special_tokens=True)
    return Generated([texts[i * num_completions:(i + 1) * num_completions] for i in range(len(prompts))], num_tokens)
