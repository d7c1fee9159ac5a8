"""Are harm directions *read* by the later blocks, and random ones not? (the audit's reader test).

    python benchmarks/audit_readers.py --model default
    python benchmarks/audit_readers.py --model small --random 16

For the difference of means (harmful - harmless, 32 + 32 built-in *val* prompts, last position of
``resid_pre``) at every block, and for ``--random`` random unit directions, prints the reader test's ``z``
(:func:`safetyscope.methods.audit.readers.reader_test`: how far the direction's strongest reader rows in
the blocks from 50% depth on exceed 64 random directions', robust z) and the largest |cos| of any reader
row with it.  Weights only apart from the difference of means; the audit counts a direction as read at
``SignatureConfig.reader_z`` (3).
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def main(argv: list[str] | None = None) -> int:
    from safetyscope.methods.audit.readers import reader_rows, reader_test
    from safetyscope.methods.audit.source import TensorSource
    from safetyscope.methods.fit import fit_group_moments
    from safetyscope.models.loading import load_model
    from safetyscope.prompts.builtin import builtin_prompts
    from safetyscope.sites import Site
    from safetyscope.testing import tiny_model

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default", help="an alias, a directory, or tiny:FAMILY (a random model)")
    ap.add_argument("--prompts", type=int, default=32, help="built-in val prompts per group")
    ap.add_argument("--random", type=int, default=16, help="random directions to test")
    ap.add_argument("--json", default="", help="write the rows here")
    args = ap.parse_args(argv)
    lm = tiny_model(args.model.split(":", 1)[1]) if args.model.startswith("tiny:") else load_model(args.model)
    t0 = time.perf_counter()
    rows_by_block = reader_rows(TensorSource.from_model(lm))
    t_rows = time.perf_counter() - t0
    groups = {k: [p.text for p in builtin_prompts(k, "val").sample(args.prompts, seed=1)] for k in ("harmful", "harmless")}
    sites = [Site("resid_pre", layer).name for layer in range(1, lm.n_layers)]
    stats = fit_group_moments(lm, groups, sites, "last", batch_size=8)
    out = []
    for layer, site in zip(range(1, lm.n_layers), sites):
        diff = (stats.get("harmful", site).mean[0] - stats.get("harmless", site).mean[0]).float()
        t = reader_test(rows_by_block, diff)
        out.append({"direction": f"harm difference, block {layer}", "z": t.z, "top_cos": max(t.top_cos.values(), default=0.0)})
    g = torch.Generator().manual_seed(99)
    for i in range(args.random):
        t = reader_test(rows_by_block, torch.randn(lm.dims.d_model, generator=g))
        out.append({"direction": f"random {i}", "z": t.z, "top_cos": max(t.top_cos.values(), default=0.0)})
    for r in out:
        print(f"{r['direction']:<28} z {r['z']:7.2f}   largest |cos| {r['top_cos']:.3f}")
    harm = [r["z"] for r in out if r["direction"].startswith("harm")]
    rand = [r["z"] for r in out if r["direction"].startswith("random")]
    print(f"harm differences: z {min(harm):.2f} to {max(harm):.2f}; random: {min(rand, default=0):.2f} to "
          f"{max(rand, default=0):.2f}; reader rows of {len(rows_by_block)} blocks read in {t_rows:.1f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
