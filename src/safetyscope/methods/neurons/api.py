"""Safety neurons as library calls: ``find_neurons`` -> :class:`NeuronReport` (with its :class:`NeuronSet`),
``neuron_ablation`` (refusal and KL with a set ablated) and ``neuron_fragility`` (curves as more neurons go).

Prompt groups are :data:`~safetyscope.prompts.sets.PromptsLike` (a list of strings, a PromptSet or a file);
files are digested (``prompts.sets.file_digest``) into the set's ``info["fitted_on"]``, so measuring on the
file a set was found on is refused (:func:`check_held_out`). Nothing here loads a model.

>>> report = find_neurons(lm, harmful, harmless, top_k=50, cache_dir="runs/x/neurons")  # doctest: +SKIP
>>> with report.neuron_set.apply(lm): ...  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal, get_args

from ...io import fingerprint, read_json, write_json
from ...measure.compare import logits_under
from ...measure.refusal_tokens import refusal_token_ids
from ...models.adapter import LoadedModel
from ...positions import PositionSpec
from ...prompts.sets import PromptsLike, as_prompt_set, file_digest
from ...prompts.types import PromptSet
from .analysis import FilterMethod, NeuronAnalysis, analyse_neurons, check_filter
from .artifact import Neuron, NeuronSet, ablate_neurons, resolve_strength
from .fragility import FragilityResult, fragility_curves, measure_point, parse_ks
from .grads import set_difference
from .rank import DIRECTIONS

Ranking = Literal["effect_size", "diff", "gradient", "gradient_diff"]
RANKINGS: tuple[str, ...] = get_args(Ranking)
FRAGILITY_PARTIAL = "fragility_partial.json"  # finished fragility points of an interrupted run (in cache_dir)


def check_ranking(name: str) -> Ranking:
    if name not in RANKINGS:
        raise ValueError(f"unknown ranking {name!r}; use {', '.join(RANKINGS)}")
    return name  # type: ignore[return-value]


def _group(prompts: PromptsLike, kind: str, n: int, seed: int, what: str = "") -> PromptSet:
    ps = as_prompt_set(prompts, kind, what=f"{what}{kind} prompts")
    return (ps.sample(n, seed=seed) if n else ps).require_nonempty(f"{what}{kind} prompts")


def _fitted_on(**groups: PromptsLike) -> dict[str, dict[str, str]]:
    """{kind: {"path", "sha256"}} of the groups given as files."""
    return {kind: {"path": str(p), "sha256": file_digest(p)} for kind, p in groups.items()
            if isinstance(p, (str, Path)) and Path(p).is_file()}


def utility_set(utility_texts: int | Sequence[str]) -> list[str]:
    """The utility texts: the first N built-in capability passages, or the given texts."""
    if isinstance(utility_texts, int):
        from ...prompts import capability_texts

        return capability_texts()[: max(0, utility_texts)]
    return list(utility_texts)


def neuron_analysis(
    lm: LoadedModel,
    harmful: PromptsLike,
    harmless: PromptsLike,
    *,
    layers: str | Sequence[int] = "*",
    positions: PositionSpec = "last",
    filter: FilterMethod = "first_token",
    gradient: bool = True,
    utility_texts: int | Sequence[str] = 16,
    utility_tokens: int = 128,
    n_prompts: int = 0,
    batch_size: int = 8,
    system: str | None = None,
    seed: int = 0,
    cache_dir: str | Path | None = None,
    filter_cache: str | Path | None = None,
) -> NeuronAnalysis:
    """The analysis ``find_neurons`` ranks (see :func:`~safetyscope.methods.neurons.analysis.analyse_neurons`);
    ``n_prompts`` samples at most that many prompts per group with ``seed``."""
    h, s = _group(harmful, "harmful", n_prompts, seed), _group(harmless, "harmless", n_prompts, seed)
    return analyse_neurons(lm, h.texts, s.texts, positions=positions, layers=layers, filter=check_filter(filter),
                           gradient=gradient, utility=utility_set(utility_texts) if gradient else [],
                           utility_tokens=utility_tokens, batch_size=batch_size, system=system, cache_dir=cache_dir,
                           filter_cache=filter_cache)


def rankings(a: NeuronAnalysis, names: Iterable[str], k: int | None = None, *, direction: str = "both",
             utility_top: float = 0.05) -> dict[str, list[Neuron]]:
    """Named neuron rankings (``top_by_<name>``): effect_size / diff (activation, with ``direction``), gradient
    (refusal attribution) and gradient_diff (refusal minus the top ``utility_top`` utility neurons)."""
    out: dict[str, list[Neuron]] = {}
    for name in map(check_ranking, names):
        if name in ("effect_size", "diff"):
            out[f"top_by_{name}"] = a.stats.ranking(name, direction, k)
            continue
        if a.refusal is None:
            raise ValueError(f"the {name} ranking needs gradients; drop --no-gradient")
        if name == "gradient":
            out["top_by_gradient"] = a.refusal.ranking("signed", k)
        elif a.utility is None:
            raise ValueError("gradient_diff needs utility texts; set --utility-texts above 0")
        else:
            out["top_by_gradient_diff"] = set_difference(a.refusal, a.utility, top_utility=utility_top, k=k)
    return out


@dataclass(frozen=True)
class NeuronReport:
    """Ranked safety neurons: the saved :class:`NeuronSet` (the top ``top_k`` by ``rank_by``) and the analysis."""

    model: str
    analysis: NeuronAnalysis
    neuron_set: NeuronSet
    ranked: tuple[Neuron, ...]
    rank_by: Ranking
    direction: str
    top_k: int
    per_layer: int
    utility_top: float

    @property
    def rows(self) -> list[dict[str, Any]]:
        """The ranked neurons' records (layer, neuron, means, diff, Cohen's d, direction), rank 1 first."""
        return [{"rank": i + 1, **self.analysis.stats.record(n)} for i, n in enumerate(self.ranked)]

    def _gradient_record(self, neuron: Neuron) -> dict[str, Any]:
        a = self.analysis
        rec = a.stats.record(neuron)
        assert a.refusal is not None
        rec["attribution"], rec["attribution_abs"] = a.refusal.value(neuron)
        if a.utility is not None:
            rec["utility_attribution_abs"] = a.utility.value(neuron)[1]
        return rec

    def to_json(self, files: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The records ``neurons find`` writes (``records.json``); ``files`` names saved files."""
        stats, a, k = self.analysis.stats, self.analysis, self.top_k
        out: dict[str, Any] = {
            "model": self.model, "positions": stats.positions, "n_harmful": stats.n_harmful,
            "n_harmless": stats.n_harmless, "filter": a.filter, "n_neurons_analysed": stats.n_neurons,
            "rank_by": self.rank_by, "top": self.rows,
            "top_by_effect_size": stats.top(k, "effect_size", self.direction),
            "top_by_diff": stats.top(k, "diff", self.direction),
            "top_per_layer": stats.top_per_layer(self.per_layer, "effect_size", self.direction),
            "layers": stats.layer_summary(),
        }
        if a.refusal is not None:
            out["top_by_gradient"] = [self._gradient_record(n) for n in a.refusal.ranking("signed", k)]
            if a.utility is not None:
                sd = rankings(a, ["gradient_diff"], k, utility_top=self.utility_top)["top_by_gradient_diff"]
                out["top_by_gradient_diff"] = [self._gradient_record(n) for n in sd]
        if files is not None:
            out["files"] = dict(files)
        return out


def find_neurons(
    lm: LoadedModel,
    harmful: PromptsLike,
    harmless: PromptsLike,
    *,
    layers: str | Sequence[int] = "*",
    positions: PositionSpec = "last",
    top_k: int = 100,
    per_layer: int = 5,
    rank_by: Ranking = "effect_size",
    direction: str = "both",
    filter: FilterMethod = "first_token",
    gradient: bool = True,
    utility_texts: int | Sequence[str] = 16,
    utility_tokens: int = 128,
    utility_top: float = 0.05,
    mode: str = "zero",
    strength: float | None = None,
    n_prompts: int = 0,
    batch_size: int = 8,
    system: str | None = None,
    seed: int = 0,
    cache_dir: str | Path | None = None,
    filter_cache: str | Path | None = None,
) -> NeuronReport:
    """Rank MLP neurons by how they separate refused harmful from answered harmless prompts (Cohen's d, mean
    difference, refusal-score attribution or its set difference with utility) and build the top ``top_k`` as a
    :class:`NeuronSet` ablated with ``mode`` / ``strength``.

    ``cache_dir``: keep (and reuse) the analysis there, and the running statistics of finished batches while it
    runs, so an interrupted call resumes; ``filter_cache``: share the prompt filter's verdicts.
    """
    rank_by = check_ranking(rank_by)
    if direction not in DIRECTIONS:
        raise ValueError(f"unknown direction {direction!r}; use {', '.join(DIRECTIONS)}")
    resolve_strength(mode, strength)
    a = neuron_analysis(lm, harmful, harmless, layers=layers, positions=positions, filter=filter, gradient=gradient,
                        utility_texts=utility_texts, utility_tokens=utility_tokens, n_prompts=n_prompts,
                        batch_size=batch_size, system=system, seed=seed, cache_dir=cache_dir, filter_cache=filter_cache)
    ranked = next(iter(rankings(a, [rank_by], top_k, direction=direction, utility_top=utility_top).values()))
    info: dict[str, Any] = {"model": lm.name, "rank_by": rank_by, "direction": direction, "filter": a.filter}
    fitted = _fitted_on(harmful=harmful, harmless=harmless)
    if fitted:
        info["fitted_on"] = fitted
    ns = a.stats.neuron_set(ranked, mode=mode, strength=strength, info=info)
    return NeuronReport(lm.name, a, ns, tuple(ranked), rank_by, direction, top_k, per_layer, utility_top)


def check_held_out(measured: Mapping[str, str | Path | None], fitted: Mapping[str, Mapping[str, str]],
                   what: str = "this neuron set") -> None:
    """A one-line error when a measurement file has the bytes of a file ``what`` was fitted on.

    ``measured``: {option name: path}; ``fitted``: ``info["fitted_on"]`` ({kind: {"path", "sha256"}}).
    """
    digests = {v["sha256"]: v.get("path", k) for k, v in fitted.items() if isinstance(v, Mapping) and "sha256" in v}
    for flag, path in measured.items():
        if path and Path(path).is_file() and (src := digests.get(file_digest(path))) is not None:
            raise ValueError(f"{flag} {path} is the file {what} was found on ({src}): measuring on it reuses the "
                             "fitting prompts; give held-out prompts (another file, or the test part of a split)")


@dataclass(frozen=True)
class AblationResult:
    """Refusal and harmless KL before and after ablating a neuron set, on the same prompts."""

    neuron_set: NeuronSet
    before: dict[str, Any]
    after: dict[str, Any]
    n_harmful: int
    n_harmless: int
    harmful: tuple[str, ...] = ()  # the held-out harmful prompts measured
    replies_before: tuple[str, ...] = ()  # their judged replies, unmodified (empty without max_new_tokens)
    replies_after: tuple[str, ...] = ()  # ... with the neurons ablated


def neuron_ablation(
    lm: LoadedModel,
    neuron_set: NeuronSet,
    harmful: PromptsLike,
    harmless: PromptsLike,
    *,
    max_new_tokens: int = 32,
    n_prompts: int = 0,
    batch_size: int = 8,
    system: str | None = None,
    seed: int = 0,
) -> AblationResult:
    """Logit refusal score on ``harmful``, first-token KL on ``harmless`` (and with ``max_new_tokens`` the judged
    refusal rate of generated replies) without and with ``neuron_set`` ablated. Refuses files the set was found on."""
    check_held_out({"harmful": harmful if isinstance(harmful, (str, Path)) else None,
                    "harmless": harmless if isinstance(harmless, (str, Path)) else None},
                   neuron_set.info.get("fitted_on", {}))
    neuron_set.check(lm)
    h = _group(harmful, "harmful", n_prompts, seed, "held-out ").texts
    s = _group(harmless, "harmless", n_prompts, seed, "held-out ").texts
    ids = refusal_token_ids(lm.tokenizer)
    base_logits = logits_under(lm, [*h, *s], None, batch_size=batch_size, system=system)
    ref = base_logits[len(h):]  # [n_harmless, vocab]
    kw: dict[str, Any] = {"token_ids": ids, "max_new_tokens": max_new_tokens, "batch_size": batch_size, "system": system}
    before = measure_point(lm, None, h, s, ref, logits=base_logits, keep_replies=True, **kw)
    after = measure_point(lm, neuron_set, h, s, ref, keep_replies=True, **kw)
    replies = (tuple(before.pop("replies", ())), tuple(after.pop("replies", ())))
    return AblationResult(neuron_set, before, after, len(h), len(s), tuple(h), *replies)


def _curve_maker(lm: LoadedModel, a: NeuronAnalysis, mode: str, strength: float | None) -> Callable[[Sequence[Neuron]], Any]:
    def make(prefix: Sequence[Neuron]) -> Any:
        mu = a.stats.neuron_set(prefix).means if mode == "mean" else None
        return lambda: ablate_neurons(lm, prefix, mode=mode, strength=strength, means=mu)

    return make


def neuron_fragility(
    lm: LoadedModel,
    analysis_or_report: NeuronAnalysis | NeuronReport,
    harmful: PromptsLike,
    harmless: PromptsLike,
    *,
    ks: str | Sequence[int | str] = "0,10,50,100,500,1%,5%",
    seeds: int | Sequence[int] = 3,
    curves: Sequence[str] = ("effect_size", "gradient"),
    mode: str = "zero",
    strength: float | None = None,
    direction: str = "both",
    utility_top: float = 0.05,
    max_new_tokens: int = 0,
    n_prompts: int = 0,
    batch_size: int = 8,
    system: str | None = None,
    seed: int = 0,
    cache_dir: str | Path | None = None,
    info: Mapping[str, Any] | None = None,
) -> FragilityResult:
    """Refusal and KL on held-out ``harmful`` / ``harmless`` prompts as the top ``ks`` neurons of each ranking in
    ``curves`` are ablated, against random neurons from the same layers (``seeds``: a count, from ``seed``, or a
    list). With ``cache_dir`` every finished point is saved (keyed) and a rerun resumes. ``info`` is added to the
    result's ``info``."""
    a = analysis_or_report.analysis if isinstance(analysis_or_report, NeuronReport) else analysis_or_report
    names = [c.strip() for c in curves if c.strip()]
    if not names:
        raise ValueError("no curves given; use --curves effect_size,gradient")
    resolve_strength(mode, strength)
    if isinstance(analysis_or_report, NeuronReport):
        check_held_out({"harmful": harmful if isinstance(harmful, (str, Path)) else None,
                        "harmless": harmless if isinstance(harmless, (str, Path)) else None},
                       analysis_or_report.neuron_set.info.get("fitted_on", {}))
    k_list = parse_ks(ks, a.stats.n_neurons)
    ranked = rankings(a, names, max(k_list), direction=direction, utility_top=utility_top)
    h = _group(harmful, "harmful", n_prompts, seed, "held-out ").texts
    s = _group(harmless, "harmless", n_prompts, seed, "held-out ").texts
    seed_list = [seed + i for i in range(seeds)] if isinstance(seeds, int) else [int(x) for x in seeds]
    done, save_row = _fragility_progress(cache_dir, fingerprint(lm.name, ranked, h, s, mode, strength, max_new_tokens,
                                                                seed_list))
    pools: dict[Hashable, list[Neuron]] = {layer: [(layer, i) for i in range(a.stats.d_mlp)] for layer in a.stats.layers}
    res = fragility_curves(lm, ranked, _curve_maker(lm, a, mode, strength), k_list, h, s, random_pools=pools,
                           group=lambda n: n[0], seeds=seed_list, random_like=next(iter(ranked)),
                           max_new_tokens=max_new_tokens, batch_size=batch_size, system=system, done=done,
                           on_row=save_row)
    if cache_dir is not None:  # finished: no resume file left behind
        (Path(cache_dir) / FRAGILITY_PARTIAL).unlink(missing_ok=True)
    extra = {"model": lm.name, "mode": mode, "strength": strength, "n_neurons_total": a.stats.n_neurons,
             "filter": a.filter, "ks_spec": ks if isinstance(ks, str) else ",".join(str(k) for k in ks), **(info or {})}
    return replace(res, info={**res.info, **extra})


def _fragility_progress(cache_dir: str | Path | None, key: str) -> tuple[list[dict[str, Any]], Callable[[dict[str, Any]], None] | None]:
    """Rows of an interrupted run with the same key, and a callback that saves each new row."""
    if cache_dir is None:
        return [], None
    partial = Path(cache_dir) / FRAGILITY_PARTIAL
    saved = read_json(partial) if partial.is_file() else {}
    rows: list[dict[str, Any]] = list(saved.get("rows", [])) if saved.get("key") == key else []
    done = list(rows)

    def save_row(row: dict[str, Any]) -> None:
        rows.append(row)
        write_json(partial, {"key": key, "rows": rows})

    return done, save_row


__all__ = ["RANKINGS", "AblationResult", "NeuronReport", "Ranking", "check_held_out", "check_ranking", "find_neurons",
           "neuron_ablation", "neuron_analysis", "neuron_fragility", "rankings", "utility_set"]
