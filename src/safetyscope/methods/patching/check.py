"""Do the top patches change real replies? Greedy generation of the harmful prompts under each cell's patch,
judged by the phrase judge (the refusal score is a first-token proxy; this checks the replies)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ...hooks import EditFn, hooks
from ...measure.generation import generate_batch
from ...measure.judges import PhraseJudge
from ...sites import Site
from .exact import Job, Patch, Tracer, parse_cell, patch_edits


def _replies(tr: Tracer, cell: str | None, *, span: str, max_new_tokens: int, batch_size: int) -> list[str]:
    """Greedy replies of the pairs' harmful prompts, with ``cell`` patched from the harmless runs (None: unpatched)."""
    pairs = tr.pairs
    out: list[str] = []
    for lo in range(0, len(pairs), batch_size):
        rows = list(range(lo, min(lo + batch_size, len(pairs))))
        sub = pairs.harmful.select(rows)
        edits: dict[Site, EditFn] = {}
        if cell is not None:
            site, head, off = parse_cell(cell, tr.lm.n_layers)
            jobs = [Job(i, (Patch(site, pairs.offsets(i, span) if off is None else (off,), head),)) for i in rows]
            edits = patch_edits(jobs, sub.seq_len, tr.runs("harmless", [site]))
        with hooks(tr.lm, edits):
            out += generate_batch(tr.lm, sub, max_new_tokens)
    return out


def harmless_replies(tr: Tracer, batch_size: int, max_new_tokens: int) -> list[str]:
    """Greedy replies of the pairs' harmless prompts, unpatched."""
    out: list[str] = []
    for lo in range(0, len(tr.pairs), batch_size):
        out += generate_batch(tr.lm, tr.pairs.harmless.select(range(lo, min(lo + batch_size, len(tr.pairs)))), max_new_tokens)
    return out


def generation_check(tr: Tracer, cells: Sequence[str], *, span: str, max_new_tokens: int, batch_size: int) -> dict[str, Any]:
    """Refusal rate (phrase judge) of the harmful prompts' replies unpatched and under each cell's patch, and of
    the harmless prompts' replies: ``{"rows": [{"cell", "refusal_rate", "replies"}], "harmless_refusal_rate", "judge"}``."""
    judge, texts = PhraseJudge(), list(tr.pairs.harmful.texts)
    rows = []
    for cell in [None, *cells]:
        rep = _replies(tr, cell, span=span, max_new_tokens=max_new_tokens, batch_size=batch_size)
        refused = [judge(p, r) for p, r in zip(texts, rep)]
        rows.append({"cell": cell or "(unpatched harmful)", "refusal_rate": float(np.mean(refused)), "replies": rep})
    harmless = [judge(p, r) for p, r in zip(tr.pairs.harmless.texts, harmless_replies(tr, batch_size, max_new_tokens))]
    return {"rows": rows, "harmless_refusal_rate": float(np.mean(harmless)), "judge": "PhraseJudge"}
