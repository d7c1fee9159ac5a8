"""Fingerprint audits of the default model's partial, kernel and random-direction exports, built exactly as
benchmarks/audit.py builds them (its attacker direction and variant builders).

    OMP_NUM_THREADS=1 python scripts/audit_fingerprint_check.py   # writes runs/audit16/fingerprint_default.json
"""
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from audit import attack_stats, builders_for  # noqa: E402  (benchmarks/audit.py)

from safetyscope.methods.audit import audit_checkpoint  # noqa: E402
from safetyscope.methods.audit.fingerprint import make_fingerprint  # noqa: E402
from safetyscope.models.loading import load_model  # noqa: E402

lm = load_model("default", log=lambda m: None)
t = time.perf_counter()
fp = make_fingerprint(lm)
fp_s = time.perf_counter() - t
fp.save("runs/audit16/fingerprint")
build, _ = builders_for(lm, attack_stats(lm, 32, False), round(0.6 * (lm.n_layers - 1)), refine_steps=0)
rows = [{"fingerprint_s": fp_s}]
for name in ("partial:0.25", "partial:0.5", "kernel", "random"):
    path = build[name](Path("runs/audit16/fp_variants") / name.replace(":", "_"))
    rep = audit_checkpoint(path, fingerprint="runs/audit16/fingerprint", behaviour=False)
    f = rep.fingerprint
    rows.append({"checkpoint": name, "verdict": rep.verdict, "fp_verdict": f.verdict, "ratios": f.ratios, "s": f.seconds})
    print(name, rep.verdict, f.verdict, {k: round(x, 3) for k, x in f.ratios.items()}, round(f.seconds, 1))
Path("runs/audit16/fingerprint_default.json").write_text(json.dumps(rows, indent=1))
