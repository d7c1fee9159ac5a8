"""Greedy replies of a model tuned by ``benchmarks/finetune.py --save-tuned``, plain and with a direction ablated.

Usage: python scripts/finetune_replies.py TUNED.safetensors DIRECTION_DIR [N] [TOKENS]
(the first N of the 20 validation harmful prompts the benchmark measures, seed 0; default 6 prompts, 48 tokens)
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import finetune as bench  # noqa: E402

from safetyscope.io import load_tensors  # noqa: E402
from safetyscope.measure.generation import generate  # noqa: E402
from safetyscope.methods.direction.artifact import Direction  # noqa: E402
from safetyscope.models import load_model  # noqa: E402
from safetyscope.prompts import builtin_prompts  # noqa: E402


def main() -> None:
    tuned, direction = sys.argv[1], sys.argv[2]
    n = int(sys.argv[3]) if len(sys.argv) > 3 else 6
    tokens = int(sys.argv[4]) if len(sys.argv) > 4 else 48
    lm = load_model("default", log=lambda _m: None)
    d = Direction.load(direction)
    prompts = builtin_prompts("harmful", "val", seed=0).sample(20, seed=0).texts[:n]
    with bench.Reused(load_tensors(tuned)).apply(lm):
        plain = generate(lm, prompts, max_new_tokens=tokens, batch_size=8)
        with d.apply(lm):
            ablated = generate(lm, prompts, max_new_tokens=tokens, batch_size=8)
    for p, a, b in zip(prompts, plain, ablated):
        print(">>", p)
        print("   plain:  ", a.replace("\n", " "))
        print("   ablated:", b.replace("\n", " "))


if __name__ == "__main__":
    main()
