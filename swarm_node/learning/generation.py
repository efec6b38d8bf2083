"""Batched sampling of L completions per question, with the prompt's KV cache shared by its L samples.

Design (measured in benchmarks/node_speed.py): `transformers`' `generate(num_return_sequences=L)` copies every
prompt L times *before* the prefill, so it runs the (long, few-shot) prompt through the model L times and
materialises (P * L, T, vocab) prefill logits. Here each prompt is prefilled once with `logits_to_keep=1`,
its KV cache is repeated L times, and the decode loop drops finished rows from the batch. Generation runs on
a bf16 copy of the weights when the policy uses bf16 (CPUs with AMX/AVX512-bf16, CUDA), refreshed from the
fp32 training weights on every call, so autocast never re-casts the weights at every decoding step and the
samples always come from the current policy.
"""

from __future__ import annotations

import contextlib
import dataclasses

import torch

from swarm_node.learning.models import Policy


@dataclasses.dataclass
class Generated:
    """Completions for a batch of prompts: `completions[i]` holds the L texts of prompt i.

    `logprobs[i][j]` holds the generator's per-token log-probabilities of completion j of prompt i under the
    sampling distribution actually used (softmax(logits / temperature) of the bf16/fp32 inference model), one
    float per generated token including a final EOS. It is an empty list when re-tokenising the decoded text
    does not give back the sampled tokens (a non-canonical tokenisation or a special token inside the text):
    the log-probs could then not be aligned with the tokens a trainer sees, so none are claimed.
    """

    completions: list[list[str]]
    num_tokens: int
    logprobs: list[list[list[float]]] = dataclasses.field(default_factory=list)


def tokenizer_identity(tokenizer) -> str:
    """sha256 (hex) of the tokenizer's vocabulary, merges and added tokens, computed once per tokenizer object.

    Two peers whose identities match split any text into the same token ids, so a peer's per-token log-probs
    can be aligned with the receiver's own tokenisation of the completion text.
    """
    cached = getattr(tokenizer, "_swarm_identity", None)
    if cached is not None:
        return cached
    import hashlib
    import json

    merges: list[str] = []
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        model = json.loads(backend.to_str()).get("model", {})
        merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    added = sorted((t.content if hasattr(t, "content") else str(t), int(i))
                   for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items())
    blob = json.dumps({"vocab": sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1]), "merges": merges,
                       "added": added}, ensure_ascii=False, separators=(",", ":"))
    digest = hashlib.sha256(blob.encode()).hexdigest()
    try:
        tokenizer._swarm_identity = digest
    except AttributeError:
        pass
    return digest


def autocast(policy: Policy):
    """bf16 autocast context when the policy runs in bf16, else a no-op."""
    if policy.autocast_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(policy.device.type, dtype=policy.autocast_dtype)


def inference_model(policy: Policy) -> torch.nn.Module:
    """The module generation runs on: a bf16 copy of the current weights (bf16 policies) or the model itself.

    The copy is (re)filled from the training weights on every call (about 0.1 s for 135M parameters on CPU) and
    released with `release_inference_model`, so it never holds stale weights and costs no memory while training.
    """
    dtype = policy.autocast_dtype
    if dtype is None:
        return policy.model
    infer = getattr(policy, "_inference_copy", None)
    if infer is None:  # built on the meta device and filled directly in bf16: no transient fp32 copy
        with torch.device("meta"):
            infer = type(policy.model)(policy.model.config)
        infer = infer.to_empty(device=policy.device).to(dtype).eval().requires_grad_(False)
        policy._inference_copy = infer
    with torch.no_grad():
        for (name, dst), (_, src) in zip(infer.state_dict(keep_vars=True).items(),
                                         policy.model.state_dict(keep_vars=True).items()):
            dst.copy_(src)
        for name, src in policy.model.named_buffers():  # rotary frequencies etc. stay in their own dtype
            owner, _, attr = name.rpartition(".")
            getattr(infer.get_submodule(owner), attr).data = src.detach().clone()
    return infer


def release_inference_model(policy: Policy) -> None:
    """Free the bf16 inference copy (call before training to keep peak memory low)."""
    policy._inference_copy = None


def _pick(logits: torch.Tensor, temperature: float, greedy: bool,
          generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Next token per row from (B, V) logits and its log-probability under the distribution sampled from.

    Greedy: argmax, log-prob under softmax(logits). Else pure sampling at `temperature` from
    softmax(logits / temperature). Returns ((B,) token ids, (B,) float32 log-probs).
    """
    logp = torch.log_softmax(logits.float() / (1.0 if greedy else temperature), dim=-1)  # (B, V)
    nxt = logits.argmax(dim=-1) if greedy else torch.multinomial(logp.exp(), 1, generator=generator).squeeze(1)
    return nxt, logp.gather(1, nxt[:, None]).squeeze(1)


@torch.no_grad()
def generate(policy: Policy, prompts: list[str], num_completions: int, max_new_tokens: int,
             temperature: float, greedy: bool = False, generator: torch.Generator | None = None) -> Generated:
    """Sample `num_completions` completions for every prompt in one batch.

    Args:
        prompts: P chat-formatted prompt strings (generation prompt already appended).
        num_completions: L samples per prompt (pure sampling: no top-k, no top-p).
        max_new_tokens: cap on new tokens per completion.
        temperature: sampling temperature (ignored when greedy).
        greedy: argmax decoding (held-out evaluation); then use num_completions=1.
        generator: optional torch RNG for the sampling.

    Returns:
        Generated with P lists of L decoded texts (special tokens stripped) and the number of new tokens
        generated (each completion's tokens up to and including its EOS).
    """
    tok = policy.tokenizer
    enc = tok(prompts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
    device = policy.device
    input_ids, attention = enc["input_ids"].to(device), enc["attention_mask"].to(device)  # (P, T)
    model = inference_model(policy)
    was_training = model.training
    model.eval()
    from transformers import DynamicCache

    try:
        cache = DynamicCache()
        positions = (attention.cumsum(dim=1) - 1).clamp(min=0)  # (P, T): left padding shifts positions
        out = model(input_ids=input_ids, attention_mask=attention, position_ids=positions, cache=cache,
                    use_cache=True, logits_to_keep=1)
        rows = len(prompts) * num_completions
        logits = out.logits[:, -1].repeat_interleave(num_completions, dim=0)  # (P * L, V)
        cache.batch_repeat_interleave(num_completions)
        attention = attention.repeat_interleave(num_completions, dim=0)  # (P * L, T)
        next_pos = positions[:, -1:].repeat_interleave(num_completions, dim=0) + 1  # (P * L, 1)
        active = torch.arange(rows, device=device)  # original row of each row still decoding
        tokens = torch.full((rows, max_new_tokens), tok.pad_token_id, dtype=torch.long, device=device)
        token_logprobs = torch.zeros((rows, max_new_tokens), dtype=torch.float32, device=device)
        lengths = torch.zeros(rows, dtype=torch.long, device=device)
        eos = tok.eos_token_id
        for t in range(max_new_tokens):
            nxt, nxt_logp = _pick(logits, temperature, greedy, generator)  # (B,), (B,)
            tokens[active, t] = nxt
            token_logprobs[active, t] = nxt_logp
            lengths[active] += 1
            keep = nxt != eos  # (B,)
            if t == max_new_tokens - 1 or not bool(keep.any()):
                break
            if not bool(keep.all()):  # drop finished rows from the batch and the cache
                idx = keep.nonzero().squeeze(1)
                active, nxt, attention, next_pos = active[idx], nxt[idx], attention[idx], next_pos[idx]
                cache.batch_select_indices(idx)
            attention = torch.cat([attention, attention.new_ones((len(active), 1))], dim=1)
            out = model(input_ids=nxt[:, None], attention_mask=attention, position_ids=next_pos,
                        cache=cache, use_cache=True)
            next_pos = next_pos + 1
            logits = out.logits[:, -1]
    finally:
        model.train(was_training)
    texts = tok.batch_decode(tokens.cpu(), skip_special_tokens=True)
    L = num_completions
    logprobs = _aligned_logprobs(tok, texts, tokens.cpu(), lengths.cpu(), token_logprobs.cpu())
    return Generated([texts[i * L:(i + 1) * L] for i in range(len(prompts))], int(lengths.sum()),
                     [logprobs[i * L:(i + 1) * L] for i in range(len(prompts))])


def _aligned_logprobs(tok, texts: list[str], tokens: torch.Tensor, lengths: torch.Tensor,
                      token_logprobs: torch.Tensor) -> list[list[float]]:
    """Per completion, the sampled tokens' log-probs if re-tokenising its text gives back exactly the sampled
    tokens (plus a final EOS), else []: only log-probs a receiver can align with its own tokenisation are kept."""
    out = []
    for text, row, n, lp in zip(texts, tokens.tolist(), lengths.tolist(), token_logprobs.tolist()):
        sampled = row[:n]
        body = sampled[:-1] if sampled and sampled[-1] == tok.eos_token_id else sampled
        ok = tok(text, add_special_tokens=False)["input_ids"] == body
        out.append([float(x) for x in lp[:n]] if ok else [])
    return out
