"""Capture benchmark: all-layer capture vs a plain forward pass vs one forward per layer per prompt.

    python benchmarks/capture.py                 # default model, 32 prompts
    python benchmarks/capture.py --model small --prompts 16

Prints per-prompt times measured side by side in one run and the ratios:
  capture / plain forward      (target <= 1.10)
  per-layer loop / capture     (target >= n_layers)
The per-layer loop (the seed article's approach: for each prompt, for each layer, one forward pass
with a hook on that layer) runs on a subset of the prompts; times are per prompt.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

os.environ.setdefault("SAFETYSCOPE_QUIET", "1")

from safetyscope.hooks import capture, forward  # noqa: E402
from safetyscope.models import load_model  # noqa: E402
from safetyscope.prompts import builtin_prompts  # noqa: E402
from safetyscope.prompts.chat import tokenize_prompts  # noqa: E402
from safetyscope.runner import run_capture  # noqa: E402
from safetyscope.testing import interleaved_times  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--loop-prompts", type=int, default=2, help="prompts for the slow per-layer loop")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    lm = load_model(args.model, log=lambda m: print(m, file=sys.stderr))
    texts = (builtin_prompts("harmful", "train").texts[: args.prompts // 2]
             + builtin_prompts("harmless", "train").texts[: args.prompts - args.prompts // 2])
    sites = ["blocks.*.resid_post", "blocks.*.mlp.neurons"]
    batches = [tokenize_prompts(lm.tokenizer, texts[i : i + args.batch_size]) for i in range(0, len(texts), args.batch_size)]

    def plain() -> None:
        with torch.inference_mode():
            for b in batches:
                forward(lm, b, last_only=True)

    def captured() -> None:
        with torch.inference_mode(), capture(lm, sites, "last") as cap:
            for b in batches:
                forward(lm, b, last_only=True)
                cap.values.clear()

    def through_runner() -> None:
        for _ in run_capture(lm, texts, sites, "last", batch_size=args.batch_size):
            pass

    loop_texts = texts[: args.loop_prompts]

    def per_layer_loop() -> None:
        with torch.inference_mode():
            for text in loop_texts:
                b = tokenize_prompts(lm.tokenizer, [text])
                for layer in range(lm.n_layers):
                    with capture(lm, [f"blocks.{layer}.resid_post", f"blocks.{layer}.mlp.neurons"], "last"):
                        forward(lm, b, last_only=True)

    n = len(texts)
    times, _ = interleaved_times({"plain": plain, "capture": captured, "runner": through_runner}, args.repeats)
    t = {name: statistics.median(v) for name, v in times.items()}
    t_plain, t_cap, t_run = t["plain"] / n, t["capture"] / n, t["runner"] / n
    t0 = time.perf_counter()
    per_layer_loop()
    t_loop = (time.perf_counter() - t0) / len(loop_texts)
    print(f"model {lm.name}: {lm.n_layers} layers, {n} prompts, batch {args.batch_size}, device {lm.input_device}, "
          f"threads {torch.get_num_threads()}")
    print(f"{'approach':38s} {'s/prompt':>10s}")
    for name, t in [("plain forward", t_plain), ("capture (resid+neurons, all layers)", t_cap),
                    ("run_capture (tokenize+capture+CPU copy)", t_run), ("per-layer loop (seed approach)", t_loop)]:
        print(f"{name:38s} {t:10.4f}")
    print(f"capture / plain forward:        {t_cap / t_plain:6.3f}   (target <= 1.10)")
    print(f"run_capture / plain forward:    {t_run / t_plain:6.3f}")
    print(f"per-layer loop / capture:       {t_loop / t_cap:6.1f}   (target >= n_layers = {lm.n_layers})")


if __name__ == "__main__":
    main()
