"""Monitor benchmark: generation time with vs without the monitor (one run), and the eval figures.

    python benchmarks/monitor.py --out runs/bench_monitor                      # overhead only
    python benchmarks/monitor.py --out runs/bench_monitor \\
        --harmful ../shared/data/advbench.jsonl --harmless ../shared/data/alpaca_harmless_val.jsonl \\
        --attack find                                                           # + eval before / under ablation

The monitor is fitted on the built-in train splits (harmful; harmless + scary_harmless) and calibrated
on the default calibration set, or loaded with --monitor. Overhead: the same batches are generated
(greedy, fixed length) with and without ``monitor.watch``, interleaved with alternating order (min and
median of --repeats, and the per-round ratio's median, quartiles and range), so load from other processes
hits both alike; target ratio <= 1.03; the model's forward calls are counted in both (target: no extra
call). ``--attack find``: the refusal direction
from ``find_direction`` on the built-in train split, ablated by hooks (or give an artifact directory).
Nothing is selected on the --harmful / --harmless files: they are only measured.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

os.environ.setdefault("SAFETYSCOPE_QUIET", "1")

from safetyscope.artifacts.base import Artifact, load_artifact  # noqa: E402
from safetyscope.io import write_json  # noqa: E402
from safetyscope.methods.monitor import Monitor, evaluate_monitor, fit_monitor  # noqa: E402
from safetyscope.models import load_model  # noqa: E402
from safetyscope.models.adapter import LoadedModel  # noqa: E402
from safetyscope.prompts import builtin_prompts, load_prompts  # noqa: E402
from safetyscope.prompts.chat import pad_token_id, tokenize_prompts  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--out", type=Path, default=Path("runs/bench_monitor"))
    ap.add_argument("--monitor", default="", help="monitor artifact directory (default: fit one, saved under --out)")
    ap.add_argument("--gen-prompts", type=int, default=16, help="prompts generated for the overhead timing")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--harmful", default="", help="held-out harmful prompts for the eval (empty: no eval)")
    ap.add_argument("--harmless", default="", help="held-out harmless prompts for the eval")
    ap.add_argument("--attack", default="", help="'find' (direction ablation found on the built-in train split) or an artifact dir")
    ap.add_argument("--find-prompts", type=int, default=0, help="--attack find: prompts per group (0 = the whole train split)")
    ap.add_argument("--find-layers", default="", help="--attack find: candidate blocks a-b (empty = all, the default search)")
    ap.add_argument("--find-fast", action="store_true", help="--attack find: last position only, no refusal filter, lazy induce")
    ap.add_argument("--n-eval", type=int, default=0, help="measure on a seeded sample of this many prompts per file (0 = all)")
    ap.add_argument("--eval-tokens", type=int, default=48, help="reply length for the eval's phrase judge")
    ap.add_argument("--protect", type=int, default=0)
    ap.add_argument("--stress", default="none", help="fit: stress blocks (none, auto, quick or e.g. 6,12,18)")
    return ap.parse_args(argv)


def setup(args: argparse.Namespace) -> tuple[LoadedModel, Monitor, dict[str, Any]]:
    lm = load_model(args.model, log=lambda m: print(m, file=sys.stderr))
    info: dict[str, Any] = {"model": lm.name}
    if args.monitor:
        return lm, Monitor.load(args.monitor), info
    t0 = time.perf_counter()
    harmless = builtin_prompts("harmless", "train") + builtin_prompts("scary_harmless", "train")
    m = fit_monitor(lm, builtin_prompts("harmful", "train"), harmless, protect=args.protect,
                    batch_size=args.batch_size, stress=args.stress)
    info["fit_s"] = time.perf_counter() - t0
    m.save(args.out / "monitor")
    info["monitor"] = str(args.out / "monitor")
    return lm, m, info


def overhead(lm: LoadedModel, m: Monitor, args: argparse.Namespace) -> dict[str, Any]:
    """Generation time with and without the watch on the same batches (interleaved rounds, min and median),
    and the model's forward calls counted in both (the monitor adds none)."""
    texts = (builtin_prompts("harmful", "test").texts[: args.gen_prompts // 2]
             + builtin_prompts("harmless", "test").texts[: args.gen_prompts - args.gen_prompts // 2])
    batches = [tokenize_prompts(lm.tokenizer, texts[i:i + args.batch_size]).to(lm.input_device)
               for i in range(0, len(texts), args.batch_size)]
    n = args.max_new_tokens
    calls = {"plain": 0, "monitored": 0}

    def gen() -> None:
        with torch.inference_mode():
            for b in batches:
                lm.model.generate(input_ids=b.input_ids, attention_mask=b.attention_mask, max_new_tokens=n,
                                  min_new_tokens=n, do_sample=False, pad_token_id=pad_token_id(lm.tokenizer))

    def plain() -> None:
        def count(*_: Any, **__: Any) -> None:
            calls["plain"] += 1

        handle = lm.model.register_forward_pre_hook(count)
        try:
            gen()
        finally:
            handle.remove()

    def watched() -> None:
        with m.watch(lm) as w:
            gen()
        calls["monitored"] += w.n_calls

    fns = {"plain": plain, "monitored": watched}
    for fn in fns.values():
        fn()  # warm-up (and the forward-call count of one round each)
    per_round = dict(calls)
    times: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(args.repeats):
        for k in (list(fns) if r % 2 == 0 else list(fns)[::-1]):  # alternate the order: drift hits both alike
            t0 = time.perf_counter()
            fns[k]()
            times[k].append(time.perf_counter() - t0)
    inside = hook_time(lm, m, gen)
    med = {k: statistics.median(v) for k, v in times.items()}
    low = {k: min(v) for k, v in times.items()}
    paired = sorted(m / p for m, p in zip(times["monitored"], times["plain"]))  # per round: same load on both
    q = statistics.quantiles(paired, n=4) if len(paired) >= 2 else [paired[0]] * 3
    return {"prompts": len(texts), "new_tokens": n, "plain_s": med["plain"], "monitored_s": med["monitored"],
            "ratio": med["monitored"] / med["plain"], "ratio_min": low["monitored"] / low["plain"],
            "ratio_paired_median": statistics.median(paired), "ratio_paired_quartiles": [q[0], q[2]],
            "ratio_paired_range": [paired[0], paired[-1]],
            "plain_min_s": low["plain"], "monitored_min_s": low["monitored"], "repeats": args.repeats,
            "forward_calls_per_round": per_round, "extra_forward_calls": per_round["monitored"] - per_round["plain"],
            "times": times, **inside}


def hook_time(lm: LoadedModel, m: Monitor, gen: Any) -> dict[str, float]:
    """Seconds spent inside the monitor's own hook functions (the pre/post hooks on the model and every
    block reader) during one more monitored round, and their share of that round. On a CPU the hooks run
    synchronously, so this is the monitor's compute without the round-to-round noise of the wall-clock
    ratio (it leaves out torch's own hook dispatch, which the ratio includes)."""
    from safetyscope.methods.monitor import watch

    spent = [0.0]

    def timed(fn: Any) -> Any:
        def run(*a: Any, **k: Any) -> Any:
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                spent[0] += time.perf_counter() - t
        return run

    names = ("_before", "_after", "_reader")
    original = {name: getattr(watch.Watch, name) for name in names}
    wrapped = {"_before": timed(original["_before"]), "_after": timed(original["_after"]),
               "_reader": lambda self, layer: timed(original["_reader"](self, layer))}
    for name, fn in wrapped.items():
        setattr(watch.Watch, name, fn)
    try:
        t0 = time.perf_counter()
        with m.watch(lm):
            gen()
        total = time.perf_counter() - t0
    finally:
        for name, fn in original.items():
            setattr(watch.Watch, name, fn)
    return {"hook_s": spent[0], "hook_round_s": total, "hook_share": spent[0] / total}


def attack_of(lm: LoadedModel, args: argparse.Namespace) -> Artifact | None:
    if not args.attack:
        return None
    if args.attack != "find":
        return load_artifact(args.attack)
    from safetyscope.methods.direction.api import DirectionConfig, find_direction

    harmful, harmless = builtin_prompts("harmful", "train"), builtin_prompts("harmless", "train")
    if args.find_prompts:
        harmful, harmless = harmful.sample(args.find_prompts, seed=0), harmless.sample(args.find_prompts, seed=0)
    kw: dict[str, Any] = {}
    if args.find_layers:
        lo, hi = (int(v) for v in args.find_layers.split("-"))
        kw["layers"] = tuple(range(lo, hi + 1))
    if args.find_fast:
        kw.update(positions=(-1,), filter="none", induce="lazy")
    d = find_direction(lm, harmful, harmless, config=DirectionConfig(**kw), batch_size=args.batch_size)
    d.save(args.out / "attack_direction")
    return d


def report(result: dict[str, Any], out: Path) -> None:
    write_json(out / "summary.json", result)
    print(json.dumps(result, indent=2, default=str))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    lm, m, result = setup(args)
    result["overhead"] = overhead(lm, m, args)
    o = result["overhead"]
    print(f"overhead: monitored / plain generation = {o['ratio']:.3f} (median), {o['ratio_min']:.3f} (min); per "
          f"round {o['ratio_paired_median']:.3f} (median; quartiles {o['ratio_paired_quartiles'][0]:.3f}-"
          f"{o['ratio_paired_quartiles'][1]:.3f}, range {o['ratio_paired_range'][0]:.3f}-"
          f"{o['ratio_paired_range'][1]:.3f}); extra forward calls: {o['extra_forward_calls']}; time inside the "
          f"monitor's hooks: {o['hook_s']:.3f} s of a {o['hook_round_s']:.2f} s round ({o['hook_share']:.1%})",
          file=sys.stderr)
    if args.harmful and args.harmless:
        attack = attack_of(lm, args)
        harmful, harmless = (load_prompts(f) for f in (args.harmful, args.harmless))
        if args.n_eval:
            harmful, harmless = harmful.sample(args.n_eval, seed=0), harmless.sample(args.n_eval, seed=0)
        ev = evaluate_monitor(lm, m, harmful, harmless, attack=attack,
                              attack_name=args.attack or None, max_new_tokens=args.eval_tokens,
                              batch_size=args.batch_size)
        result["eval"] = ev.to_json()
    result["command"] = " ".join(["python", "benchmarks/monitor.py", *(argv if argv is not None else sys.argv[1:])])
    report(result, args.out)
    return result


if __name__ == "__main__":
    main()
