"""Frozen results of an audit: per-matrix differences, per-layer verdicts, the no-reference signature,
the runtime findings, and the report that combines them. ``to_dict()`` gives JSON-ready data."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch

Verdict = Literal["clean", "modified", "tampering"]
DiffKind = Literal["none", "noise", "low_rank", "full_rank"]
VERDICT_TEXT: dict[str, str] = {"clean": "clean", "modified": "modified (benign)", "tampering": "refusal tampering"}
_ORDER: dict[str, int] = {"clean": 0, "modified": 1, "tampering": 2}


def worst(verdicts: list[Verdict]) -> Verdict:
    """The most severe of several verdicts (clean < modified < tampering)."""
    return max(verdicts, key=lambda v: _ORDER[v], default="clean")


def rounded(x: Any) -> Any:
    if isinstance(x, float):
        return float(f"{x:.6g}")
    if isinstance(x, (list, tuple)):
        return [rounded(v) for v in x]
    if isinstance(x, dict):
        return {k: rounded(v) for k, v in x.items()}
    if isinstance(x, torch.Tensor):
        return rounded(x.tolist())
    return x


@dataclass(frozen=True)
class NeuronEdit:
    """MLP neurons whose weight slice was zeroed or multiplied by a constant (the rest of the matrix untouched)."""

    name: str
    layer: int
    zeroed: tuple[int, ...]
    scaled: tuple[tuple[int, float], ...]  # (neuron, factor)


@dataclass(frozen=True)
class MatrixDiff:
    """How one tensor differs from the reference.

    ``rel_norm``: ||D||_F / ||W||_F; ``rank``: singular values holding 95% of ||D||^2; ``top_singular``:
    the largest singular values of D relative to ||W||_F; ``top_energy``: sigma_1^2 / ||D||^2.
    For residual writers: ``removal_weight`` w and ``explained`` (share of ||D||^2 that the projection
    removal ``D = -w r r^T W`` explains) with the matrix's own top direction (``self_*``) and with the
    direction recovered across all matrices (``global_*``); ``cos_global``: |cos| of the matrix's own
    top left singular vector with the recovered direction.
    """

    name: str
    role: str
    layer: int | None
    kind: DiffKind
    rel_norm: float
    noise_floor: float
    rank: int | None = None
    top_singular: tuple[float, ...] = ()
    top_energy: float | None = None
    self_weight: float | None = None
    self_explained: float | None = None
    global_weight: float | None = None
    global_explained: float | None = None
    cos_global: float | None = None

    @property
    def removal(self) -> bool:
        """The edit is (mostly) a projection that removes one direction from the output."""
        return self.self_explained is not None and self.self_explained >= 0.9 and (self.self_weight or 0.0) > 0.02


@dataclass(frozen=True)
class LayerVerdict:
    layer: int
    verdict: Verdict
    removal_weights: dict[str, float]  # writer name -> removal weight along the recovered direction
    evidence: tuple[str, ...] = ()


@dataclass(frozen=True)
class WeightAudit:
    """The checkpoint against a reference (``audit_checkpoint(..., reference=...)``)."""

    checkpoint: str
    reference: str
    verdict: Verdict
    evidence: tuple[str, ...]
    matrices: tuple[MatrixDiff, ...]
    layers: tuple[LayerVerdict, ...]
    neurons: tuple[NeuronEdit, ...]
    direction: torch.Tensor | None  # [d_model] unit, the recovered removed direction
    concentration: float | None  # share of all residual-side change along that one direction
    n_removal: int  # residual writers whose change is a one-direction removal
    n_aligned: int  # of those, how many removed the recovered direction (|cos| >= 0.9)
    cos_reference: float | None  # |cos| with the given or found refusal direction
    counts: dict[str, int]
    seconds: float

    def changed(self) -> list[MatrixDiff]:
        return [m for m in self.matrices if m.kind != "none"]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["matrices"] = [asdict(m) for m in self.changed()]
        d["direction"] = None if self.direction is None else "[d_model] unit vector (not printed)"
        return rounded(d)


@dataclass(frozen=True)
class SignatureAudit:
    """The checkpoint alone (no reference): the ablation signature and canary refusal.

    ``null_ratio``: the smallest eigenvalue of sum_i W_i W_i^T / ||W_i||^2 over residual writers relative
    to the median one (about 0 when some direction can no longer be written by any of them);
    ``collapse``: {matrix: ||r^T W|| / median ||u^T W|| over random unit u} along the null direction r;
    ``harm_collapse``: the same along the checkpoint's own difference-of-means harm direction per layer.
    """

    checkpoint: str
    verdict: Verdict
    evidence: tuple[str, ...]
    null_direction: torch.Tensor  # [d_model]
    null_ratio: float
    collapse: dict[str, float]
    n_collapsed: int
    harm_collapse: dict[int, float]
    harm_cos_null: dict[int, float]
    canary_scores: tuple[float, ...]
    canary_refusal_rate: float | None
    seconds: float
    zeroed_neurons: dict[str, tuple[int, ...]] = field(default_factory=dict)  # MLP matrix -> all-zero neuron slices
    n_weak: int = 0  # writers whose norm along the direction is < SignatureConfig.weak of random directions'
    direction_source: str = ""  # how the direction was found
    embedding_edit: tuple[float, float] | None = None  # (weight, share) of a one-direction edit of an untied embedding
    restore: dict[str, Any] | None = None  # the restore test (behaviour.RestoreTest.to_dict())
    harm_alignment: float | None = None  # max over blocks of |cos(own harm difference, null direction)| x sqrt(d_model)
    readers: dict[str, Any] | None = None  # the reader test of a direction the writers lost (readers.ReaderTest.to_dict())

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["null_direction"] = "[d_model] unit vector (not printed)"
        return rounded(d)


@dataclass(frozen=True)
class RuntimeFinding:
    kind: Literal["hook", "pre_hook", "peft", "class", "param_changed"]
    module: str
    detail: str


@dataclass(frozen=True)
class RuntimeAudit:
    model: str
    findings: tuple[RuntimeFinding, ...]
    seconds: float
    notes: tuple[str, ...] = ()

    @property
    def clean(self) -> bool:
        return not self.findings

    @property
    def verdict(self) -> Verdict:
        return "clean" if self.clean else "tampering"

    def to_dict(self) -> dict[str, Any]:
        return rounded({**asdict(self), "clean": self.clean, "verdict": self.verdict})


@dataclass(frozen=True)
class FingerprintAudit:
    """The checkpoint against a trusted model's saved fingerprint (see :mod:`.fingerprint`)."""

    checkpoint: str
    fingerprint: str
    verdict: Verdict
    evidence: tuple[str, ...]
    ratios: dict[int, float]  # block -> median over writers of ||h^T W'|| / ||h^T W|| along its harm direction
    changed: tuple[str, ...]  # tensors whose squared norm moved beyond the dtype noise floor
    canary_shift: float | None  # mean canary refusal score now minus at fingerprint time
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return rounded({**asdict(self), "changed": list(self.changed)[:50], "n_changed": len(self.changed)})


@dataclass(frozen=True)
class AuditReport:
    """What ``audit_checkpoint`` returns: the overall verdict and the evidence of each check that ran."""

    checkpoint: str
    verdict: Verdict
    evidence: tuple[str, ...]
    weights: WeightAudit | None = None
    signature: SignatureAudit | None = None
    fingerprint: FingerprintAudit | None = None
    seconds: float = 0.0
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def verdict_text(self) -> str:
        return VERDICT_TEXT[self.verdict]

    def to_dict(self) -> dict[str, Any]:
        return rounded({
            "checkpoint": self.checkpoint, "verdict": self.verdict, "verdict_text": self.verdict_text,
            "evidence": list(self.evidence), "notes": list(self.notes), "seconds": self.seconds,
            "weights": None if self.weights is None else self.weights.to_dict(),
            "signature": None if self.signature is None else self.signature.to_dict(),
            "fingerprint": None if self.fingerprint is None else self.fingerprint.to_dict(),
        })
