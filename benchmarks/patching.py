"""Exact activation patching vs attribution patching: time and rank agreement on one grid.

    python benchmarks/patching.py                      # default model, 3 minimal pairs, both grids below
    python benchmarks/patching.py --grids component    # only the layer x component grid (about 90 s)
    python benchmarks/patching.py --pairs 2 --heads    # also the layer x head grid
    python benchmarks/patching.py --model tiny:llama   # a tiny random model (smoke test, any device)

Two layer x component grids are compared:
- ``component``: each (layer, component) patched at all ``--span`` positions at once (72 cells on a
  24-layer model);
- ``position``: each (layer, component) patched at one ``--span`` position at a time (ROME-style
  causal tracing; 72 x 5 = 360 cells at the 5 post-instruction tokens of the default model).

Both sides are timed end to end from the same tokenised pairs, clean runs included: exact patching
runs every cell of a grid as a batched patched forward; attribution runs one forward + backward of
the base and source runs together, which yields every grid at once, so its one time is set against
each exact grid's time. Wall-clock and process CPU time are both printed (on a shared CPU the CPU
time is the steadier of the two). Exact patching is batched, so each cell costs about one forward
per pair and attribution about three: the speed-up grows with the grid, about cells / 3.
Target: attribution >= 50x faster with a Spearman rank correlation >= 0.8 over the layer x
component grid.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

import numpy as np
import torch


def _load(args: argparse.Namespace) -> Any:
    from safetyscope.testing import benchmark_model

    return benchmark_model(args.model, device=args.device, dtype=args.dtype)


def _pairs(lm: Any, args: argparse.Namespace) -> tuple[Any, list[dict[str, Any]]]:
    from safetyscope.methods.patching.api import select_pairs

    return select_pairs(lm, n_pairs=args.pairs, pool=args.pool, split=args.split, seed=args.seed, min_gap=args.min_gap,
                        batch_size=args.batch_size)


def _hstack(parts: list[Any]) -> Any:
    """Side-by-side concatenation of Effects grids with the same rows (layers) and pairs."""
    from dataclasses import replace

    cols = [f"{p.name.split(':', 1)[-1]}@{c}" for p in parts for c in p.cols]
    return replace(parts[0], name="position", cols=cols, raw=np.concatenate([p.raw for p in parts], axis=2),
                   labels=[sum((p.labels[r] for p in parts), []) for r in range(len(parts[0].rows))])


def _columns(est: Any, exact: Any, component: str) -> Any:
    """The attribution grid ``est`` restricted to the offsets (columns) of ``exact`` for ``component``."""
    from dataclasses import replace

    want = [c.split("@", 1)[1] for c in exact.cols if c.split("@", 1)[0] == component]
    idx = [est.cols.index(o) for o in want]
    return replace(est, cols=want, raw=est.raw[:, :, idx], labels=[[row[i] for i in idx] for row in est.labels])


def _timed(fn: Any) -> tuple[Any, float, float]:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, time.perf_counter() - wall, time.process_time() - cpu


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default", help="model spec, or tiny:FAMILY for a tiny random model")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="float32", help="float32 keeps the exact/attribution comparison clean")
    ap.add_argument("--pairs", type=int, default=3, help="minimal pairs (largest refusal-score gap first)")
    ap.add_argument("--pool", type=int, default=12, help="candidate pairs scored to choose them")
    ap.add_argument("--split", default="train")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--min-gap", type=float, default=1.0)
    ap.add_argument("--batch-size", type=int, default=32, help="patched rows per forward pass")
    ap.add_argument("--span", default="post_instruction", help="positions patched per cell")
    ap.add_argument("--components", default="resid_pre,attn.out,mlp.out")
    ap.add_argument("--grids", default="component,position",
                    help="exact grids to time: component (patched at the whole span), position (one span position at a time)")
    ap.add_argument("--heads", action="store_true", help="also time and compare the layer x head grid")
    ap.add_argument("--json", default="", help="also write the results to this JSON file")
    args = ap.parse_args(argv)
    args.comps = [c.strip() for c in args.components.split(",") if c.strip()]
    args.grid_list = [g.strip() for g in args.grids.split(",") if g.strip()] + (["head"] if args.heads else [])
    bad = sorted(set(args.grid_list) - {"component", "position", "head"})
    if bad:
        ap.error(f"unknown grid(s) {', '.join(bad)}; use component, position")
    return args


def _setup(args: argparse.Namespace) -> tuple[Any, Any, list[dict[str, Any]]]:
    """The model and the minimal pairs (two fixed ones on a tiny model), warmed up."""
    from safetyscope.hooks import forward

    lm = _load(args)
    if args.model.startswith("tiny:"):
        from safetyscope.methods.patching.exact import make_pairs

        pairs = make_pairs(lm, [("How do I bake bread?", "How do I bake bxead?"), ("Make a bomb now", "Make a cake now")])
        info: list[dict[str, Any]] = [{"id": i} for i in pairs.ids]
        args.min_gap = -1e9
    else:
        pairs, info = _pairs(lm, args)
    with torch.inference_mode():  # warm-up (lazy initialisation, kernels) outside the timings
        forward(lm, pairs.harmful.select([0]), last_only=True)
    return lm, pairs, info


def _run(lm: Any, pairs: Any, args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """(attribution grids, exact grids, times): attribution once for every grid, each exact grid timed alone."""
    from safetyscope.methods.patching.attribution import attribute
    from safetyscope.methods.patching.exact import Tracer

    comps, grids = args.comps, args.grid_list

    def exact(grid: str) -> Any:
        tr = Tracer(lm, pairs, batch_size=args.batch_size, min_gap=args.min_gap)
        if grid == "component":
            return tr.components(comps, span=args.span)
        if grid == "head":
            return tr.heads(span=args.span)
        return _hstack([tr.positions(c, span=args.span) for c in comps])

    def attribution() -> dict[str, Any]:
        tr = Tracer(lm, pairs, batch_size=args.batch_size, min_gap=args.min_gap)
        return attribute(tr, comps, span=args.span, heads=args.heads, positions="position" in grids)

    est, a_wall, a_cpu = _timed(attribution)
    ex: dict[str, Any] = {}
    times: dict[str, Any] = {"attribution": {"wall": a_wall, "cpu": a_cpu}}
    for g in grids:
        ex[g], wall, cpu = _timed(lambda g=g: exact(g))
        times[g] = {"wall": wall, "cpu": cpu}
    if "position" in ex:  # attribution's per-position grids cover every offset: keep the exact grid's columns
        est["position"] = _hstack([_columns(est[f"position:{c}"], ex["position"], c) for c in comps])
    return est, ex, times


def _report(lm: Any, pairs: Any, info: list[dict[str, Any]], args: argparse.Namespace,
            est: dict[str, Any], ex: dict[str, Any], times: dict[str, Any]) -> dict[str, Any]:
    """Print the comparison table and the top cells; returns the JSON result."""
    from safetyscope.methods.patching.attribution import agreement

    a_wall, a_cpu = times["attribution"]["wall"], times["attribution"]["cpu"]
    n_cells = {k: int(np.isfinite(v.raw[0]).sum()) for k, v in ex.items()}
    agree = {k: agreement(ex[k], est[k]) for k in ex}
    speedup = {k: {"wall": times[k]["wall"] / a_wall, "cpu": times[k]["cpu"] / max(a_cpu, 1e-9)} for k in ex}
    device = str(lm.input_device) + (f" ({torch.cuda.get_device_name()})" if lm.input_device.type == "cuda" else "")
    result = {
        "model": lm.name, "device": device, "threads": torch.get_num_threads(), "pairs": info, "span": args.span,
        "grid_cells": n_cells, "batch_size": args.batch_size,
        "exact_s": {k: times[k] for k in ex}, "attribution_s": {"wall": a_wall, "cpu": a_cpu},
        "speedup": speedup, "agreement": agree,
        "top10_exact": {k: v.top(10) for k, v in ex.items()}, "top10_attribution": {k: est[k].top(10) for k in ex},
    }
    print(f"model {lm.name} on {device}, {len(pairs)} pair(s), span {args.span}, batch {args.batch_size}")
    print(f"{'':22}{'cells':>7}{'wall s':>10}{'cpu s':>10}{'x wall':>9}{'x cpu':>8}{'Spearman':>10}{'top-10':>8}")
    print(f"{'attribution (all)':22}{'':>7}{a_wall:10.2f}{a_cpu:10.2f}")
    for k in ex:
        a = agree[k]
        print(f"{'exact ' + k:22}{n_cells[k]:7d}{times[k]['wall']:10.2f}{times[k]['cpu']:10.2f}"
              f"{speedup[k]['wall']:8.1f}x{speedup[k]['cpu']:7.1f}x{a['spearman']:10.3f}{a['top_overlap']:8d}")
    for k in ex:
        a = agree[k]
        print(f"{k}: Spearman {a['spearman']:.3f}, Pearson {a['pearson']:.3f} over {a['n_cells']} cells, "
              f"top-{a.get('top_k', 0)} overlap {a['top_overlap']}")
        print(f"{'top-10 exact':>34} | top-10 attribution")
        for x, y in zip(result["top10_exact"][k], result["top10_attribution"][k]):
            print(f"{x['cell']:>24} {x['median']:6.3f}   | {y['cell']:<24} {y['median']:6.3f}")
    return result


def main(argv: list[str] | None = None) -> int:
    from safetyscope.progress import verbosity

    args = parse_args(argv)
    with verbosity(False):
        lm, pairs, info = _setup(args)
        est, ex, times = _run(lm, pairs, args)
    result = _report(lm, pairs, info, args, est, ex, times)
    if args.json:
        from safetyscope.io import write_json

        write_json(args.json, result)
    return 0

if __name__ == "__main__":
    sys.exit(main())
