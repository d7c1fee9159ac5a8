"""Prompt sets: types, file loaders and the built-in harmful/harmless/over-refusal data."""

from __future__ import annotations

from .builtin import (
    BUILTIN_KINDS,
    CAPABILITY_KINDS,
    builtin_prompts,
    builtin_with_tasks,
    capability_passages,
    capability_texts,
    minimal_pairs,
)
from .loaders import FORMATS, load_prompts, parse_csv, parse_jsonl, parse_txt
from .sets import FILE_FRACTIONS, PromptsLike, Splits, as_prompt_set, group_splits, split_prompts
from .types import (
    LABELS,
    SPLITS,
    MinimalPair,
    Prompt,
    PromptError,
    PromptSet,
    normalize_label,
)

# --- chat templating (prompts/chat.py, maintained separately): add `from .chat import ...` lines below ---

__all__ = [
    "BUILTIN_KINDS",
    "CAPABILITY_KINDS",
    "FILE_FRACTIONS",
    "FORMATS",
    "LABELS",
    "SPLITS",
    "MinimalPair",
    "Prompt",
    "PromptError",
    "PromptSet",
    "PromptsLike",
    "Splits",
    "as_prompt_set",
    "builtin_prompts",
    "builtin_with_tasks",
    "capability_passages",
    "capability_texts",
    "group_splits",
    "load_prompts",
    "minimal_pairs",
    "normalize_label",
    "parse_csv",
    "parse_jsonl",
    "parse_txt",
    "split_prompts",
]
