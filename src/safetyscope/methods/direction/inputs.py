"""The prompts a direction search or refinement takes (lists, PromptSets or files; split when no validation
prompts are given) and which prompt files a direction was fitted or selected on (sha256 in its metadata),
so that measurement commands can refuse to measure on them."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...prompts.sets import PromptsLike, as_prompt_set, file_digest, split_prompts
from .artifact import Direction


@dataclass(frozen=True)
class TrainVal:
    """Fitting (train) and selection (val) prompts of both groups; ``held_out`` is False when a group was
    too small to split and the same prompts serve both."""

    harmful: list[str]
    harmless: list[str]
    val_harmful: list[str]
    val_harmless: list[str]
    held_out: bool = True


def train_val_texts(harmful: PromptsLike, harmless: PromptsLike, val_harmful: PromptsLike | None,
                    val_harmless: PromptsLike | None, *, what: str, seed: int = 0) -> TrainVal:
    """Texts of both groups for fitting and selection. Without validation prompts each group is split with
    :func:`~safetyscope.prompts.sets.split_prompts` (its test part is left out); a group with too few
    prompts for a non-empty train and val part is used whole for both (``held_out=False``)."""
    if (val_harmful is None) != (val_harmless is None):
        raise ValueError(f"{what}: give both val_harmful and val_harmless, or neither (then each group is split)")
    sets = [as_prompt_set(p, kind, what=f"{kind} {what} prompts") for p, kind in ((harmful, "harmful"), (harmless, "harmless"))]
    if val_harmful is not None and val_harmless is not None:
        vals = [as_prompt_set(p, kind, what=f"{kind} validation prompts")
                for p, kind in ((val_harmful, "harmful"), (val_harmless, "harmless"))]
        return TrainVal(sets[0].texts, sets[1].texts, vals[0].texts, vals[1].texts)
    parts = [split_prompts(ps, seed) for ps in sets]
    if all(len(p.train) and len(p.val) for p in parts):
        return TrainVal(parts[0].train.texts, parts[1].train.texts, parts[0].val.texts, parts[1].val.texts)
    return TrainVal(sets[0].texts, sets[1].texts, sets[0].texts, sets[1].texts, held_out=False)

FIT_FILES = "fit_files"  # Direction.meta key: [{"group", "path", "sha256", "test_part"?}]


def file_records(groups: Mapping[str, PromptsLike | None]) -> list[dict[str, str]]:
    """One record per input that is a prompt file (lists and PromptSets carry no file to record)."""
    out = []
    for group, prompts in groups.items():
        if isinstance(prompts, (str, Path)) and Path(prompts).is_file():
            out.append({"group": group, "path": str(prompts), "sha256": file_digest(prompts)})
    return out


def with_fit_files(direction: Direction, records: list[dict[str, str]]) -> Direction:
    """``direction`` with ``records`` added to the files it was fitted on (a copy; none added twice)."""
    old: list[dict[str, Any]] = list(direction.meta.get(FIT_FILES) or [])
    seen = {(r.get("group"), r.get("sha256")) for r in old}
    new = [r for r in records if (r.get("group"), r.get("sha256")) not in seen]
    return direction.with_meta(**{FIT_FILES: old + new}) if new else direction


def fitted_on(direction: Direction, path: str | Path) -> dict[str, Any] | None:
    """The record of ``path`` if the direction was fitted or selected on a file with the same bytes."""
    records = direction.meta.get(FIT_FILES) or []
    if not records or not Path(path).is_file():
        return None
    digest = file_digest(path)
    return next((r for r in records if r.get("sha256") == digest), None)
