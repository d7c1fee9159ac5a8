"""Tiny random models and an offline tokenizer for tests and benchmarks (no download).

Every table in the architecture tables has a config here (``TINY_FAMILIES``; further model types of the
same tables in ``EXTRA_FAMILIES``); ``llama_mqa`` and ``qwen2`` (GQA) and ``gpt2`` (MHA) cover the attention
variants.
"""

from __future__ import annotations

import string
import time
from collections.abc import Callable, Mapping
from typing import Any

import torch

from .models.adapter import LoadedModel

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIALS = ["<pad>", "<unk>", "<|im_start|>", "<|im_end|>"]


def tiny_tokenizer(chat_template: str | None = CHAT_TEMPLATE) -> Any:
    """A character-level fast tokenizer (about 100 tokens) with a ChatML-style template."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    chars = sorted(set(string.printable) - set("\x0b\x0c\r"))
    vocab = {tok: i for i, tok in enumerate(SPECIALS + chars)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.add_special_tokens(SPECIALS)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token="<|im_end|>", bos_token="<|im_start|>"
    )
    fast.chat_template = chat_template
    fast.padding_side = "left"
    return fast


VOCAB = 128


def _configs() -> dict[str, Any]:
    import transformers as tf

    common: dict[str, Any] = {"vocab_size": VOCAB, "max_position_embeddings": 512}
    llama_like: dict[str, Any] = {
        **common,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
    }
    # families added later pass the special token ids (their defaults lie outside the tiny vocabulary)
    new_like: dict[str, Any] = {**llama_like, "pad_token_id": 0, "bos_token_id": 2, "eos_token_id": 3, "head_dim": 8}
    return {
        "llama": lambda: tf.LlamaConfig(**llama_like),
        "llama_mqa": lambda: tf.LlamaConfig(**{**llama_like, "num_key_value_heads": 1}),
        "qwen2": lambda: tf.Qwen2Config(**llama_like),
        "mistral": lambda: tf.MistralConfig(**{**llama_like, "num_key_value_heads": 4, "sliding_window": None}),
        "gemma": lambda: tf.GemmaConfig(**llama_like, head_dim=8),
        "gemma2": lambda: tf.Gemma2Config(**llama_like, head_dim=8),
        "gemma3_text": lambda: tf.Gemma3TextConfig(**llama_like, head_dim=8),
        "phi3": lambda: tf.Phi3Config(**llama_like),
        "qwen3": lambda: tf.Qwen3Config(**new_like),
        "smollm3": lambda: tf.SmolLM3Config(**new_like),
        "ministral": lambda: tf.MinistralConfig(**new_like),
        "seed_oss": lambda: tf.SeedOssConfig(**new_like),
        "helium": lambda: tf.HeliumConfig(**new_like),
        "hunyuan_v1_dense": lambda: tf.HunYuanDenseV1Config(**new_like),
        # no input norm: the MLP reads the raw residual, so the default 0.02 init leaves its neurons at ~1e-3
        "olmo2": lambda: tf.Olmo2Config(**new_like, initializer_range=0.1),
        "olmo3": lambda: tf.Olmo3Config(**new_like, initializer_range=0.1),
        "exaone4": lambda: tf.Exaone4Config(**new_like, initializer_range=0.1),
        "glm4": lambda: tf.Glm4Config(**new_like),
        "glm": lambda: tf.GlmConfig(**new_like),
        "cohere": lambda: tf.CohereConfig(**new_like),
        "cohere2": lambda: tf.Cohere2Config(**new_like),
        "stablelm": lambda: tf.StableLmConfig(**new_like),
        "phi": lambda: tf.PhiConfig(**new_like),
        "apertus": lambda: tf.ApertusConfig(**new_like),
        "arcee": lambda: tf.ArceeConfig(**new_like),
        "gpt2": lambda: tf.GPT2Config(
            vocab_size=VOCAB, n_positions=512, n_embd=32, n_layer=3, n_head=4, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0
        ),
        "gpt_neox": lambda: tf.GPTNeoXConfig(
            vocab_size=VOCAB,
            max_position_embeddings=512,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=3,
            num_attention_heads=4,
        ),
    }


# Every site invariant (tests/test_capture.py) runs on these.
TINY_FAMILIES: tuple[str, ...] = (
    "llama", "llama_mqa", "qwen2", "mistral", "gemma", "gemma2", "gemma3_text", "phi3", "gpt2", "gpt_neox",
    "smollm3", "olmo2", "olmo3", "glm4", "cohere", "stablelm", "phi",
)
# Further model types of the tables (each once checked against every site invariant); to keep the suite fast
# only tests/test_arch_families.py runs on them (table, residual decomposition; methods on glm, apertus, arcee).
EXTRA_FAMILIES: tuple[str, ...] = (
    "qwen3", "ministral", "seed_oss", "helium", "hunyuan_v1_dense", "exaone4", "cohere2", "glm", "apertus", "arcee",
)


def tiny_model(family: str = "llama", seed: int = 0, dtype: torch.dtype = torch.float32, **overrides: Any) -> LoadedModel:
    """A randomly initialised model of the given family wrapped as a LoadedModel (eval mode)."""
    from transformers import AutoModelForCausalLM

    config = _configs()[family]()
    config.bos_token_id, config.eos_token_id, config.pad_token_id = 2, 3, 0
    for key, value in overrides.items():
        setattr(config, key, value)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    with torch.no_grad():  # norms start at 1 (or 0 for Gemma's 1+w): randomise them so tests see real scales
        for name, p in model.named_parameters():
            if p.dim() == 1 and "norm" in name.lower() or name.endswith(("ln_1.weight", "ln_2.weight")):
                p.add_(0.1 * torch.randn_like(p))
    model.eval()
    model.requires_grad_(False)
    return LoadedModel.wrap(model, tiny_tokenizer(), name=f"tiny-{family}")


def interleaved_times(fns: Mapping[str, Callable[[], Any]], repeats: int, *,
                      warmup: bool = True) -> tuple[dict[str, list[float]], dict[str, Any]]:
    """Wall times of each function over ``repeats`` interleaved rounds (so load from other processes affects
    every function alike), after one warm-up call each unless ``warmup=False``; and each one's last result."""
    last = {name: fn() for name, fn in fns.items()} if warmup else {}
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            last[name] = fn()
            times[name].append(time.perf_counter() - t0)
    return times, last


def benchmark_model(spec: str, *, device: str = "auto", dtype: str = "auto",
                    log: Callable[[str], None] | None = None) -> LoadedModel:
    """A benchmark's model: ``tiny:FAMILY`` (a tiny random model, moved to ``device``) or anything
    :func:`safetyscope.models.load_model` takes."""
    if spec.startswith("tiny:"):
        lm = tiny_model(spec.split(":", 1)[1])
        if device not in ("auto", "cpu"):
            lm.model.to(device)
        return lm
    from .models import load_model

    return load_model(spec, device=device, dtype=dtype, log=log or (lambda _m: None))
