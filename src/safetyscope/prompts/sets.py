"""Prompt sets as the public API takes them, and the one split of user files into fitting and test prompts.

Every public function accepts ``PromptsLike``: a :class:`PromptSet`, a plain list of strings, or the
path of a prompt file (JSONL / CSV / TXT). User files are split once, seeded, into train (fitting),
val (selection) and test (every measurement) with :data:`FILE_FRACTIONS`, so no measurement reuses a
fitting prompt; the built-in sets carry their own splits.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Union

from .builtin import builtin_prompts
from .loaders import load_prompts
from .types import PromptError, PromptSet

PromptsLike = Union[PromptSet, Sequence[str], str, Path]

# train (fitting) / val (selection) / test (every measurement): the one split of user files.
FILE_FRACTIONS: tuple[float, float, float] = (0.6, 0.2, 0.2)


def as_prompt_set(prompts: PromptsLike, label: str | None = None, *, what: str = "prompts") -> PromptSet:
    """A non-empty :class:`PromptSet` from a set, a list of strings or a file path."""
    if isinstance(prompts, PromptSet):
        ps = prompts
    elif isinstance(prompts, (str, Path)):
        if isinstance(prompts, str) and not _looks_like_path(prompts):
            raise PromptError(f"{what}: {prompts[:60]!r} is not a prompt file; pass a list of strings or a file path")
        ps = load_prompts(prompts, label=label)
    else:
        texts = list(prompts)
        bad = [t for t in texts if not isinstance(t, str)]
        if bad:
            raise PromptError(f"{what}: expected strings, got {type(bad[0]).__name__}; pass a list of prompt texts")
        ps = PromptSet.from_texts(texts, label)
    return ps.require_nonempty(what)


def _looks_like_path(text: str) -> bool:
    return "\n" not in text and (Path(text).suffix.lower() in (".jsonl", ".json", ".csv", ".txt") or Path(text).exists())


@dataclass(frozen=True)
class Splits:
    """Train (fitting), val (selection) and test (measurement) prompts of one group."""

    train: PromptSet
    val: PromptSet
    test: PromptSet

    @property
    def fit(self) -> PromptSet:
        """Every prompt a method may fit or select on (train + val)."""
        return self.train + self.val


def split_prompts(prompts: PromptSet, seed: int = 0) -> Splits:
    """The seeded 60/20/20 split of a user file, stratified by label."""
    return Splits(*(prompts.split(part, seed, FILE_FRACTIONS) for part in ("train", "val", "test")))


def group_splits(path: str | Path | None, kind: str, seed: int = 0) -> Splits:
    """Splits of a user file, or of the built-in ``kind`` set when ``path`` is empty."""
    if path:
        full = load_prompts(path, label=kind).require_nonempty(f"{kind} prompts in {path}")
        return split_prompts(full, seed)
    return Splits(*(builtin_prompts(kind, part, seed=seed) for part in ("train", "val", "test")))


def file_digest(path: str | Path) -> str:
    """sha256 of a prompt file's bytes: artifacts record the files they were fitted on, so measurement
    commands can refuse to measure on them."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()
