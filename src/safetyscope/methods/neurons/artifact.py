"""Neuron sets: a ranked list of MLP neurons, reversible ablation hooks and exact weight edits.

A neuron is ``(layer, index)`` on the site ``blocks.{layer}.mlp.neurons`` (the input of the down
projection). Ablation modes, applied at every position (also during generation):

  ``zero``   x_i <- (1 - strength) * x_i               (strength 1, the default: x_i = 0)
  ``mean``   x_i <- x_i + strength * (mu_i - x_i)       (strength 1: x_i = mu_i, the harmless mean)
  ``scale``  x_i <- strength * x_i                      (strength required: 0.5 halves, 2 amplifies)

All three are affine in x_i, so :func:`edit_weights` reproduces them exactly on a copy of the
weights: the down projection's input column i is multiplied by the factor and, for ``mean``,
``strength * mu_i * column_i`` is added to its bias (refused when the projection has no bias).
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

import torch

from ...artifacts.base import Artifact, ArtifactError, register
from ...hooks import EditFn, hooks
from ...io import atomic_dir, write_json
from ...models.adapter import LoadedModel
from ...positions import Batch
from ...prefix import pointwise
from ...sites import Site

MODES = ("zero", "mean", "scale")
Neuron = tuple[int, int]  # (layer, neuron index)


def resolve_strength(mode: str, strength: float | None) -> float:
    """The effective strength of a mode (zero/mean default to full ablation; scale needs a factor)."""
    if mode not in MODES:
        raise ValueError(f"unknown ablation mode {mode!r}; use zero, mean or scale")
    if strength is None:
        if mode == "scale":
            raise ValueError("scale mode needs --strength (the factor: 0.5 halves the neurons, 2 doubles them)")
        return 1.0
    return float(strength)


def _factor_and_shift(mode: str, strength: float) -> tuple[float, float]:
    """x_i <- factor * x_i + shift * mu_i."""
    if mode == "scale":
        return strength, 0.0
    if mode == "zero":
        return 1.0 - strength, 0.0
    return 1.0 - strength, strength


@register
class NeuronSet(Artifact):
    """An ordered (most important first) list of MLP neurons with their harmless means.

    ``neurons``: [(layer, index), ...]; ``means``: [n] harmless mean activation of each neuron
    (needed for ``mean`` mode); ``scores``: [n] the ranking score (informational).
    """

    kind = "neuron_set"

    def __init__(
        self,
        neurons: Iterable[Neuron],
        means: torch.Tensor | Sequence[float] | None = None,
        *,
        scores: torch.Tensor | Sequence[float] | None = None,
        mode: str = "zero",
        strength: float | None = None,
        info: dict[str, Any] | None = None,
    ):
        pairs = [(int(layer), int(idx)) for layer, idx in neurons]
        if len(set(pairs)) != len(pairs):
            raise ValueError("a neuron set lists a neuron twice; give each (layer, neuron) once")
        if any(layer < 0 or idx < 0 for layer, idx in pairs):
            raise ValueError("neuron layers and indices must be non-negative")
        self.neurons: list[Neuron] = pairs
        self.means = None if means is None else torch.as_tensor(means, dtype=torch.float32).flatten()
        self.scores = None if scores is None else torch.as_tensor(scores, dtype=torch.float32).flatten()
        for name, t in (("means", self.means), ("scores", self.scores)):
            if t is not None and t.numel() != len(pairs):
                raise ValueError(f"{name} has {t.numel()} values for {len(pairs)} neurons; give one per neuron")
        self.mode = mode
        self.strength = resolve_strength(mode, strength)
        self.info = dict(info or {})

    def __len__(self) -> int:
        return len(self.neurons)

    def __repr__(self) -> str:
        return f"NeuronSet(n={len(self)}, mode={self.mode!r}, strength={self.strength})"

    # ---- derived sets ------------------------------------------------------------------------
    def _subset(self, rows: Sequence[int]) -> NeuronSet:
        pick = torch.as_tensor(list(rows), dtype=torch.long)
        return NeuronSet(
            [self.neurons[i] for i in rows],
            None if self.means is None else self.means[pick],
            scores=None if self.scores is None else self.scores[pick],
            mode=self.mode,
            strength=self.strength,
            info=self.info,
        )

    def top(self, k: int) -> NeuronSet:
        """The first ``k`` neurons (the set is ordered by importance)."""
        return self._subset(range(min(max(int(k), 0), len(self))))

    def in_layers(self, layers: Iterable[int]) -> NeuronSet:
        keep = set(layers)
        return self._subset([i for i, (layer, _) in enumerate(self.neurons) if layer in keep])

    def with_mode(self, mode: str, strength: float | None = None) -> NeuronSet:
        out = self._subset(range(len(self)))
        out.mode, out.strength = mode, resolve_strength(mode, strength)
        return out

    def by_layer(self) -> dict[int, tuple[torch.Tensor, torch.Tensor | None]]:
        """{layer: (indices [m] int64, harmless means [m] or None)} in set order."""
        rows: dict[int, list[int]] = {}
        for i, (layer, _) in enumerate(self.neurons):
            rows.setdefault(layer, []).append(i)
        out = {}
        for layer, r in sorted(rows.items()):
            pick = torch.as_tensor(r, dtype=torch.long)
            idx = torch.as_tensor([self.neurons[i][1] for i in r], dtype=torch.long)
            out[layer] = (idx, None if self.means is None else self.means[pick])
        return out

    def check(self, lm: LoadedModel) -> None:
        bad = [(layer, i) for layer, i in self.neurons if layer >= lm.n_layers or i >= lm.dims.d_mlp]
        if bad:
            raise ValueError(
                f"neuron {bad[0]} is outside this model ({lm.n_layers} layers x {lm.dims.d_mlp} neurons); "
                "use a neuron set found on the same model"
            )
        if self.mode == "mean" and self.means is None:
            raise ValueError("mean ablation needs the neurons' harmless means; use a set saved by `neurons find`")

    # ---- artifact ----------------------------------------------------------------------------
    def to_state(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        tensors = {"neurons": torch.tensor(self.neurons, dtype=torch.long).reshape(-1, 2)}
        if self.means is not None:
            tensors["harmless_mean"] = self.means
        if self.scores is not None:
            tensors["scores"] = self.scores
        meta = {"mode": self.mode, "strength": self.strength, "n_neurons": len(self), "info": self.info}
        return meta, tensors

    @classmethod
    def from_state(cls, meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> NeuronSet:
        if "neurons" not in tensors:
            raise ArtifactError("neuron set without a 'neurons' tensor; re-create it with `safetyscope neurons find`")
        pairs = [(int(a), int(b)) for a, b in tensors["neurons"].tolist()]
        return cls(
            pairs,
            tensors.get("harmless_mean"),
            scores=tensors.get("scores"),
            mode=meta.get("mode", "zero"),
            strength=meta.get("strength"),
            info=meta.get("info", {}),
        )

    def apply(self, lm: LoadedModel) -> AbstractContextManager[None]:
        return ablate_neurons(lm, self, mode=self.mode, strength=self.strength)

    def export(self, lm: LoadedModel, out_dir: str | Path) -> Path:
        """Save a Hugging Face checkpoint whose weights carry this ablation permanently."""
        edited = edited_copy(lm, self)
        with atomic_dir(out_dir) as tmp:
            edited.model.save_pretrained(tmp, safe_serialization=True)
            if lm.tokenizer is not None:
                lm.tokenizer.save_pretrained(tmp)
            write_json(tmp / "safetyscope_edit.json", {
                "kind": self.kind, "mode": self.mode, "strength": self.strength,
                "n_neurons": len(self), "neurons": self.neurons, "source_model": lm.name,
            })
        return Path(out_dir)


# ---- hooks ---------------------------------------------------------------------------------------
def _edit(idx: torch.Tensor, means: torch.Tensor | None, factor: float, shift: float) -> EditFn:
    def fn(x: torch.Tensor, _batch: Batch | None) -> torch.Tensor:  # x: [batch, pos, d_mlp]
        i = idx.to(x.device)
        new = x.index_select(-1, i) * factor  # [batch, pos, m]
        if shift and means is not None:
            new = new + shift * means.to(device=x.device, dtype=x.dtype)
        return x.index_copy(-1, i, new)

    return pointwise(fn)  # the same map at every position: shared-prefix reuse stays exact


def _as_set(neurons: NeuronSet | Iterable[Neuron], means: torch.Tensor | Sequence[float] | None) -> NeuronSet:
    if isinstance(neurons, NeuronSet):
        return neurons if means is None else NeuronSet(neurons.neurons, means, scores=neurons.scores)
    return NeuronSet(neurons, means)


@contextmanager
def ablate_neurons(
    lm: LoadedModel,
    neurons: NeuronSet | Iterable[Neuron],
    mode: str = "zero",
    strength: float | None = None,
    *,
    means: torch.Tensor | Sequence[float] | None = None,
) -> Iterator[None]:
    """Ablate neurons for the duration of the block (hooks removed on exit, also on errors).

    >>> with ablate_neurons(lm, [(12, 403), (14, 77)], mode="zero"):
    ...     logits = forward(lm, batch)
    """
    s = resolve_strength(mode, strength)
    ns = _as_set(neurons, means)
    ns = ns.with_mode(mode, s) if ns.mode != mode or ns.strength != s else ns
    ns.check(lm)
    factor, shift = _factor_and_shift(mode, s)
    edits = {Site("mlp.neurons", layer): _edit(idx, mu, factor, shift) for layer, (idx, mu) in ns.by_layer().items()}
    with hooks(lm, edits):
        yield


# ---- permanent weight edits ----------------------------------------------------------------------
def _down_proj_path(lm: LoadedModel, layer: int) -> str:
    if not lm.table.mlp_out_proj:
        raise ArtifactError(
            f"the {lm.table.family} architecture table has no mlp_out_proj; add it with --arch-table to export"
        )
    return lm.table.expand(lm.table.mlp_out_proj, layer)


def edit_weights(model: Any, lm: LoadedModel, neurons: NeuronSet) -> None:
    """Apply ``neurons``' ablation to ``model``'s down projections in place (``model`` shares ``lm``'s layout).

    nn.Linear stores [d_model, d_mlp] (neuron i is column i); GPT-2's Conv1D stores [d_mlp, d_model] (row i).
    """
    neurons.check(lm)
    factor, shift = _factor_and_shift(neurons.mode, neurons.strength)
    conv1d = lm.table.conv1d
    with torch.no_grad():
        for layer, (idx, mu) in neurons.by_layer().items():
            path = _down_proj_path(lm, layer)
            proj = model.get_submodule(path)
            w = proj.weight
            i = idx.to(w.device)
            cols = (w[i, :] if conv1d else w[:, i]).double()  # [m, d_model] or [d_model, m]
            if shift:
                bias = getattr(proj, "bias", None)
                if bias is None:
                    raise ArtifactError(
                        f"mean-mode export needs a bias on {path}, which this model lacks; export with mode zero "
                        "or scale, or apply the set as hooks (safetyscope eval --intervention DIR)"
                    )
                assert mu is not None
                m = mu.to(w.device, torch.float64)
                add = m @ cols if conv1d else cols @ m  # [d_model]
                bias.add_((shift * add).to(bias.dtype))
            scaled = (cols * factor).to(w.dtype)
            if conv1d:
                w[i, :] = scaled
            else:
                w[:, i] = scaled


def edited_copy(lm: LoadedModel, neurons: NeuronSet) -> LoadedModel:
    """A LoadedModel sharing ``lm``'s tokenizer whose (deep-copied) weights carry the ablation."""
    neurons.check(lm)
    model = copy.deepcopy(lm.model)
    edit_weights(model, lm, neurons)
    return dataclasses.replace(lm, model=model, name=f"{lm.name}+neurons", meta=dict(lm.meta))
