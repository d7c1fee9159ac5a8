"""ROME-style causal tracing with noise corruption (Meng et al. 2022, "Locating and editing factual
associations in GPT").

The harmful prompt's *instruction* tokens (the user's message, not the chat-template tokens) get
Gaussian noise added to their embeddings, ``scale`` (3) times the standard deviation of the clean
embeddings of those tokens (over every token and dimension of the traced prompts). The corrupted run
refuses less; restoring one site (at the post-instruction positions, or at one position) to its
clean value shows how much of the refusal that site carries. Per prompt, averaged over noise
samples::

    indirect effect = s_restored - s_corrupted,   normalised by   s_clean - s_corrupted

(1 = restoring this site alone brings the clean refusal back, 0 = no effect). Restoring the residual
stream at every position would trivially restore everything, so the layer x component grid restores
at the ``span`` positions (post-instruction by default) and per-position grids restore one token.
Every restored variant of every noise sample runs in one batched forward.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from ...hooks import EditFn
from ...positions import Batch
from ...prompts.chat import format_chat
from ...sites import Site
from .exact import COMPONENTS, Effects, ExtraEdits, Job, Pairs, Patch, Tracer, cell_name, run_jobs

_SENTINEL = "\u2063SAFETYSCOPE\u2063"


def prefix_length(tokenizer: object, system: str | None = None) -> int:
    """Template tokens before the user's message (the system turn, the user header)."""
    text = format_chat(tokenizer, _SENTINEL, system)
    start = text.index(_SENTINEL)
    try:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)  # type: ignore[operator]
        return sum(1 for _s, end in enc["offset_mapping"] if end <= start)
    except (NotImplementedError, ValueError, TypeError):  # slow tokenizers have no offsets
        return len(tokenizer(text[:start], add_special_tokens=False)["input_ids"])  # type: ignore[operator]


def instruction_offsets(batch: Batch, lengths: Sequence[int], n_pre: int) -> list[tuple[int, ...]]:
    """Per row, the negative offsets of the user's message tokens."""
    out = []
    for length in lengths:
        offs = tuple(range(-(length - n_pre), -batch.n_post))
        if not offs:
            raise ValueError("a prompt has no instruction tokens to corrupt; give non-empty prompts")
        out.append(offs)
    return out


Grid = tuple[str, list[str], list[int | None], list[str]]  # (name, components, offsets (None: span), columns)


def _noise(emb: torch.Tensor, instr: Sequence[tuple[int, ...]], samples: int, scale: float,
           seed: int) -> tuple[torch.Tensor, float]:
    """Gaussian noise on the instruction tokens' embeddings, [n, samples, pos, d_model], and its std
    (``scale`` x the std of those clean embeddings). ``emb``: [n, pos, d_model]."""
    n, width = emb.shape[0], emb.shape[1]
    picked = torch.cat([emb[i, [width + o for o in instr[i]]] for i in range(n)]).double()
    std = float(picked.std()) * scale
    gen = torch.Generator().manual_seed(seed)
    noise = torch.zeros(n, samples, width, emb.shape[-1], dtype=torch.float32)
    for i in range(n):
        idx = [width + o for o in instr[i]]
        noise[i, :, idx] = torch.randn(samples, len(idx), emb.shape[-1], generator=gen) * std
    return noise, std


def _corrupter(noise: torch.Tensor) -> ExtraEdits:
    """Extra edits adding each job's noise sample (``job.key``) to the embeddings of its row."""
    def extra(chunk: Sequence[Job], sub: Batch) -> Mapping[Site, EditFn]:
        add = noise[torch.tensor([j.row for j in chunk]), torch.tensor([j.key for j in chunk])]  # [rows, pos, d_model]

        def corrupt(x: torch.Tensor, _b: Batch | None) -> torch.Tensor | None:
            if x.shape[1] != sub.seq_len:
                return None
            return x + add.to(device=x.device, dtype=x.dtype)

        return {Site("embed"): corrupt}

    return extra


def _restore_jobs(pairs: Pairs, grids: Sequence[Grid], layers: Sequence[int], samples: int,
                  span: str) -> tuple[list[Job], list[tuple[int, int, int, int, int]]]:
    """The corrupted runs (one per pair and sample), then every restored variant, and where each variant goes
    ((grid, pair, row, column, sample) per restored job)."""
    n = len(pairs)
    jobs = [Job(i, (), s) for i in range(n) for s in range(samples)]
    where: list[tuple[int, int, int, int, int]] = []
    for g, (_name, comps, offs, _cols) in enumerate(grids):
        for i in range(n):
            ok = set(pairs.offsets(i, "all"))
            for r, layer in enumerate(layers):
                for c, (comp, off) in enumerate((cp, of) for cp in comps for of in offs):
                    if off is not None and off not in ok:
                        continue
                    patch = Patch(Site(comp, layer), pairs.offsets(i, span) if off is None else (off,))
                    for s in range(samples):
                        jobs.append(Job(i, (patch,), s))
                        where.append((g, i, r, c, s))
    return jobs, where


def noise_trace(
    tracer: Tracer,
    components: Sequence[str] = COMPONENTS,
    layers: Sequence[int] | None = None,
    *,
    samples: int = 4,
    scale: float = 3.0,
    span: str = "post_instruction",
    position_components: Sequence[str] = (),
    seed: int = 0,
    system: str | None = None,
) -> dict[str, Any]:
    """Noise-corruption tracing of the harmful prompts of ``tracer.pairs``.

    Returns ``{"component": Effects, "position:<c>": Effects..., "clean": [n], "corrupted": [n, samples],
    "noise_std": float}``; the effects' ``gap`` is ``s_clean - mean(s_corrupted)``.
    """
    lm, pairs = tracer.lm, tracer.pairs
    layers = list(range(lm.n_layers)) if layers is None else list(layers)
    if samples < 1 or scale <= 0:
        raise ValueError("noise tracing needs --noise-samples >= 1 and --noise-scale > 0")
    n_pre = prefix_length(lm.tokenizer, system)
    sites = [Site(c, layer) for layer in layers for c in dict.fromkeys([*components, *position_components])]
    clean = tracer.runs("harmful", [Site("embed"), *sites])
    n = len(pairs)
    instr = instruction_offsets(clean.batch, pairs.lengths, n_pre)
    noise, std = _noise(clean.values[Site("embed")], instr, samples, scale, seed)
    grids: list[Grid] = [("component", list(components), [None], list(components))]
    offsets: list[int | None] = [*sorted(set().union(*(pairs.offsets(i, "all") for i in range(n))))]
    grids += [(f"position:{c}", [c], offsets, [str(o) for o in offsets]) for c in position_components]
    jobs, where = _restore_jobs(pairs, grids, layers, samples, span)
    scores = run_jobs(lm, clean.batch, clean, jobs, tracer.token_ids, batch_size=tracer.batch_size,
                      extra=_corrupter(noise), description="noise tracing").double().numpy()
    corrupted = scores[: n * samples].reshape(n, samples)
    gap = clean.scores.double().numpy() - corrupted.mean(1)
    out: dict[str, Any] = {"clean": clean.scores, "corrupted": corrupted, "noise_std": std, "n_prefix_tokens": n_pre}
    for g, (name, comps, offs, cols) in enumerate(grids):
        raw = np.zeros((n, len(layers), len(cols), samples))
        seen = np.zeros((n, len(layers), len(cols)), dtype=bool)
        for (gg, i, r, c, s), v in zip(where, scores[n * samples:]):
            if gg == g:
                raw[i, r, c, s] = v - corrupted[i, s]
                seen[i, r, c] = True
        labels = [[cell_name(Site(cp, layer), None, of) for cp in comps for of in offs] for layer in layers]
        note = (f"noise {scale}x embedding std on the instruction tokens, {samples} sample(s); restored at "
                + (pairs.alignment_note(span).split("patched at ", 1)[-1] if name == "component" else "one position"))
        out[name] = Effects(f"noise:{name}", "clean->corrupted", [str(x) for x in layers], cols,
                            np.where(seen, raw.mean(-1), np.nan), gap, tracer.min_gap, note, sign=1, labels=labels)
    return out
