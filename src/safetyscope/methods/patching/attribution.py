"""Attribution patching: a first-order estimate of every patching effect from one forward and one
backward pass per batch of pairs (Nanda 2023, "Attribution patching"; Syed et al. 2023).

For a site with activation ``a`` in the base run and ``a'`` in the source run, patching changes the
refusal score by approximately ``(a' - a) . d s / d a`` (summed over the patched positions and the
site's features). The base and source prompts of a pair run as two rows of ONE forward pass (which
captures both runs' activations everywhere), and one backward pass of the base rows' scores gives
the gradient at every site, position and head at once: the whole layer x component, layer x
position and layer x head grids cost one forward and one backward pass per batch of pairs. The estimates are returned as :class:`Effects` with the
same layout and normalisation as exact patching, so they can be compared cell by cell
(:func:`agreement`), and the top cells of the full grid can be checked exactly (:func:`verify_top`).

Heads: ``capture(..., grad=True)`` records gradients on the tensor the model uses; the per-head view
of ``attn.heads`` is not on the graph, so head gradients are recorded here by a pass-through edit
of ``attn.heads`` (a clone that the model then uses).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import numpy as np
import torch

from ...hooks import EditFn, capture, forward, hooks
from ...positions import Batch
from ...prompts.chat import pad_token_id
from ...sites import Site
from .exact import COMPONENTS, FORWARD, REVERSE, Effects, Pairs, Tracer, cell_name
from .exact import score_logits as score_with_grad


def _head_probes(layers: Sequence[int], vals: dict[Site, torch.Tensor], grads: dict[Site, torch.Tensor]) -> dict[Site, EditFn]:
    def make(site: Site) -> EditFn:
        def fn(x: torch.Tensor, _b: Batch | None) -> torch.Tensor:  # x: [batch, pos, n_heads, d_head]
            y = x.clone()
            vals[site] = y.detach()
            if y.requires_grad:
                y.register_hook(lambda g: grads.__setitem__(site, g.detach()))
            return y

        return fn

    return {Site("attn.heads", layer): make(Site("attn.heads", layer)) for layer in layers}


def _stack(a: Batch, b: Batch, width: int, tokenizer: object) -> Batch:
    """Rows of ``a`` then rows of ``b`` in one batch, left padded to ``width``."""
    pad = pad_token_id(tokenizer)

    def widen(x: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        extra = width - x.seq_len
        ids = torch.nn.functional.pad(x.input_ids, (extra, 0), value=int(pad))
        return ids, torch.nn.functional.pad(x.attention_mask, (extra, 0), value=0)

    (ia, ma), (ib, mb) = widen(a), widen(b)
    return replace(a, input_ids=torch.cat([ia, ib]), attention_mask=torch.cat([ma, mb]), texts=a.texts + b.texts,
                   index=tuple(range(len(a) + len(b))))


def _per_position(src: torch.Tensor, base: torch.Tensor, grad: torch.Tensor, k: int) -> torch.Tensor:
    """(a_src - a_base) . grad over the last k positions: [rows, k] (or [rows, k, n_heads])."""
    d = src[:, -k:].to(device=grad.device, dtype=torch.float64) - base[:, -k:].double()
    return (d * grad[:, -k:].double()).sum(-1).cpu()


def _estimates(tracer: Tracer, sites: Sequence[Site], head_layers: Sequence[int], reverse: bool,
               k: int) -> tuple[dict[Site, torch.Tensor], np.ndarray]:
    """Per-position estimates {site: [n_pairs, k] (heads: [n_pairs, k, n_heads])} and the gap per pair, from one
    forward pass of base + source rows and one backward pass of the base rows' scores per chunk of pairs."""
    lm, pairs = tracer.lm, tracer.pairs
    base, source = (pairs.harmless, pairs.harmful) if reverse else (pairs.harmful, pairs.harmless)
    comp_sites = [s for s in sites if s.kind != "attn.heads"]
    pos_est: dict[Site, list[torch.Tensor]] = {}  # site -> chunks of [rows, k] (heads: [rows, k, n_heads])
    scores: list[torch.Tensor] = []  # chunks of [2 * rows]: base rows, then source rows
    step = max(1, tracer.batch_size // 2)
    for lo in range(0, len(pairs), step):
        rows = list(range(lo, min(lo + step, len(pairs))))
        r = len(rows)
        joint = _stack(base.select(rows), source.select(rows), k, lm.tokenizer)  # [2r, k]
        vals: dict[Site, torch.Tensor] = {}
        grads: dict[Site, torch.Tensor] = {}
        with torch.enable_grad(), capture(lm, comp_sites, "all", grad=True) as cap, hooks(
            lm, _head_probes(head_layers, vals, grads)
        ):
            logits = forward(lm, joint, last_only=True)[:, -1]  # [2r, vocab]
            s = score_with_grad(logits, tracer.token_ids)  # [2r]
            s[:r].sum().backward()  # base rows are independent: each gets its own score's gradient
        scores.append(s.detach().cpu())
        vals.update(cap.values)
        grads.update(cap.grads)
        for site in sites:
            pos_est.setdefault(site, []).append(_per_position(vals[site][r:], vals[site][:r], grads[site][:r], k))
        del vals, grads, cap, logits, s
    base_scores = torch.cat([c[: len(c) // 2] for c in scores])
    source_scores = torch.cat([c[len(c) // 2 :] for c in scores])
    return {site: torch.cat(parts) for site, parts in pos_est.items()}, (source_scores - base_scores).double().numpy()


def attribute(
    tracer: Tracer,
    components: Sequence[str] = COMPONENTS,
    layers: Sequence[int] | None = None,
    *,
    span: str = "post_instruction",
    heads: bool = True,
    positions: bool = True,
    reverse: bool = False,
) -> dict[str, Effects]:
    """Attribution estimates: ``component`` (layer x component at ``span``), ``head`` (layer x head)
    and ``position:<component>`` (layer x position offset) grids, each an :class:`Effects`."""
    lm, pairs = tracer.lm, tracer.pairs
    layers = list(range(lm.n_layers)) if layers is None else list(layers)
    head_sites = [Site("attn.heads", layer) for layer in layers] if heads else []
    k = max(pairs.harmful.seq_len, pairs.harmless.seq_len)  # both runs are left padded to this width
    est, gap = _estimates(tracer, [*(Site(c, layer) for layer in layers for c in components), *head_sites],
                          layers if heads else [], reverse, k)
    direction, sign = (REVERSE, 1) if reverse else (FORWARD, -1)
    n, rows = len(pairs), [str(x) for x in layers]
    note = "attribution estimate; " + pairs.alignment_note(span)

    def effects(name: str, cols: list[str], raw: np.ndarray, labels: list[list[str]], note: str = note) -> Effects:
        return Effects(name, direction, rows, cols, raw, gap, tracer.min_gap, note, sign=sign, labels=labels)

    def span_sum(e: torch.Tensor, i: int) -> torch.Tensor:  # e: [n_pairs, k, ...] -> [...]
        return e[i, [k + o for o in pairs.offsets(i, span)]].sum(0)

    raw = np.array([[[float(span_sum(est[Site(c, layer)], i)) for c in components] for layer in layers] for i in range(n)])
    out = {"component": effects("component", list(components), raw,
                                [[cell_name(Site(c, layer)) for c in components] for layer in layers])}
    if heads:
        raw = np.stack([np.stack([span_sum(est[s], i).numpy() for s in head_sites]) for i in range(n)])
        n_heads = lm.dims.n_heads
        out["head"] = effects("head", [str(h) for h in range(n_heads)], raw,
                              [[cell_name(s, h) for h in range(n_heads)] for s in head_sites])
    if positions:
        offsets = sorted(set().union(*(pairs.offsets(i, "all") for i in range(n))))
        pos_note = "attribution estimate; " + pairs.alignment_note("all") + "; one position at a time"
        for c in components:
            out[f"position:{c}"] = effects(f"position:{c}", [str(o) for o in offsets], _position_raw(est, c, layers, offsets, pairs, k),
                                           [[cell_name(Site(c, layer), None, o) for o in offsets] for layer in layers], pos_note)
    return out


def _position_raw(est: dict[Site, torch.Tensor], component: str, layers: Sequence[int], offsets: Sequence[int],
                  pairs: Pairs, k: int) -> np.ndarray:
    """[n_pairs, n_layers, n_offsets] per-position estimates (NaN where a pair has no such position)."""
    n = len(pairs)
    raw = np.full((n, len(layers), len(offsets)), np.nan)
    for i in range(n):
        ok = set(pairs.offsets(i, "all"))
        for j, o in enumerate(offsets):
            if o in ok and -o <= k:
                raw[i, :, j] = [float(est[Site(component, layer)][i, k + o]) for layer in layers]
    return raw


def agreement(exact: Effects, approx: Effects, top: int = 10) -> dict[str, float | int]:
    """Spearman and Pearson correlation of the median effects over the cells both define, and the
    overlap of their top-``top`` cells."""
    from scipy.stats import pearsonr, spearmanr

    a, b = exact.median().ravel(), approx.median().ravel()
    ok = ~(np.isnan(a) | np.isnan(b))
    if ok.sum() < 3:
        return {"n_cells": int(ok.sum()), "spearman": float("nan"), "pearson": float("nan"), "top_overlap": 0}
    names = np.array(exact.cell_names())[ok]
    t = min(top, int(ok.sum()))
    top_a = set(names[np.argsort(-a[ok])[:t]])
    top_b = set(names[np.argsort(-b[ok])[:t]])
    return {
        "n_cells": int(ok.sum()),
        "spearman": float(spearmanr(a[ok], b[ok]).statistic),
        "pearson": float(pearsonr(a[ok], b[ok]).statistic),
        "top_overlap": len(top_a & top_b),
        "top_k": t,
    }


def rank_cells(grids: Sequence[Effects], k: int = 10) -> list[tuple[str, float]]:
    """The ``k`` cells with the largest median effect over several grids (e.g. every attribution grid)."""
    cells: list[tuple[str, float]] = []
    for g in grids:
        cells += [(n, float(v)) for n, v in zip(g.cell_names(), g.median().ravel()) if not np.isnan(v)]
    return sorted(cells, key=lambda c: -c[1])[:k]


def verify_top(tracer: Tracer, grids: Sequence[Effects], k: int = 10, *, span: str = "post_instruction",
               reverse: bool = False) -> list[dict[str, object]]:
    """Rank every estimated cell, then patch the top ``k`` exactly (one batched run)."""
    top = rank_cells(grids, k)
    if not top:
        return []
    exact = tracer.cells([n for n, _ in top], span=span, reverse=reverse)
    med, mean = exact.median()[0], exact.mean()[0]
    return [{"cell": n, "attribution": est, "exact_median": float(m), "exact_mean": float(mu)}
            for (n, est), m, mu in zip(top, med, mean)]
