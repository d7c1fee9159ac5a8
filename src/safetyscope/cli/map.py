"""`safetyscope map`: the whole pipeline, stage by stage, cached and resumable, ending in the report.

Stages (``--stages`` selects; each writes ``OUT/map/stages/<stage>.json`` atomically, and a rerun
skips every stage whose settings are unchanged):

  probe       probes at every layer (where is harmfulness readable?)
  neurons     safety neurons in the readable layers (activation difference + gradient importance)
  trace       attribution patching of the full layer x component grid, top cells verified exactly
  direction   refusal direction: candidates (readable blocks from the trace's decision onset), selection,
              ablation and addition measured on test prompts
  fragility   refusal vs number of neurons removed (top vs random), with the direction as one component
  capability  KL and perplexity under the direction and the neuron set (safetyscope eval)
  dla         direct logit attribution of each component to the refusal tokens
  report      circuit stages by evidence and the HTML report
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import typer

from ..io import fingerprint
from .common import PromptSettings, user_errors
from .settings import command, opt

STAGES = ("probe", "neurons", "trace", "direction", "fragility", "capability", "dla", "report")


@dataclass
class MapSettings(PromptSettings):
    stages: str = opt("all", "Stages to run (comma list of " + ", ".join(STAGES) + ") or all.")
    quick: bool = opt(False, "Tiny budgets everywhere (a smoke test in a few minutes, not findings).")
    force: bool = opt(False, "Recompute stages even when cached results with the same settings exist.")
    n_prompts: int = opt(48, "Training prompts per group (probes, neurons, direction candidates).")
    n_eval: int = opt(16, "Held-out prompts per group for ablation, fragility and capability measurements.")
    pairs: int = opt(6, "Minimal pairs traced by attribution patching.")
    max_new_tokens: int = opt(32, "Reply length for judged generations (refusal rates, sample replies).")
    fragility_ks: str = opt("0,10,100,1%", "Numbers of neurons ablated along the fragility curves.")


@dataclass(frozen=True)
class Budget:
    n_prompts: int
    n_eval: int
    n_val: int
    pairs: int
    max_new_tokens: int
    ks: str
    seeds: int
    folds: int
    utility_texts: int


def budget(s: MapSettings) -> Budget:
    if s.quick:
        return Budget(n_prompts=10, n_eval=6, n_val=6, pairs=2, max_new_tokens=12, ks="0,5,20", seeds=1, folds=2,
                      utility_texts=2)
    return Budget(n_prompts=s.n_prompts, n_eval=s.n_eval, n_val=max(8, s.n_eval * 3 // 4), pairs=s.pairs,
                  max_new_tokens=s.max_new_tokens, ks=s.fragility_ks, seeds=2, folds=5, utility_texts=8)


def _common(s: MapSettings) -> dict[str, Any]:
    """The shared settings every sub-command receives (model, device, output, prompts ...)."""
    from .settings import Settings

    names = {f.name for f in fields(Settings)} | {"harmful", "harmless", "seed"}
    return {k: v for k, v in asdict(s).items() if k in names} | {"quiet": True, "json": False}


def _settings(cls: type, s: MapSettings, **over: Any) -> Any:
    base = {k: v for k, v in _common(s).items() if k in {f.name for f in fields(cls)}}
    return cls(**{**base, **over})


FILE_FRACTIONS = (0.6, 0.2, 0.2)  # train (fitting) / val (direction selection) / test (every measurement)


def user_splits(s: MapSettings) -> dict[str, dict[str, str]]:
    """Seeded train+val / test files for user prompt files, so no measurement reuses a fitting prompt.

    {} for the built-in sets (they have their own splits); else {"fit": {"harmful": path, ...},
    "test": {...}} written under OUT/map/prompts/. A group without a file uses the built-in set's splits.
    """
    import json as _json

    from ..io import atomic_path
    from ..prompts import load_prompts

    if not (s.harmful or s.harmless):
        return {}
    out: dict[str, dict[str, str]] = {"fit": {}, "test": {}}
    for kind, path in (("harmful", s.harmful), ("harmless", s.harmless)):
        if not path:
            continue
        full = load_prompts(path, label=kind).require_nonempty(f"{kind} prompts in {path}")
        parts = {"fit": [*full.split("train", s.seed, FILE_FRACTIONS), *full.split("val", s.seed, FILE_FRACTIONS)],
                 "test": list(full.split("test", s.seed, FILE_FRACTIONS))}
        for part, items in parts.items():
            if not items:
                raise ValueError(f"{path} has too few {kind} prompts to split into fitting and test prompts; give at least 5")
            dest = s.out / "map" / "prompts" / f"{kind}_{part}.jsonl"
            with atomic_path(dest) as tmp:
                tmp.write_text("".join(_json.dumps({"prompt": x.text, "label": kind}) + "\n" for x in items), "utf-8")
            out[part][kind] = str(dest)
    return out


def _files(s: MapSettings, part: str) -> dict[str, str]:
    """Prompt-file overrides: part "fit" for stages that fit (probe, neurons, direction, DLA), "test" for
    stages that measure on held-out prompts."""
    return user_splits(s).get(part, {})


# ---- the stages ----------------------------------------------------------------------------------------
def stage_probe(s: MapSettings, b: Budget, done: dict[str, Any]) -> dict[str, Any]:
    from .probe import ProbeSettings, run_probe

    jobs = max(1, min(4, os.cpu_count() or 1))  # the nested-CV fits dominate this stage; layers fit in parallel
    return run_probe(_settings(ProbeSettings, s, n_prompts=b.n_prompts, folds=b.folds, controls=2 if not s.quick else 1,
                               n_jobs=1 if s.quick else jobs, **({"c": "1.0"} if s.quick else {}), **_files(s, "fit")))


def readable_layers(probe: dict[str, Any] | None, n_layers: int) -> str:
    """Layers from the first one where the probe is halfway to its best accuracy, to the end."""
    if not probe:
        return "*"
    acc = [row["accuracy"] for row in probe["layers"]]
    base = max(0.5, sum(r["control_accuracy"] for r in probe["layers"]) / len(acc))
    half = base + 0.5 * (max(acc) - base)
    first = next((i for i, a in enumerate(acc) if a >= half), 0)
    return f"{probe['layers'][first]['layer']}-{n_layers - 1}"


def decision_onset(trace: dict[str, Any] | None) -> int | None:
    """The first block whose residual stream, patched harmless -> harmful at the post-instruction tokens,
    restores at least half of the largest such effect: below it the refusal decision is not yet carried
    by those tokens, so a refusal direction read there cannot mediate it. None without a trace grid."""
    mode = ((trace or {}).get("modes") or {}).get("attribution") or {}
    grid = (mode.get("grids") or {}).get("component") or {}
    cols, rows, med = grid.get("cols") or [], grid.get("rows") or [], grid.get("median") or []
    if "resid_pre" not in cols or not rows or not med:
        return None
    j = cols.index("resid_pre")
    col = [float(r[j]) if r[j] is not None else float("nan") for r in med]
    finite = [v for v in col if v == v]
    if not finite or max(finite) <= 0:
        return None
    first = next(i for i, v in enumerate(col) if v == v and v >= 0.5 * max(finite))
    return int(rows[first])


def stage_neurons(s: MapSettings, b: Budget, done: dict[str, Any]) -> dict[str, Any]:
    from .neurons import FindSettings, run_find

    n_layers = int(done["probe"]["model"]["n_layers"]) if done.get("probe") else 0
    layers = readable_layers(done.get("probe"), n_layers) if n_layers else "*"
    res = run_find(_settings(FindSettings, s, n_prompts=b.n_prompts, layers=layers, utility_texts=b.utility_texts, **_files(s, "fit")))
    res["layers_analysed"] = layers
    return res


def stage_trace(s: MapSettings, b: Budget, done: dict[str, Any]) -> dict[str, Any]:
    from .trace import TraceSettings, run_trace

    # --quick runs on tiny random models too, whose pairs have no real refusal gap to normalise by.
    return run_trace(_settings(TraceSettings, s, mode="attribution", pairs=b.pairs, verify_top=5 if s.quick else 10,
                               min_gap=0.0 if s.quick else 1.0))


def stage_direction(s: MapSettings, b: Budget, done: dict[str, Any]) -> dict[str, Any]:
    from .direction import EvalDirSettings, FindSettings, run_ablate, run_add, run_find

    # Candidates where the probe reads harmfulness (the refusal direction must be readable there), screened on a
    # few prompts first and fully scored for the best ones: the selection is the map's most expensive step.
    n_layers = int(done["probe"]["model"]["n_layers"]) if done.get("probe") else 0
    layers = readable_layers(done.get("probe"), n_layers) if n_layers else ""
    onset = decision_onset(done.get("trace"))
    if onset is not None and layers not in ("", "*"):  # and from 2 blocks before the residual patching effect sets in
        lo = max(int(layers.split("-")[0]), onset - 2)
        layers = f"{min(lo, n_layers - 1)}-{layers.split('-')[1]}"
    # The best 2 finalists are judged on real replies (the first-token score is only a proxy).
    screen: dict[str, Any] = {"screen": 3, "keep": 6, "verify": 2}
    if s.quick and n_layers:  # a smoke test: the last position of 4 evenly spaced readable blocks before the cutoff
        from ..methods.direction.select import SelectConfig

        hi = max(0, SelectConfig().cutoff(n_layers) - 1)  # the last block not pruned as "late"
        lo = min(hi, int(layers.split("-")[0]) if layers not in ("", "*") else 0)
        layers = ",".join(str(x) for x in sorted({lo + round(i * (hi - lo) / 3) for i in range(4)}))
        screen = {"positions": "-1", "verify": 1, "verify_tokens": 8}
    found = run_find(_settings(FindSettings, s, n_prompts=b.n_prompts, n_val=b.n_val, induce="lazy",
                               layers="" if layers == "*" else layers, **screen, **_files(s, "fit")))
    ev = dict(n_prompts=b.n_eval, max_new_tokens=b.max_new_tokens, split="test", **_files(s, "test"))
    ablate = run_ablate(_settings(EvalDirSettings, s, **ev))
    add = run_add(_settings(EvalDirSettings, s, **ev))
    return {"find": found, "ablate": ablate, "add": add}


def stage_fragility(s: MapSettings, b: Budget, done: dict[str, Any]) -> dict[str, Any]:
    """Neuron curves (top by effect size and by gradient, random from the same layers) and the refusal
    direction as one component against random directions, on the same held-out prompts and metrics."""
    from ..artifacts import load_artifact
    from ..methods.neurons.fragility import direction_fragility
    from ..report.plots.neurons import plot_fragility
    from .neurons import FragilitySettings, eval_sets, run_fragility

    layers = done.get("neurons", {}).get("layers_analysed", "*")
    # the same analysis settings as the neurons stage, so its cached statistics and attributions are reused
    fs = _settings(FragilitySettings, s, n_prompts=b.n_prompts, layers=layers, ks=b.ks, seeds=b.seeds, n_eval=b.n_eval,
                   curves="effect_size,gradient", utility_texts=b.utility_texts, eval_split="test", **_files(s, "fit"),
                   **{f"eval_{k}": v for k, v in _files(s, "test").items()})
    res = run_fragility(fs)
    path = s.out / "direction" / "artifact"
    if (path / "artifact.json").is_file():
        harmful, harmless = eval_sets(fs)
        lm = s.load_model()
        d = direction_fragility(lm, load_artifact(path), harmful, harmless, seeds=[s.seed + i for i in range(b.seeds)],
                                batch_size=s.batch_size, system=s.system).to_dict()
        res["direction"] = d
        combined = {**res, "summary": [*res["summary"], *(r for r in d["summary"] if r["k"] > 0)]}
        res["combined_plot"] = plot_fragility(
            combined, s.out / "map" / "fragility_all",
            title=f"{lm.name}: neurons vs the refusal direction vs random ({len(harmful)} harmful / {len(harmless)} harmless held out)",
            xlabel="components ablated (neurons; the direction counts as 1)")
        res["direction_summary"] = d["summary"]
    return res


def stage_capability(s: MapSettings, b: Budget, done: dict[str, Any]) -> dict[str, Any]:
    """First-token KL on held-out harmless prompts and perplexity on the built-in prose/code passages,
    under the direction and under the neuron set; plus a few replies before/after, for the report."""
    from ..artifacts import load_artifact
    from ..measure.capability import capability_rows, cross_entropy
    from ..measure.compare import first_token_kl, logits_under
    from ..measure.generation import generate
    from ..measure.judges import PhraseJudge
    from ..prompts import builtin_prompts, load_prompts

    lm = s.load_model()
    test = _files(s, "test")

    def held_out(kind: str) -> Any:
        return load_prompts(test[kind], label=kind) if kind in test else builtin_prompts(kind, "test", seed=s.seed)

    harmless = held_out("harmless").sample(b.n_eval, seed=s.seed).texts
    harmful = held_out("harmful").sample(4 if not s.quick else 2, seed=s.seed + 1).texts
    rows = capability_rows(lm, max_tokens=64 if s.quick else 128)
    if s.quick:
        rows = rows[:4]
    reference = logits_under(lm, harmless, None, batch_size=s.batch_size, system=s.system)
    ref_ce = cross_entropy(lm, rows, batch_size=s.batch_size)  # once, shared by every intervention
    judge = PhraseJudge()
    before = generate(lm, harmful, max_new_tokens=b.max_new_tokens, batch_size=s.batch_size, system=s.system)
    out: dict[str, Any] = {"n_harmless": len(harmless), "n_capability_tokens": sum(len(r) - 1 for r in rows),
                           "interventions": {}, "samples": []}
    samples = [{"prompt": p, "before": r, "refused_before": judge(p, r)} for p, r in zip(harmful, before)]
    arts = {"direction": s.out / "direction" / "artifact", "neurons": s.out / "neurons" / "set"}
    for name, path in arts.items():
        if not path.is_dir():
            continue
        art = load_artifact(path)
        kl = first_token_kl(lm, harmless, art, reference=reference, batch_size=s.batch_size, system=s.system)
        with art.apply(lm):
            new_ce = cross_entropy(lm, rows, batch_size=s.batch_size)
            after = generate(lm, harmful, max_new_tokens=b.max_new_tokens, batch_size=s.batch_size, system=s.system)
        for sample, p, r in zip(samples, harmful, after):
            sample[f"after_{name}"] = r
            sample[f"refused_after_{name}"] = judge(p, r)
        out["interventions"][name] = {
            "artifact": str(path), "kl_first_token_mean": float(kl.mean()), "kl_first_token_median": float(kl.median()),
            "ppl_before": ref_ce.ppl, "ppl_after": new_ce.ppl, "ppl_ratio": new_ce.ppl / ref_ce.ppl,
        }
    out["samples"] = samples
    return out


def stage_dla(s: MapSettings, b: Budget, done: dict[str, Any]) -> dict[str, Any]:
    from ..methods.circuit.dla import direct_logit_attribution
    from .common import prompt_sets

    fit = _files(s, "fit")
    harmful, harmless = prompt_sets(replace(s, n_prompts=b.n_prompts, harmful=fit.get("harmful", s.harmful),
                                            harmless=fit.get("harmless", s.harmless)))
    lm = s.load_model()
    res = direct_logit_attribution(lm, harmful.texts, harmless.texts, batch_size=s.batch_size, system=s.system)
    return {**res.to_json(), "top": res.top(10), "n_layers": lm.n_layers}


def stage_report(s: MapSettings, b: Budget, done: dict[str, Any]) -> dict[str, Any]:
    from .map_report import build_report

    return build_report(s, done)


RUNNERS: dict[str, Callable[[MapSettings, Budget, dict[str, Any]], dict[str, Any]]] = {
    "probe": stage_probe, "neurons": stage_neurons, "trace": stage_trace, "direction": stage_direction,
    "fragility": stage_fragility, "capability": stage_capability, "dla": stage_dla, "report": stage_report,
}


# ---- orchestration ---------------------------------------------------------------------------------
def _key(s: MapSettings, b: Budget, stage: str, upstream: dict[str, Any] | None = None) -> str:
    """Settings, budget and the results of the stages before this one: a recomputed earlier stage whose
    results changed invalidates every later stage's cache."""
    keep = {k: v for k, v in asdict(s).items() if k not in ("stages", "force", "quiet", "json", "out")}
    return fingerprint(stage, keep, asdict(b), upstream or {})


def run_map(s: MapSettings) -> dict[str, Any]:
    from ..io import read_json, write_json

    os.environ["SAFETYSCOPE_QUIET"] = "1" if (s.quiet or s.json) else os.environ.get("SAFETYSCOPE_QUIET", "")
    wanted = list(STAGES) if s.stages.strip() == "all" else [x.strip() for x in s.stages.split(",") if x.strip()]
    unknown = [x for x in wanted if x not in STAGES]
    if unknown:
        raise ValueError(f"unknown stage(s) {', '.join(unknown)}; use {', '.join(STAGES)} or all")
    b = budget(s)
    state_dir = s.out / "map" / "stages"
    done: dict[str, Any] = {}
    timings: dict[str, float] = {}
    say = (lambda _m: None) if (s.quiet or s.json) else (lambda m: print(m, file=sys.stderr, flush=True))
    for stage in STAGES:
        path = state_dir / f"{stage}.json"
        key = _key(s, b, stage, {k: v for k, v in done.items() if k != "report"})
        cached = read_json(path) if path.is_file() else None
        if cached is not None and cached.get("key") == key and not (s.force and stage in wanted):
            done[stage] = cached["result"]
            timings[stage] = cached.get("seconds", 0.0)
            if stage in wanted:
                say(f"[map] {stage}: cached ({path})")
            continue
        if stage not in wanted:
            continue
        say(f"[map] {stage} ...")
        t0 = time.perf_counter()
        result = RUNNERS[stage](s, b, done)
        timings[stage] = time.perf_counter() - t0
        write_json(path, {"key": key, "seconds": timings[stage], "result": result})
        done[stage] = json.loads(path.read_text("utf-8"))["result"]
        say(f"[map] {stage}: done in {timings[stage]:.0f}s")
    summary = {"stages": {k: timings.get(k) for k in done}, "out": str(s.out),
               "report": str(s.out / "report.html") if "report" in done else None}
    if "report" in done:
        summary["headline"] = done["report"].get("headline")
        summary["implications"] = done["report"].get("implications")
    write_json(s.out / "map" / "summary.json", summary)
    return summary


def register(app: typer.Typer) -> None:
    @command(app, "map", MapSettings, "Map the refusal circuit: probes, neurons, patching, direction, fragility, capability; HTML report.")
    def map_cmd(s: MapSettings) -> None:
        with user_errors():
            summary = run_map(s)
        if s.json:
            print(json.dumps(summary, indent=2, default=str))
        elif summary.get("report"):
            print(f"report: {Path(summary['report']).resolve()}")
            if summary.get("headline"):
                print(summary["headline"])
