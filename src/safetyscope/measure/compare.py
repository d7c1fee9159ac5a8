"""Before/after comparisons under an intervention: first-token KL and refusal scores in one place.

An *intervention* here is anything with ``apply(lm)`` returning a context manager (every
artifact), or a zero-argument callable returning a context manager.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch

from ..models.adapter import LoadedModel
from .generation import last_logits
from .memo import LogitsMemo
from .metrics import kl_divergence, refusal_score
from .refusal_tokens import refusal_token_ids

Intervention = Any  # has .apply(lm) -> context manager, or is a callable () -> context manager


def enter(lm: LoadedModel, intervention: Intervention | None) -> AbstractContextManager[Any]:
    """The context manager that applies ``intervention`` (a no-op for None)."""
    if intervention is None:
        return nullcontext()
    if hasattr(intervention, "apply"):
        return intervention.apply(lm)
    if callable(intervention):
        return intervention()
    raise TypeError(f"not an intervention: {type(intervention).__name__}; give an artifact or a context-manager factory")


def logits_under(
    lm: LoadedModel, prompts: Sequence[str], intervention: Intervention | None, *, batch_size: int = 16,
    system: str | None = None, memo: LogitsMemo | None = None,
) -> torch.Tensor:
    """[n_prompts, vocab] next-token logits at the first response position under an intervention (``memo``: the
    unmodified model's kept logits, read and filled when no intervention is active; see :mod:`safetyscope.measure.memo`)."""
    with enter(lm, intervention):
        return last_logits(lm, prompts, batch_size=batch_size, system=system, memo=memo)


def first_token_kl(
    lm: LoadedModel,
    prompts: Sequence[str],
    intervention: Intervention | None,
    *,
    reference: torch.Tensor | None = None,
    batch_size: int = 16,
    system: str | None = None,
) -> torch.Tensor:
    """KL(P_ref || P_intervened) of the first response token per prompt, [n_prompts].

    Pass ``reference`` (unmodified logits from :func:`logits_under` with None) to reuse it.
    """
    ref = reference if reference is not None else logits_under(lm, prompts, None, batch_size=batch_size, system=system)
    new = logits_under(lm, prompts, intervention, batch_size=batch_size, system=system)
    return kl_divergence(ref, new)


def scores_under(
    lm: LoadedModel,
    prompts: Sequence[str],
    intervention: Intervention | None,
    *,
    token_ids: Sequence[int] | None = None,
    batch_size: int = 16,
    system: str | None = None,
) -> torch.Tensor:
    """Logit refusal score per prompt under an intervention, [n_prompts]."""
    ids = list(token_ids) if token_ids is not None else refusal_token_ids(lm.tokenizer)
    return refusal_score(logits_under(lm, prompts, intervention, batch_size=batch_size, system=system), ids)


def context_factory(fn: Callable[[], AbstractContextManager[Any]]) -> Intervention:
    """Mark a zero-argument context-manager factory as an intervention (for readability)."""
    return fn
