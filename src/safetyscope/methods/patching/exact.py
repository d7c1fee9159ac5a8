"""Exact activation patching of the logit refusal score (causal tracing), batched.

A *pair* is a harmful prompt and a harmless one. In the forward direction the harmful run (the
*base*) is rerun with one site's activation replaced by the harmless run's (the *source*); the
reverse direction patches harmful activations into the harmless run. The effect of a patch is
normalised per pair::

    effect = (s_patched - s_base) / (s_source - s_base)

with ``s`` the logit refusal score (:func:`safetyscope.measure.metrics.refusal_score`): 1 = the
patched run scores like the source run (fully harmless-like in the forward direction), 0 = unchanged.
Pairs whose gap ``s_source - s_base`` is below ``min_gap`` in the expected direction are left out
of the normalised summary (the raw changes are kept); the summary is the median over pairs (robust
to one pair with a small gap), with the mean, the pooled ratio and the quartiles beside it.

Sites and positions (documented choices):
  * components are site kinds: ``resid_pre`` (the residual stream entering block l, as in
    TransformerLens' ``resid_pre`` patching), ``attn.out`` and ``mlp.out``; heads patch one head's
    slice of ``attn.heads`` (the input of the attention output projection).
  * *aligned* pairs (same token length, the built-in minimal pairs) can be patched at any position;
    *unaligned* pairs only at the post-instruction template tokens, which both runs share.
  * the layer x component and layer x head grids patch the ``span``: ``post_instruction`` (default;
    comparable between aligned and unaligned pairs and not trivial for the residual stream) or
    ``all`` (every token of aligned pairs: then the residual column is 1 at every layer by
    construction; unaligned pairs still get the post-instruction tokens) or ``last``.
  * per-position patching patches one position (negative offset from the end) at a time.

Results are :class:`~safetyscope.methods.patching.effects.Effects` (re-exported here); attribution
patching (``attribution.py``) and noise tracing (``noise.py``) return the same type.

Many patch variants run in one batched forward: the base prompt's row is repeated once per
variant and each row gets its own site / position / head through index-assigning edit functions.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from ...hooks import EditFn, capture, forward, hooks
from ...measure.metrics import refusal_score
from ...measure.refusal_tokens import refusal_token_ids
from ...models.adapter import LoadedModel
from ...positions import Batch
from ...progress import progress_bar
from ...prompts.chat import tokenize_prompts
from ...sites import Site
from .effects import Effects, cell_name, parse_cell

__all__ = ["COMPONENTS", "FORWARD", "REVERSE", "SPANS", "Effects", "Job", "Pairs", "Patch", "Runs", "Tracer",
           "capture_runs", "cell_name", "make_pairs", "parse_cell", "patch_edits", "run_jobs", "score_logits"]

COMPONENTS: tuple[str, ...] = ("resid_pre", "attn.out", "mlp.out")
SPANS: tuple[str, ...] = ("post_instruction", "all", "last")
FORWARD, REVERSE = "harmless->harmful", "harmful->harmless"


def score_logits(logits: torch.Tensor, token_ids: Sequence[int]) -> torch.Tensor:
    """:func:`safetyscope.measure.metrics.refusal_score`, differentiable and in float64, [B] from [B, V]:
    float64 keeps small patching effects above the float32 rounding of the score."""
    return refusal_score(logits, token_ids, grad=True, dtype=torch.float64)


@dataclass(frozen=True)
class Patch:
    """Replace ``site`` (one head of it when ``head`` is set) at ``offsets`` (negative, from the end)."""

    site: Site
    offsets: tuple[int, ...]
    head: int | None = None


@dataclass(frozen=True)
class Job:
    """One row of a batched patched run: base row ``row`` with ``patches`` applied together."""

    row: int
    patches: tuple[Patch, ...] = ()
    key: int = 0  # free tag read by extra per-row edits (e.g. the noise sample in noise.py)


@dataclass
class Runs:
    """Activations of some runs at every position, and their refusal scores."""

    batch: Batch
    values: dict[Site, torch.Tensor]  # site -> [n, pos, *site_shape] (on the site's device)
    scores: torch.Tensor  # [n] float64 CPU


def capture_runs(lm: LoadedModel, batch: Batch, sites: Iterable[Site], token_ids: Sequence[int], *, batch_size: int = 16) -> Runs:
    """One forward pass per chunk of rows captures every site at every position."""
    sites = list(dict.fromkeys(sites))
    parts: dict[Site, list[torch.Tensor]] = {s: [] for s in sites}
    scores = []
    for lo in range(0, len(batch), batch_size):
        sub = batch.select(range(lo, min(lo + batch_size, len(batch))))
        with torch.inference_mode(), capture(lm, sites, "all") as cap:
            logits = forward(lm, sub, last_only=True)  # [rows, 1, vocab]
        cap.check_finite()
        scores.append(score_logits(logits[:, -1], token_ids).cpu())
        for s in sites:
            parts[s].append(cap.values[s])
    return Runs(batch, {s: torch.cat(v) for s, v in parts.items()}, torch.cat(scores))


def patch_edits(jobs: Sequence[Job], width: int, source: Runs) -> dict[Site, EditFn]:
    """Edit functions that give row ``r`` of a run of width ``width`` the patches of ``jobs[r]``."""
    entries: dict[tuple[Site, bool], list[tuple[int, int, int, int, int]]] = {}
    w_src = source.batch.seq_len
    for r, job in enumerate(jobs):
        for p in job.patches:
            for o in p.offsets:
                entries.setdefault((p.site, p.head is not None), []).append(
                    (r, width + o, job.row, w_src + o, p.head if p.head is not None else 0)
                )
    grouped: dict[Site, list[tuple[tuple[torch.Tensor, ...], torch.Tensor]]] = {}
    for (site, by_head), ent in entries.items():
        rows, cols, src_rows, src_cols, heads = (torch.tensor(c) for c in zip(*ent))
        src = source.values[site]  # [n, pos, *shape]
        dev = src.device
        if by_head:  # vals: [n_entries, d_head]
            vals = src[src_rows.to(dev), src_cols.to(dev), heads.to(dev)]
            grouped.setdefault(site, []).append(((rows, cols, heads), vals))
        else:  # vals: [n_entries, *shape]
            grouped.setdefault(site, []).append(((rows, cols), src[src_rows.to(dev), src_cols.to(dev)]))

    def make(groups: list[tuple[tuple[torch.Tensor, ...], torch.Tensor]]) -> EditFn:
        def edit(x: torch.Tensor, _batch: Batch | None) -> torch.Tensor | None:
            if x.shape[1] != width:  # a generation step with the KV cache: the prompt is already patched
                return None
            y = x.clone()
            for idx, vals in groups:
                y[tuple(i.to(y.device) for i in idx)] = vals.to(device=y.device, dtype=y.dtype)
            return y

        return edit

    return {site: make(g) for site, g in grouped.items()}


ExtraEdits = Callable[[Sequence[Job], Batch], Mapping[Site, EditFn]]


def run_jobs(
    lm: LoadedModel,
    base: Batch,
    source: Runs,
    jobs: Sequence[Job],
    token_ids: Sequence[int],
    *,
    batch_size: int = 32,
    extra: ExtraEdits | None = None,
    return_logits: bool = False,
    description: str = "patching",
) -> torch.Tensor:
    """Refusal score of every job, [n_jobs] (next-token logits [n_jobs, vocab] with ``return_logits``).

    Jobs run ``batch_size`` rows per forward pass; ``extra(chunk_jobs, chunk_batch)`` may add edits
    (e.g. embedding noise) that apply to every row of a chunk.
    """
    out: list[torch.Tensor] = []
    with progress_bar(len(jobs), description) as advance:
        for lo in range(0, len(jobs), batch_size):
            chunk = list(jobs[lo : lo + batch_size])
            sub = base.select([j.row for j in chunk])
            edits = list(patch_edits(chunk, sub.seq_len, source).items())
            if extra is not None:
                edits = list(extra(chunk, sub).items()) + edits
            with torch.inference_mode(), hooks(lm, edits):
                logits = forward(lm, sub, last_only=True)[:, -1]  # [rows, vocab]
            out.append(logits.float().cpu() if return_logits else score_logits(logits, token_ids).cpu())
            advance(len(chunk))
    return torch.cat(out)


# ---- pairs ------------------------------------------------------------------------------------
@dataclass
class Pairs:
    """Tokenised harmful/harmless pairs; row i of both batches is pair i."""

    harmful: Batch
    harmless: Batch
    aligned: list[bool]  # same token length and built as twins: every position is comparable
    lengths: list[int]  # real tokens of the harmful prompt of each pair
    ids: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.aligned)

    @property
    def n_post(self) -> int:
        return self.harmful.n_post

    def offsets(self, i: int, span: str = "all") -> tuple[int, ...]:
        """Patchable negative offsets of pair i: all its tokens if aligned, else the post-instruction ones."""
        if span == "last":
            return (-1,)
        if span == "post_instruction" or not self.aligned[i]:
            return tuple(range(-self.n_post, 0))
        if span == "all":
            return tuple(range(-self.lengths[i], 0))
        raise ValueError(f"unknown span {span!r}; use {', '.join(SPANS)}")

    def alignment_note(self, span: str) -> str:
        n_al = sum(self.aligned)
        n_un = len(self) - n_al
        if span == "all" and n_un:
            return (f"{n_al} aligned pair(s) patched at every token; {n_un} unaligned pair(s) patched at the "
                    f"{self.n_post} post-instruction tokens only")
        where = {"last": "the last token", "all": "every token"}.get(span, f"the {self.n_post} post-instruction tokens")
        return f"{len(self)} pair(s) ({n_al} aligned, {n_un} unaligned) patched at {where}"


def make_pairs(
    lm: LoadedModel, pairs: Sequence[tuple[str, str]], *, system: str | None = None, aligned: bool | None = None,
    ids: Sequence[str] = (),
) -> Pairs:
    """Tokenise (harmful, harmless) pairs. ``aligned=None``: a pair is aligned when its prompts have the
    same token length (right for template twins such as ``minimal_pairs()``); False forces unaligned."""
    if not pairs:
        raise ValueError("no prompt pairs to trace; give at least one (harmful, harmless) pair")
    max_len = lm.dims.max_positions
    h = tokenize_prompts(lm.tokenizer, [p[0] for p in pairs], system=system, max_length=max_len)
    s = tokenize_prompts(lm.tokenizer, [p[1] for p in pairs], system=system, max_length=max_len)
    len_h = h.attention_mask.sum(1).tolist()
    len_s = s.attention_mask.sum(1).tolist()
    al = [aligned is not False and a == b for a, b in zip(len_h, len_s)]
    return Pairs(h, s, al, [int(x) for x in len_h], list(ids) or [str(i) for i in range(len(pairs))])


# ---- the exact tracer -------------------------------------------------------------------------
class Tracer:
    """Exact patching on a set of pairs; caches the clean runs of both directions."""

    def __init__(self, lm: LoadedModel, pairs: Pairs, *, token_ids: Sequence[int] | None = None,
                 batch_size: int = 32, min_gap: float = 1.0) -> None:
        self.lm, self.pairs, self.batch_size, self.min_gap = lm, pairs, batch_size, min_gap
        self.token_ids = list(token_ids) if token_ids is not None else refusal_token_ids(lm.tokenizer)
        self._runs: dict[str, Runs] = {}

    def runs(self, which: str, sites: Iterable[Site] = ()) -> Runs:
        """Clean runs of ``harmful`` or ``harmless`` with (at least) ``sites`` captured."""
        have = self._runs.get(which)
        need = [s for s in sites if have is None or s not in have.values]
        if have is None or need:
            batch = self.pairs.harmful if which == "harmful" else self.pairs.harmless
            new = capture_runs(self.lm, batch, need or [Site("resid_pre", 0)], self.token_ids, batch_size=self.batch_size)
            if have is not None:
                new.values = {**have.values, **new.values}
            self._runs[which] = new
        return self._runs[which]

    def roles(self, reverse: bool) -> tuple[str, str]:
        return ("harmless", "harmful") if reverse else ("harmful", "harmless")  # (base, source)

    def gap(self, reverse: bool = False) -> np.ndarray:
        base, src = self.roles(reverse)
        return (self.runs(src).scores - self.runs(base).scores).double().numpy()

    def run(self, jobs: Sequence[Job], *, reverse: bool = False, return_logits: bool = False,
            description: str = "patching") -> torch.Tensor:
        """Scores (or last logits) of base runs patched from the source runs, [n_jobs]."""
        base, src = self.roles(reverse)
        sites = {p.site for j in jobs for p in j.patches}
        source = self.runs(src, sites)
        return run_jobs(self.lm, self.runs(base).batch, source, jobs, self.token_ids, batch_size=self.batch_size,
                        return_logits=return_logits, description=description)

    def grid(self, name: str, rows: list[str], cols: list[str], cells: Callable[[int, int, int], Patch | None],
             *, reverse: bool = False, note: str = "") -> Effects:
        """Patch every cell (r, c) of every pair i given by ``cells(i, r, c)`` (None: undefined)."""
        jobs, where = [], []
        for i in range(len(self.pairs)):
            for r in range(len(rows)):
                for c in range(len(cols)):
                    patch = cells(i, r, c)
                    if patch is not None:
                        jobs.append(Job(i, (patch,)))
                        where.append((i, r, c))
        scores = self.run(jobs, reverse=reverse, description=f"patching {name}").double().numpy()
        base = self.runs(self.roles(reverse)[0]).scores.double().numpy()
        raw = np.full((len(self.pairs), len(rows), len(cols)), np.nan)
        for (i, r, c), s in zip(where, scores):
            raw[i, r, c] = s - base[i]
        return Effects(name, REVERSE if reverse else FORWARD, rows, cols, raw, self.gap(reverse), self.min_gap, note,
                       sign=1 if reverse else -1)

    def components(self, components: Sequence[str] = COMPONENTS, layers: Sequence[int] | None = None, *,
                   span: str = "post_instruction", reverse: bool = False) -> Effects:
        """Layer x component grid: each site patched at the pair's ``span`` positions."""
        layers = list(range(self.lm.n_layers)) if layers is None else list(layers)
        eff = self.grid("component", [str(x) for x in layers], list(components),
                        lambda i, r, c: Patch(Site(components[c], layers[r]), self.pairs.offsets(i, span)),
                        reverse=reverse, note=self.pairs.alignment_note(span))
        eff.labels = [[cell_name(Site(c, layer)) for c in components] for layer in layers]
        return eff

    def heads(self, layers: Sequence[int] | None = None, *, span: str = "post_instruction", reverse: bool = False) -> Effects:
        """Layer x head grid: one head's slice of ``attn.heads`` patched at the ``span`` positions."""
        layers = list(range(self.lm.n_layers)) if layers is None else list(layers)
        n_heads = self.lm.dims.n_heads
        eff = self.grid("head", [str(x) for x in layers], [str(h) for h in range(n_heads)],
                        lambda i, r, c: Patch(Site("attn.heads", layers[r]), self.pairs.offsets(i, span), c),
                        reverse=reverse, note=self.pairs.alignment_note(span))
        eff.labels = [[cell_name(Site("attn.heads", layer), h) for h in range(n_heads)] for layer in layers]
        return eff

    def positions(self, component: str = "resid_pre", layers: Sequence[int] | None = None, *,
                  span: str = "all", reverse: bool = False) -> Effects:
        """Layer x position grid (offsets from the end) for one component, one position of ``span`` at a time."""
        layers = list(range(self.lm.n_layers)) if layers is None else list(layers)
        per_pair = [set(self.pairs.offsets(i, span)) for i in range(len(self.pairs))]
        offsets = sorted(set().union(*per_pair))
        eff = self.grid(f"position:{component}", [str(x) for x in layers], [str(o) for o in offsets],
                        lambda i, r, c: Patch(Site(component, layers[r]), (offsets[c],)) if offsets[c] in per_pair[i] else None,
                        reverse=reverse, note=self.pairs.alignment_note(span) + "; one position at a time")
        eff.labels = [[cell_name(Site(component, layer), None, o) for o in offsets] for layer in layers]
        return eff

    def cells(self, names: Sequence[str], *, span: str = "post_instruction", reverse: bool = False) -> Effects:
        """Exact effects of named cells (``cell_name`` format), e.g. the top cells of attribution patching."""
        parsed = [parse_cell(n, self.lm.n_layers) for n in names]

        def cell(i: int, _r: int, c: int) -> Patch | None:
            site, head, off = parsed[c]
            offs = self.pairs.offsets(i, span) if off is None else (off,)
            return None if off is not None and off not in self.pairs.offsets(i, "all") else Patch(site, offs, head)

        eff = self.grid("cells", ["exact"], list(names), cell, reverse=reverse, note=self.pairs.alignment_note(span))
        eff.labels = [list(names)]
        return eff
