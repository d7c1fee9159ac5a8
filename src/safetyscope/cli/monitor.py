"""`safetyscope monitor fit|run|eval`: notice harmful intent without refusal, at runtime.

A thin shell over :mod:`safetyscope.methods.monitor`: parse the settings, call the library, print and
write. ``fit`` fits on the built-in train splits (``default_fit_prompts``: harmful + harmful_tasks against harmless +
harmless_tasks + scary_harmless) or on the fitting part (train + val) of user files; ``eval`` measures on the files it
is given, whole.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import typer

from .common import PromptSettings, emit
from .judge import JUDGES_HELP, parse_judges, render_comparison
from .settings import Settings, command, opt


@dataclass
class FitSettings(PromptSettings):
    calibration: str = opt("", "Harmless calibration prompts for the threshold (JSONL/CSV/TXT); empty = built-in harmless val split + scary_harmless + harmless_tasks val/test.")
    fpr: float = opt(0.01, "Target false-positive rate on the calibration prompts (strictly between 0 and 1).")
    layers: str = opt("*", "Blocks whose resid_pre the harm readers may read: *, a-b or a,b.")
    method: str = opt("both", "Harm readers: dom (difference of means), probe (logistic) or both.")
    n_readers: int = opt(12, "Readers (best validation AUROC) averaged into the harm score.")
    protect: int = opt(0, "Refusal-subspace dimensions projected out of the harm readers (0 = none).")
    stress: str = opt("none", "Blocks whose refusal candidate is ablated on fitting prompts to choose readers that survive refusal removal: none, auto, quick or e.g. 6,12,18 (see docs/monitor.md for what it buys).")
    n_stress: int = opt(32, "Train prompts per group read under each stress ablation (plus the validation prompts).")
    scary: bool = opt(True, "With the built-in sets (harmful + harmful_tasks against harmless + harmless_tasks), also fit on the built-in scary_harmless train split.")


@dataclass
class RunSettings(Settings):
    monitor: str = opt("", "Monitor artifact directory (default: OUT/monitor/artifact).")
    prompts: str = opt("", "Prompts to answer and monitor (JSONL/CSV/TXT).")
    max_new_tokens: int = opt(48, "Reply length.")
    stop_on_alert: bool = opt(False, "Stop a reply as soon as the monitor raises an alert.")
    drift_threshold: float = opt(float("nan"), "Also alert when the harm read on a reply token exceeds this (default: off).")
    any_model: bool = opt(False, "Allow a model whose name differs from the monitor's (an edited copy of it); dims must match.")
    reanchor: bool = opt(False, "If the tamper check on the monitor's own calibration prompts finds refusal removed, set the threshold again on them as this model reads them (a different operating rule; see docs/monitor.md).")
    calibration: str = opt("", "With --reanchor: the harmless prompts the monitor was calibrated on, when they were not the built-in ones.")


@dataclass
class EvalSettings(Settings):
    monitor: str = opt("", "Monitor artifact directory (default: OUT/monitor/artifact).")
    harmful: str = opt("", "Held-out harmful prompts (JSONL/CSV/TXT) the monitor never saw.")
    harmless: str = opt("", "Held-out harmless prompts (JSONL/CSV/TXT) the monitor never saw.")
    attack: str = opt("", "An intervention artifact directory (a direction: ablated by hooks; a neuron set: zeroed) or an edited checkpoint directory (e.g. `direction export`).")
    max_new_tokens: int = opt(48, "Reply length for the judge.")
    judge: str = opt("", "Judge deciding which harmful prompts were answered: phrase, llm, llm:MODEL, phrase+llm[:MODEL] or module:function (default: the phrase judge with the broken-output detector); refused and broken replies are not answers.")
    judges: str = opt("", JUDGES_HELP)
    any_model: bool = opt(False, "Allow a model whose name differs from the monitor's (an edited copy of it); dims must match.")
    reanchor: bool = opt(False, "With --attack: also report the attacked replies at a threshold re-anchored on the monitor's own calibration prompts read under the attack (beside the fixed threshold).")
    calibration: str = opt("", "With --reanchor: the harmless prompts the monitor was calibrated on, when they were not the built-in ones.")


def register(app: typer.Typer) -> None:
    sub = typer.Typer(no_args_is_help=True, help="Runtime monitor: notice harmful intent without refusal.")
    commands: list[tuple[str, type[Settings], str, Callable[[Any], dict[str, Any]]]] = [
        ("fit", FitSettings, "Fit harm readers and a refusal reader; calibrate the threshold to --fpr on harmless prompts.", run_fit),
        ("run", RunSettings, "Answer prompts under the monitor: verdicts, JSONL and an HTML page with per-token trajectories.", run_run),
        ("eval", EvalSettings, "AUROC / TPR at 1% and 5% FPR on held-out prompts, before and under --attack, beside baselines.", run_eval),
    ]
    for name, settings, help_text, fn in commands:
        def cmd(s: Any, fn: Callable[[Any], dict[str, Any]] = fn) -> None:
            fn(s)

        command(sub, name, settings, help_text)(cmd)
    app.add_typer(sub, name="monitor", help="Runtime monitor: fit, run, eval.")


def _monitor_path(s: RunSettings | EvalSettings) -> Path:
    path = Path(s.monitor) if s.monitor else s.out / "monitor" / "artifact"
    if not (path / "artifact.json").is_file():
        raise ValueError(f"no monitor at {path}; fit one with `safetyscope monitor fit MODEL --out DIR` or pass --monitor DIR")
    return path


def _check_tokens(n: int) -> None:
    if n < 1:
        raise ValueError(f"--max-new-tokens must be at least 1 (the verdict reads the first reply token), not {n}")


def _load_monitor(path: Path) -> Any:
    from ..methods.monitor import Monitor

    return Monitor.load(path)


def _fit_prompts(s: FitSettings) -> tuple[Any, Any]:
    from ..methods.monitor.fit import default_fit_prompts
    from ..prompts.sets import group_splits

    builtin = default_fit_prompts(s.split, seed=s.seed, scary=s.scary)
    out = []
    for kind, path, default in (("harmful", s.harmful, builtin[0]), ("harmless", s.harmless, builtin[1])):
        ps = group_splits(path, kind, s.seed).fit if path else default
        out.append(ps.sample(s.n_prompts, seed=s.seed) if s.n_prompts else ps)
    return out[0], out[1]


def run_fit(s: FitSettings) -> dict[str, Any]:
    from ..io import write_json
    from ..methods.monitor import fit_monitor
    from ..methods.monitor.fit import check_fpr, check_method
    from ..methods.monitor.stress import stress_blocks

    check_fpr(s.fpr)
    method = check_method(s.method)
    if s.n_stress < 1:
        raise ValueError(f"--n-stress must be at least 1, not {s.n_stress}")
    stress_blocks(s.stress, range(10**4))  # the syntax, before loading; fit checks the blocks against the model
    harmful, harmless = _fit_prompts(s)
    lm = s.load_model()
    m = fit_monitor(lm, harmful, harmless, calibration=s.calibration or None, layers=s.layers, fpr=s.fpr,
                    method=method, n_readers=s.n_readers, protect=s.protect, batch_size=s.batch_size,
                    system=s.system, seed=s.seed, stress=s.stress, n_stress=s.n_stress)
    out = s.out / "monitor"
    m.save(out / "artifact")
    meta, _ = m.to_state()
    result = {"artifact": str(out / "artifact"), **{k: meta[k] for k in ("model", "readers", "threshold", "fpr",
                                                                          "refusal_threshold", "refusal_layer",
                                                                          "metrics", "info")}}
    write_json(out / "summary.json", result)
    emit(s, result, lambda: _print_fit(result))
    return result


def _print_fit(r: dict[str, Any]) -> None:
    for rd in r["readers"]:
        print(f"reader: block {rd['layer']} {rd['position']} {rd['method']} (validation AUROC {rd['val_auroc']}, "
              f"worst stressed TPR {rd.get('stress_tpr')})")
    m = r["metrics"]
    print(f"threshold {r['threshold']:.3f} at fpr {r['fpr']}: calibration FPR {m['calibration_fpr']:.3f}, "
          f"validation AUROC {m['val_auroc']}, validation TPR {m['val_tpr']}")
    print(f"monitor: {r['artifact']}")


def run_run(s: RunSettings) -> dict[str, Any]:
    from ..io import atomic_path, write_json
    from ..methods.monitor import run_monitor
    from ..methods.monitor.html import render_html

    if not s.prompts:
        raise ValueError("give the prompts to monitor with --prompts FILE")
    _check_tokens(s.max_new_tokens)
    path = _monitor_path(s)
    m = _load_monitor(path)
    _check_reanchor(s, m)
    lm = s.load_model()
    if s.reanchor:
        from ..methods.monitor import reanchor

        m = reanchor(lm, m, calibration=s.calibration or None, when="tampering", batch_size=s.batch_size,
                     system=s.system, strict=not s.any_model)
    drift = None if math.isnan(s.drift_threshold) else s.drift_threshold
    run = run_monitor(lm, m, s.prompts, max_new_tokens=s.max_new_tokens, batch_size=s.batch_size,
                      system=s.system, strict=not s.any_model, stop_on_alert=s.stop_on_alert, drift_threshold=drift)
    out = s.out / "monitor_run"
    with atomic_path(out / "verdicts.jsonl") as tmp:
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in run.rows()), encoding="utf-8")
    with atomic_path(out / "report.html") as tmp:
        tmp.write_text(render_html(run), encoding="utf-8")
    result = {"model": lm.name, "monitor": str(path), "counts": run.counts(), "tamper": run.tamper.to_json(),
              "verdicts": str(out / "verdicts.jsonl"), "html": str(out / "report.html"),
              "reanchored": m.info.get("reanchored")}
    write_json(out / "summary.json", result)
    emit(s, result, lambda: _print_run(run, result))
    return result


def _print_run(run: Any, result: dict[str, Any]) -> None:
    for i, v in enumerate(run.verdicts):
        flag = "ALERT " if v.alert else ""
        print(f"{i:4d} {flag}{v.kind:16s} harm {v.harm:7.2f} refusal {v.refusal:7.2f}  {run.prompts[i][:70]!r}")
    print(" ".join(f"{k}: {n}" for k, n in result["counts"].items()))
    print(tamper_line(result["tamper"]))
    if result.get("reanchored"):
        print(reanchor_line(result["reanchored"]))
    print(f"written: {result['verdicts']}, {result['html']}")


def reanchor_line(r: dict[str, Any]) -> str:
    """One line on a re-anchoring record (methods/monitor/reanchor.py)."""
    head = (f"re-anchored: threshold {r['threshold_fitted']:.3f} -> {r['threshold']:.3f}" if r["applied"] else
            f"not re-anchored (tamper check on the calibration prompts: {r['tamper']}): threshold {r['threshold']:.3f}")
    return (f"{head}; on the {r['n_calibration']} calibration prompts as {r['model']} reads them, FPR "
            f"{r['calibration_fpr_at_fitted']:.3f} at the fitted threshold, {r['calibration_fpr']:.3f} at this one")


def _check_reanchor(s: RunSettings | EvalSettings, m: Any) -> None:
    """Before loading the model: the monitor's calibration prompts can be rebuilt (one-line error if not)."""
    from ..methods.monitor.fit import recorded_calibration

    if s.calibration and not s.reanchor:
        raise ValueError("--calibration is used only with --reanchor; add --reanchor or drop --calibration")
    if s.reanchor:
        recorded_calibration(m.info, s.calibration or None)


def tamper_line(t: dict[str, Any]) -> str:
    """One line on the prefix check (methods/monitor/tamper.py)."""
    what = {"clean": "the model computes the chat template's opening as when the monitor was fitted",
            "modified": "the model was changed since the monitor was fitted, not along its refusal subspace",
            "refusal_tampering": "ALERT: a refusal direction was removed from this model (every reply is an alert)",
            "unchecked": "no prompt carried the monitor's chat-template opening (another system prompt?)"}[t["kind"]]
    figures = ""
    if t.get("enrichment") is not None:
        figures = f" (change {t['deviation']:.1e} of the norm, refusal-subspace enrichment {t['enrichment']:.1f})"
    return f"tamper check: {t['kind']}{figures}: {what}"


def run_eval(s: EvalSettings) -> dict[str, Any]:
    from ..artifacts.base import load_artifact
    from ..io import write_json
    from ..measure.judges import load_judge
    from ..methods.monitor import evaluate_monitor

    if not s.harmful or not s.harmless:
        raise ValueError("give held-out prompts with --harmful FILE and --harmless FILE")
    _check_tokens(s.max_new_tokens)
    if s.reanchor and not s.attack:
        raise ValueError("--reanchor re-anchors the threshold under --attack; give the attack with --attack DIR")
    path = _monitor_path(s)
    m = _load_monitor(path)
    _check_reanchor(s, m)
    attack = load_artifact(s.attack) if s.attack else None
    judges = parse_judges(s.judges)
    judge = load_judge(s.judge, batch_size=s.batch_size) if s.judge else None  # a bad name fails before the model loads
    lm = s.load_model()
    ev = evaluate_monitor(lm, m, s.harmful, s.harmless, attack=attack, attack_name=s.attack or None,
                          max_new_tokens=s.max_new_tokens, batch_size=s.batch_size, system=s.system,
                          strict=not s.any_model, reanchor=s.reanchor, calibration=s.calibration or None,
                          judge=judge, judges=judges)
    result = {"monitor": str(path), "harmful": s.harmful, "harmless": s.harmless, **ev.to_json()}
    write_json(s.out / "monitor_eval" / "summary.json", result)
    emit(s, result, lambda: _print_eval(result))
    return result


def _print_eval(r: dict[str, Any]) -> None:
    print(f"{r['model']}: {r['n_harmful']} harmful + {r['n_harmless']} harmless held-out prompts")
    for name in ("clean", "attacked"):
        c = r[name]
        if c is None:
            continue
        m = c["monitor"]
        print(f"[{name}] monitor: AUROC {m['auroc']:.3f}, TPR@1%FPR {m['tpr_at_1pct_fpr']:.3f}, TPR@5%FPR "
              f"{m['tpr_at_5pct_fpr']:.3f}; at its threshold TPR {m['tpr_at_threshold']:.3f} FPR {m['fpr_at_threshold']:.3f}")
        if c.get("tamper"):
            print(f"[{name}] {tamper_line(c['tamper'])}")
        share = c["complied_flagged_share"]
        print(f"[{name}] harmful prompts answered (judge: {r.get('judge', 'phrase')}; {c.get('broken', 0)} broken "
              f"replies not counted): {c['complied']}, flagged by the monitor: {c['complied_flagged']}"
              + (f" ({share:.0%})" if share is not None else "")
              + f", alerted (flagged or tamper check): {c.get('complied_alerted', c['complied_flagged'])}")
        if c.get("reanchored"):
            a = c["reanchored"]
            print(f"[{name}, re-anchored] {reanchor_line(a['record'])}")
            print(f"[{name}, re-anchored] at threshold {a['threshold']:.3f}: TPR {a['tpr_at_threshold']:.3f} FPR "
                  f"{a['fpr_at_threshold']:.3f}; harmful prompts answered flagged: {a['complied_flagged']} of "
                  f"{c['complied']}")
        for b, f in c["baselines"].items():
            print(f"[{name}] {b}: AUROC {f['auroc']:.3f}, TPR@1%FPR {f['tpr_at_1pct_fpr']:.3f}, TPR "
                  f"{f['tpr_at_threshold']:.3f} / FPR {f['fpr_at_threshold']:.3f}, answered harmful flagged "
                  f"{f['complied_flagged']}")
        if c.get("judges"):
            from rich.console import Console

            render_comparison(Console(), {**c["judges"], "names": c["judges"].get("names", {})})
    if r.get("tpr_drop_at_threshold") is not None:
        print(f"TPR drop at the threshold under the attack: {r['tpr_drop_at_threshold']:.3f}")
    if r.get("tpr_drop_at_reanchored_threshold") is not None:
        print(f"TPR drop, the clean fitted threshold vs the re-anchored one under the attack (another operating "
              f"rule): {r['tpr_drop_at_reanchored_threshold']:.3f}")
