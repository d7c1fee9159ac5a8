"""`safetyscope probe`: where is harmfulness (or the refusal decision) linearly readable, layer by layer?"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import typer

from .common import PromptSettings, emit, prompt_sets, user_errors
from .settings import command, opt


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


def run_probe(s: ProbeSettings) -> dict[str, Any]:
    from ..io import write_json
    from ..methods.probes.api import check_label, fit_probes, parse_c
    from ..progress import verbosity
    from ..report.plots.probes import plot_probe_layers

    with verbosity(False) if s.quiet or s.json else nullcontext():
        label = check_label(s.label)
        if bool(s.test_harmful) != bool(s.test_harmless):
            raise ValueError("give both --test-harmful and --test-harmless (or neither)")
        c = parse_c(s.c)
        harmful, harmless = prompt_sets(s)
        lm = s.load_model()
        out = s.out / "probe"
        report = fit_probes(
            lm, harmful, harmless, layers=s.layers, site=s.site, positions=s.positions, folds=s.folds,
            controls=s.controls, c=c, random_directions=s.random_directions, n_jobs=s.n_jobs, label=label,
            refusal_judge=s.refusal_judge, refusal_threshold=s.refusal_threshold, max_new_tokens=s.max_new_tokens,
            test_harmful=s.test_harmful or None, test_harmless=s.test_harmless or None, n_test=s.n_test,
            batch_size=s.batch_size, system=s.system, seed=s.seed, cache_dir=out / "cache",
            source_names=(s.harmful or f"built-in ({s.split})", s.harmless or f"built-in ({s.split})"))
    report.probe.save(out / "artifact")
    result = report.to_json(artifact=out / "artifact", plot=out / "probe_layers.png")
    write_json(out / "summary.json", result)
    what = "refused vs answered" if s.label == "refusal" else "harmful vs harmless"
    n = result["n_positive"] + result["n_negative"]
    plot_probe_layers(result["layers"], out / "probe_layers.png", chance=result["chance"],
                      title=f"{lm.name}: {what} at {s.site} ({s.positions}), {n} prompts, {s.folds}-fold CV")
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
