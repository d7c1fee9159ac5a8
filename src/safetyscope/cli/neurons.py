"""`safetyscope neurons find|ablate|fragility`: safety neurons, their ablation and fragility curves."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import typer

from ..io import fingerprint
from .common import PromptSettings, emit, prompt_sets, user_errors
from .settings import command, opt

RANKINGS = ("effect_size", "diff", "gradient", "gradient_diff")
FILTERS = ("first_token", "score", "judge", "none")


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
            run_find(s)

    @command(sub, "ablate", AblateSettings, "Measure refusal and harmless KL with a saved neuron set ablated.")
    def ablate_cmd(s: AblateSettings) -> None:
        with user_errors():
            run_ablate(s)

    @command(sub, "fragility", FragilitySettings, "Refusal and KL as more top / random neurons are ablated.")
    def fragility_cmd(s: FragilitySettings) -> None:
        with user_errors():
            run_fragility(s)

    app.add_typer(sub, name="neurons", help="Safety neurons: find, ablate, fragility curves.")


# ---- shared analysis (cached under OUT/neurons, keyed by its inputs) ---------------------------------
def filter_method(s: FindSettings) -> str:
    """The prompt filter to use: --filter, or none with its alias --no-filter."""
    method = s.filter.strip().lower()
    if method not in FILTERS:
        raise ValueError(f"unknown --filter {s.filter!r}; use {', '.join(FILTERS)}")
    if s.no_filter:
        if method not in ("first_token", "none"):  # first_token is the default: only an explicit other filter conflicts
            raise ValueError(f"--no-filter conflicts with --filter {method}; give one of them")
        return "none"
    return method


def _quiet(s: Any) -> None:
    if s.quiet or s.json:
        os.environ["SAFETYSCOPE_QUIET"] = "1"



def analyse(s: FindSettings, lm: Any) -> dict[str, Any]:
    """Filter the prompts, fit the neuron statistics and attributions; reuse a cached result of the same inputs."""
    from ..io import load_tensors, read_json, save_tensors, write_json
    from ..methods.filtering import filter_by_refusal
    from ..methods.neurons.grads import NeuronAttribution, loss_attribution, refusal_attribution
    from ..methods.neurons.rank import NeuronStats, find_neurons
    from ..prompts import capability_texts

    method = filter_method(s)
    harmful, harmless = prompt_sets(s)
    out = s.out / "neurons"
    key = fingerprint(lm.name, harmful.texts, harmless.texts, s.positions, s.layers, method, s.system,
                       s.gradient, s.utility_texts, s.utility_tokens)
    state_path, tensors_path = out / "analysis.json", out / "analysis.safetensors"
    if state_path.is_file() and tensors_path.is_file() and read_json(state_path).get("key") == key:
        state, t = read_json(state_path), load_tensors(tensors_path)
        stats = NeuronStats.from_state({k[6:]: v for k, v in t.items() if k.startswith("stats/")}, s.positions)
        ref = NeuronAttribution.from_state(t, "refusal_score", "refusal/") if "refusal/layers" in t else None
        util = NeuronAttribution.from_state(t, "lm_loss", "utility/") if "utility/layers" in t else None
        return {"stats": stats, "refusal": ref, "utility": util, "filter": state["filter"], "cached": True}
    filt = filter_by_refusal(lm, harmful.texts, harmless.texts, method=method,
                             batch_size=s.batch_size, system=s.system, cache_dir=s.out / "cache")
    stats = find_neurons(lm, filt.harmful, filt.harmless, positions=s.positions, layers=s.layers,
                         batch_size=s.batch_size, system=s.system)
    tensors = {f"stats/{k}": v for k, v in stats.state().items()}
    ref = util = None
    if s.gradient:
        ref = refusal_attribution(lm, filt.harmful, layers=stats.layers, batch_size=s.batch_size, system=s.system)
        tensors.update(ref.state("refusal/"))
        if s.utility_texts > 0:
            texts = capability_texts()[: s.utility_texts]
            util = loss_attribution(lm, texts, layers=stats.layers, max_tokens=s.utility_tokens,
                                    batch_size=max(1, s.batch_size // 4))
            tensors.update(util.state("utility/"))
    save_tensors(tensors_path, tensors)
    write_json(state_path, {"key": key, "filter": filt.summary()})
    return {"stats": stats, "refusal": ref, "utility": util, "filter": filt.summary(), "cached": False}


def rankings(s: FindSettings, a: dict[str, Any], names: list[str], k: int | None = None) -> dict[str, list]:
    """Named neuron rankings: effect_size / diff (activation, with --direction), gradient, gradient_diff."""
    from ..methods.neurons.grads import set_difference

    out: dict[str, list] = {}
    for name in names:
        if name in ("effect_size", "diff"):
            out[f"top_by_{name}"] = a["stats"].ranking(name, s.direction, k)
        elif name in ("gradient", "gradient_diff"):
            if a["refusal"] is None:
                raise ValueError(f"the {name} ranking needs gradients; drop --no-gradient")
            if name == "gradient":
                out["top_by_gradient"] = a["refusal"].ranking("signed", k)
            else:
                if a["utility"] is None:
                    raise ValueError("gradient_diff needs utility texts; set --utility-texts above 0")
                out["top_by_gradient_diff"] = set_difference(a["refusal"], a["utility"], top_utility=s.utility_top, k=k)
        else:
            raise ValueError(f"unknown ranking {name!r}; use {', '.join(RANKINGS)}")
    return out


def eval_sets(s: EvalSettings) -> tuple[list[str], list[str]]:
    from ..prompts import builtin_prompts, load_prompts

    out = []
    for kind, path in (("harmful", s.eval_harmful), ("harmless", s.eval_harmless)):
        ps = load_prompts(path, label=kind) if path else builtin_prompts(kind, s.eval_split, seed=s.seed)
        if s.n_eval:
            ps = ps.sample(s.n_eval, seed=s.seed)
        out.append(ps.require_nonempty(f"held-out {kind} prompts").texts)
    return out[0], out[1]


def _gradient_record(a: dict[str, Any], neuron: tuple[int, int]) -> dict[str, Any]:
    rec = a["stats"].record(neuron)
    rec["attribution"], rec["attribution_abs"] = a["refusal"].value(neuron)
    if a["utility"] is not None:
        rec["utility_attribution_abs"] = a["utility"].value(neuron)[1]
    return rec


# ---- commands ---------------------------------------------------------------------------------------
def run_find(s: FindSettings) -> dict[str, Any]:
    from ..io import write_json
    from ..report.plots.neurons import plot_effect_sizes

    _quiet(s)
    filter_method(s)  # a bad --filter fails before the model loads
    lm = s.load_model()
    a = analyse(s, lm)
    stats = a["stats"]
    chosen = rankings(s, a, [s.rank_by], s.top_k)
    ranked = next(iter(chosen.values()))
    out = s.out / "neurons"
    ns = stats.neuron_set(ranked, mode=s.mode, strength=s.strength,
                          info={"model": lm.name, "rank_by": s.rank_by, "direction": s.direction, "filter": a["filter"]})
    ns.save(out / "set")
    result: dict[str, Any] = {
        "model": lm.name, "positions": s.positions, "n_harmful": stats.n_harmful, "n_harmless": stats.n_harmless,
        "filter": a["filter"], "n_neurons_analysed": stats.n_neurons, "rank_by": s.rank_by,
        "top": [{"rank": i + 1, **stats.record(n)} for i, n in enumerate(ranked)],
        "top_by_effect_size": stats.top(s.top_k, "effect_size", s.direction),
        "top_by_diff": stats.top(s.top_k, "diff", s.direction),
        "top_per_layer": stats.top_per_layer(s.per_layer, "effect_size", s.direction),
        "layers": stats.layer_summary(),
    }
    if a["refusal"] is not None:
        result["top_by_gradient"] = [_gradient_record(a, n) for n in a["refusal"].ranking("signed", s.top_k)]
        if a["utility"] is not None:
            sd = rankings(s, a, ["gradient_diff"], s.top_k)["top_by_gradient_diff"]
            result["top_by_gradient_diff"] = [_gradient_record(a, n) for n in sd]
    write_json(out / "records.json", result)
    plot = plot_effect_sizes(result["layers"], result["top_by_effect_size"][:50], out / "effect_size",
                             title=f"{lm.name}: neuron effect size per layer ({stats.n_harmful}+{stats.n_harmless} prompts)")
    result["files"] = {"set": out / "set", "records": out / "records.json", "plot": plot}

    def render() -> None:
        from rich.console import Console
        from rich.table import Table

        t = Table(title=f"{lm.name}: top neurons by {s.rank_by} ({stats.n_harmful} harmful / {stats.n_harmless} harmless, "
                  f"{s.positions})")
        for col in ("rank", "layer", "neuron", "harmful μ", "harmless μ", "diff", "Cohen's d", "direction"):
            t.add_column(col, justify="right")
        for r in result["top"][:20]:
            t.add_row(str(r["rank"]), str(r["layer"]), str(r["neuron"]), f"{r['unsafe_activation']:.3f}",
                      f"{r['safe_activation']:.3f}", f"{r['activation_diff']:+.3f}", f"{r['effect_size']:+.2f}", r["direction"])
        c = Console()
        c.print(t)
        c.print(f"filter: {a['filter']}")
        for note in a["filter"].get("notes", []):
            c.print(f"[yellow]{note}[/yellow]")
        c.print(f"saved: {out / 'set'} (neuron set), {out / 'records.json'}, {plot}")

    emit(s, result, render)
    return result


def _measure(lm: Any, s: AblateSettings, ns: Any, harmful: list[str], harmless: list[str]) -> dict[str, Any]:
    from ..measure.compare import logits_under
    from ..measure.refusal_tokens import refusal_token_ids
    from ..methods.neurons.fragility import measure_point

    ids = refusal_token_ids(lm.tokenizer)
    base_logits = logits_under(lm, [*harmful, *harmless], None, batch_size=s.batch_size, system=s.system)
    ref = base_logits[len(harmful):]
    kw: dict[str, Any] = {"token_ids": ids, "max_new_tokens": s.max_new_tokens, "batch_size": s.batch_size,
                          "system": s.system}
    before = measure_point(lm, None, harmful, harmless, ref, logits=base_logits, **kw)
    after = measure_point(lm, ns, harmful, harmless, ref, **kw)
    return {"before": before, "after": after}


def run_ablate(s: AblateSettings) -> dict[str, Any]:
    from ..io import write_json
    from ..methods.neurons.artifact import NeuronSet

    _quiet(s)
    path = Path(s.neuron_set) if s.neuron_set else s.out / "neurons" / "set"
    ns = NeuronSet.load(path)
    if s.k:
        ns = ns.top(s.k)
    if s.mode or s.strength is not None:
        ns = ns.with_mode(s.mode or ns.mode, s.strength if s.strength is not None else (None if s.mode else ns.strength))
    lm = s.load_model()
    ns.check(lm)
    harmful, harmless = eval_sets(s)
    m = _measure(lm, s, ns, harmful, harmless)
    result = {"model": lm.name, "set": path, "n_neurons": len(ns), "mode": ns.mode, "strength": ns.strength,
              "n_harmful": len(harmful), "n_harmless": len(harmless), **m}
    if s.export:
        result["exported"] = ns.export(lm, s.export)
    write_json(s.out / "neurons" / "ablate.json", result)

    def render() -> None:
        from rich.console import Console
        from rich.table import Table

        t = Table(title=f"{lm.name}: {len(ns)} neurons, {ns.mode} ablation (strength {ns.strength})")
        for col in ("metric", "before", "after"):
            t.add_column(col, justify="right")
        for key in ("refusal_score", "score_refusal_rate", "refusal_rate", "kl", "kl_median"):
            if key in m["after"]:
                t.add_row(key, f"{m['before'][key]:.4f}", f"{m['after'][key]:.4f}")
        Console().print(t)

    emit(s, result, render)
    return result


def run_fragility(s: FragilitySettings) -> dict[str, Any]:
    from ..io import read_json, write_json
    from ..methods.neurons.artifact import ablate_neurons
    from ..methods.neurons.fragility import FragilityResult, fragility_curves, parse_ks
    from ..report.plots.neurons import plot_fragility

    _quiet(s)
    names = [c.strip() for c in s.curves.split(",") if c.strip()]
    if not names:
        raise ValueError("no curves given; use --curves effect_size,gradient")
    filter_method(s)
    lm = s.load_model()
    a = analyse(s, lm)
    stats = a["stats"]
    ks = parse_ks(s.ks, stats.n_neurons)
    ranked = rankings(s, a, names, max(ks))
    harmful, harmless = eval_sets(s)

    def make(prefix: Sequence[tuple[int, int]]) -> Any:
        mu = stats.neuron_set(prefix).means if s.mode == "mean" else None
        return lambda: ablate_neurons(lm, prefix, mode=s.mode, strength=s.strength, means=mu)

    pools = {layer: [(layer, i) for i in range(stats.d_mlp)] for layer in stats.layers}
    out = s.out / "neurons"
    key = fingerprint(lm.name, ranked, harmful, harmless, s.mode, s.strength, s.max_new_tokens, s.seed, s.seeds)
    partial = out / "fragility_partial.json"
    done = read_json(partial)["rows"] if partial.is_file() and read_json(partial).get("key") == key else []
    rows: list[dict[str, Any]] = list(done)

    def save_row(row: dict[str, Any]) -> None:
        rows.append(row)
        write_json(partial, {"key": key, "rows": rows})

    res: FragilityResult = fragility_curves(
        lm, ranked, make, ks, harmful, harmless, random_pools=pools, group=lambda n: n[0],
        seeds=[s.seed + i for i in range(s.seeds)], random_like=next(iter(ranked)), max_new_tokens=s.max_new_tokens,
        batch_size=s.batch_size, system=s.system, done=done, on_row=save_row)
    res.info.update(model=lm.name, mode=s.mode, strength=s.strength, n_neurons_total=stats.n_neurons,
                    filter=a["filter"], ks_spec=s.ks, eval_split=s.eval_split)
    result = res.to_dict()
    write_json(out / "fragility.json", result)
    plot = plot_fragility(result, out / "fragility",
                          title=f"{lm.name}: {s.mode} ablation of MLP neurons ({len(harmful)} harmful / {len(harmless)} harmless held out)")
    result["files"] = {"table": out / "fragility.json", "plot": plot}

    def render() -> None:
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
        c.print(f"saved: {out / 'fragility.json'}, {plot}")

    emit(s, result, render)
    return result
