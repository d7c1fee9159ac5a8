"""ablate-llm (the `ablate` package, 0.3) beside heretic and safetyscope: the same prompts, its own search, its
saved checkpoint measured by safetyscope's code on the held-out test split.

    make .venv-ablate/.installed
    .venv/bin/python benchmarks/peers_ablate.py --out runs/peers/direction --ablate-python .venv-ablate/bin/python
    .venv/bin/python benchmarks/peers_direction.py --out runs/peers/direction --phases measure,plot \\
        --artifact "ablate-llm best=runs/peers/direction/ablate/best"

What it runs (in ablate's own venv, as a subprocess; no safetyscope import there): ``Ablator(model_dir)`` on
the default model's local HF directory (offline), ``extract`` on safetyscope's built-in *train* split
(difference of means at every layer, its defaults), then ablate's optuna search (``ablate.optimize.optimize``,
what ``Ablator.search`` calls, with a callback that timestamps every trial) on the built-in *val* split with
``--trials`` trials and replies of ``--max-new-tokens``, its default objective (keyword refusal rate +
``--kl-weight`` x mean KL on the harmless prompts), then ``bake`` + ``save`` of the best configuration: the
checkpoint a user of ``ablate run --save-model`` gets. Note what ``bake`` does in ablate 0.3: it
orthogonalises the chosen direction out of *every* residual writer (embeddings, attention and MLP outputs of
every layer), ignoring the searched ``alpha`` and layer range, so the saved checkpoint is full ablation of the
chosen direction; the trials' own figures are for the searched hook configurations.

Writes OUT/ablate/: the prompt files, ``trials.json`` (every trial: configuration, its own refusal rate and KL
on the val split, seconds since the start), ``result.json`` (best configuration, wall time, plain forward
time measured in the same run) and ``best/`` (the saved checkpoint).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parent))
from peers_direction import ROOT, plain_forward_seconds, timed_run  # noqa: E402

GROUPS = {"bad_train": ("harmful", "train"), "good_train": ("harmless", "train"),
          "bad_val": ("harmful", "val"), "good_val": ("harmless", "val")}


# ---- ablate side (runs inside its venv: no safetyscope imports here) ---------------------------------
def ablate_driver(run_dir: str, model_dir: str, trials: int, tokens: int, kl_weight: float) -> None:
    """Extract on the train files, search on the val files (timestamped trials), bake and save the best."""
    from ablate.optimize import optimize
    from ablate.pipeline import Ablator

    t0 = time.perf_counter()
    root = Path(run_dir)
    texts = {k: [t for t in (root / f"{k}.txt").read_text().splitlines() if t.strip()] for k in GROUPS}
    abl = Ablator(model_dir, device="cpu", dtype="float32")
    abl.extract(harmful=texts["bad_train"], harmless=texts["good_train"])
    stamps: list[dict[str, Any]] = []

    def stamp(row: dict[str, Any]) -> None:
        keep = {k: v for k, v in row.items() if isinstance(v, (int, float, str, bool)) or v is None}
        stamps.append({**keep, "seconds": round(time.perf_counter() - t0, 1)})
        (root / "trials.json").write_text(json.dumps(stamps, indent=1))

    assert abl.directions is not None
    res = optimize(abl.lm, abl.directions, texts["bad_val"], texts["good_val"], n_trials=trials, kl_weight=kl_weight,
                   max_new_tokens=tokens, seed=0, show_progress=False, callback=stamp)
    searched = round(time.perf_counter() - t0, 1)
    abl.best_config = res.config
    abl.bake(res.config)
    abl.save(str(root / "best"))
    (root / "driver.json").write_text(json.dumps({
        "best_config": res.config.to_dict(), "best_refusal_rate": res.result.refusal_rate,
        "best_mean_kl": res.result.mean_kl, "best_objective": res.result.objective,
        "search_end_s": searched, "saved_s": round(time.perf_counter() - t0, 1)}, indent=1))


# ---- safetyscope side --------------------------------------------------------------------------------
def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "ablate-driver":
        run_dir, model_dir, trials, tokens, kl = sys.argv[2:7]
        ablate_driver(run_dir, model_dir, int(trials), int(tokens), float(kl))
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "peers" / "direction")
    ap.add_argument("--ablate-python", default=str(ROOT / ".venv-ablate" / "bin" / "python"))
    ap.add_argument("--trials", type=int, default=8, help="ablate's optuna trials (its default is 30)")
    ap.add_argument("--max-new-tokens", type=int, default=40, help="reply length of its refusal count")
    ap.add_argument("--kl-weight", type=float, default=1.0, help="its objective: refusal rate + this x mean KL")
    args = ap.parse_args()

    from safetyscope.models import load_model
    from safetyscope.models.embedded import ensure_embedded
    from safetyscope.prompts import builtin_prompts

    run_dir = (args.out / "ablate").absolute()  # the driver runs with run_dir as its working directory
    run_dir.mkdir(parents=True, exist_ok=True)
    for name, (kind, split) in GROUPS.items():
        (run_dir / f"{name}.txt").write_text("\n".join(builtin_prompts(kind, split).texts) + "\n")
    lm = load_model("default")
    t_plain = plain_forward_seconds(lm, builtin_prompts("harmless", "val").texts[:8])
    del lm
    python = os.path.abspath(args.ablate_python)  # it runs in run_dir; abspath, not resolve: keep the venv's link
    cmd = [python, str(HERE), "ablate-driver", str(run_dir), str(ensure_embedded("default")),
           str(args.trials), str(args.max_new_tokens), str(args.kl_weight)]
    rc, wall = timed_run(cmd, run_dir / "ablate.log", cwd=run_dir)
    trials = json.loads((run_dir / "trials.json").read_text()) if (run_dir / "trials.json").is_file() else []
    driver = json.loads((run_dir / "driver.json").read_text()) if (run_dir / "driver.json").is_file() else {}
    best = min(trials, key=lambda t: t.get("score", float("inf")), default=None)
    res = {"rc": rc, "wall_s": round(wall, 1), "plain_forward_s": t_plain, "trials_budget": args.trials,
           "reply_tokens": args.max_new_tokens, "kl_weight": args.kl_weight, "cmd": " ".join(cmd),
           "best_trial": best, "driver": driver, "checkpoint": str(run_dir / "best")}
    (run_dir / "result.json").write_text(json.dumps(res, indent=1))
    print(f"ablate-llm: rc {rc}, {wall:.0f} s ({wall / t_plain:.0f} plain forward passes of 8 prompts)")
    for t in trials:
        print(f"  trial {t['trial']}: layer {t['direction_layer']} alpha {t['alpha']:.2f} "
              f"layers {t['min_layer']}-{t['max_layer']}: refusal {t['refusal_rate']:.3f} KL {t['mean_kl']:.4f} "
              f"score {t['score']:.3f} at {t['seconds']:.0f} s")
    if driver:
        print(f"  best {driver['best_config']} -> saved {res['checkpoint']} at {driver['saved_s']:.0f} s")


if __name__ == "__main__":
    main()
