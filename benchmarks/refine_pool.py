"""The map's refinement settings, decided on validation prompts only: pool size x KL weight.

    python benchmarks/refine_pool.py --direction runs/default/direction/unrefined          # the issue-20 sweep
    python benchmarks/refine_pool.py --direction D --variants 48:20,all:20 --steps 2       # shorter
    python benchmarks/refine_pool.py --model tiny:qwen2 --direction D --variants 4:20 --steps 1 --max-new-tokens 2

The map refines its direction (``direction refine``: only the direction trains, under its own mean
ablation) with ``REFINE`` in ``methods/circuit/steps_measure.py``. This benchmark refines one saved,
unrefined direction (``OUT/direction/unrefined`` of a map run) with each variant ``POOL:KL_WEIGHT``: the
minibatches, the KL reference and the harmless mean come from ``POOL`` training prompts per group (the
map's seeded sample of that many, or ``all`` of the built-in train split); ``KL_WEIGHT`` weighs the
first-token KL. Everything else is the map's: the same 12 + 12 validation prompts choose the checkpoint.

Each variant is then measured on the *rest* of the built-in validation split (31 harmful + 30 harmless on
the built-in sets: prompts the refinement never saw, and never the test split that the map reports on):
refusal after ablation (greedy replies, phrase judge) and first-token KL on the harmless ones. Variant
``none`` is the unrefined direction. Decision rule: the lowest mean KL among variants at <= 5% refusal.

Measured 2026-12-03 on the default model (the unrefined direction of a map run, ``runs/r20/direction/unrefined``;
31 harmful + 30 harmless decision prompts; run by this script's throwaway predecessor with the same settings):

    variant   refusal after   KL mean  median   max
    none         0/31          0.103   0.035   0.461
    48:20        1/31          0.068   0.024   0.355   (the map's recipe before)
    all:20       1/31          0.043   0.011   0.275   (chosen: Budget.n_refine)
    48:40        1/31          0.051   0.017   0.268
    all:40       4/31          0.026   0.009   0.159   (over 5% refusal)

The larger pool lowers KL mostly through the harmless mean (126 prompts instead of 48: the unrefined start's
validation KL falls from 0.107 to 0.074 before any step).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--direction", required=True, help="an unrefined direction artifact (OUT/direction/unrefined)")
    ap.add_argument("--variants", default="none,48:20,all:20,48:40,all:40", help="POOL:KL_WEIGHT, or none")
    ap.add_argument("--n-prompts", type=int, default=48, help="the map's training prompts per group")
    ap.add_argument("--n-val", type=int, default=12, help="the map's validation prompts per group")
    ap.add_argument("--steps", type=int, default=None, help="refine steps (default: the map's)")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--json", type=Path, default=None, help="also append each row here (JSON lines)")
    args = ap.parse_args(argv)

    from safetyscope.methods.circuit.steps_measure import REFINE
    from safetyscope.methods.direction.artifact import Direction
    from safetyscope.methods.direction.evaluate import ReplyCache, evaluate_ablation
    from safetyscope.prompts.builtin import builtin_prompts
    from safetyscope.testing import benchmark_model

    lm = benchmark_model(args.model)
    start = Direction.load(args.direction)
    train = {k: builtin_prompts(k, "train", seed=0) for k in ("harmful", "harmless")}
    val = {k: builtin_prompts(k, "val", seed=0) for k in ("harmful", "harmless")}
    chooser = {k: val[k].sample(args.n_val, seed=0).texts for k in val}  # the map's checkpoint-choice prompts
    decide = {k: [p for p in val[k].texts if p not in chooser[k]] for k in val}
    print(f"model {args.model}; decision prompts {len(decide['harmful'])} harmful + {len(decide['harmless'])} "
          f"harmless (built-in val split less the refinement's own validation prompts)", flush=True)
    settings = {**REFINE, **({"steps": args.steps} if args.steps is not None else {})}
    cache = ReplyCache(None, {})
    print(f"{'variant':10} {'refine s':>9} {'refusal':>9} {'KL mean':>8} {'median':>8} {'max':>7}", flush=True)
    for variant in args.variants.split(","):
        t0 = time.perf_counter()
        direction = start if variant == "none" else _refined(
            lm, start, variant, train, chooser, settings, args)
        seconds = time.perf_counter() - t0
        r = evaluate_ablation(lm, direction, decide["harmful"], decide["harmless"], max_new_tokens=args.max_new_tokens,
                              batch_size=args.batch_size, cache=cache, harmless_replies_ablated=False)
        after, kl = r["harmful_refusal_after"], r["kl_first_token"]
        row: dict[str, Any] = {"variant": variant, "refine_s": seconds, "refusal_after": after,
                               "refusal_before": r["harmful_refusal_before"], "kl_first_token": kl}
        print(f"{variant:10} {seconds:9.0f} {after['k']:>4}/{after['n']:<4} {kl['mean']:8.4f} {kl['median']:8.4f} "
              f"{kl['max']:7.3f}", flush=True)
        if args.json:
            with args.json.open("a") as f:
                f.write(json.dumps(row) + "\n")
    return 0


def _refined(lm: Any, start: Any, variant: str, train: dict[str, Any], chooser: dict[str, list[str]],
             settings: dict[str, Any], args: argparse.Namespace) -> Any:
    from safetyscope.methods.direction.refine import refine_direction

    pool, _, weight = variant.partition(":")
    if not weight:
        raise SystemExit(f"variant {variant!r}: give POOL:KL_WEIGHT (e.g. all:20) or none")
    n = 0 if pool == "all" else int(pool)
    prompts = [(train[k].sample(n, seed=0) if n else train[k]).texts for k in ("harmful", "harmless")]
    res = refine_direction(lm, start, *prompts, val_harmful=chooser["harmful"], val_harmless=chooser["harmless"],
                 micro_batch=args.batch_size, seed=0, **{**settings, "kl_weight": float(weight)})
    return res.direction


if __name__ == "__main__":
    raise SystemExit(main())
