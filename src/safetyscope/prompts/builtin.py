"""The project's own built-in prompt sets, shipped as JSONL package data in ``prompts/data/``."""

from __future__ import annotations

import json
from functools import cache
from importlib import resources
from typing import Any

from .loaders import parse_jsonl
from .types import DEFAULT_FRACTIONS, MinimalPair, PromptError, PromptSet, SplitName, split_items

BUILTIN_KINDS: tuple[str, ...] = (
    "harmful", "harmless", "scary_harmless", "harmful_tasks", "harmless_tasks", "scary_harmless_tasks",
)
CAPABILITY_KINDS: tuple[str, ...] = ("prose", "code")
DEFAULT_SEED = 0


def _read_data(filename: str) -> str:
    return resources.files("safetyscope.prompts").joinpath("data").joinpath(filename).read_text(encoding="utf-8")


def _json_rows(filename: str) -> list[dict[str, Any]]:
    rows = []
    for lineno, line in enumerate(_read_data(filename).splitlines(), start=1):
        if line.strip():
            row = json.loads(line)
            if not isinstance(row, dict):  # pragma: no cover - guarded by the tests
                raise PromptError(f"built-in {filename} line {lineno} is not an object; reinstall safetyscope")
            rows.append(row)
    return rows


@cache
def _full_set(kind: str) -> PromptSet:
    items = parse_jsonl(_read_data(f"{kind}.jsonl"), origin=f"built-in {kind}.jsonl", name=f"builtin:{kind}")
    return PromptSet(name=kind, items=tuple(items))


def builtin_prompts(kind: str, split: SplitName | str = "all", seed: int = DEFAULT_SEED) -> PromptSet:
    """A built-in prompt set, one of :data:`BUILTIN_KINDS`: ``"harmful"``, ``"harmless"``, ``"scary_harmless"``
    (over-refusal probes) or a ``*_tasks`` twin of one of them (requests phrased as tasks).

    ``split`` is ``"train"`` (60%), ``"val"`` (20%), ``"test"`` (20%) or ``"all"``; the split is
    deterministic for a given ``seed`` and stratified by label.
    """
    if kind not in BUILTIN_KINDS:
        raise PromptError(f"unknown built-in prompt set {kind!r}; use one of {', '.join(BUILTIN_KINDS)}")
    return _full_set(kind).split(split, seed=seed)


def builtin_with_tasks(kind: str, split: SplitName | str = "all", seed: int = DEFAULT_SEED) -> PromptSet:
    """The built-in ``kind`` set (``"harmful"``, ``"harmless"`` or ``"scary_harmless"``) followed by its ``*_tasks``
    twin at the same split: requests phrased as the tasks public benchmarks use ("Write a script that ...", "Develop a
    plan to ..."). ``scary_harmless_tasks`` holds benign requests on the harmful sets' topics (defence, history,
    fiction, first aid, support), 15 per harmful-task category."""
    if f"{kind}_tasks" not in BUILTIN_KINDS:
        twins = ", ".join(k.removesuffix("_tasks") for k in BUILTIN_KINDS if k.endswith("_tasks"))
        raise PromptError(f"no task twin for built-in set {kind!r}; use one of {twins}")
    return builtin_prompts(kind, split, seed=seed) + builtin_prompts(f"{kind}_tasks", split, seed=seed)


@cache
def _all_pairs() -> tuple[MinimalPair, ...]:
    return tuple(
        MinimalPair(id=str(r["id"]), category=r.get("category"), harmful=r["harmful"], harmless=r["harmless"])
        for r in _json_rows("minimal_pairs.jsonl")
    )


def minimal_pairs(split: SplitName | str = "all", seed: int = DEFAULT_SEED) -> list[MinimalPair]:
    """Harmful/harmless twins of equal token length under the default model's tokenizer.

    Split 60/20/20 like :func:`builtin_prompts`, deterministic per ``seed`` and stratified by category.
    """
    return split_items(
        _all_pairs(), split, seed=seed, fractions=DEFAULT_FRACTIONS,
        key=lambda p: p.harmful, group=lambda p: p.category,
    )


def capability_passages(kind: str | None = None) -> list[dict[str, str]]:
    """The capability passages as ``{"id", "kind", "text"}`` dicts, optionally only ``"prose"`` or ``"code"``."""
    if kind is not None and kind not in CAPABILITY_KINDS:
        raise PromptError(f"unknown capability text kind {kind!r}; use 'prose', 'code' or None for both")
    rows = _json_rows("capability.jsonl")
    return [
        {"id": str(r["id"]), "kind": str(r["kind"]), "text": str(r["text"])}
        for r in rows
        if kind is None or r["kind"] == kind
    ]


def capability_texts(kind: str | None = None) -> list[str]:
    """Original prose and code passages (a few thousand tokens) for perplexity checks."""
    return [r["text"] for r in capability_passages(kind)]
