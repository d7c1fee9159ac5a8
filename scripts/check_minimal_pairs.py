#!/usr/bin/env python
"""Check that every built-in minimal pair tokenizes to the same length under the default tokenizer.

Both the raw texts and their chat-templated forms (user turn + generation prompt) must have equal
token counts. Offending pairs are printed with their tokens; the exit status is 1 if any fail.

Usage:
    python scripts/check_minimal_pairs.py [--model-dir /tmp/ss] [--gguf default.gguf] [--pairs FILE]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

DEFAULT_PAIRS = Path(__file__).resolve().parents[1] / "src/safetyscope/prompts/data/minimal_pairs.jsonl"
CAPABILITY = DEFAULT_PAIRS.with_name("capability.jsonl")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", default="/tmp/ss", help="directory holding the GGUF file")
    ap.add_argument("--gguf", default="default.gguf", help="GGUF file name inside --model-dir")
    ap.add_argument("--pairs", type=Path, default=DEFAULT_PAIRS, help="minimal-pairs JSONL to check")
    ap.add_argument("--no-capability", action="store_true", help="skip the capability-text token total")
    args = ap.parse_args(argv)

    from transformers import AutoTokenizer

    t0 = time.time()
    tok = AutoTokenizer.from_pretrained(args.model_dir, gguf_file=args.gguf)
    print(f"tokenizer loaded in {time.time() - t0:.1f}s", file=sys.stderr)

    def n_raw(text: str) -> int:
        return len(tok(text, add_special_tokens=False)["input_ids"])

    def n_chat(text: str) -> int:
        templ = tok.apply_chat_template(
            [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
        )
        return len(tok(templ, add_special_tokens=False)["input_ids"])

    rows = [json.loads(line) for line in args.pairs.read_text(encoding="utf-8").splitlines() if line.strip()]
    bad = 0
    for r in rows:
        h, b = r["harmful"], r["harmless"]
        rh, rb, ch, cb = n_raw(h), n_raw(b), n_chat(h), n_chat(b)
        if rh != rb or ch != cb:
            bad += 1
            print(f"MISMATCH {r['id']}: raw {rh} vs {rb}, chat {ch} vs {cb}")
            print(f"  harmful : {h!r}\n    {tok.tokenize(h)}")
            print(f"  harmless: {b!r}\n    {tok.tokenize(b)}")
    print(f"{len(rows) - bad}/{len(rows)} pairs have equal raw and chat-templated token counts")

    if not args.no_capability and CAPABILITY.exists():
        caps = [json.loads(line) for line in CAPABILITY.read_text(encoding="utf-8").splitlines() if line.strip()]
        total = {k: sum(n_raw(c["text"]) for c in caps if c["kind"] == k) for k in ("prose", "code")}
        print(f"capability texts: {len(caps)} passages, {sum(total.values())} tokens {total}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
