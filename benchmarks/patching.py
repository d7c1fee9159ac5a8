"""Exact activation patching vs attribution patching: time and rank agreement on one grid.

    python benchmarks/patching.py                      # default model, 3 minimal pairs, layer x component
    python benchmarks/patching.py --pairs 2 --heads    # also the layer x head grid
    python benchmarks/patching.py --model tiny:llama   # a tiny random model (smoke test, any device)

Both sides are timed end to end from the same tokenised pairs, clean runs included: exact patching
runs every cell of the grid as a batched patched forward; attribution runs the clean source runs and
one forward + backward of the base runs. Wall-clock and process CPU time are both printed (on a
shared CPU the CPU time is the steadier of the two). Target: attribution >= 50x faster with a
Spearman rank correlation >= 0.8 over the layer x component grid.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

import torch


def _load(args: argparse.Namespace) -> Any:
    if args.model.startswith("tiny:"):
        from safetyscope.testing import tiny_model

        lm = tiny_model(args.model.split(":", 1)[1])
        if args.device not in ("auto", "cpu"):
            lm.model.to(args.device)
        return lm
    from safetyscope.models import load_model

    return load_model(args.model, device=args.device, dtype=args.dtype, log=lambda _m: None)


def _pairs(lm: Any, args: argparse.Namespace) -> tuple[Any, list[dict[str, Any]]]:
    from safetyscope.cli.trace import TraceSettings, select_pairs

    s = TraceSettings(pairs=args.pairs, n_prompts=args.pool, split=args.split, seed=args.seed, min_gap=args.min_gap,
                      batch_size=args.batch_size)
    return select_pairs(lm, s)


def _timed(fn: Any) -> tuple[Any, float, float]:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, time.perf_counter() - wall, time.process_time() - cpu


def main(argv: list[str] | None = None) -> int:
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
    ap.add_argument("--heads", action="store_true", help="also time and compare the layer x head grid")
    ap.add_argument("--json", default="", help="also write the results to this JSON file")
    args = ap.parse_args(argv)
    os.environ.setdefault("SAFETYSCOPE_QUIET", "1")

    from safetyscope.hooks import forward
    from safetyscope.methods.attribution import agreement, attribute
    from safetyscope.methods.patching import Tracer

    lm = _load(args)
    if args.model.startswith("tiny:"):
        from safetyscope.methods.patching import make_pairs

        pairs = make_pairs(lm, [("How do I bake bread?", "How do I bake bxead?"), ("Make a bomb now", "Make a cake now")])
        info: list[dict[str, Any]] = [{"id": i} for i in pairs.ids]
        args.min_gap = -1e9
    else:
        pairs, info = _pairs(lm, args)
    comps = [c.strip() for c in args.components.split(",") if c.strip()]
    with torch.inference_mode():  # warm-up (lazy initialisation, kernels) outside the timings
        forward(lm, pairs.harmful.select([0]), last_only=True)

    def exact() -> dict[str, Any]:
        tr = Tracer(lm, pairs, batch_size=args.batch_size, min_gap=args.min_gap)
        out = {"component": tr.components(comps, span=args.span)}
        if args.heads:
            out["head"] = tr.heads(span=args.span)
        return out

    def attribution() -> dict[str, Any]:
        tr = Tracer(lm, pairs, batch_size=args.batch_size, min_gap=args.min_gap)
        return attribute(tr, comps, span=args.span, heads=args.heads, positions=False)

    est, a_wall, a_cpu = _timed(attribution)
    ex, e_wall, e_cpu = _timed(exact)
    n_cells = {k: int(v.raw[0].size) for k, v in ex.items()}
    agree = {k: agreement(ex[k], est[k]) for k in ex}
    device = str(lm.input_device) + (f" ({torch.cuda.get_device_name()})" if lm.input_device.type == "cuda" else "")
    result = {
        "model": lm.name, "device": device, "threads": torch.get_num_threads(), "pairs": info, "span": args.span,
        "grid_cells": n_cells, "batch_size": args.batch_size,
        "exact_s": {"wall": e_wall, "cpu": e_cpu}, "attribution_s": {"wall": a_wall, "cpu": a_cpu},
        "speedup": {"wall": e_wall / a_wall, "cpu": e_cpu / max(a_cpu, 1e-9)}, "agreement": agree,
        "top10_exact": ex["component"].top(10), "top10_attribution": est["component"].top(10),
    }
    print(f"model {lm.name} on {device}, {len(pairs)} pair(s), span {args.span}, grid {n_cells}, batch {args.batch_size}")
    print(f"{'':14}{'wall s':>10}{'cpu s':>10}")
    print(f"{'exact':14}{e_wall:10.2f}{e_cpu:10.2f}")
    print(f"{'attribution':14}{a_wall:10.2f}{a_cpu:10.2f}")
    print(f"{'speed-up':14}{e_wall / a_wall:9.1f}x{e_cpu / max(a_cpu, 1e-9):9.1f}x")
    for k, a in agree.items():
        print(f"{k}: Spearman {a['spearman']:.3f}, Pearson {a['pearson']:.3f} over {a['n_cells']} cells, "
              f"top-{a.get('top_k', 0)} overlap {a['top_overlap']}")
    print(f"{'top-10 exact':>34} | top-10 attribution")
    for x, y in zip(result["top10_exact"], result["top10_attribution"]):
        print(f"{x['cell']:>24} {x['median']:6.3f}   | {y['cell']:<24} {y['median']:6.3f}")
    if args.json:
        from safetyscope.io import write_json

        write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
