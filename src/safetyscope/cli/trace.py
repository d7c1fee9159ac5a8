"""`safetyscope trace`: causal tracing of refusal by layer, component, position and head."""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import typer

from .common import PromptSettings, emit, user_errors
from .settings import command, opt


@dataclass
class TraceSettings(PromptSettings):
    mode: str = opt("exact", "What to run: exact (activation patching), attribution (gradient estimate), noise (ROME-style corruption), a comma list (exact,attribution) or all.")
    pairs: int = opt(8, "Harmful/harmless pairs to trace: the built-in minimal pairs of --split with the largest refusal-score gap, or the first N of --harmful/--harmless zipped (unaligned).")
    components: str = opt("resid_pre,attn.out,mlp.out", "Components (site kinds) of the layer x component grid.")
    layers: str = opt("*", "Layers to trace: *, a-b or a,b.")
    span: str = opt("post_instruction", "Positions patched in the component and head grids: post_instruction, all (aligned pairs; the residual column is then 1 by construction) or last.")
    positions: bool = opt(False, "Also patch one position at a time (layer x position heatmaps).")
    position_components: str = opt("resid_pre", "Components patched position by position with --positions (comma list).")
    heads: bool = opt(False, "Also patch each attention head exactly (layer x head heatmap; attribution always estimates heads).")
    reverse: bool = opt(False, "Also patch harmful activations into the harmless runs (does refusal appear?).")
    verify_top: int = opt(10, "Attribution: patch the top K cells of the full estimated grid exactly (0 = off).")
    generate_check: bool = opt(False, "Generate replies under the top patches and judge them with the phrase judge.")
    gen_top: int = opt(3, "Cells checked by --generate-check.")
    max_new_tokens: int = opt(32, "Reply length for --generate-check.")
    min_gap: float = opt(1.0, "Pairs whose harmful-harmless refusal-score gap is below this are left out of the normalised effects.")
    noise_samples: int = opt(4, "Noise samples per prompt for --mode noise.")
    noise_scale: float = opt(3.0, "Noise standard deviation in units of the instruction embeddings' std (ROME uses 3).")


def register(app: typer.Typer) -> None:
    @command(app, "trace", TraceSettings, "Causal tracing: which layers, components, positions and heads carry refusal (exact, attribution and noise patching).")
    def trace_cmd(s: TraceSettings) -> None:
        with user_errors():
            run_trace(s)


def _comma(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def run_trace(s: TraceSettings) -> dict[str, Any]:
    from ..io import write_json
    from ..methods.patching.api import check_modes, check_span, trace
    from ..progress import verbosity
    from ..report.plots.patching import plot_effects, position_labels

    with verbosity(False) if s.quiet or s.json else nullcontext():
        modes, span = check_modes(s.mode), check_span(s.span)
        if bool(s.harmful) != bool(s.harmless):
            raise ValueError("give both --harmful and --harmless (paired in order), or neither for the built-in minimal pairs")
        lm = s.load_model()
        out = s.out / "trace"
        res = trace(lm, harmful=s.harmful or None, harmless=s.harmless or None, mode=modes, n_pairs=s.pairs,
                    components=_comma(s.components), layers=s.layers, span=span, positions=s.positions,
                    position_components=_comma(s.position_components), heads=s.heads, reverse=s.reverse,
                    verify_top=s.verify_top, min_gap=s.min_gap, noise_samples=s.noise_samples, noise_scale=s.noise_scale,
                    generate_check=s.generate_check, gen_top=s.gen_top, max_new_tokens=s.max_new_tokens, split=s.split,
                    pool=s.n_prompts, batch_size=s.batch_size, system=s.system, seed=s.seed, cache_dir=out / "cache")
    plots = []
    for mode, m in res.modes.items():
        for name, eff in m.grids.items():
            labels = position_labels(res.pairs.harmful, lm.tokenizer, [int(c) for c in eff.cols]) if "position" in name else None
            plots.append(plot_effects(eff, out / "plots" / f"{mode}-{name.replace(':', '-')}.png", labels=labels))
    summary = res.to_json(plots)
    write_json(out / "summary.json", summary)
    emit(s, summary, lambda: _render(summary, out))
    return summary


def _render(summary: dict[str, Any], out: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    c = Console()
    c.print(f"{len(summary['pairs'])} pair(s): {summary['note']}")
    for mode, m in summary["modes"].items():
        top: list[dict[str, Any]] = m["top"].get("component") or next(iter(m["top"].values()), [])
        t = Table(title=f"{mode}: top cells (median normalised effect, 1 = source-like) in {m['seconds']:.1f}s")
        for col in ("cell", "median", "mean"):
            t.add_column(col, justify="right" if col != "cell" else "left")
        for row in top:
            t.add_row(row["cell"], f"{row['median']:.3f}", f"{row['mean']:.3f}")
        c.print(t)
        for name, a in m.get("agreement", {}).items():
            c.print(f"attribution vs exact ({name}): Spearman {a['spearman']:.3f} over {a['n_cells']} cells, "
                    f"top-{a.get('top_k', 0)} overlap {a['top_overlap']}")
        for direction, rows in m.get("verify", {}).items():
            c.print(f"verified top cells ({direction}): " + ", ".join(
                f"{r['cell']} est {r['attribution']:.2f} / exact {r['exact_median']:.2f}" for r in rows))
    if "generation_check" in summary:
        g = summary["generation_check"]
        c.print("generation check (phrase judge refusal rate): " + ", ".join(
            f"{r['cell']} {r['refusal_rate']:.2f}" for r in g["rows"]) + f"; harmless {g['harmless_refusal_rate']:.2f}")
    c.print(f"results: {out}/summary.json, heatmaps in {out}/plots/")
