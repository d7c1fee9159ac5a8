"""The attack's own search inside robust training (adversarial hardening).

Robust hardening ablates the refusal direction (or a subspace around it) while training, and
re-estimates it as a difference of means at the direction's own block and position. An attacker does
more: a direction search over every candidate block and post-instruction position, selected by how much
its ablation removes refusal. Every ``search_every`` steps :func:`attack_direction` runs that search
(:func:`safetyscope.methods.direction.api.find_direction`, with the fast settings of the benchmark's
fresh search) on the model as it is being trained; the direction it finds is kept for the rest of the
run and ablated with the others, so refusal cannot settle in the one place the attack would look next.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ...errors import SafetyscopeError
from ...models.adapter import LoadedModel
from ..direction.api import DirectionConfig, NoDirectionFound, find_direction


@dataclass(frozen=True)
class Found:
    """A direction the in-training search found: unit vector [d_model] at its block and prompt position."""

    direction: torch.Tensor
    layer: int
    position: int


def attack_direction(lm: LoadedModel, harmful: Sequence[str], harmless: Sequence[str],
                     layers: Sequence[int] | None, system: str | None, batch_size: int = 8) -> Found | None:
    """The direction an attacker's search would ablate on ``lm`` now (None when no candidate qualifies:
    e.g. too few harmful prompts are refused any more for the search's filter)."""
    cfg = DirectionConfig(screen=8, keep=4, induce="lazy", layers=None if layers is None else tuple(layers))
    try:
        with torch.no_grad():  # the trained tensors require gradients; the search needs none
            d = find_direction(lm, list(harmful), list(harmless), config=cfg, batch_size=batch_size, system=system)
    except (NoDirectionFound, SafetyscopeError):
        return None
    v = d.direction.detach().double().cpu()
    return Found((v / v.norm().clamp_min(1e-12)).float(), int(d.layer), int(d.position))
