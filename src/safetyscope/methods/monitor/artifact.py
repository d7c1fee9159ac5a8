"""The :class:`Monitor` artifact: harm readers, a refusal reader and a calibrated threshold.

Tensors (``tensors.safetensors``, float64 so a saved monitor scores exactly as the fitted one)::

    weight             [n_readers, d_model]  each harm reader's weights on raw ``resid_pre`` activations
    bias               [n_readers]           its intercept
    mean, std          [n_readers]           standardisation of its score (harmless train prompts)
    refusal_direction  [d_model]             unit refusal direction (read at ``blocks.{refusal_layer}.resid_pre``)
    protect            [k, d_model]          orthonormal refusal subspace projected out of the readers (k may be 0)
    prefix_*                                 the shared prefix's print for the tamper check (:mod:`.tamper`; optional)

JSON: per reader its block, position (``inst``: the instruction's last token; ``post``: mean over the
post-instruction template tokens), method and validation AUROC; ``threshold`` (flag when the harm score
is above it), ``fpr``, ``refusal_threshold`` (logit refusal score of the first reply token above it =
refused), ``refusal_layer``, ``refusal_token_ids``, the model it was fitted on, ``system`` and ``n_post``.

Harm score of a prompt = mean over readers of ``((x_l . w + b) - mean) / std``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch

from ...artifacts.base import Artifact, ArtifactError, register
from .tamper import PrefixPrint

if TYPE_CHECKING:
    from ...models.adapter import LoadedModel
    from .watch import Watch

Position = Literal["inst", "post"]
POSITIONS: tuple[Position, ...] = ("inst", "post")
ReaderMethod = Literal["dom", "probe"]


class MonitorMismatch(ArtifactError):
    """A monitor applied to a model it was not fitted on."""


@dataclass(frozen=True)
class Reader:
    """One linear harm reader at ``blocks.{layer}.resid_pre``."""

    layer: int
    position: Position
    method: ReaderMethod
    weight: np.ndarray  # [d_model] float64, on raw activations
    bias: float
    mean: float  # standardisation of the raw score
    std: float
    val_auroc: float
    stress_tpr: float = float("nan")  # worst validation detection rate over the simulated ablations (fit.py)

    def describe(self) -> dict[str, Any]:
        return {"layer": self.layer, "position": self.position, "method": self.method,
                "val_auroc": None if self.val_auroc != self.val_auroc else self.val_auroc,
                "stress_tpr": None if self.stress_tpr != self.stress_tpr else self.stress_tpr}


@register
class Monitor(Artifact):
    kind = "monitor"

    def __init__(self, *, readers: Sequence[Reader], threshold: float, fpr: float, refusal_threshold: float,
                 refusal_direction: Any, refusal_layer: int, refusal_token_ids: Sequence[int], protect: Any,
                 model: dict[str, Any], system: str = "", n_post: int = 1, metrics: dict[str, Any] | None = None,
                 info: dict[str, Any] | None = None, prefix: PrefixPrint | None = None):
        if not readers:
            raise ArtifactError("a monitor needs at least one harm reader; re-fit it with `safetyscope monitor fit`")
        if any(r.position not in POSITIONS for r in readers):
            raise ArtifactError(f"monitor reader positions must be one of {POSITIONS}; re-fit the monitor")
        self.readers = list(readers)
        self.threshold, self.fpr = float(threshold), float(fpr)
        self.refusal_threshold = float(refusal_threshold)
        r = np.asarray(refusal_direction, dtype=np.float64).reshape(-1)
        self.refusal_direction = r / (np.linalg.norm(r) or 1.0)  # [d_model]
        self.refusal_layer = int(refusal_layer)
        self.refusal_token_ids = [int(i) for i in refusal_token_ids]
        self.protect = np.asarray(protect, dtype=np.float64).reshape(-1, r.size)  # [k, d_model]
        self.model = dict(model)
        self.system, self.n_post = system, int(n_post)
        self.metrics = dict(metrics or {})
        self.info = dict(info or {})
        self.prefix = prefix
        d = int(self.model.get("d_model", r.size))
        if any(rd.weight.shape != (d,) for rd in self.readers) or r.size != d:
            raise ArtifactError(f"monitor tensors do not match d_model {d}; re-fit the monitor")

    # ---- scoring -------------------------------------------------------------------------------
    @property
    def layers(self) -> list[int]:
        """Blocks whose ``resid_pre`` the monitor reads (harm readers, the refusal direction, the prefix print)."""
        extra = set(self.prefix.blocks) if self.prefix is not None else set()
        return sorted({r.layer for r in self.readers} | {self.refusal_layer} | extra)

    def reader_matrix(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(W [n_readers, d], b, mean, std [n_readers]) float64."""
        w = np.stack([r.weight for r in self.readers])
        return (w, np.array([r.bias for r in self.readers]), np.array([r.mean for r in self.readers]),
                np.array([r.std for r in self.readers]))

    def harm_from_raw(self, raw: np.ndarray) -> np.ndarray:
        """Raw reader scores [n, n_readers] -> harm scores [n] (mean of the standardised scores)."""
        _, _, mu, sd = self.reader_matrix()
        return ((raw - mu) / sd).mean(-1)

    def harm_from_features(self, feats: Any) -> np.ndarray:
        """Harm score [n] of :class:`.fit.Features` (captured at every block of ``feats.layers``)."""
        raw = np.empty((feats.x.shape[0], len(self.readers)))
        for i, r in enumerate(self.readers):
            x = feats.at(r.position)[:, feats.layers.index(r.layer)]  # [n, d]
            raw[:, i] = x @ r.weight + r.bias
        return self.harm_from_raw(raw)

    def flags(self, harm: Any) -> np.ndarray:
        """Harmful verdicts (harm score above the calibrated threshold)."""
        return np.asarray(harm, dtype=np.float64) > self.threshold

    # ---- model checks ----------------------------------------------------------------------------
    def validate(self, lm: LoadedModel, *, strict: bool = True) -> None:
        """One-line error if ``lm`` is not the model the monitor was fitted on (dims always; name when strict)."""
        want = self.model
        have = {"d_model": lm.dims.d_model, "n_layers": lm.n_layers, "vocab": int(lm.unembed_matrix().shape[0])}
        for key, value in have.items():
            if key in want and int(want[key]) != value:
                raise MonitorMismatch(f"this monitor was fitted on {want.get('name')} ({key} {want[key]}) but "
                                      f"{lm.name} has {key} {value}; fit a monitor on this model")
        if strict and want.get("name") not in (None, lm.name):
            raise MonitorMismatch(f"this monitor was fitted on {want.get('name')}, not {lm.name}; fit one on this "
                                  "model, or pass strict=False (--any-model) for an edited copy of the same model")

    # ---- applying ----------------------------------------------------------------------------------
    def watch(self, lm: LoadedModel, *, on_alert: Callable[[int, Any], bool | None] | None = None,
              stop_on_alert: bool = False, drift_threshold: float | None = None, strict: bool = True) -> Watch:
        """A read-only context manager that reads every forward pass of ``lm`` (see :mod:`.watch`)."""
        from .watch import Watch

        self.validate(lm, strict=strict)
        return Watch(self, lm, on_alert=on_alert, stop_on_alert=stop_on_alert, drift_threshold=drift_threshold)

    def apply(self, lm: Any) -> AbstractContextManager[Any]:
        """The monitor never edits the model: ``apply`` is :meth:`watch` (entering yields the :class:`Watch`)."""
        return self.watch(lm)

    # ---- serialisation -----------------------------------------------------------------------------
    def to_state(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        w, b, mu, sd = self.reader_matrix()
        tensors = {"weight": torch.from_numpy(w), "bias": torch.from_numpy(b), "mean": torch.from_numpy(mu),
                   "std": torch.from_numpy(sd), "refusal_direction": torch.from_numpy(self.refusal_direction.copy()),
                   "protect": torch.from_numpy(self.protect.copy())}
        if self.prefix is not None:
            tensors.update(self.prefix.tensors())
        meta = {"readers": [r.describe() for r in self.readers], "threshold": self.threshold, "fpr": self.fpr,
                "refusal_threshold": self.refusal_threshold, "refusal_layer": self.refusal_layer,
                "refusal_token_ids": self.refusal_token_ids, "model": self.model, "system": self.system,
                "n_post": self.n_post, "metrics": self.metrics, "info": self.info,
                "prefix": None if self.prefix is None else self.prefix.meta()}
        return meta, tensors

    @classmethod
    def from_state(cls, meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Monitor:
        need = ("weight", "bias", "mean", "std", "refusal_direction")
        missing = [k for k in need if k not in tensors] + [k for k in ("readers", "model") if k not in meta]
        if missing:
            raise ArtifactError(f"monitor artifact lacks {', '.join(missing)}; re-fit it with `safetyscope monitor fit`")
        w, b = tensors["weight"].double().numpy(), tensors["bias"].double().numpy()
        mu, sd = tensors["mean"].double().numpy(), tensors["std"].double().numpy()
        if len(meta["readers"]) != w.shape[0]:
            raise ArtifactError("monitor artifact: reader list and weights disagree; re-fit the monitor")
        readers = [Reader(int(r["layer"]), r["position"], r["method"], w[i], float(b[i]), float(mu[i]), float(sd[i]),
                          float("nan") if r.get("val_auroc") is None else float(r["val_auroc"]),
                          float("nan") if r.get("stress_tpr") is None else float(r["stress_tpr"]))
                   for i, r in enumerate(meta["readers"])]
        protect = tensors.get("protect", torch.zeros(0, w.shape[1])).double().numpy()
        return cls(readers=readers, threshold=meta["threshold"], fpr=meta["fpr"],
                   refusal_threshold=meta["refusal_threshold"], refusal_direction=tensors["refusal_direction"].double().numpy(),
                   refusal_layer=meta["refusal_layer"], refusal_token_ids=meta["refusal_token_ids"], protect=protect,
                   model=meta["model"], system=meta.get("system", ""), n_post=meta.get("n_post", 1),
                   metrics=meta.get("metrics"), info=meta.get("info"),
                   prefix=PrefixPrint.from_state(meta.get("prefix"), tensors))
