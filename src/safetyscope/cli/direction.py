"""`safetyscope direction find|tune|refine|ablate|add|export`: the refusal direction (Arditi et al. 2024) and beyond."""

from __future__ import annotations

import math
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import typer

from ..io import fingerprint
from .common import PromptSettings, emit, prompt_sets, user_errors
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
    ablation: str = opt("zero", "How candidates are ablated while scoring, and how the chosen direction ablates: zero (Arditi et al.) or mean (the component moved to the harmless mean at every block; gentler, hooks only).")
    verify: int = opt(0, "Check the best N candidates on real replies (greedy generation + judge) and choose by judged refusal (0 = off: the logit score decides, as in the paper).")
    verify_tokens: int = opt(24, "Reply length for --verify.")
    judge: str = opt("", "Refusal judge as module:function for --filter judge and --verify (default: the built-in phrase judge).")


@dataclass
class TuneSettings(PromptSettings):
    direction: str = opt("", "Direction artifact directory (default: OUT/direction/artifact).")
    split: str = opt("val", "Built-in split to tune on (val: the selection prompts, not the test prompts).")
    n_prompts: int = opt(32, "Prompts per group for the search (0 = all).")
    trials: int = opt(24, "Number of kernel settings tried (trial 0 is full ablation).")
    norm_preserving: bool = opt(False, "Search the norm-preserving variant (rescale the residual to its norm after projecting).")
    target: float = opt(float("nan"), "Choose the lowest-KL trial whose mean refusal score on harmful prompts is at most this (default: the model's own mean score on the harmless prompts).")


@dataclass
class EvalDirSettings(PromptSettings):
    direction: str = opt("", "Direction artifact directory (default: OUT/direction/artifact).")
    split: str = opt("test", "Built-in split to measure on (test: never used for selection).")
    n_prompts: int = opt(32, "Prompts per group (0 = all), sampled with --seed.")
    max_new_tokens: int = opt(64, "Greedy reply length judged for refusal.")
    judge: str = opt("", "Refusal judge as module:function (default: the built-in phrase judge).")
    norm_preserving: bool = opt(False, "Use the norm-preserving ablation variant.")
    full: bool = opt(False, "Ignore tuned per-layer weights and ablate fully.")
    ablation: str = opt("", "Override the artifact's ablation: zero (Arditi et al.) or mean (to the harmless mean); empty = the artifact's own.")
    coeff: float = opt(1.0, "Activation-addition coefficient, in units of the difference-of-means norm (direction add).")
    layer: int = opt(-1, "Block whose resid_pre gets the addition (-1 = the direction's own block).")
    tag: str = opt("", "Name of this measurement: results go to OUT/direction_<ablate|add>/<tag>.json (default summary.json); replies are cached and shared across tags.")
    skip_harmless_replies: bool = opt(False, "direction ablate: do not generate harmless replies under ablation (KL and perplexity are still measured).")


@dataclass
class ExportSettings(Settings):
    direction: str = opt("", "Direction artifact directory (default: OUT/direction/artifact).")
    to: Path = opt(Path(""), "Where to write the orthogonalised Hugging Face checkpoint (required).")
    full: bool = opt(False, "Ignore tuned per-layer weights and orthogonalise fully.")
    ablation: str = opt("", "Override the artifact's ablation (weights can only hold zero ablation: pass zero for a mean-ablation artifact).")


def register(app: typer.Typer) -> None:
    sub = typer.Typer(no_args_is_help=True, help="Find, apply and export the refusal direction.")

    @command(sub, "find", FindSettings, "Difference-of-means candidates at every block x post-instruction position; select on validation prompts.")
    def find_cmd(s: FindSettings) -> None:
        with user_errors():
            run_find(s)

    @command(sub, "tune", TuneSettings, "Search smooth per-layer ablation weights trading refusal against KL; report the Pareto front.")
    def tune_cmd(s: TuneSettings) -> None:
        with user_errors():
            run_tune(s)

    from .direction_refine import RefineSettings, run_refine

    @command(sub, "refine", RefineSettings, "Train the direction (only it; the model stays frozen) to bypass refusal at lower harmless KL.")
    def refine_cmd(s: RefineSettings) -> None:
        with user_errors():
            run_refine(s)

    @command(sub, "ablate", EvalDirSettings, "Refusal before -> after directional ablation (greedy + judge), first-token KL, reply perplexity.")
    def ablate_cmd(s: EvalDirSettings) -> None:
        with user_errors():
            run_ablate(s)

    @command(sub, "add", EvalDirSettings, "Induced refusal on harmless prompts under activation addition of the direction.")
    def add_cmd(s: EvalDirSettings) -> None:
        with user_errors():
            run_add(s)

    @command(sub, "export", ExportSettings, "Write a weight-orthogonalised copy of the model as a normal HF checkpoint (safetensors).")
    def export_cmd(s: ExportSettings) -> None:
        with user_errors():
            run_export(s)

    app.add_typer(sub, name="direction", help="Refusal direction: find, tune, refine, ablate, add, export.")


# ---- helpers ------------------------------------------------------------------------------------------

def _log(s: Any) -> Any:
    if s.quiet or s.json:
        os.environ["SAFETYSCOPE_QUIET"] = "1"
        return lambda _m: None
    return lambda m: print(m, file=sys.stderr)


def _layers(spec: str, n_layers: int) -> list[int] | None:
    if not spec.strip():
        return None
    from ..sites import parse_sites

    return [int(site.layer) for site in parse_sites(f"blocks.{spec}.resid_pre", n_layers) if site.layer is not None]


def _direction_dir(s: Any) -> Path:
    return Path(s.direction) if s.direction else s.out / "direction" / "artifact"


def _load_direction(s: Any) -> Any:
    from ..methods.direction.artifact import Direction

    path = _direction_dir(s)
    if not (path / "artifact.json").is_file():
        raise FileNotFoundError(f"no direction artifact at {path}; run `safetyscope direction find` or pass --direction DIR")
    return Direction.load(path)


def _splits(s: Any) -> tuple[Any, Any, Any, Any]:
    """(harmful train, harmless train, harmful val, harmless val): built-in splits, or files split 80/20."""
    from ..prompts import builtin_prompts, load_prompts

    out = []
    for kind, path in (("harmful", s.harmful), ("harmless", s.harmless)):
        if path:
            full = load_prompts(path, label=kind)
            train, val = full.split("train", s.seed, (0.8, 0.2, 0.0)), full.split("val", s.seed, (0.8, 0.2, 0.0))
        else:
            train, val = builtin_prompts(kind, s.split, seed=s.seed), builtin_prompts(kind, "val", seed=s.seed)
        if s.n_prompts:
            train = train.sample(s.n_prompts, seed=s.seed)
        if s.n_val:
            val = val.sample(s.n_val, seed=s.seed)
        out.append((train.require_nonempty(f"{kind} training prompts"), val.require_nonempty(f"{kind} validation prompts")))
    return out[0][0], out[1][0], out[0][1], out[1][1]


# ---- find -----------------------------------------------------------------------------------------------
def run_find(s: FindSettings) -> dict[str, Any]:
    from ..io import read_json, write_json
    from ..measure.judges import load_judge
    from ..methods.direction.artifact import ABLATIONS
    from ..methods.direction.candidates import Candidates, find_candidates, position_offsets
    from ..methods.direction.select import SelectConfig, select_direction
    from ..methods.filtering import filter_by_refusal
    from ..report.plots.direction import candidate_heatmaps

    if s.ablation not in ABLATIONS:  # before loading anything: a typo must not cost a capture pass
        raise ValueError(f"unknown --ablation {s.ablation!r}; use {' or '.join(ABLATIONS)}")
    log = _log(s)
    judge = load_judge(s.judge) if s.judge else None
    h_train, s_train, h_val, s_val = _splits(s)
    lm = s.load_model()
    out = s.out / "direction"
    offsets = position_offsets(lm, s.positions, s.system)
    ident = [lm.describe()["name"], lm.describe()["n_params"], lm.describe()["dtype"], s.system, s.filter, s.judge]
    cand_key = fingerprint(ident, offsets, h_train.texts, s_train.texts)
    cands = None
    if (out / "candidates" / "candidates.json").is_file():
        loaded = Candidates.load(out / "candidates")
        cands = loaded if loaded.info.get("key") == cand_key else None
    if cands is None:
        log(f"capturing resid_pre at {lm.n_layers} blocks x {len(offsets)} positions ({len(h_train)}+{len(s_train)} prompts)")
        cands = find_candidates(lm, h_train.texts, s_train.texts, positions=list(offsets), filter=s.filter, judge=judge,
                                batch_size=s.batch_size, system=s.system, cache_dir=s.out / "cache")
        cands.info["key"] = cand_key
        cands.save(out / "candidates")
    else:
        log(f"reusing candidates from {out / 'candidates'}")

    val = filter_by_refusal(lm, h_val.texts, s_val.texts, method=s.filter, judge=judge, batch_size=s.batch_size,
                            system=s.system, cache_dir=s.out / "cache")
    cfg = SelectConfig(s.kl_threshold, s.induce_threshold, s.prune_layers, s.induce, s.score_pruned,
                       _layers(s.layers, lm.n_layers), None, 1.0, s.per_pass, s.screen, s.keep,
                       verify=s.verify, verify_tokens=s.verify_tokens, ablation=s.ablation)
    sel_key = fingerprint(cand_key, val.harmful, val.harmless, s.verify_tokens, s.ablation)  # judged scores depend on the reply length
    partial_path = out / "scores_partial.json"
    done: dict[str, dict[str, float]] = {}
    if partial_path.is_file():
        saved = read_json(partial_path)
        done = saved["scores"] if saved.get("key") == sel_key else {}
    def save_partial(memo: dict[str, dict[str, float]]) -> None:
        write_json(partial_path, {"key": sel_key, "scores": memo})

    log(f"scoring candidates on {len(val.harmful)}+{len(val.harmless)} validation prompts"
        + (f" (resuming {len(done)} scored)" if done else ""))
    direction, selection = select_direction(
        lm, cands, val.harmful, val.harmless, cfg, batch_size=s.batch_size, system=s.system, done=done,
        checkpoint=save_partial, log=log, judge=judge,
    )
    write_json(out / "selection.json", selection.to_json())
    plot = candidate_heatmaps(selection, lm.n_layers, list(cands.positions), cands.tokens, out / "plots" / "candidates.png",
                              title=f"{lm.name}: refusal-direction candidates")
    if direction is None:
        raise RuntimeError("no candidate could be scored; check the prompts (both groups need prompts) and --layers")
    direction.save(out / "artifact")
    result = {
        "model": lm.name, "artifact": out / "artifact", "layer": direction.layer, "position": direction.position,
        "token": direction.token, "norm": direction.norm, "scores": direction.scores, "note": selection.note,
        "ablation": direction.ablation,
        "n_train": [cands.n_harmful, cands.n_harmless], "n_val": [len(val.harmful), len(val.harmless)],
        "filter": cands.info.get("filter"), "n_candidates": len(selection.scores),
        "n_eligible": sum(1 for c in selection.scores if c.eligible), "plot": plot,
    }
    write_json(out / "summary.json", result)

    def render() -> None:
        from rich.console import Console

        c = Console()
        sc = direction.scores

        def f(key: str, fmt: str) -> str:
            return "n/a" if sc.get(key) is None else format(sc[key], fmt)

        c.print(f"[bold]refusal direction[/bold]: block {direction.layer}, position {direction.position} "
                f"({direction.token!r}), ||Δμ|| = {direction.norm:.2f}, {direction.ablation} ablation")
        c.print(f"  bypass {f('bypass', '+.3f')} (baseline {f('baseline_harmful_score', '+.3f')}), "
                f"induce {f('induce', '+.3f')}, KL {f('kl', '.4f')}; "
                f"{result['n_eligible']}/{result['n_candidates']} candidates eligible")
        if sc.get("judged_bypass") is not None:
            base = selection.baseline
            c.print(f"  judged on replies: refusal under ablation {sc['judged_bypass']:.0%} "
                    f"(without: {base.get('judged_harmful', float('nan')):.0%}), under addition {sc['judged_induce']:.0%} "
                    f"(without: {base.get('judged_harmless', float('nan')):.0%})")
        if selection.note:
            c.print(f"[yellow]{selection.note}[/yellow]")
        c.print(f"artifact: {out / 'artifact'}; scores: {out / 'selection.json'}; plot: {plot}")

    emit(s, result, render)
    return result


# ---- tune -----------------------------------------------------------------------------------------------
def run_tune(s: TuneSettings) -> dict[str, Any]:
    from ..io import write_json
    from ..methods.direction.tune import tune_weights
    from ..methods.filtering import filter_by_refusal
    from ..report.plots.direction import pareto_plot

    log = _log(s)
    base = _load_direction(s)
    harmful, harmless = prompt_sets(s)
    lm = s.load_model()
    kept = filter_by_refusal(lm, harmful.texts, harmless.texts, batch_size=s.batch_size, system=s.system)
    res = tune_weights(lm, base, kept.harmful, kept.harmless, n_trials=s.trials, seed=s.seed,
                       norm_preserving=s.norm_preserving, target=None if math.isnan(s.target) else s.target, batch_size=s.batch_size,
                       system=s.system, log=log)
    out = s.out / "direction_tune"
    tuned = res.direction(base, lm.n_layers)
    tuned.save(out / "artifact")
    write_json(out / "tune.json", res.to_json())
    plot = pareto_plot(res, out / "pareto.png", title=f"{lm.name}: per-layer ablation weights")
    chosen = res.trials[res.chosen]
    result = {"artifact": out / "artifact", "chosen": asdict(chosen), "full_ablation": asdict(res.trials[0]),
              "front": [asdict(res.trials[i]) for i in res.front], "plot": plot}

    def render() -> None:
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

    emit(s, result, render)
    return result


# ---- ablate / add ---------------------------------------------------------------------------------------
def _eval_inputs(s: EvalDirSettings) -> tuple[Any, Any, Any, Any, Any]:
    from ..measure.judges import load_judge

    direction = _load_direction(s)
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


def run_ablate(s: EvalDirSettings) -> dict[str, Any]:
    from ..io import write_json
    from ..methods.direction.evaluate import evaluate_ablation, fmt_rate

    _log(s)
    direction, harmful, harmless, judge, lm = _eval_inputs(s)
    res = evaluate_ablation(lm, direction, harmful.texts, harmless.texts, judge=judge, max_new_tokens=s.max_new_tokens,
                            batch_size=s.batch_size, system=s.system, cache=_cache(s, lm, direction, "direction_eval"),
                            harmless_replies_ablated=not s.skip_harmless_replies)
    res.update(model=lm.name, direction=str(_direction_dir(s)), norm_preserving=direction.norm_preserving,
               weighted=direction.layer_weights is not None, ablation=direction.ablation)
    path = write_json(s.out / "direction_ablate" / f"{s.tag or 'summary'}.json", res)

    def render() -> None:
        from rich.console import Console

        c = Console()
        c.print(f"[bold]{lm.name}[/bold] under directional ablation ({_direction_dir(s)})")
        c.print(f"  harmful refusal:  {fmt_rate(res['harmful_refusal_before'])} -> {fmt_rate(res['harmful_refusal_after'])}")
        c.print(f"  harmless refusal: {fmt_rate(res['harmless_refusal_before'])} -> {fmt_rate(res.get('harmless_refusal_after', {}))}")
        c.print(f"  refusal score (harmful): {res['harmful_score_before']:+.3f} -> {res['harmful_score_after']:+.3f}")
        kl = res["kl_first_token"]
        c.print(f"  first-token KL (harmless): mean {kl['mean']:.4f}, median {kl['median']:.4f}, max {kl['max']:.4f}")
        if "reply_perplexity" in res:
            p = res["reply_perplexity"]
            c.print(f"  perplexity of the original replies (harmless): {p['before']:.3f} -> {p['after']:.3f} (x{p['ratio']:.3f})")
        c.print(f"results: {path}")

    emit(s, res, render)
    return res


def run_add(s: EvalDirSettings) -> dict[str, Any]:
    from ..io import write_json
    from ..methods.direction.evaluate import evaluate_addition, fmt_rate

    _log(s)
    direction, _harmful, harmless, judge, lm = _eval_inputs(s)
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
def run_export(s: ExportSettings) -> dict[str, Any]:
    _log(s)
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
