"""LLM judge throughput: replies judged per second, beside a plain forward pass over the same replies.

    python benchmarks/judge.py                      # default model as judge, 32 pairs of the judge set
    python benchmarks/judge.py --model large --pairs 16
    python benchmarks/judge.py --model tiny:llama   # a tiny random model (smoke test)
    python benchmarks/judge.py --model large --rubric attempt --spread   # the cascade's yes/no stage (phrase+llm)

Three timings, measured side by side in interleaved rounds (median), same batch size:
  judge             LLMJudge.probabilities (default rubric + prompt + reply, one forward pass each, no cache,
                    no calibration prior (one 3-row batch per judge, amortised),
                    no detector shortcut)
  plain forward     one forward pass over the chat-formatted prompt + reply alone (what reading the
                    reply costs at least, without the rubric)
  rubric forward    one forward pass over the judge's own inputs (system message with the rubric's examples,
                    prompt, reply, prefill; the judge minus its bookkeeping)
  cascade           (--rubric attempt) CascadeJudge.probabilities: detector and phrase judge first, only the
                    replies they leave reach the model (no cache)
Ratios: judge / plain forward (the rubric's extra tokens) and judge / rubric forward (overhead; target ~1).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

os.environ.setdefault("SAFETYSCOPE_QUIET", "1")

from safetyscope.hooks import forward  # noqa: E402
from safetyscope.measure.cascade_judge import ATTEMPT_RUBRIC, CascadeJudge  # noqa: E402
from safetyscope.measure.judge_eval import load_judge_set  # noqa: E402
from safetyscope.measure.judges import PhraseJudge  # noqa: E402
from safetyscope.measure.llm_judge import LLMJudge, Rubric  # noqa: E402
from safetyscope.prompts.chat import tokenize_prompts  # noqa: E402

TINY_RUBRIC = "Q: {prompt}\nR: {reply}\nA, B or C?"  # the tiny tokenizer is per character (512 positions)
TINY_ATTEMPT = Rubric(user="Q: {prompt}\nR: {reply}\nY or N?", letters=(("Y", "complied"), ("N", "broken")))


def _model(spec: str):  # noqa: ANN202
    from safetyscope.testing import benchmark_model

    return benchmark_model(spec)


def _forward_all(lm, texts: list[str], batch_size: int, encode=None) -> None:  # noqa: ANN001
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            rows = [texts[i] for i in order[start:start + batch_size]]
            forward(lm, encode(rows) if encode else tokenize_prompts(lm.tokenizer, rows), last_only=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default", help="judge model spec, or tiny:FAMILY")
    ap.add_argument("--pairs", type=int, default=32, help="pairs of the built-in judge set (the first N)")
    ap.add_argument("--spread", action="store_true",
                    help="N pairs evenly spaced over the set instead of the first N (which are all refusals; the "
                         "cascade would never reach its model)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", default="", help="also write the figures here")
    ap.add_argument("--rubric", choices=("letters", "attempt"), default="letters",
                    help="letters: the five-letter RUBRIC (--judge llm); attempt: the cascade's yes/no stage "
                         "(--judge phrase+llm), also timed as the whole cascade")
    args = ap.parse_args(argv)
    lm = _model(args.model)
    pairs = load_judge_set()
    pairs = pairs[:: max(1, len(pairs) // args.pairs)][: args.pairs] if args.spread else pairs[: args.pairs]
    if args.model.startswith("tiny:"):
        pairs = [p for p in pairs if len(p.prompt) + len(p.reply) < 300]
    prompts, replies = [p.prompt for p in pairs], [p.reply for p in pairs]
    tiny = args.model.startswith("tiny:")
    if args.rubric == "attempt":
        kw = {"rubric": TINY_ATTEMPT if tiny else ATTEMPT_RUBRIC}
    else:
        kw = {"rubric": TINY_RUBRIC} if tiny else {}
    probe = LLMJudge(lm, batch_size=args.batch_size, detector=False, **kw)
    rubric_texts = [probe.judge_text(p, r) for p, r in zip(prompts, replies)]
    plain = [f"{p}\n\n{r}" for p, r in zip(prompts, replies)]
    fns = {
        "judge": lambda: LLMJudge(lm, batch_size=args.batch_size, detector=False, calibrate=False,
                                 **kw).probabilities(prompts, replies),
        "plain forward": lambda: _forward_all(lm, plain, args.batch_size),
        "rubric forward": lambda: _forward_all(lm, rubric_texts, args.batch_size, probe.encode),
    }
    if args.rubric == "attempt":
        fns["cascade"] = lambda: CascadeJudge(LLMJudge(lm, batch_size=args.batch_size, **kw),
                                              PhraseJudge()).probabilities(prompts, replies)
    times: dict[str, list[float]] = {k: [] for k in fns}
    for fn in fns.values():
        fn()  # warm-up
    for _ in range(args.repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    n = len(pairs)
    res = {"model": args.model, "rubric": args.rubric, "pairs": n, "batch_size": args.batch_size,
           "threads": torch.get_num_threads(),
           "seconds": med, "replies_per_second": n / med["judge"],
           "judge_over_plain_forward": med["judge"] / med["plain forward"],
           "judge_over_rubric_forward": med["judge"] / med["rubric forward"]}
    print(f"judge model {args.model}: {n} replies, batch {args.batch_size}, {res['threads']} threads, median of "
          f"{args.repeats}")
    for k, v in med.items():
        print(f"  {k:15s} {v:8.2f} s  ({v / n * 1000:7.1f} ms/reply)")
    print(f"  replies judged per second: {res['replies_per_second']:.2f}")
    print(f"  judge / plain forward (prompt+reply only): {res['judge_over_plain_forward']:.2f}x")
    print(f"  judge / rubric forward (same texts):       {res['judge_over_rubric_forward']:.2f}x")
    if "cascade" in med:
        res["cascade_replies_per_second"] = n / med["cascade"]
        res["cascade_over_judge"] = med["cascade"] / med["judge"]
        print(f"  cascade: {res['cascade_replies_per_second']:.2f} replies/s, {res['cascade_over_judge']:.2f}x the "
              "judge alone (the detector and phrases decide the rest without the model)")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
