"""Reading prompts through a monitor without generating: one forward pass each, under the watch."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ...models.adapter import LoadedModel
from ...runner import batched
from .artifact import Monitor
from .tamper import TamperReading


@dataclass(frozen=True)
class Readings:
    """Per prompt the harm score and the first-token logit refusal score; the prefix check over all of them."""

    harm: np.ndarray  # [n]
    refusal: np.ndarray  # [n]
    tamper: TamperReading


def score_prompts(lm: LoadedModel, monitor: Monitor, prompts: Sequence[str], *, batch_size: int = 8,
                  system: str | None = None, strict: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(harm score, first-token logit refusal score) per prompt from one forward pass each (no generation)."""
    r = read_prompts(lm, monitor, prompts, batch_size=batch_size, system=system, strict=strict)
    return r.harm, r.refusal


def read_prompts(lm: LoadedModel, monitor: Monitor, prompts: Sequence[str], *, batch_size: int = 8,
                 system: str | None = None, strict: bool = True) -> Readings:
    """:class:`Readings` of ``prompts`` from one forward pass each (no generation)."""
    from ...hooks import forward

    harm, refusal = np.zeros(len(prompts)), np.zeros(len(prompts))
    with monitor.watch(lm, strict=strict) as w:
        def step(batch: Any) -> list[Any]:
            with torch.inference_mode():
                forward(lm, batch, last_only=True)
            return w.verdicts[-len(batch):]

        for batch, verdicts in batched(lm, list(prompts), step, batch_size=batch_size, system=system,
                                       description="monitor scores"):
            for i, v in zip(batch.index, verdicts):
                harm[i], refusal[i] = v.harm, v.refusal
    return Readings(harm, refusal, w.tamper)
