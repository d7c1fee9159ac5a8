"""Directional-ablation variants side by side: judged refusal on harmful prompts against first-token KL
on harmless prompts, for the same candidate directions on the same validation prompts.

    python benchmarks/direction_variants.py                          # default model, 2 candidates, every variant
    python benchmarks/direction_variants.py --candidates 15:-1 --variants zero,mean
    python benchmarks/direction_variants.py --model tiny:llama --n-val 4 --max-new-tokens 4   # smoke test

Candidates (``block:offset``) are differences of means of the built-in train split (unfiltered: every
prompt, as ``direction find --filter none``); both measurements use ``--n-val`` prompts per group of the
built-in val split (or of ``--harmful`` / ``--harmless`` files, for held-out figures), replies greedy and
``--max-new-tokens`` long, read by the phrase judge.

Variants (the shipped ones go through the ``Direction`` artifact's own hooks; the others are defined
here, as experiments, and are not part of the library):

* ``zero``: Arditi et al.'s directional ablation (shipped, ``--ablation zero``).
* ``mean``: the component moved to the harmless mean at every block's input (shipped, ``--ablation mean``;
  affine concept editing).
* ``partial:W``: mean ablation with weight W at every block (shipped as per-layer weights).
* ``blocks:A-B``: mean ablation only at blocks A..B (shipped as per-layer weights).
* ``cap``: only a component above the harmless mean is pulled down to it (experiment).
* ``template``: the component set to the harmless mean of its own post-instruction position at those
  positions, and to the last one's at generated tokens; user-message tokens untouched (experiment).

``--artifacts DIR,...`` adds saved direction artifacts (e.g. ``OUT/direction/artifact`` and the refined
``OUT/direction_refine/artifact``) as rows of their own, applied as they are saved.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import torch


def _load(args: argparse.Namespace) -> Any:
    from safetyscope.testing import benchmark_model

    return benchmark_model(args.model, device=args.device, dtype=args.dtype)


def _along(x: torch.Tensor, r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x, r, x . r) in at least float32; x: [batch, pos, d_model], r: unit [d_model], x . r: [batch, pos, 1]."""
    dt = torch.promote_types(x.dtype, torch.float32)
    xf, rf = x.to(dt), r.to(device=x.device, dtype=dt)
    return xf, rf, (xf @ rf).unsqueeze(-1)


def _experiment_edits(lm: Any, r: torch.Tensor, targets: torch.Tensor, mode: str) -> list[Any]:
    """Edits of the experimental variants. targets: [n_layers, n_post] harmless mean projections on r at the
    post-instruction offsets -n_post..-1."""
    from safetyscope.sites import Site

    def make(layer: int) -> Any:
        def edit(x: torch.Tensor, batch: Any) -> torch.Tensor:  # x: [batch, pos, d_model]
            xf, rf, c = _along(x, r)  # c: [batch, pos, 1]
            t = targets[layer].to(c.dtype)
            if mode == "cap":
                new = torch.clamp(c, max=float(t[-1]))
            elif x.shape[1] == 1:  # a generated token (decoding with the KV cache)
                new = torch.full_like(c, float(t[-1]))
            else:
                n = min(int(getattr(batch, "n_post", 0) or 0), x.shape[1], t.numel())
                new = c.clone()
                if n:
                    new[:, -n:, 0] = t[-n:]
            return (xf + (new - c) * rf).to(x.dtype)

        return edit

    return [(Site("resid_pre", layer), make(layer)) for layer in range(lm.n_layers)]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default", help="Model alias or path, or tiny:<family> for a random tiny model.")
    p.add_argument("--candidates", default="15:-1,18:-2", help="Candidate directions as block:offset, comma separated.")
    p.add_argument("--variants", default="zero,mean,partial:0.8,blocks:8-23,cap,template", help="Variants to compare.")
    p.add_argument("--artifacts", default="", help="Also measure these saved direction artifacts (comma separated directories).")
    p.add_argument("--n-train", type=int, default=0, help="Train prompts per group for the candidates (0 = all).")
    p.add_argument("--n-val", type=int, default=32, help="Measurement prompts per group (a seeded sample).")
    p.add_argument("--harmful", default="", help="Measure on this harmful prompt file instead of the built-in val split.")
    p.add_argument("--harmless", default="", help="Measure on this harmless prompt file instead of the built-in val split.")
    p.add_argument("--max-new-tokens", type=int, default=24, help="Reply length for the judged refusal rate.")
    p.add_argument("--batch-size", type=int, default=16, help="Prompts per forward pass.")
    p.add_argument("--seed", type=int, default=0, help="Seed of the prompt samples.")
    p.add_argument("--device", default="auto", help="Device (auto, cpu, cuda, ...).")
    p.add_argument("--dtype", default="auto", help="Dtype (auto, float32, bfloat16, ...).")
    p.add_argument("--json", default="", help="Also write the results to this JSON file.")
    args = p.parse_args(argv)
    return args


def _prompt_sets(args: argparse.Namespace) -> tuple[list[str], list[str], list[str], list[str]]:
    """(harmful train, harmless train, harmful measurement, harmless measurement) prompts."""
    from safetyscope.prompts import builtin_prompts, load_prompts

    def split(kind: str, name: str, n: int, path: str = "") -> list[str]:
        ps = load_prompts(path, label=kind) if path else builtin_prompts(kind, name, seed=args.seed)
        return list((ps.sample(n, seed=args.seed) if n else ps).texts)

    return (split("harmful", "train", args.n_train), split("harmless", "train", args.n_train),
            split("harmful", "val", args.n_val, args.harmful), split("harmless", "val", args.n_val, args.harmless))


class _Bench:
    """Judged refusal on the harmful and first-token KL on the harmless measurement prompts, one row per call."""

    def __init__(self, lm: Any, h_val: list[str], s_val: list[str], args: argparse.Namespace):
        from safetyscope.measure.compare import logits_under
        from safetyscope.measure.judges import PhraseJudge

        self.lm, self.h_val, self.s_val, self.batch_size = lm, h_val, s_val, args.batch_size
        self.judge = PhraseJudge()
        self.kw: dict[str, Any] = {"max_new_tokens": args.max_new_tokens, "batch_size": args.batch_size}
        self.reference = logits_under(lm, s_val, None, batch_size=args.batch_size)
        self.baseline = self.refusal()
        self.rows: list[dict[str, Any]] = []

    def refusal(self) -> float:
        from safetyscope.measure.generation import generate
        from safetyscope.methods.direction.evaluate import refusal_rate

        return float(refusal_rate(self.h_val, generate(self.lm, self.h_val, **self.kw), self.judge)["rate"])

    def measure(self, ctx: Any, layer: int, pos: int, variant: str) -> None:
        from safetyscope.measure.compare import logits_under
        from safetyscope.measure.metrics import kl_divergence

        t0 = time.perf_counter()
        with ctx:
            kl = kl_divergence(self.reference, logits_under(self.lm, self.s_val, None, batch_size=self.batch_size))
            rate = self.refusal()
        row = {"layer": layer, "position": pos, "variant": variant, "judged_refusal": rate,
               "kl_mean": float(kl.mean()), "kl_median": float(kl.median()), "kl_max": float(kl.max()),
               "seconds": time.perf_counter() - t0}
        self.rows.append(row)
        print(f"{f'{layer}:{pos}':<12}{variant:<14}{rate:>15.1%}{row['kl_mean']:>10.4f}{row['kl_median']:>11.4f}"
              f"{row['kl_max']:>9.3f}{row['seconds']:>6.0f}", flush=True)


def _variant(lm: Any, cands: Any, offsets: Any, layer: int, pos: int, variant: str) -> Any:
    """The intervention (a context manager) of one variant on the candidate at (layer, pos)."""
    from safetyscope.hooks import hooks
    from safetyscope.methods.direction.artifact import Direction

    base = cands.direction(layer, pos)
    col = cands.column(pos)
    unit = base.direction
    per_pos = torch.einsum("lpd,d->lp", cands.harmless_mean, unit.double()).float()  # [n_layers, n_post]
    name, _, arg = variant.partition(":")
    mean = Direction(base.direction, layer, pos, targets=per_pos[:, col], ablation="mean")
    if name == "zero":
        return base.apply(lm)
    if name == "mean":
        return mean.apply(lm)
    if name == "partial":
        return mean.with_weights(torch.full((lm.n_layers,), float(arg))).apply(lm)
    if name == "blocks":
        lo, hi = (int(v) for v in arg.split("-"))
        return mean.with_weights(torch.tensor([1.0 if lo <= i <= hi else 0.0 for i in range(lm.n_layers)])).apply(lm)
    if name in ("cap", "template"):
        targets = per_pos[:, [cands.column(o) for o in offsets]]
        return hooks(lm, _experiment_edits(lm, unit, targets if name == "template" else per_pos[:, [col]], name))
    raise SystemExit(f"unknown variant {variant!r}; use zero, mean, partial:W, blocks:A-B, cap or template")


def main(argv: list[str] | None = None) -> int:
    with torch.no_grad():  # scoped: a caller (the test suite) keeps its autograd mode
        return run(parse_args(argv))


def run(args: argparse.Namespace) -> int:
    from safetyscope.methods.direction.artifact import Direction
    from safetyscope.methods.direction.candidates import find_candidates, position_offsets

    lm = _load(args)
    h_train, s_train, h_val, s_val = _prompt_sets(args)
    offsets = position_offsets(lm, "post_instruction")
    cands = find_candidates(lm, h_train, s_train, positions=list(offsets), filter="none", batch_size=args.batch_size)
    bench = _Bench(lm, h_val, s_val, args)
    print(f"{lm.name}: {len(h_train)}+{len(s_train)} train prompts, {len(h_val)}+{len(s_val)} measurement prompts; "
          f"judged refusal of the harmful ones without intervention {bench.baseline:.1%}")
    print(f"{'candidate':<12}{'variant':<14}{'judged refusal':>15}{'KL mean':>10}{'KL median':>11}{'KL max':>9}{'s':>6}")
    for spec in [c for c in args.candidates.split(",") if c]:
        layer, pos = (int(v) for v in spec.split(":"))
        layer = layer if layer >= 0 else layer + lm.n_layers
        for variant in args.variants.split(","):
            bench.measure(_variant(lm, cands, offsets, layer, pos, variant), layer, pos, variant)
    for path in [a for a in args.artifacts.split(",") if a]:
        saved = Direction.load(path)
        name = ("refined " if saved.meta.get("refined") else "") + saved.ablation
        print(f"  artifact {path}: {name}")
        bench.measure(saved.apply(lm), saved.layer, saved.position, f"artifact:{name}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"model": lm.name, "baseline_judged_refusal": bench.baseline, "n_val": [len(h_val), len(s_val)],
                       "rows": bench.rows}, f, indent=2)
    return 0

if __name__ == "__main__":
    sys.exit(main())
