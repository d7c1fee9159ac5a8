"""Typed views of the map's stage results.

Each stage stores its result as JSON (``OUT/map/stages/<stage>.json``); the report and the evidence
rules read it through these frozen views. ``from_json`` indexes the keys it needs directly, so a
renamed key fails loudly (the report stage records the error on the page) instead of rendering "n/a".
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

Json = Mapping[str, Any]


def _float(x: Any) -> float:
    return float("nan") if x is None else float(x)


@dataclass(frozen=True)
class ModelInfo:
    name: str
    n_layers: int
    model_type: str = ""
    d_model: int | None = None
    d_mlp: int | None = None
    n_params: int | None = None
    dtype: str = ""

    @classmethod
    def from_json(cls, d: Json) -> ModelInfo:
        return cls(str(d["name"]), int(d["n_layers"]), str(d.get("model_type") or ""), d.get("d_model"),
                   d.get("d_mlp"), d.get("n_params"), str(d.get("dtype") or ""))

    def facts(self) -> str:
        """"llama, 3 layers, d_model 32, 1M parameters, float32" (what is known)."""
        parts = [self.model_type, f"{self.n_layers} layers" if self.n_layers else "",
                 f"d_model {self.d_model}" if self.d_model else "",
                 f"{self.n_params / 1e6:.0f}M parameters" if self.n_params else "", self.dtype]
        return ", ".join(p for p in parts if p)


@dataclass(frozen=True)
class ProbeLayer:
    layer: int
    accuracy: float
    control_accuracy: float


@dataclass(frozen=True)
class ProbeSummary:
    """Per-layer probe accuracy against its shuffled-label control, and the best layer."""

    model: ModelInfo
    layers: tuple[ProbeLayer, ...]
    best: ProbeLayer

    @classmethod
    def from_json(cls, d: Json) -> ProbeSummary:
        rows = tuple(ProbeLayer(int(r["layer"]), float(r["accuracy"]), float(r["control_accuracy"])) for r in d["layers"])
        b = d["best"]
        return cls(ModelInfo.from_json(d["model"]), rows,
                   ProbeLayer(int(d["best_layer"]), float(b["accuracy"]), float(b["control_accuracy"])))

    @property
    def accuracies(self) -> list[float]:
        return [r.accuracy for r in self.layers]

    @property
    def controls(self) -> list[float]:
        return [r.control_accuracy for r in self.layers]


@dataclass(frozen=True)
class NeuronLayer:
    layer: int
    n_large: int  # neurons with |Cohen's d| > 0.8
    p99_abs_effect: float


@dataclass(frozen=True)
class NeuronSummary:
    layers_analysed: str
    layers: tuple[NeuronLayer, ...]
    top: tuple[Mapping[str, Any], ...]  # records of the top neurons by effect size (best first)

    @classmethod
    def from_json(cls, d: Json) -> NeuronSummary:
        rows = tuple(NeuronLayer(int(r["layer"]), int(r["n_large"]), float(r["p99_abs_effect"])) for r in d["layers"])
        return cls(str(d["layers_analysed"]), rows, tuple(d["top_by_effect_size"]))

    @property
    def n_large(self) -> int:
        return sum(r.n_large for r in self.layers)


@dataclass(frozen=True)
class EffectGrid:
    """Median normalised patching effect per layer (rows) x component (cols); None where not computed."""

    rows: tuple[str, ...]
    cols: tuple[str, ...]
    median: tuple[tuple[float | None, ...], ...]  # [n_rows][n_cols]

    @classmethod
    def from_json(cls, d: Json) -> EffectGrid:
        return cls(tuple(str(r) for r in d["rows"]), tuple(str(c) for c in d["cols"]),
                   tuple(tuple(None if v is None else float(v) for v in row) for row in d["median"]))


@dataclass(frozen=True)
class TraceSummary:
    grid: EffectGrid | None  # the layer x component grid of the attribution mode
    effects: Mapping[str, float]  # cell -> effect: top estimated cells, replaced by their exact values where verified

    @classmethod
    def from_json(cls, d: Json) -> TraceSummary:
        modes = d["modes"]
        mode: Json = modes.get("attribution") or next(iter(modes.values()), {})
        grids = mode["grids"]
        grid = EffectGrid.from_json(grids["component"]) if "component" in grids else None
        top = {r["cell"]: float(r["median"]) for r in mode["top"].get("component", [])}
        verified = {r["cell"]: r["exact_median"]  # only the attribution mode verifies its top cells
                    for key, rs in mode.get("verify", {}).items() if not str(key).startswith("reverse") for r in rs}
        effects = {**top, **{k: float(v) for k, v in verified.items() if v is not None}}
        return cls(grid, effects)


def rate(r: Json | None) -> float | None:
    """The ``rate`` of a judged refusal-rate record, None when it was not measured."""
    return None if r is None or r.get("rate") is None else float(r["rate"])


@dataclass(frozen=True)
class DirectionSummary:
    layer: int
    position: int
    ablation: str
    refusal_before: float | None  # judged refusal of held-out harmful prompts, unmodified
    refusal_after: float | None  # ... with the direction ablated
    kl_mean: float  # first-token KL on held-out harmless prompts under the ablation
    refined: bool = False  # trained by `refine` after the selection
    zero_refusal_after: float | None = None  # the same direction under zero ablation (the exportable variant)
    zero_kl_mean: float | None = None
    judge: str = "phrase"  # the judge of the refusal rates (evaluate_ablation's default, the phrase judge)
    n_harmful: int | None = None  # held-out harmful prompts the rates are measured on

    @classmethod
    def from_json(cls, d: Json) -> DirectionSummary:
        find, ab, zero = d["find"], d["ablate"], d.get("ablate_zero")
        return cls(int(find["layer"]), int(find["position"]), str(find["ablation"]), rate(ab["harmful_refusal_before"]),
                   rate(ab["harmful_refusal_after"]), _float(ab["kl_first_token"]["mean"]), "refine" in find,
                   rate(zero.get("harmful_refusal_after")) if zero else None,
                   _float(zero["kl_first_token"]["mean"]) if zero else None, str(ab.get("judge") or "phrase"),
                   int(ab["n_harmful"]) if ab.get("n_harmful") is not None else None)


@dataclass(frozen=True)
class CurvePoint:
    curve: str
    k: int
    score_refusal_rate: float


def _points(rows: Sequence[Json]) -> tuple[CurvePoint, ...]:
    return tuple(CurvePoint(str(r["curve"]), int(r["k"]), float(r["score_refusal_rate"])) for r in rows)


@dataclass(frozen=True)
class FragilitySummary:
    neurons: tuple[CurvePoint, ...]  # ranked and random neuron curves
    direction: tuple[CurvePoint, ...] = ()  # the refusal direction (k = 0, 1) and random directions

    @classmethod
    def from_json(cls, d: Json) -> FragilitySummary:
        return cls(_points(d["summary"]), _points(d.get("direction_summary", [])))


@dataclass(frozen=True)
class Cost:
    kl_first_token_mean: float
    ppl_ratio: float


@dataclass(frozen=True)
class CapabilitySummary:
    interventions: Mapping[str, Cost]  # "direction" / "neurons" -> cost
    samples: tuple[Mapping[str, Any], ...]  # prompt, before, after_<name>, refused_*

    @classmethod
    def from_json(cls, d: Json) -> CapabilitySummary:
        costs = {k: Cost(float(v["kl_first_token_mean"]), float(v["ppl_ratio"])) for k, v in d["interventions"].items()}
        return cls(costs, tuple(d["samples"]))


@dataclass(frozen=True)
class DLASummary:
    by_component: Mapping[str, float]  # site -> DLA harmful - harmless
    top: tuple[Mapping[str, Any], ...]  # component, dla_diff, harmful, harmless
    n_layers: int

    @classmethod
    def from_json(cls, d: Json) -> DLASummary:
        return cls(dict(zip(d["components"], (float(x) for x in d["diff"]))), tuple(d["top"]), int(d["n_layers"]))


@dataclass(frozen=True)
class ReportSummary:
    """What the report stage stored: the page, its headline, the implications rows, stages without evidence."""

    path: str
    headline: str
    implications: tuple[Mapping[str, str], ...]  # row, measured, meaning
    missing_stages: Mapping[str, str]  # circuit stage -> why it has no evidence

    @classmethod
    def from_json(cls, d: Json) -> ReportSummary:
        return cls(str(d["report"]), str(d["headline"]), tuple(d["implications"]), dict(d["missing_stages"]))


@dataclass(frozen=True)
class StageRun:
    """How one stage went in this run: computed, reused from the cache, failed or not run."""

    name: str
    status: str  # "done", "cached", "failed", "skipped"
    seconds: float | None = None
    error: str | None = None


@dataclass(frozen=True)
class Results:
    """The typed results of every stage that has one (None: not run, failed or unreadable)."""

    probe: ProbeSummary | None = None
    neurons: NeuronSummary | None = None
    trace: TraceSummary | None = None
    direction: DirectionSummary | None = None
    fragility: FragilitySummary | None = None
    capability: CapabilitySummary | None = None
    dla: DLASummary | None = None
    report: ReportSummary | None = None
    problems: Mapping[str, str] = field(default_factory=dict)  # stage -> why its result could not be read

    @classmethod
    def from_json(cls, done: Mapping[str, Any]) -> Results:
        parsers: dict[str, Any] = {"probe": ProbeSummary, "neurons": NeuronSummary, "trace": TraceSummary,
                                   "direction": DirectionSummary, "fragility": FragilitySummary,
                                   "capability": CapabilitySummary, "dla": DLASummary, "report": ReportSummary}
        found: dict[str, Any] = {}
        problems: dict[str, str] = {}
        for name, parser in parsers.items():
            raw = done.get(name)
            if not isinstance(raw, Mapping) or "error" in raw:
                continue
            try:
                found[name] = parser.from_json(raw)
            except (KeyError, TypeError, ValueError, StopIteration) as exc:
                problems[name] = f"result not readable ({type(exc).__name__}: {exc})"
        return cls(**found, problems=problems)

    @property
    def model(self) -> ModelInfo | None:
        return self.probe.model if self.probe else None

    @property
    def n_layers(self) -> int:
        if self.probe:
            return self.probe.model.n_layers
        return self.dla.n_layers if self.dla else 1
