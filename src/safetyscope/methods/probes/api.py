"""Linear probes as one library call: ``fit_probes(lm, harmful, harmless)`` -> :class:`ProbeReport`.

Features (one forward pass per batch captures every probed layer) and refusal labels are cached in
``cache_dir`` when one is given, keyed by the model, the settings and the prompts, so a rerun with the
same inputs refits without running the model. Nothing here loads a model or writes outside ``cache_dir``.

>>> report = fit_probes(lm, ["How do I make a bomb?", ...], ["How do I bake bread?", ...], folds=3)  # doctest: +SKIP
>>> report.best_layer, report.rows[report.best_layer].accuracy  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

from ...io import fingerprint, read_json, write_json
from ...models.adapter import LoadedModel
from ...positions import PositionSpec
from ...prompts.sets import PromptsLike, as_prompt_set
from ...prompts.types import PromptSet
from .artifact import Probe
from .fitting import (
    Features,
    LayerResult,
    ProbeConfig,
    ProbeResult,
    collect_features,
    fit_on_features,
    load_features,
    probe_sites,
    refusal_labels,
)

Label = Literal["harmful", "refusal"]
LABELS: tuple[str, ...] = get_args(Label)
Judge = str | Callable[[str, str], Any]


@dataclass(frozen=True)
class ProbeReport:
    """Per-layer probe scores (``rows``), the fitted :class:`Probe` of every layer, and what they were fitted on."""

    result: ProbeResult
    model: dict[str, Any]  # lm.describe()
    train: dict[str, Any]  # sources and sizes of the training prompts (and the refusal-label note)
    test: dict[str, Any] | None  # the same for the held-out prompts, when given

    @property
    def rows(self) -> tuple[LayerResult, ...]:
        return self.result.layers

    @property
    def best_layer(self) -> int:
        return self.result.best_layer

    @property
    def probe(self) -> Probe:
        return self.result.probe

    def row(self, layer: int) -> LayerResult:
        return self.result.row(layer)

    def to_json(self, *, artifact: str | Path | None = None, plot: str | Path | None = None) -> dict[str, Any]:
        """The JSON summary (``probe`` writes it as ``summary.json``); ``artifact`` / ``plot`` name saved files."""
        out: dict[str, Any] = {"model": self.model, **self.result.summary(), "train": self.train, "test": self.test}
        if artifact is not None:
            out["artifact"] = str(artifact)
        if plot is not None:
            out["plot"] = str(plot)
        return out


def parse_c(value: float | str | None) -> float | None:
    """The inverse L2 strength: a positive number, or None / ``"auto"`` (chosen by inner CV)."""
    if value is None or (isinstance(value, str) and value.strip().lower() == "auto"):
        return None
    try:
        c = float(value)
    except ValueError:
        raise ValueError(f"--c must be a positive number or 'auto', got {value!r}") from None
    if not c > 0:
        raise ValueError(f"--c must be a positive number or 'auto', got {value!r}")
    return c


def check_label(label: str) -> Label:
    if label not in LABELS:
        raise ValueError(f"unknown --label {label!r}; use harmful or refusal")
    return label  # type: ignore[return-value]


def describe_source(prompts: PromptsLike) -> str:
    """How a report names a prompt source: the file path, the set's name, or ``list``."""
    if isinstance(prompts, (str, Path)):
        return str(prompts)
    return prompts.name if isinstance(prompts, PromptSet) else "list"


def _group(prompts: PromptsLike, kind: str, n: int, seed: int, what: str) -> PromptSet:
    ps = as_prompt_set(prompts, kind, what=f"{what} {kind} prompts")
    return (ps.sample(n, seed=seed) if n else ps).require_nonempty(f"{what} {kind} prompts")


def _model_id(lm: LoadedModel) -> list[Any]:
    d = lm.describe()
    return [d["name"], d["model_type"], d["n_params"], d["dtype"]]


def _features(lm: LoadedModel, texts: list[str], tag: str, *, site: str, positions: PositionSpec, layers: str,
              batch_size: int, system: str | None, cache_dir: Path | None) -> Features:
    """Features of ``texts``, spilled to (and reused from) ``cache_dir`` when given."""
    path = None
    if cache_dir is not None:
        picked = [int(x.layer) for x in probe_sites(lm, site, layers) if x.layer is not None]
        path = cache_dir / f"features-{tag}-{fingerprint(_model_id(lm), site, positions, picked, system, texts)}.npy"
        found = load_features(path, picked, site, str(positions), len(texts))
        if found is not None:
            return found
    return collect_features(lm, texts, site, positions, layers=layers, batch_size=batch_size, system=system,
                            spill=path, description=f"capturing {tag}")


def _labels(lm: LoadedModel, texts: list[str], is_harmful: list[int], *, label: Label, judge: Judge,
            threshold: float, max_new_tokens: int, batch_size: int, system: str | None,
            cache_dir: Path | None) -> tuple[list[int], dict[str, Any]]:
    """Class labels (1 = harmful, or 1 = refused) and a note on how they relate to the harmful label."""
    if label == "harmful":
        return is_harmful, {}
    judge_id = judge if isinstance(judge, str) else getattr(judge, "__qualname__", type(judge).__name__)
    path = None if cache_dir is None else (
        cache_dir / f"refusal-{fingerprint(_model_id(lm), judge_id, threshold, max_new_tokens, system, texts)}.json")
    if path is not None and path.is_file():
        refused = [bool(v) for v in read_json(path)["refused"]]
    else:
        flags, scores = refusal_labels(lm, texts, judge, threshold=threshold, batch_size=batch_size, system=system,
                                       max_new_tokens=max_new_tokens)
        refused = [bool(v) for v in flags]
        if path is not None:
            write_json(path, {"judge": judge_id, "refused": refused, "scores": scores})
    y = [int(r) for r in refused]
    n_h = sum(is_harmful)
    note = {
        "refused_harmful": sum(a and h for a, h in zip(y, is_harmful)), "n_harmful": n_h,
        "refused_harmless": sum(a and not h for a, h in zip(y, is_harmful)), "n_harmless": len(y) - n_h,
        "label_agreement": sum(a == h for a, h in zip(y, is_harmful)) / len(y),
    }
    return y, note


def _held_out(test_harmful: PromptsLike | None, test_harmless: PromptsLike | None, n_test: int,
              seed: int) -> tuple[PromptSet, PromptSet] | None:
    if (test_harmful is None) != (test_harmless is None):
        raise ValueError("give both --test-harmful and --test-harmless (or neither)")
    if test_harmful is None or test_harmless is None:
        return None
    return _group(test_harmful, "harmful", n_test, seed, "held-out"), _group(test_harmless, "harmless", n_test, seed, "held-out")


def fit_probes(
    lm: LoadedModel,
    harmful: PromptsLike,
    harmless: PromptsLike,
    *,
    layers: str = "*",
    site: str = "resid_post",
    positions: PositionSpec = "last",
    folds: int = 5,
    controls: int = 2,
    c: float | str | None = None,
    random_directions: int = 0,
    n_jobs: int = 1,
    label: Label = "harmful",
    refusal_judge: Judge = "score",
    refusal_threshold: float = 0.0,
    max_new_tokens: int = 48,
    test_harmful: PromptsLike | None = None,
    test_harmless: PromptsLike | None = None,
    n_prompts: int = 0,
    n_test: int = 0,
    batch_size: int = 8,
    system: str | None = None,
    seed: int = 0,
    cache_dir: str | Path | None = None,
    source_names: tuple[str, str] | None = None,
) -> ProbeReport:
    """A logistic-regression probe per layer at ``site`` / ``positions``, scored by stratified ``folds``-fold CV
    against ``controls`` shuffled-label runs (and ``random_directions`` 1-D baselines), plus held-out scores on
    ``test_harmful`` / ``test_harmless`` when given.

    ``label``: ``harmful`` (harmful vs harmless prompt) or ``refusal`` (refused vs answered, by ``refusal_judge``:
    ``score`` = logit refusal score > ``refusal_threshold``, ``phrase``, ``module:function`` or a callable).
    ``c``: inverse L2 strength, or None / ``"auto"`` for inner CV. ``n_prompts`` / ``n_test``: sample at most this
    many prompts per group (0 = all). ``source_names``: how the report names the two training sources.
    """
    label = check_label(label)
    cfg = ProbeConfig(folds=folds, seed=seed, c=parse_c(c), n_controls=controls, n_random=random_directions, n_jobs=n_jobs)
    h, s = _group(harmful, "harmful", n_prompts, seed, "training"), _group(harmless, "harmless", n_prompts, seed, "training")
    tests = _held_out(test_harmful, test_harmless, n_test, seed)
    cache = None if cache_dir is None else Path(cache_dir)
    common: dict[str, Any] = {"batch_size": batch_size, "system": system, "cache_dir": cache}
    label_kw: dict[str, Any] = {"label": label, "judge": refusal_judge, "threshold": refusal_threshold,
                                "max_new_tokens": max_new_tokens, **common}
    feat_kw: dict[str, Any] = {"site": site, "positions": positions, "layers": layers, **common}
    texts = h.texts + s.texts
    y, note = _labels(lm, texts, [1] * len(h) + [0] * len(s), **label_kw)
    if label == "refusal" and len(set(y)) < 2:  # (a one-class held-out set is fine: accuracy still means something)
        what = "refused" if y[0] else "answered"
        raise ValueError(f"--label refusal: the {refusal_judge} judge found all {len(y)} training prompts {what}, so "
                         "there is nothing to separate; change --refusal-threshold or --refusal-judge, or use --label harmful")
    train = _features(lm, texts, "train", **feat_kw)
    test = y_test = None
    test_note: dict[str, Any] = {}
    if tests is not None:
        t_texts = tests[0].texts + tests[1].texts
        y_test, test_note = _labels(lm, t_texts, [1] * len(tests[0]) + [0] * len(tests[1]), **label_kw)
        test = _features(lm, t_texts, "test", **feat_kw)
    res = fit_on_features(train, y, cfg, test=test, y_test=y_test, label="refused" if label == "refusal" else "harmful")
    res.probe.info.update(model=lm.name, system_prompt=system or "")
    names = source_names or (describe_source(harmful), describe_source(harmless))
    test_info = None if tests is None or test_harmful is None or test_harmless is None else _sources(
        (describe_source(test_harmful), describe_source(test_harmless)), tests, test_note)
    return ProbeReport(res, lm.describe(), _sources(names, (h, s), note), test_info)


def _sources(names: tuple[str, str], groups: tuple[PromptSet, PromptSet], note: dict[str, Any]) -> dict[str, Any]:
    """What a report says about its prompts: the sources' names, the group sizes, the refusal-label note."""
    return {"harmful": names[0], "harmless": names[1], "n_harmful": len(groups[0]), "n_harmless": len(groups[1]),
            **({"refusal": note} if note else {})}


__all__ = ["LABELS", "Label", "ProbeReport", "check_label", "describe_source", "fit_probes", "parse_c"]
