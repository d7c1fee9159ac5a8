"""Chat formatting: every prompt goes through the tokenizer's chat template, left padded."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..errors import SafetyscopeError
from ..positions import Batch

_SENTINEL = "\u2063SAFETYSCOPE\u2063"


class ChatTemplateError(SafetyscopeError, ValueError):
    """The tokenizer has no chat template."""


class PromptTooLongError(SafetyscopeError, ValueError):
    """A prompt does not fit the model's context."""


def pad_token_id(tokenizer: Any) -> int:
    """The id left padding uses: the tokenizer's pad token, else its end-of-sequence token, else 0."""
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is None:
        pad = getattr(tokenizer, "eos_token_id", None)
    return int(pad) if pad is not None else 0


def _messages(prompt: str, system: str | None) -> list[dict[str, str]]:
    msgs = [{"role": "system", "content": system}] if system else []
    return [*msgs, {"role": "user", "content": prompt}]


def format_chat(tokenizer: Any, prompt: str, system: str | None = None) -> str:
    """The templated text of one user turn, ending where the assistant's reply starts."""
    if not getattr(tokenizer, "chat_template", None):
        raise ChatTemplateError(
            "this tokenizer has no chat template; pass one with --chat-template FILE.jinja "
            "(load_model(..., chat_template=...))"
        )
    import jinja2

    try:
        return tokenizer.apply_chat_template(_messages(prompt, system), tokenize=False, add_generation_prompt=True)
    except jinja2.TemplateError as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ChatTemplateError(f"the chat template failed on a prompt ({first}); fix the template or pass "
                                "another with --chat-template") from None


def post_instruction_length(tokenizer: Any, system: str | None = None) -> int:
    """Number of template tokens after the user's message (identical for every prompt)."""
    key = ("_safetyscope_n_post", system)
    cache = tokenizer.__dict__.setdefault("_safetyscope_cache", {})
    if key in cache:
        return cache[key]
    text = format_chat(tokenizer, _SENTINEL, system)
    if _SENTINEL not in text:
        raise ChatTemplateError("the chat template does not write the user's message into its output "
                                "(no {{ message['content'] }}); fix it or pass another with --chat-template")
    end = text.rindex(_SENTINEL) + len(_SENTINEL)
    try:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        n = sum(1 for start, _ in enc["offset_mapping"] if start >= end)
    except (NotImplementedError, ValueError, TypeError):  # slow tokenizers have no offsets
        n = len(tokenizer(text[end:], add_special_tokens=False)["input_ids"])
    cache[key] = max(n, 1)
    return cache[key]


def tokenize_prompts(
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    system: str | None = None,
    max_length: int | None = None,
    index: Sequence[int] | None = None,
) -> Batch:
    """Chat-format and tokenize prompts into one left-padded batch.

    Templated text is tokenized with ``add_special_tokens=False`` (the template already holds BOS).
    """
    if not prompts:
        raise ValueError("no prompts to tokenize; give at least one prompt")
    texts = [format_chat(tokenizer, p, system) for p in prompts]
    rows = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    if max_length is not None:
        for i, r in enumerate(rows):
            if len(r) > max_length:
                raise PromptTooLongError(
                    f"prompt {i if index is None else index[i]} is {len(r)} tokens, over the model's "
                    f"context of {max_length}; shorten it or drop it from the file"
                )
    pad = pad_token_id(tokenizer)
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), int(pad), dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, width - len(r) :] = torch.tensor(r, dtype=torch.long)
            mask[i, width - len(r) :] = 1
    return Batch(
        input_ids=ids,
        attention_mask=mask,
        n_post=post_instruction_length(tokenizer, system),
        texts=tuple(prompts),
        index=tuple(index) if index is not None else tuple(range(len(prompts))),
    )
