"""Data parallel: one safetyscope command in one process and under ``torchrun`` with N processes.

    python benchmarks/parallel.py                                   # small model, eval on 32+32 prompts
    python benchmarks/parallel.py --command capture --n-prompts 64
    python benchmarks/parallel.py --model tiny --n-prompts 8 --repeats 1   # smoke test

Both runs get the same CPU threads in total (one process: ``--threads``; N processes: ``threads / N``
each, at least one: ``--threads 1`` gives one thread to each process), run in interleaved rounds so load from other processes hits both alike, and print the wall time
of the whole command (start-up and model loading included, which data parallel does not shorten), the
time inside the library where the command reports it (``eval``: ``seconds`` in eval.json), the ratio
one / N, and whether the written results are equal (``eval``: replies and rates; ``capture``: the
per-layer summary within 1e-6 relative).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def _args(command: str, model: str, n: int, out: Path) -> list[str]:
    common = [model, "--n-prompts", str(n), "--out", str(out), "--quiet"]
    if command == "eval":
        return ["eval", *common, "--split", "all", "--scary", "none", "--max-new-tokens", "16", "--no-capability"]
    return ["capture", *common, "--site", "resid_post", "--positions", "last"]


def _run(cmd: list[str], threads: int) -> float:
    env = {**os.environ, "SAFETYSCOPE_QUIET": "1", "OMP_NUM_THREADS": str(threads),
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if res.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{res.stderr[-3000:]}")
    return time.perf_counter() - t0


def _result(command: str, out: Path) -> dict[str, Any]:
    if command == "eval":
        data = json.loads((out / "eval.json").read_text())
        replies = (out / "replies.jsonl").read_text()
        return {"seconds": data["seconds"], "key": (data["refusal_rate"], data["over_refusal"], replies)}
    data = json.loads((out / "capture" / "summary.json").read_text())
    return {"seconds": None, "key": data["layers"], "best": data["most_separated_layer"]}


def _equal(command: str, a: dict[str, Any], b: dict[str, Any]) -> bool:
    if command == "eval":
        return bool(a["key"] == b["key"])
    if a["best"] != b["best"]:
        return False
    return all(abs(x[k] - y[k]) <= 1e-6 * max(1.0, abs(x[k])) for x, y in zip(a["key"], b["key"])
               for k in x if isinstance(x[k], float))


def _tiny_model(root: Path) -> str:
    sys.path.insert(0, str(ROOT / "src"))
    from safetyscope.testing import tiny_model

    lm = tiny_model("llama")
    lm.model.save_pretrained(root / "tiny")
    lm.tokenizer.save_pretrained(root / "tiny")
    return str(root / "tiny")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="small", help="model alias or directory; 'tiny' = a tiny random llama")
    ap.add_argument("--command", choices=("eval", "capture"), default="eval")
    ap.add_argument("--n-prompts", type=int, default=32, help="prompts per group")
    ap.add_argument("--procs", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2, help="CPU threads in total for each run")
    ap.add_argument("--repeats", type=int, default=2)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = _tiny_model(root) if a.model == "tiny" else a.model
        one = [sys.executable, "-m", "safetyscope"]
        many = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(a.procs),
                "-m", "safetyscope"]
        walls: dict[str, list[float]] = {"one": [], "many": []}
        inner: dict[str, list[float]] = {"one": [], "many": []}
        results: dict[str, dict[str, Any]] = {}
        for r in range(a.repeats):
            for name, launch, threads in (("one", one, a.threads), ("many", many, max(1, a.threads // a.procs))):
                out = root / f"{name}{r}"
                walls[name].append(_run([*launch, *_args(a.command, model, a.n_prompts, out)], threads))
                results[name] = _result(a.command, out)
                if results[name]["seconds"] is not None:
                    inner[name].append(results[name]["seconds"])
        w1, wn = statistics.median(walls["one"]), statistics.median(walls["many"])
        per = max(1, a.threads // a.procs)
        print(f"{a.command} on {a.model}, {a.n_prompts}+{a.n_prompts} prompts, threads: 1 process {a.threads}, "
              f"{a.procs} processes {per} each; median of {a.repeats}")
        print(f"  wall (whole command)   1 process {w1:7.1f}s   {a.procs} processes {wn:7.1f}s   ratio {w1 / wn:.2f}x")
        if inner["one"]:
            i1, i_n = statistics.median(inner["one"]), statistics.median(inner["many"])
            print(f"  inside evaluate()      1 process {i1:7.1f}s   {a.procs} processes {i_n:7.1f}s   "
                  f"ratio {i1 / i_n:.2f}x")
        print(f"  results equal: {_equal(a.command, results['one'], results['many'])}")


if __name__ == "__main__":
    main()
