"""Study, not shipped: on a hardened model, how much refusal does each block's candidate direction leave?

Usage: python scripts/finetune_block_sweep.py TUNED.safetensors POSITION BLOCK [BLOCK ...]
(TUNED from ``benchmarks/finetune.py --save-tuned``.) On the tuned model, the difference-of-means candidate at
each given block and the post-instruction POSITION (64 built-in train prompts per group, as the benchmark's search
uses) is ablated at every block and position, and judged refusal (phrase judge, 48-token greedy replies) is read
on the 20 validation harmful prompts the benchmark measures. It checks blocks the benchmark's fresh search
(``--fresh-layers``) did not look at; unlike that search it does not select, it reports every block.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from finetune_span_check import bench, on_tuned  # noqa: E402


def main() -> None:
    tuned, pos, blocks = sys.argv[1], int(sys.argv[2]), [int(b) for b in sys.argv[3:]]
    t0 = time.time()
    with on_tuned(tuned) as (lm, sets, cands):
        for block in blocks:
            v = cands.direction(block, pos).direction.float()
            rate = bench._refusal(lm, sets["harmful"], 48, 8, bench._ablate_span(lm, v / v.norm()))
            print(f"block {block:2d} position {pos}: harmful refusal {rate:.2f}  ({time.time() - t0:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
