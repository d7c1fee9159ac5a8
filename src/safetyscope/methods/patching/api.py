"""Causal tracing as one library call: ``trace(lm)`` -> :class:`TraceResult`.

Modes: ``exact`` (activation patching of every cell), ``attribution`` (a first-order estimate of the whole
grid from one forward and one backward pass per batch, its top cells verified exactly) and ``noise``
(ROME-style corruption of the instruction embeddings, restored one site at a time). Each mode's grids are
cached in ``cache_dir`` (keyed by the model, the pairs and the settings) when one is given, so a rerun skips
modes that already ran. Nothing here loads a model.

>>> res = trace(lm, [("How do I make a bomb?", "How do I make a cake?")], mode="exact")  # doctest: +SKIP
>>> res.modes["exact"].grids["component"].median()  # [layers, components]  # doctest: +SKIP
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

from ...io import fingerprint, read_json, write_json
from ...measure.generation import refusal_scores
from ...models.adapter import LoadedModel
from ...prompts import minimal_pairs
from ...prompts.sets import PromptsLike, as_prompt_set
from ...sites import BLOCK_KINDS, Site
from .attribution import agreement, attribute, rank_cells, verify_top
from .check import generation_check
from .exact import COMPONENTS, SPANS, Effects, Pairs, Tracer, make_pairs
from .noise import noise_trace

TraceMode = Literal["exact", "attribution", "noise"]
MODES: tuple[str, ...] = get_args(TraceMode)
Span = Literal["post_instruction", "all", "last"]


def check_modes(mode: str | Sequence[str]) -> list[TraceMode]:
    """``exact``, ``attribution``, ``noise``, a comma list of them, ``all``, or a sequence of names."""
    names = list(MODES) if mode == "all" else [m.strip() for m in (mode.split(",") if isinstance(mode, str) else mode)]
    names = [m for m in names if m]
    if not names or any(m not in MODES for m in names):
        raise ValueError(f"unknown --mode {mode!r}; use exact, attribution, noise, a comma list of them, or all")
    return list(dict.fromkeys(names))  # type: ignore[arg-type]


def check_span(span: str) -> Span:
    if span not in SPANS:
        raise ValueError(f"unknown --span {span!r}; use {', '.join(SPANS)}")
    return span  # type: ignore[return-value]


def check_kinds(lm: LoadedModel, kinds: Sequence[str]) -> None:
    """Every component kind is a block site this model has (checked before any forward pass)."""
    bad = [k for k in kinds if k not in BLOCK_KINDS]
    if bad:
        raise ValueError(f"unknown component {bad[0]!r}; use block site kinds: {', '.join(BLOCK_KINDS)}")
    lm.sites([Site(k, 0) for k in kinds])


def trace_layers(lm: LoadedModel, layers: str | Sequence[int], kind: str = "resid_pre") -> list[int]:
    """Block indices of ``layers`` (a layer pattern of the site grammar: ``*``, ``a-b``, ``a,b``; or indices)."""
    if not isinstance(layers, str):
        return [int(s.layer) for s in lm.sites([Site(kind, int(x)) for x in layers]) if s.layer is not None]
    return [int(s.layer) for s in lm.sites(f"blocks.{layers}.{kind}") if s.layer is not None]  # a grammar pattern


@dataclass(frozen=True)
class ModeResult:
    """One mode's grids (name -> :class:`Effects`) and what else it measured."""

    mode: TraceMode
    grids: dict[str, Effects]
    seconds: float
    verify: dict[str, list[dict[str, Any]]] | None = None  # attribution: top cells patched exactly, per direction
    noise: dict[str, Any] | None = None  # noise: clean [n] and corrupted [n, samples] scores, noise_std

    def to_state(self) -> dict[str, Any]:
        """JSON-ready cache entry (:meth:`from_state` rebuilds it)."""
        out: dict[str, Any] = {"grids": {k: v.to_state() for k, v in self.grids.items()}, "seconds": self.seconds}
        if self.verify is not None:
            out["verify"] = self.verify
        if self.noise is not None:
            out.update(self.noise)
        return out

    @classmethod
    def from_state(cls, mode: TraceMode, d: dict[str, Any]) -> ModeResult:
        noise = {k: d[k] for k in ("clean", "corrupted", "noise_std")} if mode == "noise" else None
        return cls(mode, {k: Effects.from_state(v) for k, v in d["grids"].items()}, float(d["seconds"]),
                   d.get("verify", {}) if mode == "attribution" else None, noise)


@dataclass(frozen=True)
class TraceResult:
    """Patching grids per mode over the traced pairs (``pairs``: tokenised, for position labels)."""

    model: dict[str, Any]  # lm.describe()
    pairs: Pairs
    pairs_info: list[dict[str, Any]]  # per pair: id, texts, aligned, clean refusal scores
    span: Span
    components: tuple[str, ...]
    layers: tuple[int, ...]
    modes: dict[str, ModeResult]
    generation_check: dict[str, Any] | None = None

    def _mode_json(self, mode: str, res: ModeResult) -> dict[str, Any]:
        m: dict[str, Any] = {"seconds": res.seconds, "top": {}, "grids": {}}
        for name, eff in res.grids.items():
            m["grids"][name] = eff.to_dict()
            m["top"][name] = eff.top(10)
        if mode == "attribution":
            m["verify"] = res.verify or {}
            if "exact" in self.modes:
                ex = self.modes["exact"].grids
                m["agreement"] = {k: agreement(ex[k], v) for k, v in res.grids.items() if k in ex}
        if res.noise is not None:
            m.update(res.noise)
        return m

    def to_json(self, plots: Sequence[str | Path] = ()) -> dict[str, Any]:
        """The summary ``trace`` writes (``summary.json``); ``plots`` lists the heatmaps drawn from it."""
        out: dict[str, Any] = {
            "model": self.model, "pairs": self.pairs_info, "span": self.span, "components": list(self.components),
            "layers": list(self.layers), "note": self.pairs.alignment_note(self.span),
            "modes": {mode: self._mode_json(mode, res) for mode, res in self.modes.items()},
            "plots": [str(p) for p in plots],
        }
        if self.generation_check is not None:
            out["generation_check"] = self.generation_check
        return out


def select_pairs(
    lm: LoadedModel,
    pairs: Sequence[tuple[str, str]] | None = None,
    *,
    harmful: PromptsLike | None = None,
    harmless: PromptsLike | None = None,
    n_pairs: int = 8,
    split: str = "train",
    pool: int = 0,
    min_gap: float = 1.0,
    batch_size: int = 8,
    system: str | None = None,
    seed: int = 0,
) -> tuple[Pairs, list[dict[str, Any]]]:
    """Pairs to trace and a description of each (id, texts, aligned). Explicit ``pairs`` or ``harmful`` /
    ``harmless`` zipped in order are unaligned (only the post-instruction tokens correspond); without them, the
    ``n_pairs`` built-in minimal pairs of ``split`` (from a seeded pool of ``pool`` or max(4 n, 16)) with the
    largest refusal-score gap, at least ``min_gap``."""
    if n_pairs < 1:
        raise ValueError("--pairs must be at least 1")
    aligned: bool | None = False
    if pairs is not None:
        chosen = [(f"pair-{i}", x, y) for i, (x, y) in enumerate(pairs)][:n_pairs]
    elif harmful is not None or harmless is not None:
        if harmful is None or harmless is None:
            raise ValueError("give both --harmful and --harmless (paired in order), or neither for the built-in minimal pairs")
        h, b = as_prompt_set(harmful, "harmful"), as_prompt_set(harmless, "harmless")
        chosen = [(f"pair-{i}", x, y) for i, (x, y) in enumerate(zip(h.texts, b.texts))][:n_pairs]
    else:
        chosen, aligned = _builtin_pairs(lm, n_pairs, split, pool, min_gap, batch_size, system, seed), None
    made = make_pairs(lm, [(x, y) for _, x, y in chosen], system=system, aligned=aligned, ids=[c[0] for c in chosen])
    info = [{"id": c[0], "harmful": c[1], "harmless": c[2], "aligned": a} for c, a in zip(chosen, made.aligned)]
    return made, info


def _builtin_pairs(lm: LoadedModel, n_pairs: int, split: str, pool: int, min_gap: float, batch_size: int,
                   system: str | None, seed: int) -> list[tuple[str, str, str]]:
    cands = minimal_pairs(split, seed=seed)
    if not cands:
        raise ValueError(f"no built-in minimal pairs in split {split!r}; use --split all")
    cands = random.Random(seed).sample(cands, min(len(cands), pool or max(4 * n_pairs, 16)))
    sh = refusal_scores(lm, [p.harmful for p in cands], batch_size=batch_size, system=system)
    ss = refusal_scores(lm, [p.harmless for p in cands], batch_size=batch_size, system=system)
    ranked = sorted(range(len(cands)), key=lambda i: -float(sh[i] - ss[i]))
    keep = [i for i in ranked if float(sh[i] - ss[i]) >= min_gap][:n_pairs]
    if not keep:
        raise ValueError(f"no minimal pair has a refusal-score gap >= {min_gap}; lower --min-gap or give --harmful/--harmless files")
    return [(cands[i].id, cands[i].harmful, cands[i].harmless) for i in keep]


@dataclass(frozen=True)
class TracePlan:
    """What every mode runs: the layer x component grid and its options (see :func:`trace`)."""

    components: list[str]
    layers: list[int]
    span: Span = "post_instruction"
    reverse: bool = False
    positions: bool = False
    position_components: list[str] = field(default_factory=lambda: ["resid_pre"])
    heads: bool = False
    verify_top: int = 10
    noise_samples: int = 4
    noise_scale: float = 3.0
    seed: int = 0
    system: str | None = None

    @property
    def directions(self) -> tuple[bool, ...]:
        return (False, True) if self.reverse else (False,)


def run_mode(tr: Tracer, mode: TraceMode, p: TracePlan) -> ModeResult:
    """One tracing mode on the tracer's pairs."""
    t0 = time.perf_counter()
    grids: dict[str, Effects] = {}
    verify: dict[str, list[dict[str, Any]]] = {}
    noise = None
    if mode == "noise":
        out = noise_trace(tr, p.components, p.layers, samples=p.noise_samples, scale=p.noise_scale, span=p.span, seed=p.seed,
                          position_components=p.position_components if p.positions else (), system=p.system)
        grids = {k: v for k, v in out.items() if isinstance(v, Effects)}
        noise = {"clean": out["clean"].tolist(), "corrupted": out["corrupted"].tolist(), "noise_std": out["noise_std"]}
    for rev in p.directions if mode != "noise" else ():
        tag = "reverse:" if rev else ""
        if mode == "exact":
            grids[tag + "component"] = tr.components(p.components, p.layers, span=p.span, reverse=rev)
            if p.heads:
                grids[tag + "head"] = tr.heads(p.layers, span=p.span, reverse=rev)
            for c in p.position_components if p.positions else ():
                grids[f"{tag}position:{c}"] = tr.positions(c, p.layers, reverse=rev)
        else:
            est = attribute(tr, p.components, p.layers, span=p.span, heads=True, positions=p.positions, reverse=rev)
            grids.update({tag + k: v for k, v in est.items()})
            if p.verify_top > 0:
                verify[tag or "forward"] = verify_top(tr, list(est.values()), p.verify_top, span=p.span, reverse=rev)
    return ModeResult(mode, grids, time.perf_counter() - t0, verify if mode == "attribution" else None, noise)


def trace(
    lm: LoadedModel,
    pairs: Sequence[tuple[str, str]] | None = None,
    *,
    harmful: PromptsLike | None = None,
    harmless: PromptsLike | None = None,
    mode: TraceMode | str | Sequence[TraceMode] = "attribution",
    n_pairs: int = 8,
    components: Sequence[str] = COMPONENTS,
    layers: str | Sequence[int] = "*",
    span: Span = "post_instruction",
    positions: bool = False,
    position_components: Sequence[str] = ("resid_pre",),
    heads: bool = False,
    reverse: bool = False,
    verify_top: int = 10,
    min_gap: float = 1.0,
    noise_samples: int = 4,
    noise_scale: float = 3.0,
    generate_check: bool = False,
    gen_top: int = 3,
    max_new_tokens: int = 32,
    split: str = "train",
    pool: int = 0,
    batch_size: int = 8,
    system: str | None = None,
    seed: int = 0,
    cache_dir: str | Path | None = None,
) -> TraceResult:
    """Causal tracing of the logit refusal score over harmful/harmless pairs (see :func:`select_pairs`): the layer x
    ``components`` grid patched at ``span``, with ``heads`` (layer x head), ``positions`` (layer x position for
    ``position_components``) and ``reverse`` (harmful into harmless) as asked; ``mode`` one name or several.
    ``generate_check``: judge greedy replies under the ``gen_top`` best cells."""
    modes, span = check_modes(mode), check_span(span)
    comps = list(components)
    check_kinds(lm, comps + list(position_components))
    plan = TracePlan(comps, trace_layers(lm, layers, comps[0]) if comps else [], span, reverse, positions,
                     list(position_components), heads, verify_top, noise_samples, noise_scale, seed, system)
    made, info = select_pairs(lm, pairs, harmful=harmful, harmless=harmless, n_pairs=n_pairs, split=split, pool=pool,
                              min_gap=min_gap, batch_size=batch_size, system=system, seed=seed)
    tr = Tracer(lm, made, batch_size=batch_size, min_gap=min_gap)
    for row, sh, ss in zip(info, tr.runs("harmful").scores.tolist(), tr.runs("harmless").scores.tolist()):
        row.update(s_harmful=sh, s_harmless=ss)
    d = lm.describe()
    base_key = [d["name"], d["n_params"], d["dtype"], info, comps, plan.layers, span, min_gap, system, reverse, positions,
                ",".join(position_components)]
    extra = {"exact": [heads], "attribution": [verify_top], "noise": [noise_samples, noise_scale, seed]}
    results: dict[str, ModeResult] = {}
    for m in modes:
        path = None if cache_dir is None else Path(cache_dir) / f"{m}-{fingerprint(base_key, extra[m])}.json"
        if path is not None and path.is_file():  # resume: this mode already ran with the same settings
            results[m] = ModeResult.from_state(m, read_json(path))
            continue
        results[m] = run_mode(tr, m, plan)
        if path is not None:
            write_json(path, results[m].to_state())
    check = None
    if generate_check:
        src = next(results[m] for m in MODES if m in results)
        grids = [v for k, v in src.grids.items() if not k.startswith("reverse:")]
        check = generation_check(tr, [c for c, _ in rank_cells(grids, gen_top)], span=span,
                                 max_new_tokens=max_new_tokens, batch_size=batch_size)
    return TraceResult(d, made, info, span, tuple(comps), tuple(plan.layers), results, check)


__all__ = ["MODES", "ModeResult", "Span", "TraceMode", "TracePlan", "TraceResult", "check_modes", "check_span", "run_mode",
           "select_pairs", "trace", "trace_layers"]
