"""`safetyscope direction find|tune|refine|ablate|add|export`: the refusal direction (Arditi et al. 2024) and beyond.

A thin shell over :mod:`safetyscope.methods.direction`: parse the settings, call the library, print and write.
User prompt files are split once (``prompts.sets``, 60/20/20): find and refine fit on train, select on val,
and write the held-out test part under OUT/<command>/prompts/; ablate and add refuse a file the direction
was fitted or selected on (its sha256 is in the artifact) unless --allow-fit-prompts.
"""

from __future__ import annotations

import functools
import json
import math
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, TypeVar

import typer

from ..progress import verbosity
from .common import PromptSettings, emit, prompt_sets
from .direction_render import render_find, render_refine
from .judge import JUDGES_HELP, compare_specs, parse_judges, render_comparison
from .settings import Settings, command, opt


@dataclass
class FindSettings(PromptSettings):
    n_val: int = opt(32, "Validation prompts per group for the selection (0 = the whole val split).")
    positions: str = opt("post_instruction", "Candidate positions: post_instruction (every template token after the prompt), last, or offsets like -1,-2.")
    filter: str = opt("first_token", "Keep refused harmful / answered harmless prompts by: first_token (the likeliest first reply token is a refusal opening), score (logit refusal score > 0, as in Arditi et al.), judge (generation + phrase judge) or none.")
    layers: str = opt("", "Only score candidates at these blocks (e.g. 8-14); empty = all.")
    kl_threshold: float = opt(0.1, "Filter out candidates whose ablation moves harmless first-token KL above this.")
    induce_threshold: float = opt(0.0, "Filter out candidates whose addition gives a harmless refusal score below this.")
    prune_layers: float = opt(0.2, "Filter out candidates in this last fraction of blocks.")
    induce: str = opt("all", "Score activation addition for all candidates, or lazy: only in bypass order until one passes (faster).")
    score_pruned: bool = opt(False, "Also score the pruned last blocks (complete heatmaps, slower).")
    per_pass: int = opt(0, "Candidates scored per forward pass (0 = as many as fit --batch-size rows).")
    screen: int = opt(0, "Speed-up: first score every candidate on this many prompts per group (0 = off, as in the paper) ...")
    keep: int = opt(16, "... then fully score only the best --keep of them.")
    screen_by: str = opt("forward", "How --screen scores: forward (a forward pass per candidate on the --screen prompts) or gradient (every candidate's bypass predicted to first order from one forward + backward pass; much faster, KL is left to the full scoring).")
    ablation: str = opt("zero", "How candidates are ablated while scoring, and how the chosen direction ablates: zero (Arditi et al.) or mean (the component moved to the harmless mean at every block; gentler, hooks only).")
    verify: int = opt(0, "Check the best N candidates on real replies (greedy generation + judge) and choose by judged refusal (0 = off: the logit score decides, as in the paper).")
    verify_tokens: int = opt(24, "Reply length for --verify.")
    judge: str = opt("", "Refusal judge as module:function for --filter judge and --verify (default: the built-in phrase judge).")
    refine: bool = opt(False, "Then refine the chosen direction in the same run, as `direction refine` with its defaults would (30 steps, 32 rows per pass; written to OUT/direction_refine), reusing the loaded model and the unmodified model's logits the search computed.")


@dataclass
class TuneSettings(PromptSettings):
    direction: str = opt("", "Direction artifact directory (default: OUT/direction/artifact).")
    split: str = opt("val", "Built-in split to tune on (val: the selection prompts, not the test prompts).")
    n_prompts: int = opt(32, "Prompts per group for the search (0 = all).")
    trials: int = opt(24, "Number of kernel settings tried (trial 0 is full ablation).")
    norm_preserving: bool = opt(False, "Search the norm-preserving variant (rescale the residual to its norm after projecting).")
    target: float = opt(float("nan"), "Choose the lowest-KL trial whose mean refusal score on harmful prompts is at most this (default: the model's own mean score on the harmless prompts).")
    save_front: bool = opt(False, "Also save every Pareto-front trial's direction as OUT/direction_tune/front/trial_NNN (to measure or export any point of the trade-off).")


@dataclass
class RefineSettings(PromptSettings):
    batch_size: int = opt(32, "Rows per forward + backward pass, harmful and harmless rows together (halved automatically on out-of-memory); the steps are the same at any value, larger is faster (on the default model, 30 steps: 32 rows 210 s, 16 rows 222 s, 8 rows 272 s, the same direction).")
    direction: str = opt("", "Direction artifact directory (default: OUT/direction/artifact).")
    n_val: int = opt(32, "Validation prompts per group, for choosing the checkpoint (0 = the whole val split).")
    ablation: str = opt("", "Refine under this ablation: zero (Arditi et al.) or mean (to the harmless mean); empty = the artifact's own.")
    steps: int = opt(30, "Optimiser steps (0 = only measure the starting direction).")
    lr: float = opt(0.002, "Adam learning rate on the (unnormalised) direction vector.")
    kl_weight: float = opt(20.0, "Weight of the harmless first-token KL against the harmful bypass term.")
    batch: int = opt(16, "Prompts per group per step (a seeded sample; --batch-size rows go through the model at once).")
    eval_every: int = opt(10, "Measure the validation loss every this many steps (and at the last); the best checkpoint is kept. Each measurement is a forward pass over the validation prompts, about one training step.")


@dataclass
class EvalDirSettings(PromptSettings):
    direction: str = opt("", "Direction artifact directory (default: OUT/direction/artifact).")
    split: str = opt("test", "Built-in split to measure on (test: never used for selection).")
    n_prompts: int = opt(32, "Prompts per group (0 = all), sampled with --seed.")
    max_new_tokens: int = opt(64, "Greedy reply length judged for refusal.")
    judge: str = opt("", "Refusal judge: phrase, llm, llm:MODEL, phrase+llm[:MODEL] or module:function (default: the built-in phrase judge).")
    judges: str = opt("", "direction ablate: " + JUDGES_HELP)
    norm_preserving: bool = opt(False, "Use the norm-preserving ablation variant.")
    full: bool = opt(False, "Ignore tuned per-layer weights and ablate fully.")
    ablation: str = opt("", "Override the artifact's ablation: zero (Arditi et al.) or mean (to the harmless mean); empty = the artifact's own.")
    coeff: float = opt(1.0, "Activation-addition coefficient, in units of the difference-of-means norm (direction add).")
    layer: int = opt(-1, "Block whose resid_pre gets the addition (-1 = the direction's own block).")
    tag: str = opt("", "Name of this measurement: results go to OUT/direction_<ablate|add>/<tag>.json (default summary.json); replies are cached and shared across tags.")
    skip_harmless_replies: bool = opt(False, "direction ablate: do not generate harmless replies under ablation (KL and perplexity are still measured).")
    allow_fit_prompts: bool = opt(False, "Measure even on a prompt file the direction was fitted or selected on (the results are then optimistic).")


@dataclass
class ExportSettings(Settings):
    direction: str = opt("", "Direction artifact directory (default: OUT/direction/artifact).")
    to: Path = opt(Path(""), "Where to write the orthogonalised Hugging Face checkpoint (required).")
    full: bool = opt(False, "Ignore tuned per-layer weights and orthogonalise fully.")
    ablation: str = opt("", "Override the artifact's ablation (weights can only hold zero ablation: pass zero for a mean-ablation artifact).")


S = TypeVar("S", bound=Settings)


def _with_verbosity(fn: Callable[[S], dict[str, Any]]) -> Callable[[S], dict[str, Any]]:
    """Run a command with progress bars off under --quiet / --json."""
    @functools.wraps(fn)
    def run(s: S) -> dict[str, Any]:
        with verbosity(not (s.quiet or s.json)):
            return fn(s)

    return run


def register(app: typer.Typer) -> None:
    sub = typer.Typer(no_args_is_help=True, help="Find, apply and export the refusal direction.")
    commands: list[tuple[str, type[Settings], str, Callable[[Any], dict[str, Any]]]] = [
        ("find", FindSettings, "Difference-of-means candidates at every block x post-instruction position; select on validation prompts.", run_find),
        ("tune", TuneSettings, "Search smooth per-layer ablation weights trading refusal against KL; report the Pareto front.", run_tune),
        ("refine", RefineSettings, "Train the direction (only it; the model stays frozen) to bypass refusal at lower harmless KL.", run_refine),
        ("ablate", EvalDirSettings, "Refusal before -> after directional ablation (greedy + judge), first-token KL, reply perplexity.", run_ablate),
        ("add", EvalDirSettings, "Induced refusal on harmless prompts under activation addition of the direction.", run_add),
        ("export", ExportSettings, "Write a weight-orthogonalised copy of the model as a normal HF checkpoint (safetensors).", run_export),
    ]
    for name, settings, help_text, run in commands:  # `command` turns known errors into one `error:` line
        def cmd(s: Any, run: Callable[[Any], dict[str, Any]] = run) -> None:
            run(s)

        command(sub, name, settings, help_text)(cmd)
    app.add_typer(sub, name="direction", help="Refusal direction: find, tune, refine, ablate, add, export.")


# ---- helpers ------------------------------------------------------------------------------------------
def _log(s: Settings) -> Callable[[str], None]:
    if s.quiet or s.json:
        return lambda _m: None
    return lambda m: print(m, file=sys.stderr)


def _layers(spec: str, n_layers: int) -> list[int] | None:
    if not spec.strip():
        return None
    from ..sites import parse_sites

    return [int(site.layer) for site in parse_sites(f"blocks.{spec}.resid_pre", n_layers) if site.layer is not None]


def _direction_dir(s: TuneSettings | RefineSettings | EvalDirSettings | ExportSettings) -> Path:
    return Path(s.direction) if s.direction else s.out / "direction" / "artifact"


def _load_direction(s: TuneSettings | RefineSettings | EvalDirSettings | ExportSettings) -> Any:
    from ..methods.direction.artifact import Direction

    path = _direction_dir(s)
    if not (path / "artifact.json").is_file():
        raise FileNotFoundError(f"no direction artifact at {path}; run `safetyscope direction find` or pass --direction DIR")
    return Direction.load(path)


@dataclass(frozen=True)
class _FitSets:
    harmful: Any  # PromptSet: fitting (train) prompts
    harmless: Any
    val_harmful: Any  # selection (val) prompts
    val_harmless: Any
    records: list[dict[str, str]]  # the user files split here, with their sha256 and held-out test part


def _fit_sets(s: FindSettings | RefineSettings, sub: str) -> _FitSets:
    """Built-in train (--split) / val splits, or user files split 60/20/20 (train, val; the test part is
    written to OUT/<sub>/prompts/<kind>_test.jsonl for the measurement commands)."""
    from ..io import atomic_path
    from ..prompts import builtin_prompts
    from ..prompts.sets import file_digest, group_splits

    sets, records = [], []
    for kind, path in (("harmful", s.harmful), ("harmless", s.harmless)):
        if path:
            parts = group_splits(path, kind, s.seed)
            train, val = parts.train, parts.val
            record = {"group": kind, "path": str(path), "sha256": file_digest(path)}
            if len(parts.test):
                dest = s.out / sub / "prompts" / f"{kind}_test.jsonl"
                with atomic_path(dest) as tmp:
                    tmp.write_text("".join(json.dumps({"prompt": t, "label": kind}) + "\n" for t in parts.test.texts), "utf-8")
                record["test_part"] = str(dest)
            records.append(record)
        else:
            train, val = builtin_prompts(kind, s.split, seed=s.seed), builtin_prompts(kind, "val", seed=s.seed)
        if s.n_prompts:
            train = train.sample(s.n_prompts, seed=s.seed)
        if s.n_val:
            val = val.sample(s.n_val, seed=s.seed)
        sets.append((train.require_nonempty(f"{kind} training prompts"), val.require_nonempty(f"{kind} validation prompts")))
    return _FitSets(sets[0][0], sets[1][0], sets[0][1], sets[1][1], records)


# ---- find -----------------------------------------------------------------------------------------------
def _find_config(s: FindSettings) -> Any:
    from ..methods.direction.api import DirectionConfig
    from ..methods.direction.artifact import ABLATIONS

    if s.ablation not in ABLATIONS:  # before loading anything: a typo must not cost a capture pass
        raise ValueError(f"unknown --ablation {s.ablation!r}; use {' or '.join(ABLATIONS)}")
    # every search setting is a FindSettings field of the same name; the layers need the model's block count
    return DirectionConfig(**{f.name: getattr(s, f.name) for f in fields(DirectionConfig) if f.name != "layers"})


def _write_selection(lm: Any, selection: Any, cands: Any, out: Path) -> Path:
    from ..io import write_json
    from ..report.plots.direction import candidate_heatmaps

    write_json(out / "selection.json", selection.to_json())
    return candidate_heatmaps(selection, lm.n_layers, list(cands.positions), cands.tokens, out / "plots" / "candidates.png",
                              title=f"{lm.name}: refusal-direction candidates")


@_with_verbosity
def run_find(s: FindSettings) -> dict[str, Any]:
    from ..io import write_json
    from ..measure.judges import load_judge
    from ..measure.memo import LogitsMemo
    from ..methods.direction.api import NoDirectionFound, search_direction
    from ..methods.direction.inputs import with_fit_files

    cfg = _find_config(s)
    judge = load_judge(s.judge) if s.judge else None
    sets = _fit_sets(s, "direction")
    lm = s.load_model()
    out = s.out / "direction"
    memo = LogitsMemo(lm) if s.refine else None
    try:
        found = search_direction(lm, sets.harmful, sets.harmless, val_harmful=sets.val_harmful,
                                 val_harmless=sets.val_harmless, config=replace(cfg, layers=_layers(s.layers, lm.n_layers)),
                                 judge=judge, batch_size=s.batch_size, system=s.system, cache_dir=out,
                                 verdict_cache=s.out / "cache", log=_log(s), memo=memo)
    except NoDirectionFound as exc:
        _write_selection(lm, exc.selection, exc.candidates, out)
        raise ValueError(str(exc)) from None  # the prompts or --layers: a one-line error
    plot = _write_selection(lm, found.selection, found.candidates, out)
    direction = with_fit_files(found.direction, sets.records)
    direction.save(out / "artifact")
    result = {"model": lm.name, "artifact": out / "artifact", **found.to_json(), "plot": plot}
    write_json(out / "summary.json", result)
    if memo is None:
        emit(s, result, lambda: render_find(result, found.selection, out))
        return result
    rs = RefineSettings(**{f.name: getattr(s, f.name) for f in fields(PromptSettings) if f.name != "batch_size"})
    refined = _refine(rs, lm, direction, sets, memo)
    both = {**result, "refine": refined}

    def render() -> None:
        render_find(result, found.selection, out)
        render_refine(refined)

    emit(s, both, render)
    return both


# ---- tune -----------------------------------------------------------------------------------------------
@_with_verbosity
def run_tune(s: TuneSettings) -> dict[str, Any]:
    from ..io import write_json
    from ..methods.direction.inputs import file_records, with_fit_files
    from ..methods.direction.tune import tune_weights
    from ..methods.filtering import filter_by_refusal
    from ..report.plots.direction import pareto_plot

    base = _load_direction(s)
    harmful, harmless = prompt_sets(s)
    lm = s.load_model()
    kept = filter_by_refusal(lm, harmful.texts, harmless.texts, batch_size=s.batch_size, system=s.system)
    res = tune_weights(lm, base, kept.harmful, kept.harmless, n_trials=s.trials, seed=s.seed,
                       norm_preserving=s.norm_preserving, target=None if math.isnan(s.target) else s.target, batch_size=s.batch_size,
                       system=s.system, log=_log(s))
    out = s.out / "direction_tune"
    records = file_records({"harmful": s.harmful, "harmless": s.harmless})
    tuned = with_fit_files(res.direction(base, lm.n_layers), records)
    tuned.save(out / "artifact")
    for i in res.front if s.save_front else []:
        with_fit_files(res.trial_direction(base, lm.n_layers, i), records).save(out / "front" / f"trial_{i:03d}")
    write_json(out / "tune.json", res.to_json())
    plot = pareto_plot(res, out / "pareto.png", title=f"{lm.name}: per-layer ablation weights")
    chosen = res.trials[res.chosen]
    result = {"artifact": out / "artifact", "chosen": asdict(chosen), "full_ablation": asdict(res.trials[0]),
              "front": [asdict(res.trials[i]) for i in res.front], "plot": plot}
    emit(s, result, lambda: _render_tune(res, out, plot))
    return result


def _render_tune(res: Any, out: Path, plot: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title="Pareto front (refusal score on harmful vs first-token KL on harmless)")
    for col in ("trial", "refusal", "still refusing", "KL", "kernel (peak, width, max, min)"):
        t.add_column(col, justify="right")
    for i in res.front:
        tr = res.trials[i]
        k = tr.kernel
        desc = "full ablation" if k is None else f"{k['peak']:.1f}, {k['width']:.1f}, {k['max_weight']:.2f}, {k['min_weight']:.2f}"
        t.add_row(str(i), f"{tr.refusal:+.3f}", f"{tr.refusing:.0%}", f"{tr.kl:.4f}", desc,
                  style="bold green" if i == res.chosen else None)
    c = Console()
    c.print(t)
    met = "" if res.settings["target_met"] else " (no trial reached the target: lowest refusal chosen)"
    c.print(f"target refusal score {res.settings['target']:+.3f}{met}")
    c.print(f"chosen trial {res.chosen}; artifact: {out / 'artifact'}; plot: {plot}")


# ---- refine ---------------------------------------------------------------------------------------------
@_with_verbosity
def run_refine(s: RefineSettings) -> dict[str, Any]:
    direction = _load_direction(s)
    if s.ablation:
        direction = direction.with_ablation(s.ablation)
    sets = _fit_sets(s, "direction_refine")
    result = _refine(s, s.load_model(), direction, sets, None)
    emit(s, result, lambda: render_refine(result))
    return result


def _refine(s: RefineSettings, lm: Any, direction: Any, sets: _FitSets, memo: Any) -> dict[str, Any]:
    """Refine ``direction`` on ``sets`` and write OUT/direction_refine (artifact, history, plot); the result record."""
    from ..io import write_json
    from ..methods.direction.inputs import with_fit_files
    from ..methods.direction.refine import refine_direction
    from ..report.plots.direction import refine_plot

    _log(s)(f"refining block {direction.layer}, position {direction.position} ({direction.ablation} ablation) on "
            f"{len(sets.harmful)}+{len(sets.harmless)} prompts, {s.steps} steps; validation on "
            f"{len(sets.val_harmful)}+{len(sets.val_harmless)}")
    res = refine_direction(lm, direction, sets.harmful, sets.harmless, val_harmful=sets.val_harmful,
                           val_harmless=sets.val_harmless, steps=s.steps, lr=s.lr, kl_weight=s.kl_weight, batch=s.batch,
                           micro_batch=s.batch_size, eval_every=s.eval_every, seed=s.seed, system=s.system, log=_log(s),
                           memo=memo)
    out = s.out / "direction_refine"
    with_fit_files(res.direction, sets.records).save(out / "artifact")
    write_json(out / "refine.json", res.to_json())
    plot = refine_plot(res, out / "refine.png", title=f"{lm.name}: direction refinement")
    chosen = next(h for h in res.history if h.step == res.chosen)
    return {"artifact": out / "artifact", "chosen_step": res.chosen, "steps": s.steps, "start": asdict(res.history[0]),
            "chosen": asdict(chosen), "ablation": direction.ablation, "layer": direction.layer,
            "position": direction.position, "plot": plot, "settings": res.settings}


# ---- ablate / add ---------------------------------------------------------------------------------------
def _refuse_fit_files(s: EvalDirSettings, direction: Any, kinds: tuple[str, ...]) -> None:
    """A measurement on a file the direction was fitted or selected on: an error (a loud warning with
    --allow-fit-prompts)."""
    from ..methods.direction.inputs import fitted_on

    for kind in kinds:
        path = getattr(s, kind)
        record = fitted_on(direction, path) if path else None
        if record is None:
            continue
        held_out = f"its held-out test part {record['test_part']}" if record.get("test_part") else "a held-out file"
        msg = (f"--{kind} {path} holds the prompts {_direction_dir(s)} was fitted or selected on "
               f"(sha256 {str(record['sha256'])[:12]}); measure on {held_out} or another file, or pass --allow-fit-prompts")
        if not s.allow_fit_prompts:
            raise ValueError(msg)
        print(f"WARNING: --allow-fit-prompts: --{kind} {path} holds prompts the direction was fitted or selected on; "
              "these numbers are optimistic, not a held-out measurement", file=sys.stderr)


def _eval_inputs(s: EvalDirSettings, kinds: tuple[str, ...]) -> tuple[Any, Any, Any, Any, Any]:
    from ..measure.judges import load_judge

    direction = _load_direction(s)
    _refuse_fit_files(s, direction, kinds)
    if s.full:
        direction = direction.with_weights(None, 1.0)
    if s.norm_preserving:
        direction = direction.with_weights(direction.layer_weights, direction.embed_weight, True)
    if s.ablation:
        direction = direction.with_ablation(s.ablation)
    harmful, harmless = prompt_sets(s)
    judge = load_judge(s.judge) if s.judge else None
    lm = s.load_model()
    return direction, harmful, harmless, judge, lm


def _cache(s: EvalDirSettings, lm: Any, direction: Any, sub: str) -> Any:
    from ..methods.direction.evaluate import ReplyCache

    d = lm.describe()
    meta, _ = direction.to_state()
    common = {"model": [d["name"], d["n_params"], d["dtype"]], "system": s.system, "max_new_tokens": s.max_new_tokens}
    return ReplyCache(s.out / sub, common, {"direction": meta, "vector": direction.direction.tolist(),
                                            "weights": None if direction.layer_weights is None else direction.layer_weights.tolist(),
                                            "coeff": s.coeff, "layer": s.layer})


@_with_verbosity
def run_ablate(s: EvalDirSettings) -> dict[str, Any]:
    from ..io import write_json
    from ..methods.direction.evaluate import evaluate_ablation, fmt_rate

    direction, harmful, harmless, judge, lm = _eval_inputs(s, ("harmful", "harmless"))
    res = evaluate_ablation(lm, direction, harmful.texts, harmless.texts, judge=judge, max_new_tokens=s.max_new_tokens,
                            batch_size=s.batch_size, system=s.system, cache=_cache(s, lm, direction, "direction_eval"),
                            harmless_replies_ablated=not s.skip_harmless_replies)
    res.update(model=lm.name, direction=str(_direction_dir(s)), norm_preserving=direction.norm_preserving,
               weighted=direction.layer_weights is not None, ablation=direction.ablation,
               judge=str(getattr(judge, "__qualname__", s.judge)) if judge is not None else "phrase")
    if parse_judges(s.judges):  # the harmful replies (cached by evaluate_ablation) through every judge
        cache, texts = _cache(s, lm, direction, "direction_eval"), list(harmful.texts)
        before, after = cache.get("harmful_base", texts) or [], cache.get("harmful_ablated", texts) or []
        res["judges"] = compare_specs(parse_judges(s.judges), texts * 2, before + after,
                                      ["harmful, before"] * len(texts) + ["harmful, ablated"] * len(texts),
                                      s.batch_size)
    path = write_json(s.out / "direction_ablate" / f"{s.tag or 'summary'}.json", res)

    def render() -> None:
        from rich.console import Console

        c = Console()
        c.print(f"[bold]{lm.name}[/bold] under directional ablation ({_direction_dir(s)}; judge: {res['judge']})")
        c.print(f"  harmful refusal:  {fmt_rate(res['harmful_refusal_before'])} -> {fmt_rate(res['harmful_refusal_after'])}")
        c.print(f"  harmless refusal: {fmt_rate(res['harmless_refusal_before'])} -> {fmt_rate(res.get('harmless_refusal_after', {}))}")
        c.print(f"  refusal score (harmful): {res['harmful_score_before']:+.3f} -> {res['harmful_score_after']:+.3f}")
        kl = res["kl_first_token"]
        c.print(f"  first-token KL (harmless): mean {kl['mean']:.4f}, median {kl['median']:.4f}, max {kl['max']:.4f}")
        if "reply_perplexity" in res:
            p = res["reply_perplexity"]
            c.print(f"  perplexity of the original replies (harmless): {p['before']:.3f} -> {p['after']:.3f} (x{p['ratio']:.3f})")
        if res.get("judges"):
            render_comparison(c, res["judges"])
        c.print(f"results: {path}")

    emit(s, res, render)
    return res


@_with_verbosity
def run_add(s: EvalDirSettings) -> dict[str, Any]:
    from ..io import write_json
    from ..methods.direction.evaluate import evaluate_addition, fmt_rate

    direction, _harmful, harmless, judge, lm = _eval_inputs(s, ("harmless",))
    layer = None if s.layer == -1 else s.layer
    res = evaluate_addition(lm, direction, harmless.texts, coeff=s.coeff, layer=layer, judge=judge,
                            max_new_tokens=s.max_new_tokens, batch_size=s.batch_size, system=s.system,
                            cache=_cache(s, lm, direction, "direction_eval"))
    res.update(model=lm.name, direction=str(_direction_dir(s)))
    path = write_json(s.out / "direction_add" / f"{s.tag or 'summary'}.json", res)

    def render() -> None:
        from rich.console import Console

        c = Console()
        c.print(f"[bold]{lm.name}[/bold]: adding {s.coeff:g} x the direction at block {res['layer']} (harmless prompts)")
        c.print(f"  refusal: {fmt_rate(res['refusal_before'])} -> {fmt_rate(res['refusal_after'])}")
        c.print(f"  refusal score: {res['score_before']:+.3f} -> {res['score_after']:+.3f}")
        for ex in res["examples"][:2]:
            c.print(f"  [dim]{ex['prompt'][:60]!r} -> {ex['reply'][:80]!r}[/dim]")
        c.print(f"results: {path}")

    emit(s, res, render)
    return res


# ---- export ---------------------------------------------------------------------------------------------
@_with_verbosity
def run_export(s: ExportSettings) -> dict[str, Any]:
    if not str(s.to) or str(s.to) == ".":
        raise ValueError("give the checkpoint directory to write with --to PATH")
    direction = _load_direction(s)
    if s.full:
        direction = direction.with_weights(None, 1.0)
    if s.ablation:
        direction = direction.with_ablation(s.ablation)
    lm = s.load_model()
    path = direction.export(lm, s.to)
    result = {"checkpoint": path, "layer": direction.layer, "weighted": direction.layer_weights is not None}
    emit(s, result, lambda: print(f"orthogonalised checkpoint: {path} (load it like any Hugging Face model)"))
    return result
