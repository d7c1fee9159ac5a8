"""First look at where harmful and harmless prompts separate: per-layer difference of means."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..stats import GroupMoments, diff_of_means, effect_size


@dataclass(frozen=True)
class LayerSeparation:
    layer: int
    diff_norm: float  # ||mean_harmful - mean_harmless||
    cosine: float  # cosine between the two group means
    relative_diff: float  # diff_norm / mean of the two means' norms
    mean_abs_effect: float  # mean |Cohen's d| over dimensions


def layer_separation(stats: GroupMoments, n_layers: int, kind: str = "resid_post", a: str = "harmful", b: str = "harmless") -> list[LayerSeparation]:
    rows = []
    for layer in range(n_layers):
        key = f"blocks.{layer}.{kind}"
        ma, mb = stats.get(a, key), stats.get(b, key)
        assert ma.mean is not None and mb.mean is not None
        d = diff_of_means(ma, mb).flatten()
        na, nb = ma.mean.flatten().norm(), mb.mean.flatten().norm()
        cos = torch.nn.functional.cosine_similarity(ma.mean.flatten(), mb.mean.flatten(), dim=0)
        es = effect_size(ma, mb).abs().mean() if ma.n > 1 and mb.n > 1 else torch.tensor(float("nan"))
        rows.append(
            LayerSeparation(layer, float(d.norm()), float(cos), float(d.norm() / ((na + nb) / 2 + 1e-12)), float(es))
        )
    return rows
