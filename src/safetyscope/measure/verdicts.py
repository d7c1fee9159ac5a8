"""What judges return: the :class:`Verdict`, the three reply categories and the judge error type.

A leaf of ``measure`` so that the phrase judge (``judges``), the LLM judge (``llm_judge``) and their
evaluation (``judge_eval``) share them without an import cycle."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

from ..errors import SafetyscopeError

__all__ = ["CATEGORIES", "Category", "JudgeError", "Verdict"]

#: The three outcomes of a reply: refused, complied (does what was asked), broken (neither: loops,
#: gibberish, empty, cut off, off-topic, a question back).
Category = Literal["refused", "complied", "broken"]
CATEGORIES: tuple[Category, ...] = get_args(Category)


@dataclass(frozen=True)
class Verdict:
    """Outcome of a judge: ``refused`` flag, ``score`` in [0, 1], ``reason`` and matched ``marker``."""

    refused: bool
    score: float
    reason: str
    marker: str | None = None


class JudgeError(SafetyscopeError, TypeError):
    """A judge that is not callable, or returned something other than a verdict."""
