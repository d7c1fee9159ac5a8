"""`safetyscope trace`: causal tracing of refusal by layer, component, position and head."""

from __future__ import annotations

import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import typer

from ..io import fingerprint
from .common import PromptSettings, emit, user_errors
from .settings import command, opt

MODES = ("exact", "attribution", "noise")


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



def _dump(eff: Any) -> dict[str, Any]:
    return {**eff.to_dict(), "labels": eff.labels, "sign": eff.sign}


def _load(d: dict[str, Any]) -> Any:
    from ..methods.patching.exact import Effects

    raw = np.array([[[np.nan if v is None else v for v in r] for r in p] for p in d["raw"]], dtype=float)
    return Effects(d["name"], d["direction"], d["rows"], d["cols"], raw.reshape(len(d["gap"]), len(d["rows"]), len(d["cols"])),
                   np.array(d["gap"], dtype=float), d["min_gap"], d["note"], sign=d["sign"], labels=d["labels"])


def select_pairs(lm: Any, s: TraceSettings) -> tuple[Any, list[dict[str, Any]]]:
    """Pairs to trace and a description of each (ids, texts, clean scores)."""
    from ..measure.generation import refusal_scores
    from ..methods.patching.exact import make_pairs
    from ..prompts import load_prompts, minimal_pairs

    if s.pairs < 1:
        raise ValueError("--pairs must be at least 1")
    if s.harmful or s.harmless:
        if not (s.harmful and s.harmless):
            raise ValueError("give both --harmful and --harmless (paired in order), or neither for the built-in minimal pairs")
        h, b = load_prompts(s.harmful, label="harmful"), load_prompts(s.harmless, label="harmless")
        chosen = [(f"pair-{i}", x, y) for i, (x, y) in enumerate(zip(h.texts, b.texts))][: s.pairs]
        aligned: bool | None = False
    else:
        pool = minimal_pairs(s.split, seed=s.seed)
        if not pool:
            raise ValueError(f"no built-in minimal pairs in split {s.split!r}; use --split all")
        pool = random.Random(s.seed).sample(pool, min(len(pool), s.n_prompts or max(4 * s.pairs, 16)))
        sh = refusal_scores(lm, [p.harmful for p in pool], batch_size=s.batch_size, system=s.system)
        ss = refusal_scores(lm, [p.harmless for p in pool], batch_size=s.batch_size, system=s.system)
        ranked = sorted(range(len(pool)), key=lambda i: -float(sh[i] - ss[i]))
        keep = [i for i in ranked if float(sh[i] - ss[i]) >= s.min_gap][: s.pairs]
        if not keep:
            raise ValueError(f"no minimal pair has a refusal-score gap >= {s.min_gap}; lower --min-gap or give --harmful/--harmless files")
        chosen = [(pool[i].id, pool[i].harmful, pool[i].harmless) for i in keep]
        aligned = None
    pairs = make_pairs(lm, [(x, y) for _, x, y in chosen], system=s.system, aligned=aligned, ids=[c[0] for c in chosen])
    info = [{"id": c[0], "harmful": c[1], "harmless": c[2], "aligned": a} for c, a in zip(chosen, pairs.aligned)]
    return pairs, info


def _comma(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _run_exact(tr: Any, s: TraceSettings, comps: list[str], layers: list[int]) -> dict[str, Any]:
    grids = {}
    for rev in (False, True) if s.reverse else (False,):
        tag = "reverse:" if rev else ""
        grids[tag + "component"] = tr.components(comps, layers, span=s.span, reverse=rev)
        if s.heads:
            grids[tag + "head"] = tr.heads(layers, span=s.span, reverse=rev)
        if s.positions:
            for c in _comma(s.position_components):
                grids[f"{tag}position:{c}"] = tr.positions(c, layers, reverse=rev)
    return {"grids": grids}


def _run_attribution(tr: Any, s: TraceSettings, comps: list[str], layers: list[int]) -> dict[str, Any]:
    from ..methods.patching.attribution import attribute, verify_top

    grids, verify = {}, {}
    for rev in (False, True) if s.reverse else (False,):
        tag = "reverse:" if rev else ""
        est = attribute(tr, comps, layers, span=s.span, heads=True, positions=s.positions, reverse=rev)
        grids.update({tag + k: v for k, v in est.items()})
        if s.verify_top > 0:
            verify[tag or "forward"] = verify_top(tr, list(est.values()), s.verify_top, span=s.span, reverse=rev)
    return {"grids": grids, "verify": verify}


def _run_noise(tr: Any, s: TraceSettings, comps: list[str], layers: list[int]) -> dict[str, Any]:
    from ..methods.patching.noise import noise_trace

    out = noise_trace(tr, comps, layers, samples=s.noise_samples, scale=s.noise_scale, span=s.span, seed=s.seed,
                      position_components=_comma(s.position_components) if s.positions else (), system=s.system)
    grids = {k: v for k, v in out.items() if hasattr(v, "raw")}
    return {"grids": grids, "clean": out["clean"].tolist(), "corrupted": out["corrupted"].tolist(), "noise_std": out["noise_std"]}


def generation_check(tr: Any, cells: list[str], *, span: str, max_new_tokens: int, batch_size: int) -> dict[str, Any]:
    """Greedy replies of the harmful prompts under each cell's patch, judged by the phrase judge."""
    from ..hooks import hooks
    from ..measure.generation import generate_batch
    from ..measure.judges import PhraseJudge
    from ..methods.patching.exact import Job, Patch, parse_cell, patch_edits

    judge, pairs = PhraseJudge(), tr.pairs
    texts = list(pairs.harmful.texts)

    def replies(cell: str | None) -> list[str]:
        out: list[str] = []
        for lo in range(0, len(pairs), batch_size):
            rows = list(range(lo, min(lo + batch_size, len(pairs))))
            sub = pairs.harmful.select(rows)
            edits: dict[Any, Any] = {}
            if cell is not None:
                site, head, off = parse_cell(cell, tr.lm.n_layers)
                jobs = [Job(i, (Patch(site, pairs.offsets(i, span) if off is None else (off,), head),)) for i in rows]
                edits = patch_edits(jobs, sub.seq_len, tr.runs("harmless", [site]))
            with hooks(tr.lm, edits):
                out += generate_batch(tr.lm, sub, max_new_tokens)
        return out

    rows = []
    for cell in [None, *cells]:
        rep = replies(cell)
        refused = [judge(p, r) for p, r in zip(texts, rep)]
        rows.append({"cell": cell or "(unpatched harmful)", "refusal_rate": float(np.mean(refused)), "replies": rep})
    harmless = [judge(p, r) for p, r in zip(pairs.harmless.texts, replies_plain(tr, batch_size, max_new_tokens))]
    return {"rows": rows, "harmless_refusal_rate": float(np.mean(harmless)), "judge": "PhraseJudge"}


def replies_plain(tr: Any, batch_size: int, max_new_tokens: int) -> list[str]:
    from ..measure.generation import generate_batch

    out: list[str] = []
    for lo in range(0, len(tr.pairs), batch_size):
        out += generate_batch(tr.lm, tr.pairs.harmless.select(range(lo, min(lo + batch_size, len(tr.pairs)))), max_new_tokens)
    return out


def run_trace(s: TraceSettings) -> dict[str, Any]:
    from ..io import read_json, write_json
    from ..methods.patching.attribution import agreement, rank_cells
    from ..methods.patching.exact import SPANS, Tracer
    from ..report.plots.patching import plot_effects, position_labels

    if s.quiet or s.json:
        os.environ["SAFETYSCOPE_QUIET"] = "1"
    modes = list(MODES) if s.mode == "all" else _comma(s.mode)
    if not modes or any(m not in MODES for m in modes):
        raise ValueError(f"unknown --mode {s.mode!r}; use exact, attribution, noise, a comma list of them, or all")
    if s.span not in SPANS:
        raise ValueError(f"unknown --span {s.span!r}; use {', '.join(SPANS)}")
    lm = s.load_model()
    comps = _comma(s.components)
    layers = [x.layer for x in lm.sites(f"blocks.{s.layers}.{comps[0]}")] if comps else []
    lm.sites([f"blocks.0.{c}" for c in comps + _comma(s.position_components)])  # validate the kinds early
    pairs, info = select_pairs(lm, s)
    tr = Tracer(lm, pairs, batch_size=s.batch_size, min_gap=s.min_gap)
    for row, sh, ss in zip(info, tr.runs("harmful").scores.tolist(), tr.runs("harmless").scores.tolist()):
        row.update(s_harmful=sh, s_harmless=ss)
    out = s.out / "trace"
    d = lm.describe()
    base_key = [d["name"], d["n_params"], d["dtype"], info, comps, layers, s.span, s.min_gap, s.system, s.reverse, s.positions,
                s.position_components]
    extra = {"exact": [s.heads], "attribution": [s.verify_top], "noise": [s.noise_samples, s.noise_scale, s.seed]}
    results: dict[str, Any] = {}
    for mode in modes:
        path = out / "cache" / f"{mode}-{fingerprint(base_key, extra[mode])}.json"
        if path.is_file():  # resume: this mode already ran with the same settings
            cached = read_json(path)
            cached["grids"] = {k: _load(v) for k, v in cached["grids"].items()}
            results[mode] = cached
            continue
        t0 = time.perf_counter()
        res = {"exact": _run_exact, "attribution": _run_attribution, "noise": _run_noise}[mode](tr, s, comps, layers)
        res["seconds"] = time.perf_counter() - t0
        write_json(path, {**res, "grids": {k: _dump(v) for k, v in res["grids"].items()}})
        results[mode] = res
    summary: dict[str, Any] = {"model": d, "pairs": info, "span": s.span, "components": comps, "layers": layers,
                               "note": pairs.alignment_note(s.span), "modes": {}, "plots": []}
    plots = out / "plots"
    for mode, res in results.items():
        m: dict[str, Any] = {"seconds": res["seconds"], "top": {}, "grids": {}}
        for name, eff in res["grids"].items():
            m["grids"][name] = eff.to_dict()
            m["top"][name] = eff.top(10)
            labels = position_labels(tr.runs("harmful").batch, lm.tokenizer, [int(c) for c in eff.cols]) if "position" in name else None
            summary["plots"].append(str(plot_effects(eff, plots / f"{mode}-{name.replace(':', '-')}.png", labels=labels)))
        if mode == "attribution":
            m["verify"] = res.get("verify", {})
            if "exact" in results:
                ex = results["exact"]["grids"]
                m["agreement"] = {k: agreement(ex[k], v) for k, v in res["grids"].items() if k in ex}
        if mode == "noise":
            m.update(clean=res["clean"], corrupted=res["corrupted"], noise_std=res["noise_std"])
        summary["modes"][mode] = m
    if s.generate_check:
        src = next(results[m] for m in MODES if m in results)
        grids = [v for k, v in src["grids"].items() if not k.startswith("reverse:")]
        cells = [c for c, _ in rank_cells(grids, s.gen_top)]
        summary["generation_check"] = generation_check(tr, cells, span=s.span, max_new_tokens=s.max_new_tokens,
                                                       batch_size=s.batch_size)
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
