"""Study, not shipped: on a robust-hardened model, does ablating more directions leave more or less refusal?

Usage: python scripts/finetune_span_check.py TUNED.safetensors BLOCK POSITION
(TUNED from ``benchmarks/finetune.py --save-tuned``; BLOCK, POSITION: the judged attacker's choice, as the
benchmark printed it). On the tuned model, the difference-of-means candidate v at that block and position (64
built-in train prompts per group, as the benchmark's search uses) and a rank-8 subspace estimated around it
(``estimate_subspace``, the robust training's own) are ablated in growing spans, and judged refusal (phrase
judge, 48-token greedy replies) is read on the 20 validation harmful prompts the benchmark measures.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import finetune as bench  # noqa: E402

from safetyscope.io import load_tensors  # noqa: E402
from safetyscope.methods.direction.candidates import find_candidates  # noqa: E402
from safetyscope.methods.finetune.robust import estimate_subspace  # noqa: E402


@contextmanager
def on_tuned(tuned: str) -> Iterator[tuple[Any, dict[str, list[str]], Any]]:
    """The default model with TUNED's tensors applied (removed on exit), the benchmark's prompt sets (64 train
    prompts per group, 20 val harmful), and the difference-of-means candidates on the tuned model."""
    a = bench.parse_args(["--model", "default", "--mode", "harden", "--n-train", "64", "--n-eval", "20",
                          "--eval-split", "val", "--eval-tokens", "48", "--n-scary", "40"])
    lm = bench.benchmark_model("default", log=lambda _m: None)
    sets = bench._sets(a)
    with bench.Reused(load_tensors(tuned)).apply(lm):
        yield lm, sets, find_candidates(lm, sets["train_harmful"], sets["train_harmless"], filter="none", batch_size=8)


def main() -> None:
    tuned, layer, pos = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    t0 = time.time()
    with on_tuned(tuned) as (lm, sets, cands):
        v = cands.direction(layer, pos).direction.float()
        v = v / v.norm()  # [d_model]
        span = estimate_subspace(lm, sets["train_harmful"][:32], sets["train_harmless"][:32], v, 8, None)  # [8, d_model]
        for name, basis in (("v alone", v), ("v + 7 (rank 8)", span), ("the 7 without v", span[1:]),
                            ("v + 1", span[:2]), ("v + 3", span[:4])):
            rate = bench._refusal(lm, sets["harmful"], 48, 8, bench._ablate_span(lm, basis))
            print(f"{name:18s} harmful refusal {rate:.2f}  ({time.time() - t0:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
