"""`safetyscope probe`: where is harmfulness (or the refusal decision) linearly readable, layer by layer?"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import typer

from ..io import fingerprint
from .common import PromptSettings, emit, prompt_sets, user_errors
from .settings import command, opt

LABELS = ("harmful", "refusal")


@dataclass
class ProbeSettings(PromptSettings):
    site: str = opt("resid_post", "Block site kind to probe: resid_post, attn.out, mlp.out (also resid_pre, resid_mid, mlp.neurons, attn.heads).")
    positions: str = opt("last", "Feature position: last (first reply position), mean (over the prompt), post_instruction or offsets like -1,-2 (averaged).")
    layers: str = opt("*", "Layers to probe: *, a-b or a,b (all are captured in one pass per batch).")
    label: str = opt("harmful", "What the probe predicts: harmful (harmful vs harmless prompt) or refusal (refused vs answered).")
    refusal_judge: str = opt("score", "For --label refusal: score (logit refusal score > --refusal-threshold, no generation), phrase (generate + phrase judge) or module:function.")
    refusal_threshold: float = opt(0.0, "Refusal-score threshold (log-odds of refusal tokens) for --refusal-judge score.")
    max_new_tokens: int = opt(48, "Reply length generated for --refusal-judge phrase or a custom judge.")
    test_harmful: str = opt("", "Held-out harmful prompts (JSONL/CSV/TXT): probes trained on the main set are scored on it.")
    test_harmless: str = opt("", "Held-out harmless prompts (give both test files).")
    n_test: int = opt(0, "Use at most this many held-out prompts per group (0 = all), sampled with --seed.")
    folds: int = opt(5, "Stratified cross-validation folds (shuffled with --seed; the same folds at every layer).")
    c: str = opt("auto", "Inverse L2 strength C of the logistic regression on standardised features, or 'auto': chosen by inner CV inside every training fold (a fixed C such as 1.0 is about 4x faster).")
    controls: int = opt(3, "Shuffled-label control runs (seeds); the control band in the table and plot.")
    random_directions: int = opt(0, "Random-direction baselines (1-D probes on random projections); 0 = none.")
    n_jobs: int = opt(1, "Layers fitted in parallel (joblib processes).")


def register(app: typer.Typer) -> None:
    @command(app, "probe", ProbeSettings, "Train a linear probe per layer: accuracy/AUROC by layer with shuffled-label controls and held-out scores.")
    def probe_cmd(s: ProbeSettings) -> None:
        with user_errors():
            run_probe(s)



def _model_id(lm: Any) -> list[Any]:
    d = lm.describe()
    return [d["name"], d["model_type"], d["n_params"], d["dtype"]]


def _features(lm: Any, s: ProbeSettings, texts: list[str], tag: str, cache: Path) -> Any:
    from ..methods.probes.fitting import collect_features, load_features, probe_sites

    sites = probe_sites(lm, s.site, s.layers)
    layers = [int(x.layer) for x in sites if x.layer is not None]
    path = cache / f"features-{tag}-{fingerprint(_model_id(lm), s.site, s.positions, layers, s.system, texts)}.npy"
    found = load_features(path, layers, s.site, s.positions, len(texts))
    if found is not None:
        return found
    return collect_features(
        lm, texts, s.site, s.positions, layers=s.layers, batch_size=s.batch_size, system=s.system,
        spill=path, description=f"capturing {tag}",
    )


def _labels(lm: Any, s: ProbeSettings, texts: list[str], is_harmful: list[int], cache: Path) -> tuple[list[int], dict]:
    """Class labels (1 = harmful, or 1 = refused) and a note on how they relate to the harmful label."""
    if s.label == "harmful":
        return is_harmful, {}
    from ..io import read_json, write_json
    from ..methods.probes.fitting import refusal_labels

    path = cache / f"refusal-{fingerprint(_model_id(lm), s.refusal_judge, s.refusal_threshold, s.max_new_tokens, s.system, texts)}.json"
    if path.is_file():
        refused = [bool(v) for v in read_json(path)["refused"]]
    else:
        flags, scores = refusal_labels(
            lm, texts, s.refusal_judge, threshold=s.refusal_threshold, batch_size=s.batch_size,
            system=s.system, max_new_tokens=s.max_new_tokens,
        )
        refused = [bool(v) for v in flags]
        write_json(path, {"judge": s.refusal_judge, "refused": refused, "scores": scores})
    y = [int(r) for r in refused]
    n_h = sum(is_harmful)
    note = {
        "refused_harmful": sum(a and h for a, h in zip(y, is_harmful)), "n_harmful": n_h,
        "refused_harmless": sum(a and not h for a, h in zip(y, is_harmful)), "n_harmless": len(y) - n_h,
        "label_agreement": sum(a == h for a, h in zip(y, is_harmful)) / len(y),
    }
    return y, note


def run_probe(s: ProbeSettings) -> dict[str, Any]:
    from ..io import write_json
    from ..methods.probes.fitting import ProbeConfig, fit_probes
    from ..prompts import load_prompts
    from ..report.plots.probes import plot_probe_layers

    if s.quiet or s.json:
        os.environ["SAFETYSCOPE_QUIET"] = "1"
    if s.label not in LABELS:
        raise ValueError(f"unknown --label {s.label!r}; use harmful or refusal")
    if bool(s.test_harmful) != bool(s.test_harmless):
        raise ValueError("give both --test-harmful and --test-harmless (or neither)")
    try:
        c = None if s.c.strip().lower() == "auto" else float(s.c)
    except ValueError:
        raise ValueError(f"--c must be a positive number or 'auto', got {s.c!r}") from None
    if c is not None and c <= 0:
        raise ValueError(f"--c must be a positive number or 'auto', got {s.c!r}")
    cfg = ProbeConfig(folds=s.folds, seed=s.seed, c=c, n_controls=s.controls, n_random=s.random_directions, n_jobs=s.n_jobs)
    harmful, harmless = prompt_sets(s)
    tests = None
    if s.test_harmful:
        tests = [load_prompts(p, label=k) for p, k in ((s.test_harmful, "harmful"), (s.test_harmless, "harmless"))]
        tests = [(t.sample(s.n_test, seed=s.seed) if s.n_test else t).require_nonempty(f"held-out {t_kind} prompts")
                 for t, t_kind in zip(tests, ("harmful", "harmless"))]
    lm = s.load_model()
    out = s.out / "probe"
    cache = out / "cache"
    texts = harmful.texts + harmless.texts
    is_h = [1] * len(harmful) + [0] * len(harmless)
    y, note = _labels(lm, s, texts, is_h, cache)
    if s.label == "refusal" and len(set(y)) < 2:  # (a one-class held-out set is fine: accuracy still means something)
        what = "refused" if y[0] else "answered"
        raise ValueError(f"--label refusal: the {s.refusal_judge} judge found all {len(y)} training prompts {what}, so "
                         "there is nothing to separate; change --refusal-threshold or --refusal-judge, or use --label harmful")
    train = _features(lm, s, texts, "train", cache)
    test, y_test, test_note = None, None, dict[str, Any]()
    if tests is not None:
        t_texts = tests[0].texts + tests[1].texts
        y_test, test_note = _labels(lm, s, t_texts, [1] * len(tests[0]) + [0] * len(tests[1]), cache)
        test = _features(lm, s, t_texts, "test", cache)
    res = fit_probes(train, y, cfg, test=test, y_test=y_test, label="refused" if s.label == "refusal" else "harmful")
    res.probe.info.update(model=lm.name, system_prompt=s.system_prompt)
    res.probe.save(out / "artifact")
    result: dict[str, Any] = {
        "model": lm.describe(), **res.summary(),
        "train": {"harmful": s.harmful or f"built-in ({s.split})", "harmless": s.harmless or f"built-in ({s.split})",
                  "n_harmful": len(harmful), "n_harmless": len(harmless), **({"refusal": note} if note else {})},
        "test": None if tests is None else {"harmful": s.test_harmful, "harmless": s.test_harmless,
                                            "n_harmful": len(tests[0]), "n_harmless": len(tests[1]),
                                            **({"refusal": test_note} if test_note else {})},
        "artifact": str(out / "artifact"), "plot": str(out / "probe_layers.png"),
    }
    write_json(out / "summary.json", result)
    what = "refused vs answered" if s.label == "refusal" else "harmful vs harmless"
    plot_probe_layers(result["layers"], out / "probe_layers.png", chance=result["chance"],
                      title=f"{lm.name}: {what} at {s.site} ({s.positions}), {len(texts)} prompts, {s.folds}-fold CV")
    emit(s, result, lambda: _render(result, what, out))
    return result


def _render(result: dict[str, Any], what: str, out: Path) -> None:
    from rich import box
    from rich.console import Console
    from rich.table import Table

    rows, best = result["layers"], result["best_layer"]
    has_test = result["test"] is not None
    title = (f"{result['model']['name']}: probe {what} at {result['site']} ({result['position']}), "
             f"{result['n_positive']}+{result['n_negative']} prompts, {result['config']['folds']}-fold CV")
    t = Table(title=title, box=box.SIMPLE_HEAD, pad_edge=False)
    cols = ["layer", "acc", "sd", "AUROC", "ctrl", "sel", "DoM", "cos"]
    for col in cols + (["t.acc", "t.AUC"] if has_test else []):
        t.add_column(col, justify="right", no_wrap=True)

    def f(v: Any) -> str:
        if v is None:
            return "-"
        return f"{v:.3f}"

    for r in rows:
        cells = [str(r["layer"]), f(r["accuracy"]), f(r["accuracy_std"]), f(r["auroc"]), f(r["control_accuracy"]),
                 f(r["selectivity"]), f(r["dom_auroc"]), f(r["cosine_dom"])]
        if has_test:
            cells += [f(r["test_accuracy"]), f(r["test_auroc"])]
        t.add_row(*cells, style="bold green" if r["layer"] == best else None)
    c = Console()
    c.print(t)
    c.print("acc/AUROC: CV mean (sd over folds); ctrl: shuffled-label accuracy; sel = acc - ctrl; DoM: CV AUROC of "
            "the difference of means; cos: cos(probe w/scale, DoM)" + ("; t.: held-out test set" if has_test else ""),
            style="dim")
    b = result["best"]
    line = f"best layer {best}: accuracy {b['accuracy']:.3f} (control {b['control_accuracy']:.3f}), AUROC {b['auroc']:.3f}"
    if has_test:
        line += f"; held-out accuracy {f(b['test_accuracy'])}, AUROC {f(b['test_auroc'])}"
    c.print(line)
    refusal = result["train"].get("refusal")
    if refusal:
        c.print(f"refused: {refusal['refused_harmful']}/{refusal['n_harmful']} harmful, "
                f"{refusal['refused_harmless']}/{refusal['n_harmless']} harmless "
                f"(agreement with the harmful label {refusal['label_agreement']:.2f})")
    c.print(f"results: {out}/summary.json, {out}/probe_layers.png, artifact {out}/artifact")
