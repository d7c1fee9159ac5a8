"""Targeted fine-tuning against its baselines at equal steps and data, in one run.

    python benchmarks/finetune.py --model default --mode weaken \\
        --components "blocks.14.attn, blocks.0-23.mlp.neurons[set]" --neuron-set runs/after/neurons/set \\
        --steps 10 --out runs/bench_finetune
    python benchmarks/finetune.py --model default --mode harden --robust --fresh-direction ...

One set of targets is made from the model (``finetune.data.make_data``, on the built-in *train* splits),
then every method trains on exactly those targets for the same number of steps with the same draws:
``components`` (the selection), ``random`` (random neurons in the selection's blocks, as many parameters),
``lora`` (rank 8 on every projection) and ``full``. Each tuned model is measured on the built-in *test*
splits (never trained or selected on): judged harmful refusal, over-refusal on harmless and on
benign-but-scary prompts, first-token KL on harmless prompts against the unmodified model, perplexity on
the built-in capability passages, harmful refusal under ablation of the original refusal direction and,
with ``--fresh-direction``, under a direction found afresh on the tuned model (train split, a fast search).
Wall time is also given as a ratio to one plain forward pass over a training batch, measured in this run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

os.environ.setdefault("SAFETYSCOPE_QUIET", "1")

from safetyscope.io import write_json  # noqa: E402
from safetyscope.measure.capability import capability_rows, cross_entropy  # noqa: E402
from safetyscope.measure.compare import logits_under  # noqa: E402
from safetyscope.measure.generation import generate, refusal_scores  # noqa: E402
from safetyscope.measure.judges import PhraseJudge  # noqa: E402
from safetyscope.measure.metrics import kl_divergence  # noqa: E402
from safetyscope.methods.direction.api import DirectionConfig, find_direction  # noqa: E402
from safetyscope.methods.direction.artifact import Direction  # noqa: E402
from safetyscope.methods.finetune.api import finetune  # noqa: E402
from safetyscope.methods.finetune.data import TrainingData, make_data  # noqa: E402
from safetyscope.methods.finetune.train import TrainConfig, make_batch  # noqa: E402
from safetyscope.methods.neurons.artifact import NeuronSet  # noqa: E402
from safetyscope.models import load_model  # noqa: E402
from safetyscope.models.adapter import LoadedModel  # noqa: E402
from safetyscope.prompts import builtin_prompts  # noqa: E402
from safetyscope.prompts.chat import format_chat  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--mode", choices=("weaken", "harden"), default="weaken")
    ap.add_argument("--components", default="", help="the circuit selection (component grammar)")
    ap.add_argument("--neuron-set", default="", help="neuron set artifact for [set] components")
    ap.add_argument("--top-neurons", type=int, default=0, help="keep only the set's first N neurons (0 = all)")
    ap.add_argument("--direction", default="", help="refusal direction artifact (default: found on the train split)")
    ap.add_argument("--methods", default="components,random,lora,full", help="comma-separated: components, random, lora, full")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--lr", type=float, default=1e-3, help="learning rate of components / random")
    ap.add_argument("--lora-lr", type=float, default=1e-3)
    ap.add_argument("--full-lr", type=float, default=2e-5)
    ap.add_argument("--train-batch", type=int, default=4)
    ap.add_argument("--n-train", type=int, default=16, help="train-split prompts per group for the targets")
    ap.add_argument("--n-eval", type=int, default=20, help="test-split prompts per group measured")
    ap.add_argument("--max-new-tokens", type=int, default=24, help="target reply length")
    ap.add_argument("--eval-tokens", type=int, default=24,
                    help="reply length judged in the measurement (0: the logit refusal score > 0 instead, no generation)")
    ap.add_argument("--robust", action="store_true", help="harden with random directional ablation")
    ap.add_argument("--fresh-direction", action="store_true", help="also find a direction on each tuned model")
    ap.add_argument("--fresh-layers", default="", help="candidate blocks a-b for the fresh search (empty = all)")
    ap.add_argument("--ppl-tokens", type=int, default=128, help="capability passages cut to this many tokens")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("runs/bench_finetune"))
    return ap.parse_args(argv)


def _sets(a: argparse.Namespace) -> dict[str, list[str]]:
    out = {}
    for name, kind, split, n in (("train_harmful", "harmful", "train", a.n_train), ("train_harmless", "harmless", "train", a.n_train),
                                 ("train_scary", "scary_harmless", "train", a.n_train // 2),
                                 ("harmful", "harmful", "test", a.n_eval), ("harmless", "harmless", "test", a.n_eval),
                                 ("scary", "scary_harmless", "test", a.n_eval)):
        out[name] = builtin_prompts(kind, split, seed=a.seed).sample(n, seed=a.seed).texts
    return out


def _forward_seconds(lm: LoadedModel, prompts: list[str], batch: int, reply: int) -> float:
    """Median time of a plain forward pass over a training-shaped batch (prompt + reply tokens)."""
    rows = [(lm.tokenizer(format_chat(lm.tokenizer, p), add_special_tokens=False)["input_ids"], [0] * reply)
            for p in prompts[: 2 * batch]]
    b = make_batch(lm, rows)
    times = []
    for _ in range(3):
        t = time.perf_counter()
        with torch.no_grad():
            lm.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], position_ids=b["position_ids"],
                     use_cache=False)
        times.append(time.perf_counter() - t)
    return sorted(times)[1]


def _refusal(lm: LoadedModel, prompts: list[str], tokens: int, batch: int, ctx: Any = None) -> float:
    """Judged refusal rate of greedy replies (``tokens`` = 0: logit refusal score > 0, no generation)."""
    judge = PhraseJudge()
    with ctx if ctx is not None else nullcontext():
        if tokens == 0:
            return float((refusal_scores(lm, prompts, batch_size=batch) > 0).float().mean())
        replies = generate(lm, prompts, max_new_tokens=tokens, batch_size=batch)
    return sum(bool(judge(p, r)) for p, r in zip(prompts, replies)) / len(prompts)


def _fast(layers: str) -> DirectionConfig:
    lay = None
    if layers:
        lo, hi = (int(v) for v in layers.split("-"))
        lay = tuple(range(lo, hi + 1))
    return DirectionConfig(screen=8, keep=4, induce="lazy", layers=lay)


def measure(lm: LoadedModel, a: argparse.Namespace, sets: dict[str, list[str]], d: Direction, ref: dict[str, Any],
            apply: Any = None) -> dict[str, Any]:
    tok, bs = a.eval_tokens, a.batch_size
    row: dict[str, Any] = {}
    with apply if apply is not None else nullcontext():
        for name in ("harmful", "harmless", "scary"):
            row[f"refusal_{name}"] = _refusal(lm, sets[name], tok, bs)
        row["refusal_harmful_ablated"] = _refusal(lm, sets["harmful"], tok, bs, d.apply(lm))
        row["ppl"] = cross_entropy(lm, ref["rows"], batch_size=bs).ppl
        new = logits_under(lm, sets["harmless"], None, batch_size=bs)
        if a.fresh_direction:
            t = time.perf_counter()
            fresh = find_direction(lm, sets["train_harmful"], sets["train_harmless"], config=_fast(a.fresh_layers),
                                   batch_size=bs)
            row["fresh_direction_layer"], row["fresh_seconds"] = fresh.layer, time.perf_counter() - t
            row["refusal_harmful_fresh_ablated"] = _refusal(lm, sets["harmful"], tok, bs, fresh.apply(lm))
    row["kl_first_token"] = float(kl_divergence(ref["logits"], new).mean())
    return row


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    torch.manual_seed(a.seed)
    lm = load_model(a.model, log=lambda m: print(m, file=sys.stderr))
    sets = _sets(a)
    fwd = _forward_seconds(lm, sets["train_harmful"] + sets["train_harmless"], a.train_batch, a.max_new_tokens)
    d = Direction.load(a.direction) if a.direction else find_direction(
        lm, sets["train_harmful"], sets["train_harmless"], config=_fast(""), batch_size=a.batch_size)
    ns = NeuronSet.load(a.neuron_set) if a.neuron_set else None
    if ns is not None and a.top_neurons:
        ns = ns.top(a.top_neurons)
    t = time.perf_counter()
    cached = a.out / f"data-{a.mode}.jsonl"  # a rerun (same settings) skips making the targets again
    if cached.is_file():
        data = TrainingData.load(cached)
    else:
        data = make_data(lm, a.mode, sets["train_harmful"], sets["train_harmless"],
                         sets["train_scary"] if a.mode == "harden" else [], ablate=lambda: d.apply(lm),
                         add=lambda: d.add(lm), judge=PhraseJudge(), max_new_tokens=a.max_new_tokens,
                         batch_size=a.batch_size)
        data.save(cached)
    print(f"targets {data.counts} in {time.perf_counter() - t:.0f} s; plain forward over a training batch {fwd:.2f} s",
          file=sys.stderr)
    ref = {"rows": capability_rows(lm, max_tokens=a.ppl_tokens), "logits": logits_under(lm, sets["harmless"], None, batch_size=a.batch_size)}
    rows = {"unmodified": {"n_trainable": 0, **measure(lm, a, sets, d, ref)}}
    print(json.dumps(rows["unmodified"]), file=sys.stderr)
    for method in [m.strip() for m in a.methods.split(",") if m.strip()]:
        lr = {"lora": a.lora_lr, "full": a.full_lr}.get(method, a.lr)
        cfg = TrainConfig(steps=a.steps, lr=lr, batch_size=a.train_batch, max_reply_tokens=a.max_new_tokens,
                          robust=a.robust, reestimate_every=max(1, a.steps // 2), checkpoint_every=0, seed=a.seed)
        r = finetune(lm, a.mode, a.components or None, method=method, data=data, direction=d, neuron_set=ns,  # type: ignore[arg-type]
                     config=cfg, batch_size=a.batch_size)
        row = {"lr": lr, "n_trainable": r.n_trainable, "fraction": r.fraction, "train_seconds": r.log.seconds,
               "step_over_forward": r.log.seconds / a.steps / fwd, "peak_mib": r.peak_mib,
               "loss_first": r.log.losses[0], "loss_last": r.log.losses[-1],
               **measure(lm, a, sets, d, ref, r.apply(lm))}
        rows[method] = row
        print(method, json.dumps(row), file=sys.stderr)
        write_json(a.out / f"{a.mode}.partial.json", rows)  # what exists so far
        del r
    result = {"args": {k: str(v) for k, v in vars(a).items()}, "model": lm.name, "forward_seconds": fwd,
              "targets": data.counts, "direction_layer": d.layer, "rows": rows}
    write_json(a.out / f"{a.mode}.json", result)
    _table(rows)
    return 0


def _table(rows: dict[str, dict[str, Any]]) -> None:
    cols = ["n_trainable", "train_seconds", "step_over_forward", "peak_mib", "refusal_harmful", "refusal_harmless",
            "refusal_scary", "kl_first_token", "ppl", "refusal_harmful_ablated", "refusal_harmful_fresh_ablated"]
    print("| method | " + " | ".join(cols) + " |")
    print("|---" * (len(cols) + 1) + "|")
    for name, row in rows.items():
        cells = []
        for c in cols:
            v = row.get(c)
            cells.append("-" if v is None else f"{v:,}" if isinstance(v, int) else f"{v:.3g}")
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    raise SystemExit(main())
