"""Probe artifact: one logistic-regression probe per layer, at one site kind and position.

Tensors (``tensors.safetensors``)::

    layers        [n_layers] int64      the block index of each probe
    weight        [n_layers, width]     logistic-regression weights in the *standardised* space
    bias          [n_layers]            intercepts
    scaler_mean   [n_layers, width]     StandardScaler mean_
    scaler_scale  [n_layers, width]     StandardScaler scale_ (zero-variance features have scale 1)
    dom           [n_layers, width]     difference of class means (positive - negative), optional

JSON: ``site`` (block kind, e.g. ``resid_post``), ``position``, ``label`` (what class 1 is), per-layer
``metrics`` (cross-validated accuracy / AUROC, ...) and free ``info``.

Score at layer l of a feature vector x (the site activation at the position, flattened):
``z = ((x - mean_l) / scale_l) . w_l + b_l``, ``p = sigmoid(z)``; identical to scikit-learn's
``Pipeline(StandardScaler, LogisticRegression).predict_proba(x)[:, 1]``.

``apply(lm)`` never changes the model: it is a *monitor* that records each probed layer's probability
during every forward pass (at the probe's position on a full pass; at the new token on a decoding
step with a KV cache) and yields a :class:`ProbeMonitor`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ...artifacts.base import Artifact, ArtifactError, register
from ...hooks import EditFn, hooks
from ...models.adapter import LoadedModel
from ...positions import Batch, parse_positions, select_positions
from ...sites import BLOCK_KINDS, Site

_MATRICES = ("weight", "scaler_mean", "scaler_scale")


def _tensor(x: Any) -> torch.Tensor:
    return x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))


@dataclass
class ProbeMonitor:
    """Probabilities recorded by :meth:`Probe.monitor`: ``scores[layer]`` holds one [batch] tensor per
    forward call (a generation gives the prefill first, then one entry per new token)."""

    layers: list[int]
    scores: dict[int, list[torch.Tensor]] = field(default_factory=dict)

    def latest(self) -> torch.Tensor:
        """[batch, n_layers] probabilities of the last forward call."""
        if not self.scores or not all(self.scores.get(layer) for layer in self.layers):
            raise ArtifactError("the monitor has recorded nothing yet; run a forward pass inside `with probe.apply(lm)`")
        return torch.stack([self.scores[layer][-1] for layer in self.layers], dim=1)

    def trajectory(self, layer: int) -> torch.Tensor:
        """[batch, n_calls] probabilities at ``layer`` over the recorded calls (e.g. generation steps)."""
        return torch.stack(self.scores[layer], dim=1)

    def clear(self) -> None:
        self.scores.clear()


@register
class Probe(Artifact):
    kind = "probe"

    def __init__(
        self,
        *,
        site: str,
        position: str,
        layers: Sequence[int],
        weight: Any,
        bias: Any,
        scaler_mean: Any,
        scaler_scale: Any,
        dom: Any = None,
        label: str = "harmful",
        metrics: dict[str, list[Any]] | None = None,
        info: dict[str, Any] | None = None,
    ):
        if site not in BLOCK_KINDS:
            raise ArtifactError(f"probe site {site!r} is not a block site kind; use one of {', '.join(BLOCK_KINDS)}")
        parse_positions(position)
        self.site, self.position, self.label = site, position, label
        self.layers = [int(v) for v in layers]
        self.weight = _tensor(weight).double()  # [n_layers, width]
        self.bias = _tensor(bias).double().reshape(-1)  # [n_layers]
        self.scaler_mean = _tensor(scaler_mean).double()  # [n_layers, width]
        self.scaler_scale = _tensor(scaler_scale).double()  # [n_layers, width]
        self.dom = None if dom is None else _tensor(dom).double()  # [n_layers, width]
        shape = (len(self.layers), self.weight.shape[-1])
        parts = [getattr(self, n) for n in _MATRICES] + ([self.dom] if self.dom is not None else [])
        if self.weight.dim() != 2 or any(tuple(t.shape) != shape for t in parts) or self.bias.shape[0] != shape[0]:
            raise ArtifactError(f"probe tensors do not match {len(self.layers)} layers; re-create the probe artifact")
        if len(set(self.layers)) != len(self.layers):
            raise ArtifactError(f"probe layers {self.layers} repeat a layer; re-create the probe artifact")
        self.metrics = {k: list(v) for k, v in (metrics or {}).items()}
        self.info = dict(info or {})
        self._device_cache: dict[tuple[str, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}

    # ---- reading ---------------------------------------------------------------------------------
    @property
    def width(self) -> int:
        return int(self.weight.shape[1])

    def index(self, layer: int) -> int:
        try:
            return self.layers.index(int(layer))
        except ValueError:
            raise ArtifactError(f"this probe has no layer {layer}; it covers layers {self.layers}") from None

    def sites(self) -> list[Site]:
        return [Site(self.site, layer) for layer in self.layers]

    @property
    def best_layer(self) -> int:
        """The layer with the highest cross-validated accuracy (ties: AUROC, then the earliest)."""
        acc = self.metrics.get("accuracy")
        if not acc:
            raise ArtifactError("this probe has no accuracy metrics; pass a layer explicitly")
        auc = self.metrics.get("auroc") or [0.0] * len(acc)
        best = max(range(len(acc)), key=lambda i: (acc[i] or 0.0, auc[i] or 0.0, -i))
        return self.layers[best]

    def original_space(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(w [n_layers, width], b [n_layers]) with ``z = x . w + b`` on raw (unscaled) activations."""
        w = self.weight / self.scaler_scale
        return w, self.bias - (self.scaler_mean * w).sum(-1)

    def direction(self, layer: int, *, normalize: bool = True) -> torch.Tensor:
        """[width] probe direction in activation space (w / scale), unit norm by default (float32)."""
        w = self.original_space()[0][self.index(layer)]
        return (w / w.norm().clamp_min(1e-12) if normalize else w).float()

    def decision_function(self, x: Any, layer: int | None = None) -> torch.Tensor:
        """Logits z. ``x``: [n, n_layers, width] -> [n, n_layers]; or [n, width] with ``layer`` -> [n]."""
        x = _tensor(x).double()
        if layer is not None:
            i = self.index(layer)
            if x.dim() != 2 or x.shape[1] != self.width:
                raise ArtifactError(f"expected activations [n, {self.width}] for one layer, got {tuple(x.shape)}")
            return ((x - self.scaler_mean[i]) / self.scaler_scale[i]) @ self.weight[i] + self.bias[i]
        if x.dim() != 3 or tuple(x.shape[1:]) != (len(self.layers), self.width):
            raise ArtifactError(
                f"expected activations [n, {len(self.layers)}, {self.width}] for all probe layers, "
                f"got {tuple(x.shape)}; pass layer=... for one layer"
            )
        return (((x - self.scaler_mean) / self.scaler_scale) * self.weight).sum(-1) + self.bias

    def predict_proba(self, x: Any, layer: int | None = None) -> torch.Tensor:
        """P(label) per prompt: [n, n_layers], or [n] with ``layer`` (float64)."""
        return torch.sigmoid(self.decision_function(x, layer))

    # ---- monitoring --------------------------------------------------------------------------------
    def _on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        key = (str(device), torch.float32)
        if key not in self._device_cache:
            w, b = self.original_space()
            self._device_cache[key] = (w.to(device, torch.float32), b.to(device, torch.float32))
        return self._device_cache[key]

    def monitor(self, lm: LoadedModel, layers: Sequence[int] | None = None) -> AbstractContextManager[ProbeMonitor]:
        """Read-only hooks recording P(label) at each probed layer; hooks are removed on exit."""
        chosen = [int(v) for v in (self.layers if layers is None else layers)]
        idx = {layer: self.index(layer) for layer in chosen}
        spec = parse_positions(self.position)
        record = ProbeMonitor(chosen)
        for site in (Site(self.site, layer) for layer in chosen):
            lm.resolve(site)  # fails clearly if the model lacks the site

        def make(layer: int) -> EditFn:
            def read(x: torch.Tensor, batch: Batch | None) -> None:
                if batch is not None and x.shape[1] == batch.seq_len:
                    feat = select_positions(x.detach(), spec, batch).float().mean(1)  # [batch, *shape]
                else:  # a decoding step (KV cache): score the new token
                    feat = x.detach()[:, -1].float()
                w, b = self._on(feat.device)
                z = feat.flatten(1) @ w[idx[layer]] + b[idx[layer]]  # [batch]
                record.scores.setdefault(layer, []).append(torch.sigmoid(z).detach().cpu())
                return None

            return read

        @contextmanager
        def run() -> Iterator[ProbeMonitor]:
            with hooks(lm, [(Site(self.site, layer), make(layer)) for layer in chosen]):
                yield record

        return run()

    def apply(self, lm: LoadedModel) -> AbstractContextManager[Any]:
        """A read-only monitor (see :meth:`monitor`): probes do not edit the model."""
        return self.monitor(lm)

    # ---- serialisation -----------------------------------------------------------------------------
    def to_state(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        tensors = {
            "layers": torch.tensor(self.layers, dtype=torch.int64),
            "weight": self.weight,  # float64 throughout: a saved probe scores exactly as the fitted one
            "bias": self.bias,
            "scaler_mean": self.scaler_mean,
            "scaler_scale": self.scaler_scale,
        }
        if self.dom is not None:
            tensors["dom"] = self.dom
        meta = {"site": self.site, "position": self.position, "label": self.label, "layers": self.layers,
                "width": self.width, "metrics": self.metrics, "info": self.info}
        return meta, tensors

    @classmethod
    def from_state(cls, meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Probe:
        missing = [k for k in ("layers", "bias", *_MATRICES) if k not in tensors]
        if missing or "site" not in meta:
            raise ArtifactError(f"probe artifact lacks {', '.join(missing) or 'site'}; re-create it with `safetyscope probe`")
        return cls(
            site=meta["site"], position=meta.get("position", "last"), layers=tensors["layers"].tolist(),
            weight=tensors["weight"], bias=tensors["bias"], scaler_mean=tensors["scaler_mean"],
            scaler_scale=tensors["scaler_scale"], dom=tensors.get("dom"), label=meta.get("label", "harmful"),
            metrics=meta.get("metrics"), info=meta.get("info"),
        )
