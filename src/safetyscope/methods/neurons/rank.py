"""Safety neurons by activation difference: which MLP neurons separate refused from answered prompts.

One forward pass per batch fills every layer's ``blocks.{l}.mlp.neurons`` (the input of the down
projection); float64 running moments per group give, per neuron, the harmful and harmless means,
their difference and Cohen's d (difference over the pooled standard deviation).

Positions: ``last`` (default; where the reply starts), ``mean`` (over the prompt), a single negative
offset, or several positions (``post_instruction``, ``-1,-2``), which are averaged per prompt first.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ...models.adapter import LoadedModel
from ...positions import Batch, PositionSpec, parse_positions
from ...runner import run_capture
from ...sites import Site
from ...stats import GroupMoments, effect_size, pooled_std
from .artifact import Neuron, NeuronSet

RANK_BY = ("effect_size", "diff")
DIRECTIONS = ("both", "harmful_higher", "harmless_higher")


@dataclass
class NeuronStats:
    """Per-neuron statistics for the analysed layers; every table is [n_layers_analysed, d_mlp] float64."""

    layers: list[int]
    harmful_mean: torch.Tensor
    harmless_mean: torch.Tensor
    pooled_std: torch.Tensor
    effect_size: torch.Tensor  # Cohen's d, positive = higher on harmful prompts
    n_harmful: int
    n_harmless: int
    positions: str = "last"
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def diff(self) -> torch.Tensor:
        """harmful mean - harmless mean, [L, d_mlp]."""
        return self.harmful_mean - self.harmless_mean

    @property
    def d_mlp(self) -> int:
        return int(self.harmful_mean.shape[-1])

    @property
    def n_neurons(self) -> int:
        return len(self.layers) * self.d_mlp

    def score(self, by: str = "effect_size", direction: str = "both") -> torch.Tensor:
        """The ranking score [L, d_mlp] (larger = more important); neurons of the other direction get -inf."""
        if by not in RANK_BY:
            raise ValueError(f"unknown ranking {by!r}; use {' or '.join(RANK_BY)}")
        if direction not in DIRECTIONS:
            raise ValueError(f"unknown direction {direction!r}; use {', '.join(DIRECTIONS)}")
        raw = self.effect_size if by == "effect_size" else self.diff
        if direction == "both":
            return raw.abs()
        signed = raw if direction == "harmful_higher" else -raw
        return torch.where(signed > 0, signed, torch.full_like(signed, -torch.inf))

    def ranking(self, by: str = "effect_size", direction: str = "both", k: int | None = None) -> list[Neuron]:
        """Neurons ordered by score, most important first (ties broken by layer, then index)."""
        s = self.score(by, direction).flatten()
        order = torch.argsort(-s, stable=True)
        order = order[torch.isfinite(s[order])]
        if k is not None:
            order = order[: max(int(k), 0)]
        return [(self.layers[int(i) // self.d_mlp], int(i) % self.d_mlp) for i in order]

    def _row(self, layer: int) -> int:
        try:
            return self.layers.index(layer)
        except ValueError:
            raise ValueError(f"layer {layer} was not analysed (have {self.layers[0]}-{self.layers[-1]})") from None

    def record(self, neuron: Neuron) -> dict[str, Any]:
        """The seed's record fields plus the effect size."""
        layer, i = neuron
        r = self._row(layer)
        d = float(self.diff[r, i])
        return {
            "layer": layer,
            "neuron": i,
            "activation_diff": d,
            "safe_activation": float(self.harmless_mean[r, i]),
            "unsafe_activation": float(self.harmful_mean[r, i]),
            "direction": "harmful_higher" if d > 0 else "harmless_higher",
            "effect_size": float(self.effect_size[r, i]),
        }

    def top(self, k: int = 20, by: str = "effect_size", direction: str = "both") -> list[dict[str, Any]]:
        return [{"rank": j + 1, **self.record(n)} for j, n in enumerate(self.ranking(by, direction, k))]

    def top_per_layer(self, k: int = 5, by: str = "effect_size", direction: str = "both") -> dict[int, list[dict[str, Any]]]:
        s = self.score(by, direction)  # [L, d_mlp]
        out: dict[int, list[dict[str, Any]]] = {}
        for r, layer in enumerate(self.layers):
            order = torch.argsort(-s[r], stable=True)[:k]
            out[layer] = [self.record((layer, int(i))) for i in order if torch.isfinite(s[r, i])]
        return out

    def layer_summary(self) -> list[dict[str, Any]]:
        """Per layer: max |d|, 99th percentile |d|, and how many neurons have |d| > 0.8 (a 'large' effect)."""
        a = self.effect_size.abs()
        q = torch.quantile(a.float(), 0.99, dim=1)
        return [
            {"layer": layer, "max_abs_effect": float(a[r].max()), "p99_abs_effect": float(q[r]),
             "n_large": int((a[r] > 0.8).sum()), "argmax": int(a[r].argmax())}
            for r, layer in enumerate(self.layers)
        ]

    def neuron_set(self, neurons: Sequence[Neuron], *, mode: str = "zero", strength: float | None = None,
                   scores: torch.Tensor | None = None, info: dict[str, Any] | None = None) -> NeuronSet:
        """A NeuronSet of ``neurons`` carrying their harmless means (for mean ablation)."""
        means = [float(self.harmless_mean[self._row(layer), i]) for layer, i in neurons]
        return NeuronSet(neurons, means, scores=scores, mode=mode, strength=strength,
                         info={"positions": self.positions, **self.info, **(info or {})})

    def state(self) -> dict[str, torch.Tensor]:
        return {
            "layers": torch.tensor(self.layers), "harmful_mean": self.harmful_mean, "harmless_mean": self.harmless_mean,
            "pooled_std": self.pooled_std, "effect_size": self.effect_size,
            "n": torch.tensor([self.n_harmful, self.n_harmless]),
        }

    @classmethod
    def from_state(cls, t: dict[str, torch.Tensor], positions: str = "last", info: dict[str, Any] | None = None) -> NeuronStats:
        n = t["n"].tolist()
        return cls([int(v) for v in t["layers"].tolist()], t["harmful_mean"].double(), t["harmless_mean"].double(),
                   t["pooled_std"].double(), t["effect_size"].double(), int(n[0]), int(n[1]), positions, dict(info or {}))


def stats_from_moments(gm: GroupMoments, layers: Sequence[int], positions: str = "last",
                       harmful: str = "harmful", harmless: str = "harmless") -> NeuronStats:
    """NeuronStats from group moments keyed ``blocks.{l}.mlp.neurons`` with shape [1, d_mlp]."""
    rows: dict[str, list[torch.Tensor]] = {"h": [], "s": [], "p": [], "d": []}
    n_h = n_s = 0
    for layer in layers:
        key = Site("mlp.neurons", int(layer)).name
        mh, ms = gm.get(harmful, key), gm.get(harmless, key)
        assert mh.mean is not None and ms.mean is not None
        if mh.mean.shape[0] != 1:
            raise ValueError(f"expected one position per prompt at {key}, got {mh.mean.shape[0]}")
        if mh.n < 2 or ms.n < 2:
            raise ValueError("effect sizes need at least 2 prompts per group; give more prompts or use --no-filter")
        rows["h"].append(mh.mean[0])
        rows["s"].append(ms.mean[0])
        rows["p"].append(pooled_std(mh, ms)[0])
        rows["d"].append(effect_size(mh, ms)[0])
        n_h, n_s = mh.n, ms.n
    return NeuronStats(list(layers), torch.stack(rows["h"]), torch.stack(rows["s"]), torch.stack(rows["p"]),
                       torch.stack(rows["d"]), n_h, n_s, positions)


def neuron_sites(lm: LoadedModel, layers: str | Iterable[int] = "*") -> list[Site]:
    """The ``mlp.neurons`` site of each of ``layers`` (a layer pattern of the site grammar: ``*``, ``a-b``,
    ``a,b``; or block indices), validated against the model."""
    if not isinstance(layers, str):
        return lm.sites([Site("mlp.neurons", int(layer)) for layer in layers])
    return lm.sites(f"blocks.{layers}.mlp.neurons")  # a wildcard pattern of the grammar, parsed by sites.py


def check_positions(positions: PositionSpec) -> str | tuple[int, ...]:
    spec = parse_positions(positions)
    if spec == "all":
        raise ValueError("positions 'all' would mix pads and prompts of different lengths; use mean, last or offsets")
    return spec


def accumulate(
    lm: LoadedModel,
    prompts: Sequence[str],
    sites: Sequence[Site],
    positions: PositionSpec,
    into: GroupMoments,
    group: str,
    *,
    batch_size: int = 8,
    system: str | None = None,
) -> Iterator[Batch]:
    """Add each batch's activations at ``sites`` to ``into[group]`` and yield the finished batch (so a caller
    can save progress). Several selected positions are averaged per prompt first."""
    spec = check_positions(positions)
    for batch, values in run_capture(lm, prompts, sites, spec, batch_size=batch_size, system=system,
                                     description=f"capturing {group}"):
        for site, v in values.items():  # v: [batch, k, d_mlp]
            into.update(group, site.name, v if v.shape[1] == 1 else v.double().mean(1, keepdim=True))
        yield batch


def position_name(positions: PositionSpec) -> str:
    return positions if isinstance(positions, str) else ",".join(str(p) for p in positions)


def neuron_stats(
    lm: LoadedModel,
    harmful: Sequence[str],
    harmless: Sequence[str],
    *,
    positions: PositionSpec = "last",
    layers: str | Iterable[int] = "*",
    batch_size: int = 8,
    system: str | None = None,
) -> NeuronStats:
    """Per-neuron harmful/harmless statistics at every analysed layer (one forward pass per batch)."""
    check_positions(positions)
    sites = neuron_sites(lm, layers)
    gm = GroupMoments()
    for group, prompts in (("harmful", harmful), ("harmless", harmless)):
        if not prompts:
            raise ValueError(f"the {group!r} prompt set is empty; give at least one prompt")
        for _batch in accumulate(lm, list(prompts), sites, positions, gm, group, batch_size=batch_size, system=system):
            pass
    return stats_from_moments(gm, [int(s.layer) for s in sites if s.layer is not None], position_name(positions))
