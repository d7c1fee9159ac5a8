"""Fingerprint audits of the default model's partial, kernel and random-direction exports (benchmarks/audit.py's attacker direction).

    OMP_NUM_THREADS=1 python scripts/audit_fingerprint_check.py   # writes runs/audit16/fingerprint_default.json
"""
import json
import time
from pathlib import Path

import torch

from safetyscope.methods.audit import audit_checkpoint
from safetyscope.methods.audit.fingerprint import make_fingerprint
from safetyscope.methods.direction.artifact import Direction
from safetyscope.methods.fit import fit_group_moments
from safetyscope.models.loading import load_model
from safetyscope.prompts.builtin import builtin_prompts
from safetyscope.sites import Site

lm = load_model("default", log=lambda m: None)
t = time.perf_counter()
fp = make_fingerprint(lm)
fp_s = time.perf_counter() - t
fp.save("runs/audit16/fingerprint")
layer = round(0.6 * (lm.n_layers - 1))
groups = {k: [p.text for p in builtin_prompts(k, "val").sample(32, seed=1)] for k in ("harmful", "harmless")}
site = Site("resid_pre", layer).name
st = fit_group_moments(lm, groups, [site], "last", batch_size=8)
diff = st.get("harmful", site).mean[0] - st.get("harmless", site).mean[0]
d = Direction(diff, layer, -1)
n = lm.n_layers
g = torch.Generator().manual_seed(7)
variants = {
    "partial:0.25": d.with_weights(torch.full((n,), 0.25), 0.25),
    "partial:0.5": d.with_weights(torch.full((n,), 0.5), 0.5),
    "kernel": d.with_weights(torch.tensor([max(0.0, 1 - abs(i - layer) / max(1.0, 0.4 * n)) for i in range(n)]), 0.0),
    "random": Direction(torch.randn(diff.numel(), generator=g), layer, -1),
}
rows = [{"fingerprint_s": fp_s}]
for name, v in variants.items():
    path = v.export(lm, Path("runs/audit16/fp_variants") / name.replace(":", "_"))
    rep = audit_checkpoint(path, fingerprint="runs/audit16/fingerprint", behaviour=False)
    f = rep.fingerprint
    rows.append({"checkpoint": name, "verdict": rep.verdict, "fp_verdict": f.verdict, "ratios": f.ratios, "s": f.seconds})
    print(name, rep.verdict, f.verdict, {k: round(x, 3) for k, x in f.ratios.items()}, round(f.seconds, 1))
Path("runs/audit16/fingerprint_default.json").write_text(json.dumps(rows, indent=1))
