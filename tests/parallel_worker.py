"""The library calls that tests/test_parallel.py runs once in one process and once under torchrun.

``python tests/parallel_worker.py MODEL_DIR OUT [CLI ARGS...]`` (one process, or launched by torchrun):
every rank writes ``OUT/rank{r}.json`` and ``OUT/rank{r}.safetensors`` with what it computed (plain
writes, not safetyscope's io, which writes on rank 0 only), so the test can compare ranks and runs;
then runs the CLI with ``CLI ARGS`` in the same process group and keeps what each rank printed in
``OUT/rank{r}.stdout``.
"""

from __future__ import annotations

import io
import json
import os
import sys
import time
from contextlib import redirect_stdout
from pathlib import Path

import torch

HARMFUL = [f"tell me about {w} X now" for w in ("qz", "vx", "kj", "zz", "qq", "xv", "jk", "zq", "vv", "kx", "xq")]
HARMLESS = [f"tell me about {w}." for w in ("ae", "io", "lu", "ra", "en", "st", "ou", "la", "ni", "te", "ar")]


def compute(model_dir: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """(JSON-able results, tensors) of the sharded library paths on a tiny model."""
    from safetyscope.measure.evaluate import evaluate
    from safetyscope.measure.generation import generate, last_logits
    from safetyscope.methods.direction.api import DirectionConfig, search_direction
    from safetyscope.methods.fit import fit_group_moments
    from safetyscope.methods.neurons.api import find_neurons
    from safetyscope.methods.probes.api import fit_probes
    from safetyscope.models import load_model

    lm = load_model(model_dir, log=lambda _m: None)
    times: dict[str, float] = {}
    t0 = time.perf_counter()
    stats = fit_group_moments(lm, {"harmful": HARMFUL, "harmless": HARMLESS},
                              ["blocks.*.resid_post", "blocks.1.mlp.neurons"], "post_instruction", batch_size=3)
    times["moments"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    replies = generate(lm, HARMFUL + HARMLESS, max_new_tokens=6, batch_size=4)
    logits = last_logits(lm, HARMLESS, batch_size=3)
    times["generate"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    search = search_direction(lm, HARMFUL, HARMLESS, val_harmful=HARMFUL[:4], val_harmless=HARMLESS[:4],
                              config=DirectionConfig(positions="-1", prune_layers=0.0, filter="none"), batch_size=3)
    times["direction"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    neurons = find_neurons(lm, HARMFUL, HARMLESS, filter="none", top_k=6, utility_texts=2, utility_tokens=16,
                           batch_size=3)
    times["neurons"] = time.perf_counter() - t0
    probes = fit_probes(lm, HARMFUL, HARMLESS, folds=2, controls=0, c=1.0, batch_size=3)
    t0 = time.perf_counter()
    ev = evaluate(lm, search.direction, harmful=HARMFUL[:5], harmless=HARMLESS[:5], scary=[], max_new_tokens=4,
                  batch_size=2, capability=True, ppl_max_tokens=32)
    times["evaluate"] = time.perf_counter() - t0
    d = search.direction
    from safetyscope import parallel

    mine = parallel.shard(list(range(7)))  # rank r: items r, r + world, ...
    out = {
        "collectives": {"shard": mine, "unshard": parallel.unshard(parallel.gather_objects(mine)),
                        "sum": parallel.all_reduce_sum(torch.tensor([parallel.rank() + 1.0])).tolist(),
                        "broadcast": parallel.broadcast_object(f"from {parallel.rank()}")},
        "replies": replies, "direction": [d.layer, d.position], "neurons": [list(n) for n in neurons.ranked],
        "probe_best": probes.result.best_layer,
        "eval_harmful": ev.rate("harmful"), "eval_replies": [r.reply for r in ev.replies],
        "eval_kl": ev.kl["reply_tokens"] if ev.kl else None,
        "eval_ppl": {k: v["modified"]["ce"] for k, v in ev.perplexity.items()},
        "times": times,
    }
    tensors = {"logits": logits, "direction": d.direction.float(),
               **{f"{g}|{k}|{part}": t for g, keys in stats.groups.items() for k, m in keys.items()
                  for part, t in (("mean", m.mean), ("m2", m.m2))}}
    out["n"] = {f"{g}|{k}": m.n for g, keys in stats.groups.items() for k, m in keys.items()}
    return out, tensors


def main() -> None:
    from safetensors.torch import save_file

    from safetyscope.parallel import rank, session

    torch.set_num_threads(int(os.environ.get("WORKER_THREADS", "1")))
    model_dir, out = sys.argv[1], Path(sys.argv[2])
    with session():
        t0 = time.perf_counter()
        res, tensors = compute(model_dir)
        res["seconds"] = time.perf_counter() - t0
        out.mkdir(parents=True, exist_ok=True)
        (out / f"rank{rank()}.json").write_text(json.dumps(res))
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / f"rank{rank()}.safetensors"))
        if len(sys.argv) > 3:
            from safetyscope.cli.main import app

            printed = io.StringIO()
            with redirect_stdout(printed):
                app(sys.argv[3:], standalone_mode=False)
            (out / f"rank{rank()}.stdout").write_text(printed.getvalue())


if __name__ == "__main__":
    main()
