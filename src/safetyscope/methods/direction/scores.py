"""The typed records of a direction selection: why a candidate was filtered out, its scores, the settings.

Reasons are an enum (:class:`Reason`); their human-readable text (with the threshold that applied, as
``selection.json`` writes it) is made from the settings only at the JSON edge, and parsed back there.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Any, Literal

import torch

from .artifact import ABLATIONS, Ablation

Key = tuple[int, int]  # (layer, position offset)
InduceMode = Literal["all", "lazy"]
INDUCE_MODES: tuple[InduceMode, ...] = ("all", "lazy")
ScreenMode = Literal["forward", "gradient"]
SCREEN_MODES: tuple[ScreenMode, ...] = ("forward", "gradient")


class Reason(str, Enum):
    """Why a candidate is not eligible. The value is the start of its text in ``selection.json``."""

    LATE = "late layer"  # in the pruned last blocks
    ZERO = "zero difference"  # both groups agree there (degenerate difference of means)
    SCREENED = "screened out"  # not among the best on the screening prompts
    NOT_FINITE = "not finite"  # bypass or KL is NaN / inf
    KL = "kl"  # ablation moves harmless first-token KL above the threshold
    INDUCE_NOT_SCORED = "induce not scored"  # lazy induce stopped before this candidate
    FAILS_INDUCE = "fails to induce"  # addition does not raise the harmless refusal score enough

    def text(self, config: dict[str, Any]) -> str:
        """The reason with the threshold that applied (``config``: a Selection's config)."""
        if self is Reason.LATE and "cutoff" in config:
            return f"late layer (>= {config['cutoff']})"
        if self is Reason.SCREENED and "keep" in config:
            how = (f", after a shortlist of {shortlist_size(config['keep'])} by gradient attribution"
                   if config.get("screen_by") == "gradient" else "")
            return f"screened out (not among the best {config['keep']} on {config['screen']} prompts{how})"
        if self is Reason.KL and "kl_threshold" in config:
            return f"kl > {config['kl_threshold']}"
        if self is Reason.FAILS_INDUCE and "induce_threshold" in config:
            return f"fails to induce (< {config['induce_threshold']})"
        return self.value

    @classmethod
    def parse(cls, text: str | Reason) -> Reason:
        """The reason a ``selection.json`` text names (the JSON edge only)."""
        if isinstance(text, Reason):
            return text
        for reason in sorted(cls, key=lambda r: -len(r.value)):  # "induce not scored" before shorter values
            if str(text).startswith(reason.value):
                return reason
        raise ValueError(f"unknown selection reason {text!r}; expected one of {[r.value for r in cls]}")


def shortlist_size(keep: int) -> int:
    """How many candidates the gradient-attribution shortlist passes on to the forward screen."""
    return 2 * max(1, keep)


# Candidates with one of these are never chosen, not even by the fallbacks of `choose`.
EXCLUDED = frozenset({Reason.LATE, Reason.ZERO, Reason.NOT_FINITE, Reason.SCREENED})
# Reasons the first fallback of `choose` relaxes (the KL filter is kept).
INDUCE_REASONS = frozenset({Reason.FAILS_INDUCE, Reason.INDUCE_NOT_SCORED})


@dataclass
class CandidateScore:
    layer: int
    position: int
    token: str
    norm: float
    bypass: float | None = None  # mean refusal score, harmful prompts, under ablation
    bypass_refusing: float | None = None  # fraction of those prompts whose score stays > 0
    kl: float | None = None  # mean first-token KL, harmless prompts, under ablation
    induce: float | None = None  # mean refusal score, harmless prompts, under addition
    screen_bypass: float | None = None  # bypass / KL on the screening subset (SelectConfig.screen)
    screen_kl: float | None = None
    predicted_bypass: float | None = None  # first-order bypass on the harmful prompts (screen_by="gradient")
    judged_bypass: float | None = None  # fraction of harmful prompts judged refused under ablation (verify)
    judged_induce: float | None = None  # fraction of harmless prompts judged refused under addition (verify)
    reasons: list[Reason] = field(default_factory=list)  # why it was filtered out (empty = eligible)

    def __post_init__(self) -> None:
        self.reasons = [Reason.parse(r) for r in self.reasons]

    @property
    def key(self) -> Key:
        return (self.layer, self.position)

    @property
    def eligible(self) -> bool:
        return not self.reasons and self.bypass is not None

    def flag(self, reason: Reason) -> None:
        """Add ``reason`` once."""
        if reason not in self.reasons:
            self.reasons.append(reason)

    def has(self, reasons: frozenset[Reason]) -> bool:
        return any(r in reasons for r in self.reasons)


@dataclass
class SelectConfig:
    kl_threshold: float = 0.1
    induce_threshold: float = 0.0
    prune_layers: float = 0.2  # drop candidates in the last 20% of blocks
    induce: InduceMode = "all"  # "all": score every candidate; "lazy": only as needed, in bypass order
    score_pruned: bool = False  # also score the pruned late layers (for complete plots)
    layers: list[int] | None = None  # restrict to these blocks (None = all)
    positions: list[int] | None = None  # restrict to these offsets (None = all captured)
    coeff: float = 1.0  # activation-addition coefficient (1 = the raw difference of means)
    per_pass: int = 0  # candidates per forward pass (0 = as many as fit batch_size rows)
    screen: int = 0  # >0: first score every candidate on this many prompts per group ...
    keep: int = 16  # ... and fully score only the best `keep` of them (lowest bypass, KL-passing first)
    screen_by: ScreenMode = "forward"  # forward: a pass per candidate; gradient: a first-order shortlist first (attribution.py)
    verify: int = 0  # >0: judge real replies of this many finalists and choose by judged refusal
    verify_tokens: int = 24  # reply length for the verification
    ablation: Ablation = "zero"  # how bypass/KL ablate: "zero" (the paper) or "mean" (to the harmless mean)

    def __post_init__(self) -> None:
        if self.induce not in INDUCE_MODES:
            raise ValueError(f"unknown induce mode {self.induce!r}; use all or lazy")
        if self.ablation not in ABLATIONS:
            raise ValueError(f"unknown ablation {self.ablation!r}; use {' or '.join(ABLATIONS)}")
        if self.screen_by not in SCREEN_MODES:
            raise ValueError(f"unknown screen mode {self.screen_by!r}; use forward or gradient")

    def cutoff(self, n_layers: int) -> int:
        """First block that is pruned (Arditi et al.: int(n_layers * (1 - prune)))."""
        return int(n_layers * (1.0 - self.prune_layers))


@dataclass
class Selection:
    scores: list[CandidateScore]
    best: Key | None
    baseline: dict[str, float]
    config: dict[str, Any]
    n_harmful: int
    n_harmless: int
    note: str = ""

    def get(self, layer: int, position: int) -> CandidateScore:
        for s in self.scores:
            if s.key == (layer, position):
                return s
        raise KeyError(f"no score for layer {layer}, position {position}")

    def grid(self, metric: str, n_layers: int, positions: Sequence[int], screened: bool = True) -> torch.Tensor:
        """[n_layers, n_positions] of a metric (NaN where not scored), for heatmaps.

        With ``screened``, bypass/KL fall back to the screening-pass value where there is no full score.
        """
        out = torch.full((n_layers, len(positions)), math.nan)
        for s in self.scores:
            v = getattr(s, metric)
            if v is None and screened and metric in ("bypass", "kl"):
                v = getattr(s, f"screen_{metric}")
            if v is not None and s.position in positions:
                out[s.layer, list(positions).index(s.position)] = float(v)
        return out

    def to_json(self) -> dict[str, Any]:
        def row(s: CandidateScore) -> dict[str, Any]:
            return {**asdict(s), "reasons": [r.text(self.config) for r in s.reasons]}

        return {
            "best": list(self.best) if self.best else None, "baseline": self.baseline, "config": self.config,
            "n_harmful": self.n_harmful, "n_harmless": self.n_harmless, "note": self.note,
            "scores": [row(s) for s in self.scores],
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Selection:
        best = (int(d["best"][0]), int(d["best"][1])) if d.get("best") else None
        return cls([CandidateScore(**s) for s in d["scores"]], best, d["baseline"], d["config"], d["n_harmful"],
                   d["n_harmless"], d.get("note", ""))
