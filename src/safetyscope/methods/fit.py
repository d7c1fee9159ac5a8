"""Shared fitter: per-group running moments of many sites, one forward pass per batch."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch

from ..models.adapter import LoadedModel
from ..positions import PositionSpec
from ..runner import run_capture
from ..sites import Site
from ..stats import GroupMoments, all_reduce_group_moments


def fit_group_moments(
    lm: LoadedModel,
    groups: Mapping[str, Sequence[str]],
    sites: str | Site | Iterable[str | Site],
    positions: PositionSpec = "last",
    *,
    batch_size: int = 8,
    system: str | None = None,
    into: GroupMoments | None = None,
) -> GroupMoments:
    """Running mean / variance (float64) per group and site over prompts.

    Keys are site names; each statistic has shape [k, *site_shape] (k selected positions), so
    memory does not grow with the number of prompts. Under torchrun each rank accumulates its own
    batches and the moments are merged once across ranks (all-reduce), so every rank returns the same.
    """
    local = GroupMoments()
    for group, prompts in groups.items():
        if not prompts:
            raise ValueError(f"the {group!r} prompt set is empty; give at least one prompt")
        for _batch, values in run_capture(
            lm, prompts, sites, positions, batch_size=batch_size, system=system, description=f"capturing {group}",
            gather=False,
        ):
            for site, v in values.items():  # v: [batch, k, *shape]
                local.update(group, site.name, v)
    merged = all_reduce_group_moments(local)
    return merged if into is None else into.merge(merged)


def stacked_means(stats: GroupMoments, group: str, kind: str, layers: Iterable[int]) -> torch.Tensor:
    """The group's running means at ``blocks.{l}.<kind>`` for each layer, stacked: [n_layers, k, *site_shape]."""
    means = []
    for layer in layers:
        site = Site(kind, int(layer)).name
        mean = stats.get(group, site).mean
        if mean is None:
            raise ValueError(f"no {group} statistics at {site}; capture that site before stacking its means")
        means.append(mean)
    return torch.stack(means)
