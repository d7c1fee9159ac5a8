"""What tells a removed refusal direction from a removed random one, without the reference (the audit's no-reference read-outs).

    python benchmarks/audit_restore.py --model small --variants unmod,zero,random
    python benchmarks/audit_restore.py --model default --variants zero,random --depths 0.5,0.6,0.75

The attacker's direction is the difference of means at 60% depth (32 + 32 built-in *val* prompts, last
position), as in ``benchmarks/audit.py``. Each variant is an in-memory orthogonalised copy (``zero``: the
attacker's direction everywhere; ``random``: a random unit direction everywhere; ``p0.5``/``p0.25``: the
attacker's at that weight; ``kernel``/``subset`` as in ``benchmarks/audit.py``; ``unmod``: the model itself,
pushed along the attacker's direction). For each it prints, measured on the variant alone:

* ``align``: max over blocks of |cos(own harmful - harmless difference, removed direction)| x sqrt(d_model)
  (16 + 16 built-in *train* prompts);
* for each restore depth: the harm read-out (fraction of the own harmful - harmless difference closed at
  later blocks) and the refusal read-out (logit refusal score rise) of pushing the removed direction, and
  of 6 random directions, on 8 harmless test prompts: ``restore_test`` exactly as the audit runs it.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import torch


def _attacker(lm: Any) -> tuple[torch.Tensor, int]:
    from safetyscope.methods.fit import fit_group_moments
    from safetyscope.prompts.builtin import builtin_prompts
    from safetyscope.sites import Site

    layer = round(0.6 * (lm.n_layers - 1))
    groups = {k: [p.text for p in builtin_prompts(k, "val").sample(32, seed=1)] for k in ("harmful", "harmless")}
    site = Site("resid_pre", layer).name
    st = fit_group_moments(lm, groups, [site], "last", batch_size=8)
    r = (st.get("harmful", site).mean[0] - st.get("harmless", site).mean[0]).float()
    return r / r.norm(), layer


def _variants(lm: Any, r: torch.Tensor, layer: int) -> dict[str, Any]:
    n = lm.n_layers
    rnd = torch.randn(r.numel(), generator=torch.Generator().manual_seed(7))
    kernel = torch.tensor([max(0.0, 1 - abs(i - layer) / max(1.0, 0.4 * n)) for i in range(n)])
    subset = torch.tensor([1.0 if n // 3 <= i < 2 * n // 3 else 0.0 for i in range(n)])
    return {"unmod": None, "zero": (r, None, 1.0), "random": (rnd / rnd.norm(), None, 1.0),
            "p0.5": (r, torch.full((n,), 0.5), 0.5), "p0.25": (r, torch.full((n,), 0.25), 0.25),
            "kernel": (r, kernel, 0.0), "subset": (r, subset, 0.0)}


def _readouts(ck: Any, u: torch.Tensor, diffs: torch.Tensor, depth: float) -> dict[str, Any]:
    from safetyscope.methods.audit.behaviour import restore_test

    t = restore_test(ck, u, diffs, depth=depth)  # the audit's own prompts and random directions
    return {"block": t.layer, "a": round(t.scale, 3), "harm": round(t.harm_rise, 3),
            "harm_random": [round(x, 3) for x in t.harm_random_rises], "refusal": round(t.rise, 3),
            "refusal_random": [round(x, 3) for x in t.random_rises], "restored": t.restored}


def main(argv: list[str] | None = None) -> int:
    from safetyscope.methods.audit.behaviour import harm_alignment, harm_differences
    from safetyscope.methods.direction.weights import orthogonalized_copy
    from safetyscope.models import load_model
    from safetyscope.models.adapter import LoadedModel

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="small")
    ap.add_argument("--variants", default="unmod,zero,random,p0.5,p0.25,kernel,subset")
    ap.add_argument("--depths", default="0.4,0.6", help="restore depths (fractions of the blocks)")
    args = ap.parse_args(argv)
    lm = load_model(args.model, device="cpu", log=lambda _m: None)
    r, layer = _attacker(lm)
    for name, spec in _variants(lm, r, layer).items():
        if name not in args.variants.split(","):
            continue
        t0 = time.perf_counter()
        model = lm.model if spec is None else orthogonalized_copy(lm, spec[0], spec[1], spec[2])
        ck = LoadedModel(model, lm.tokenizer, lm.table, lm.dims, name)
        u = r if spec is None else spec[0]
        diffs = harm_differences(ck, 16)  # [n_layers, d_model]
        row = {"variant": name, "attacker_block": layer, "align": round(max(harm_alignment(diffs, u).values()), 2),
               "restore": [_readouts(ck, u, diffs, float(d)) for d in args.depths.split(",")]}
        print(json.dumps({**row, "s": round(time.perf_counter() - t0, 1)}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
