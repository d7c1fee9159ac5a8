"""Helpers shared by CLI commands: prompt-set options, error handling, output."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .failures import BUG_LINE, NOTHING_SAVED, USER_ERRORS, user_errors
from .settings import Settings, opt

__all__ = ["BUG_LINE", "NOTHING_SAVED", "USER_ERRORS", "PromptSettings", "emit", "prompt_sets", "user_errors"]


@dataclass
class PromptSettings(Settings):
    harmful: str = opt("", "Harmful prompts file (JSONL/CSV/TXT); empty = the built-in harmful set.")
    harmless: str = opt("", "Harmless prompts file (JSONL/CSV/TXT); empty = the built-in harmless set.")
    split: str = opt("train", "Split of the built-in sets to use: train, val, test or all.")
    n_prompts: int = opt(0, "Use at most this many prompts per group (0 = all), sampled with --seed.")


def prompt_sets(s: PromptSettings, split: str | None = None) -> tuple[Any, Any]:
    """(harmful, harmless) PromptSets from files or the built-in sets, non-empty and capped."""
    from ..prompts import builtin_prompts, load_prompts

    out = []
    for kind, path in (("harmful", s.harmful), ("harmless", s.harmless)):
        ps = load_prompts(path, label=kind) if path else builtin_prompts(kind, split or s.split, seed=s.seed)
        if s.n_prompts:
            ps = ps.sample(s.n_prompts, seed=s.seed)
        out.append(ps.require_nonempty(f"{kind} prompts"))
    return out[0], out[1]


def emit(s: Settings, result: Any, render: Callable[[], None] | None = None) -> None:
    """Print JSON (--json) or the human rendering (unless --quiet)."""
    from ..io import json_safe

    if s.json:
        print(json.dumps(json_safe(result), indent=2))
    elif render is not None and not s.quiet:
        render()
