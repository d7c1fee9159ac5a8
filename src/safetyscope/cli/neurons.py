"""`safetyscope neurons find|ablate|fragility`: safety neurons, their ablation and fragility curves."""

from __future__ import annotations

import sys
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import typer

from .common import PromptSettings, emit, user_errors
from .judge import JUDGES_HELP, compare_specs, parse_judges, render_comparison
from .settings import Settings, command, opt


@dataclass
class EvalSettings(PromptSettings):
    eval_split: str = opt("test", "Held-out split of the built-in sets used to measure ablations (val or test).")
    n_eval: int = opt(32, "Held-out prompts per group for measuring ablations (0 = all).")
    eval_harmful: str = opt("", "Held-out harmful prompts file (default: the built-in --eval-split).")
    eval_harmless: str = opt("", "Held-out harmless prompts file (default: the built-in --eval-split).")


@dataclass
class FindSettings(PromptSettings):
    positions: str = opt("last", "Positions: last, mean, post_instruction (averaged) or offsets like -1,-2.")
    layers: str = opt("*", "Layers to analyse: *, a range like 10-20, or a list like 3,7,9.")
    top_k: int = opt(100, "Neurons in the saved neuron set.")
    per_layer: int = opt(5, "Top neurons per layer listed in records.json.")
    rank_by: str = opt("effect_size", "Ranking of the saved set: effect_size, diff, gradient or gradient_diff.")
    direction: str = opt("both", "Activation ranking keeps both, harmful_higher or harmless_higher neurons.")
    gradient: bool = opt(True, "Also rank by gradient importance (refusal-score attribution; one backward per batch).",
                         flag="--gradient/--no-gradient")
    utility_texts: int = opt(16, "Built-in capability passages for the utility loss (0 = no set difference).")
    utility_tokens: int = opt(128, "Tokens per capability passage.")
    utility_top: float = opt(0.05, "Set difference: drop the top fraction of neurons by utility importance.")
    filter: str = opt("first_token", "Keep refused harmful / answered harmless prompts by: first_token (the likeliest first reply token is a refusal opening), score (logit refusal score > 0, as in Arditi et al.), judge (generation + phrase judge) or none.")
    no_filter: bool = opt(False, "Alias of --filter none: use every prompt, not only refused harmful and answered harmless ones.")
    mode: str = opt("zero", "Ablation mode: zero, mean (harmless mean) or scale.")
    strength: float | None = opt(None, "zero/mean: fraction of the way to the target (default 1); scale: the factor.")


@dataclass
class AblateSettings(EvalSettings):
    neuron_set: str = opt("", "Neuron set directory (default: OUT/neurons/set).", flag="--set")
    k: int = opt(0, "Ablate only the first k neurons of the set (0 = all).")
    mode: str = opt("", "Override the set's mode: zero, mean or scale.")
    strength: float | None = opt(None, "Override the set's strength.")
    max_new_tokens: int = opt(32, "Generate replies this long and judge them (0 = logit scores only).")
    export: str = opt("", "Also save the ablated weights as a Hugging Face checkpoint in this directory.")
    judges: str = opt("", "The held-out harmful replies before / under ablation: " + JUDGES_HELP)


@dataclass
class FragilitySettings(FindSettings, EvalSettings):
    ks: str = opt("0,10,50,100,500,1%,5%", "Numbers of ablated neurons (counts, or % of all analysed neurons).")
    seeds: int = opt(3, "Random baselines (from the same layers as the first curve's neurons): number of seeds.")
    curves: str = opt("effect_size,gradient", "Rankings to ablate: effect_size, diff, gradient, gradient_diff (comma-separated).")
    max_new_tokens: int = opt(0, "Also generate replies this long at each point and judge them (slow; 0 = off).")


def register(app: typer.Typer) -> None:
    sub = typer.Typer(no_args_is_help=True, help="Safety neurons: find, ablate, fragility curves.")

    @command(sub, "find", FindSettings, "Rank MLP neurons by activation difference (and gradient importance); save a neuron set.")
    def find_cmd(s: FindSettings) -> None:
        with user_errors():
            try:
                run_find(s)
            except KeyboardInterrupt:
                _interrupted(s)

    @command(sub, "ablate", AblateSettings, "Measure refusal and harmless KL with a saved neuron set ablated.")
    def ablate_cmd(s: AblateSettings) -> None:
        with user_errors():
            run_ablate(s)

    @command(sub, "fragility", FragilitySettings, "Refusal and KL as more top / random neurons are ablated.")
    def fragility_cmd(s: FragilitySettings) -> None:
        with user_errors():
            try:
                run_fragility(s)
            except KeyboardInterrupt:
                _interrupted(s)

    app.add_typer(sub, name="neurons", help="Safety neurons: find, ablate, fragility curves.")


# ---- settings -> library arguments ------------------------------------------------------------------
def filter_method(s: FindSettings) -> str:
    """The prompt filter to use: --filter, or none with its alias --no-filter."""
    from ..methods.neurons.analysis import check_filter

    return check_filter(s.filter, s.no_filter)


def _quiet(s: Any) -> Any:
    from ..progress import verbosity

    return verbosity(False) if s.quiet or s.json else nullcontext()


def _groups(s: PromptSettings) -> tuple[Any, Any]:
    """(harmful, harmless): the user's files (read, digested and sampled by the library) or the built-in sets."""
    from ..prompts import builtin_prompts

    return (s.harmful or builtin_prompts("harmful", s.split, seed=s.seed),
            s.harmless or builtin_prompts("harmless", s.split, seed=s.seed))


def _eval_groups(s: EvalSettings) -> tuple[Any, Any]:
    from ..prompts import builtin_prompts

    return (s.eval_harmful or builtin_prompts("harmful", s.eval_split, seed=s.seed),
            s.eval_harmless or builtin_prompts("harmless", s.eval_split, seed=s.seed))


def _analysis_kw(s: FindSettings) -> dict[str, Any]:
    return {"layers": s.layers, "positions": s.positions, "filter": filter_method(s), "gradient": s.gradient,
            "utility_texts": s.utility_texts, "utility_tokens": s.utility_tokens, "n_prompts": s.n_prompts,
            "batch_size": s.batch_size, "system": s.system, "seed": s.seed, "cache_dir": s.out / "neurons",
            "filter_cache": s.out / "cache"}


def _interrupted(s: Settings) -> None:
    """The truthful interrupt message of `neurons find` / `fragility`, then exit 130."""
    from ..methods.neurons.analysis import saved_progress
    from ..methods.neurons.api import FRAGILITY_PARTIAL

    where = s.out / "neurons"
    n = saved_progress(where)
    kept = [f"the neuron statistics of {n} finished prompt(s)"] if n else []
    if (where / FRAGILITY_PARTIAL).is_file():
        kept.append("the finished fragility points")
    if kept:
        msg = f"interrupted: {' and '.join(kept)} are saved in {where}; rerun the same command to resume from them"
    else:
        msg = "interrupted: no partial results of this run are saved; a rerun starts the unfinished work over"
    print(msg, file=sys.stderr)
    raise typer.Exit(130)


# ---- commands ---------------------------------------------------------------------------------------
def run_find(s: FindSettings) -> dict[str, Any]:
    from ..io import write_json
    from ..methods.neurons.api import find_neurons
    from ..report.plots.neurons import plot_effect_sizes

    with _quiet(s):
        kw = _analysis_kw(s)  # a bad --filter fails before the model loads
        harmful, harmless = _groups(s)
        lm = s.load_model()
        rep = find_neurons(lm, harmful, harmless, top_k=s.top_k, per_layer=s.per_layer, rank_by=s.rank_by,  # type: ignore[arg-type]
                           direction=s.direction, utility_top=s.utility_top, mode=s.mode, strength=s.strength, **kw)
    out = s.out / "neurons"
    rep.neuron_set.save(out / "set")
    result = rep.to_json()
    write_json(out / "records.json", result)
    stats = rep.analysis.stats
    plot = plot_effect_sizes(result["layers"], result["top_by_effect_size"][:50], out / "effect_size",
                             title=f"{lm.name}: neuron effect size per layer ({stats.n_harmful}+{stats.n_harmless} prompts)")
    result["files"] = {"set": out / "set", "records": out / "records.json", "plot": plot}
    emit(s, result, lambda: _render_find(s, result, plot))
    return result


def _render_find(s: FindSettings, result: dict[str, Any], plot: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    out = s.out / "neurons"
    t = Table(title=f"{result['model']}: top neurons by {s.rank_by} ({result['n_harmful']} harmful / "
              f"{result['n_harmless']} harmless, {s.positions})")
    for col in ("rank", "layer", "neuron", "harmful μ", "harmless μ", "diff", "Cohen's d", "direction"):
        t.add_column(col, justify="right")
    for r in result["top"][:20]:
        t.add_row(str(r["rank"]), str(r["layer"]), str(r["neuron"]), f"{r['unsafe_activation']:.3f}",
                  f"{r['safe_activation']:.3f}", f"{r['activation_diff']:+.3f}", f"{r['effect_size']:+.2f}", r["direction"])
    c = Console()
    c.print(t)
    c.print(f"filter: {result['filter']}")
    for note in result["filter"].get("notes", []):
        c.print(f"[yellow]{note}[/yellow]")
    c.print(f"saved: {out / 'set'} (neuron set), {out / 'records.json'}, {plot}")


def _fitted_notes(s: AblateSettings, ns: Any) -> None:
    """ablate measures on --eval-*: a --harmful/--harmless that is the set's own fitting file is not used; say so."""
    from ..methods.neurons.api import check_held_out

    for flag, path in (("--harmful", s.harmful), ("--harmless", s.harmless)):
        try:
            check_held_out({flag: path}, ns.info.get("fitted_on", {}))
        except ValueError:
            print(f"note: {flag} {path} is the file this neuron set was found on and is not used by `neurons ablate`, "
                  "which measures on --eval-harmful / --eval-harmless (default: the built-in --eval-split)", file=sys.stderr)


def run_ablate(s: AblateSettings) -> dict[str, Any]:
    from ..io import write_json
    from ..methods.neurons.api import check_held_out, neuron_ablation
    from ..methods.neurons.artifact import NeuronSet

    if parse_judges(s.judges) and s.max_new_tokens <= 0:
        raise ValueError("--judges compares judges on generated replies; give --max-new-tokens > 0")
    with _quiet(s):
        path = Path(s.neuron_set) if s.neuron_set else s.out / "neurons" / "set"
        ns = NeuronSet.load(path)
        if s.k:
            ns = ns.top(s.k)
        if s.mode or s.strength is not None:
            ns = ns.with_mode(s.mode or ns.mode, s.strength if s.strength is not None else (None if s.mode else ns.strength))
        check_held_out({"--eval-harmful": s.eval_harmful, "--eval-harmless": s.eval_harmless}, ns.info.get("fitted_on", {}))
        _fitted_notes(s, ns)
        harmful, harmless = _eval_groups(s)
        lm = s.load_model()
        res = neuron_ablation(lm, ns, harmful, harmless, max_new_tokens=s.max_new_tokens, n_prompts=s.n_eval,
                              batch_size=s.batch_size, system=s.system, seed=s.seed)
    m = {"before": res.before, "after": res.after}
    result = {"model": lm.name, "set": path, "n_neurons": len(ns), "mode": ns.mode, "strength": ns.strength,
              "n_harmful": res.n_harmful, "n_harmless": res.n_harmless, **m,
              "judge": "phrase" if s.max_new_tokens else None}  # refusal_rate's judge (the built-in phrase judge)
    judges: dict[str, Any] | None = None
    if parse_judges(s.judges):  # the same harmful replies through every judge, side by side
        n = len(res.harmful)
        judges = compare_specs(parse_judges(s.judges), list(res.harmful) * 2, [*res.replies_before, *res.replies_after],
                               ["harmful, before"] * n + ["harmful, ablated"] * n, s.batch_size)
        result["judges"] = judges
    if s.export:
        result["exported"] = ns.export(lm, s.export)
    write_json(s.out / "neurons" / "ablate.json", result)

    def render() -> None:
        from rich.console import Console
        from rich.table import Table

        judged = f"; refusal_rate judged by {result['judge']}" if result["judge"] else ""
        t = Table(title=f"{lm.name}: {len(ns)} neurons, {ns.mode} ablation (strength {ns.strength}){judged}")
        for col in ("metric", "before", "after"):
            t.add_column(col, justify="right")
        for key in ("refusal_score", "score_refusal_rate", "refusal_rate", "kl", "kl_median"):
            if key in m["after"]:
                t.add_row(key, f"{m['before'][key]:.4f}", f"{m['after'][key]:.4f}")
        c = Console()
        c.print(t)
        if judges:
            render_comparison(c, judges)

    emit(s, result, render)
    return result


def run_fragility(s: FragilitySettings) -> dict[str, Any]:
    from ..io import write_json
    from ..methods.neurons.api import check_held_out, neuron_analysis, neuron_fragility
    from ..prompts.sets import file_digest
    from ..report.plots.neurons import plot_fragility

    with _quiet(s):
        names = [c.strip() for c in s.curves.split(",") if c.strip()]
        if not names:
            raise ValueError("no curves given; use --curves effect_size,gradient")
        kw = _analysis_kw(s)
        fitted = {k: {"path": p, "sha256": file_digest(p)} for k, p in (("harmful", s.harmful), ("harmless", s.harmless))
                  if p and Path(p).is_file()}
        check_held_out({"--eval-harmful": s.eval_harmful, "--eval-harmless": s.eval_harmless}, fitted, "the neurons")
        harmful, harmless = _groups(s)
        eval_h, eval_s = _eval_groups(s)
        lm = s.load_model()
        a = neuron_analysis(lm, harmful, harmless, **kw)
        res = neuron_fragility(lm, a, eval_h, eval_s, ks=s.ks, seeds=s.seeds, curves=names, mode=s.mode,
                               strength=s.strength, direction=s.direction, utility_top=s.utility_top,
                               max_new_tokens=s.max_new_tokens, n_prompts=s.n_eval, batch_size=s.batch_size,
                               system=s.system, seed=s.seed, cache_dir=s.out / "neurons",
                               info={"eval_split": s.eval_split})
    out = s.out / "neurons"
    result = res.to_dict()
    write_json(out / "fragility.json", result)
    plot = plot_fragility(result, out / "fragility",
                          title=f"{lm.name}: {s.mode} ablation of MLP neurons ({res.n_harmful} harmful / {res.n_harmless} harmless held out)")
    result["files"] = {"table": out / "fragility.json", "plot": plot}
    emit(s, result, lambda: _render_fragility(s, result, plot))
    return result


def _render_fragility(s: FragilitySettings, result: dict[str, Any], plot: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"Fragility ({s.mode} ablation); random = mean ± std over {s.seeds} seeds")
    metrics = ["refusal_score", "score_refusal_rate"] + (["refusal_rate"] if s.max_new_tokens else []) + ["kl"]
    for col in ("curve", "k", *metrics):
        t.add_column(col, justify="right")
    for r in result["summary"]:
        cells = [f"{r[m]:.3f}" + (f" ± {r[m + '_std']:.3f}" if r["n_seeds"] > 1 else "") for m in metrics]
        t.add_row(r["curve"], str(r["k"]), *cells)
    c = Console()
    c.print(t)
    c.print(f"saved: {s.out / 'neurons' / 'fragility.json'}, {plot}")
