"""Shared-prefix reuse: each forward-pass workload with and without the reused chat-template prefix.

    python benchmarks/prefix_cache.py                      # default model, 32 built-in prompts, batch 8
    python benchmarks/prefix_cache.py --model tiny:qwen2 --prompts 8 --repeats 1   # smoke test

Every workload runs in interleaved rounds, reuse on and off (``safetyscope.prefix.prefix_reuse``), so load
from other processes affects both alike; it prints seconds per prompt, the speed-up (off / on) and the
largest absolute logit difference between the two (the reuse is exact: float rounding only). Workloads:

* ``forward``: ``hooks.forward(..., last_only=True)`` on pre-tokenized batches (the plain forward pass; its
  seconds per prompt without reuse state this machine's speed);
* ``refusal score``: ``measure.generation.refusal_scores`` (tokenize, forward, full-row log-odds);
* ``capture``: ``runner.run_capture`` of every block's ``resid_post`` at ``last``;
* ``ablation (mean)``: the direction's mean ablation at every block (edits every position, so the prefix is
  recomputed under it) through ``measure.compare.logits_under`` (first-token KL, ``direction ablate``);
* ``candidate scoring``: ``direction find``'s per-row scoring (``--keep`` candidates per pass: one prefix
  per candidate);
* ``refine step``: a forward and backward pass with gradient through the direction (``direction refine``).

It also prints the share of the unembedding (``lm_head`` on the last position) in a forward pass: the
refusal score is a log-odds under the full softmax, so it needs the full row, and with ``logits_to_keep=1``
the full row is one position per prompt.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

os.environ.setdefault("SAFETYSCOPE_QUIET", "1")


def _load(name: str) -> Any:
    from safetyscope.testing import benchmark_model

    return benchmark_model(name, log=lambda m: print(m, file=sys.stderr))


def interleaved(fns: dict[str, Callable[[], Any]], repeats: int) -> tuple[dict[str, float], dict[str, Any]]:
    """Median wall time of each function over interleaved rounds (after one warm-up each) and its last result."""
    from safetyscope.testing import interleaved_times

    times, last = interleaved_times(fns, repeats)
    return {name: statistics.median(t) for name, t in times.items()}, last


def workloads(lm: Any, texts: list[str], bs: int, system: str | None) -> dict[str, Callable[[], torch.Tensor]]:
    from safetyscope.hooks import forward, hooks
    from safetyscope.measure.compare import logits_under
    from safetyscope.measure.generation import refusal_scores
    from safetyscope.methods.direction.artifact import Direction
    from safetyscope.methods.direction.scoring import ablated_logits
    from safetyscope.prefix import same_rows
    from safetyscope.prompts.chat import tokenize_prompts
    from safetyscope.runner import run_capture

    g = torch.Generator().manual_seed(0)
    d_model, n_layers = lm.dims.d_model, lm.n_layers
    r = torch.nn.functional.normalize(torch.randn(d_model, generator=g), dim=0)
    direction = Direction(r, n_layers // 2, -1, norm=1.0, targets=torch.randn(n_layers, generator=g), ablation="mean")
    units = torch.nn.functional.normalize(torch.randn(4, d_model, generator=g), dim=-1)
    batches = [tokenize_prompts(lm.tokenizer, texts[i:i + bs], system=system) for i in range(0, len(texts), bs)]
    few = texts[: max(2, len(texts) // 4)]  # candidate scoring: 4 candidates x these prompts

    def plain() -> torch.Tensor:
        with torch.inference_mode():
            return torch.cat([forward(lm, b, last_only=True)[:, -1] for b in batches])

    def captured() -> torch.Tensor:
        return torch.cat([v[next(iter(v))][:, 0] for _b, v in run_capture(lm, texts, "blocks.*.resid_post", batch_size=bs,
                                                                           system=system)])

    def refine_step() -> torch.Tensor:
        v = r.clone().requires_grad_(True)
        with torch.enable_grad(), hooks(lm, direction.edits(lm, same_rows(lambda _b: v / v.norm()))):
            forward(lm, batches[0], last_only=True)[:, -1].logsumexp(-1).sum().backward()
        assert v.grad is not None
        return v.grad

    return {
        "forward": plain,
        "refusal score": lambda: refusal_scores(lm, texts, batch_size=bs, system=system),
        "capture": captured,
        "ablation (mean)": lambda: logits_under(lm, texts, direction, batch_size=bs, system=system),
        "candidate scoring": lambda: ablated_logits(lm, units, few, bs, system),
        "refine step": refine_step,
    }


def unembedding_share(lm: Any, texts: list[str], bs: int, system: str | None, repeats: int) -> float:
    """Time of ``lm_head`` on one position per prompt over the time of the plain forward of the same batch."""
    from safetyscope.hooks import forward
    from safetyscope.prefix import prefix_reuse
    from safetyscope.prompts.chat import tokenize_prompts

    b = tokenize_prompts(lm.tokenizer, texts[:bs], system=system)
    head = lm.model.get_output_embeddings()
    h = torch.randn(len(b), 1, lm.dims.d_model, dtype=next(head.parameters()).dtype)

    def full() -> None:
        with torch.inference_mode(), prefix_reuse(False):
            forward(lm, b, last_only=True)

    def unembed() -> None:
        with torch.inference_mode():
            head(h)

    t, _ = interleaved({"full": full, "head": unembed}, repeats)
    return t["head"] / t["full"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--system", default=None, help="a system prompt (default: the template's own)")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = ap.parse_args(argv)

    from safetyscope.prefix import prefix_reuse, shared_prefix_length
    from safetyscope.prompts import builtin_prompts
    from safetyscope.prompts.chat import tokenize_prompts

    lm = _load(args.model)
    half = args.prompts // 2
    texts = builtin_prompts("harmful", "train").texts[:half] + builtin_prompts("harmless", "train").texts[:args.prompts - half]
    full = tokenize_prompts(lm.tokenizer, texts, system=args.system)
    p = shared_prefix_length(full)
    share = p * len(texts) / int(full.attention_mask.sum())
    print(f"model {lm.name}: {lm.n_layers} blocks, {len(texts)} prompts, batch {args.batch_size}, "
          f"threads {torch.get_num_threads()}; shared prefix {p} tokens = {share:.0%} of the prompt tokens")
    rows: dict[str, dict[str, float]] = {}
    print(f"{'workload':20s} {'s/prompt off':>13s} {'s/prompt on':>12s} {'speed-up':>9s} {'max |diff|':>11s}")
    for name, fn in workloads(lm, texts, args.batch_size, args.system).items():
        def off(fn: Callable[[], torch.Tensor] = fn) -> torch.Tensor:
            with prefix_reuse(False):
                return fn()

        t, out = interleaved({"off": off, "on": fn}, args.repeats)
        diff = float((out["on"].float() - out["off"].float()).abs().max())
        n = len(texts) if name not in ("candidate scoring", "refine step") else (
            4 * max(2, len(texts) // 4) if name == "candidate scoring" else min(args.batch_size, len(texts)))
        rows[name] = {"off_s_per_prompt": t["off"] / n, "on_s_per_prompt": t["on"] / n, "speedup": t["off"] / t["on"],
                      "max_abs_diff": diff}
        print(f"{name:20s} {t['off'] / n:13.4f} {t['on'] / n:12.4f} {t['off'] / t['on']:8.2f}x {diff:11.2e}")
    unembed = unembedding_share(lm, texts, args.batch_size, args.system, args.repeats)
    print(f"unembedding (lm_head, last position) / plain forward of the same batch: {unembed:.3f}")
    if args.json:
        args.json.write_text(json.dumps({"model": lm.name, "prompts": len(texts), "batch_size": args.batch_size,
                                         "prefix_tokens": p, "prefix_share": share, "workloads": rows,
                                         "unembedding_share": unembed}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
