"""Batched scoring of refusal-direction candidates: several candidates share one forward pass.

Each batch row carries its own direction: the prompt list is replicated once per candidate and row ``i``
belongs to candidate ``i // n_prompts``. ``bypass`` / ``kl`` come from one ablation pass over harmful +
harmless prompts, ``induce`` from one activation-addition pass over harmless prompts.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from ...hooks import hooks
from ...measure.compare import logits_under
from ...measure.metrics import kl_divergence, refusal_score
from ...models.adapter import LoadedModel
from ...positions import Batch
from ...prefix import keyed_rows
from ...sites import Site
from .artifact import DirectionFn, ablation_edits, addition_edit, mean_ablation_edits
from .candidates import Candidates
from .scores import CandidateScore, Key, Reason, SelectConfig

Memo = dict[str, dict[str, float]]  # "layer:position" -> scores, as checkpointed to resume


def row_vectors(vectors: torch.Tensor, n: int) -> DirectionFn:
    """Per-row vectors [batch, d_model]: row i of the replicated prompt list belongs to candidate i // n."""
    cache: dict[tuple[int, ...], torch.Tensor] = {}

    def get(batch: Batch | None) -> torch.Tensor:
        if batch is None:
            raise RuntimeError("candidate scoring needs the running batch; run through safetyscope.hooks.forward")
        if batch.index not in cache:
            cache.clear()
            cache[batch.index] = vectors[torch.as_tensor(batch.index) // n]  # [batch, d_model]
        return cache[batch.index]

    return keyed_rows(get, lambda batch: [i // n for i in batch.index])  # rows of one candidate share the prefix


def ablated_logits(lm: LoadedModel, units: torch.Tensor, prompts: list[str], batch_size: int, system: str | None,
                   targets: torch.Tensor | None = None) -> torch.Tensor:
    """[K, n_prompts, vocab] first-token logits with candidate k's unit direction (units [K, d_model]) ablated;
    ``targets`` [K, n_layers]: mean ablation to those projections instead of zero."""
    k, n = units.shape[0], len(prompts)

    @contextmanager
    def ablate() -> Iterator[None]:
        rows = row_vectors(units, n)
        edits = ablation_edits(lm, rows) if targets is None else mean_ablation_edits(lm, rows, row_vectors(targets, n))
        with hooks(lm, edits):
            yield

    return logits_under(lm, prompts * k, ablate, batch_size=batch_size, system=system).view(k, n, -1)


def added_logits(lm: LoadedModel, vectors: torch.Tensor, layers: torch.Tensor, prompts: list[str], batch_size: int,
                 system: str | None) -> torch.Tensor:
    """[K, n_prompts, vocab] first-token logits with candidate k's vector (vectors [K, d_model]) added at
    ``blocks.{layers[k]}.resid_pre``."""
    k, n = vectors.shape[0], len(prompts)

    def at(layer: int) -> DirectionFn:  # zero for rows whose candidate adds at another block
        return row_vectors(vectors * (layers == layer).unsqueeze(-1).to(vectors.dtype), n)

    edits = [(Site("resid_pre", int(layer)), addition_edit(at(int(layer)))) for layer in sorted(set(layers.tolist()))]

    @contextmanager
    def add() -> Iterator[None]:
        with hooks(lm, edits):
            yield

    return logits_under(lm, prompts * k, add, batch_size=batch_size, system=system).view(k, n, -1)


def chunks(items: Sequence[Any], size: int) -> Iterator[list[Any]]:
    for i in range(0, len(items), size):
        yield list(items[i : i + size])


class CandidateScoring:
    """The scores of every candidate of one selection, filled pass by pass and checkpointed as a memo."""

    def __init__(self, lm: LoadedModel, candidates: Candidates, cfg: SelectConfig, token_ids: list[int], *,
                 batch_size: int, system: str | None, done: Memo | None,
                 checkpoint: Callable[[Memo], None] | None, log: Callable[[str], None]):
        self.lm, self.candidates, self.cfg, self.ids = lm, candidates, cfg, token_ids
        self.batch_size, self.system, self.checkpoint, self.say = batch_size, system, checkpoint, log
        self.memo: Memo = {k: dict(v) for k, v in (done or {}).items()}
        self.scores = self._initial_scores()

    def _initial_scores(self) -> dict[Key, CandidateScore]:
        c, cfg = self.candidates, self.cfg
        cutoff = cfg.cutoff(c.n_layers)
        degenerate = c.degenerate()  # [n_layers, n_positions]
        layers = cfg.layers if cfg.layers is not None else list(range(c.n_layers))
        positions = cfg.positions if cfg.positions is not None else list(c.positions)
        scores: dict[Key, CandidateScore] = {}
        for layer in layers:
            for pos in positions:
                col = c.column(pos)
                s = CandidateScore(layer, pos, c.tokens[col], float(c.norms[layer, col]))
                if layer >= cutoff:
                    s.flag(Reason.LATE)
                if bool(degenerate[layer, col]):
                    s.flag(Reason.ZERO)
                for name, value in self.memo.get(f"{layer}:{pos}", {}).items():
                    setattr(s, name, value)
                scores[(layer, pos)] = s
        return scores

    def vec(self, key: Key) -> torch.Tensor:
        return self.candidates.diff[key[0], self.candidates.column(key[1])].float()  # [d_model]

    def per_pass(self, n_prompts: int) -> int:
        return self.cfg.per_pass or max(1, self.batch_size // max(1, n_prompts))

    def record(self, key: Key, **values: float) -> None:
        self.memo.setdefault(f"{key[0]}:{key[1]}", {}).update(values)
        for name, value in values.items():
            setattr(self.scores[key], name, value)

    def save(self) -> None:
        if self.checkpoint:
            self.checkpoint(self.memo)

    def ablation_pass(self, keys: list[Key], harmful: list[str], harmless: list[str], ref: torch.Tensor,
                      screen: bool = False) -> None:
        """bypass on ``harmful`` and KL to ``ref`` [n_harmless, vocab] on ``harmless``, under each key's ablation."""
        prefix = "screen " if screen else ""
        for chunk in chunks(keys, self.per_pass(len(harmful) + len(harmless))):
            units = torch.stack([self.vec(k) / self.vec(k).norm() for k in chunk])  # [K, d_model]
            targets = (torch.stack([self.candidates.targets(*k) for k in chunk])  # [K, n_layers]
                       if self.cfg.ablation == "mean" else None)
            logits = ablated_logits(self.lm, units, harmful + harmless, self.batch_size, self.system, targets)
            for key, row in zip(chunk, logits):  # row: [n, vocab]
                rs = refusal_score(row[: len(harmful)], self.ids)
                kl = float(kl_divergence(ref, row[len(harmful):]).mean())
                if screen:
                    self.record(key, screen_bypass=float(rs.mean()), screen_kl=kl)
                else:
                    self.record(key, bypass=float(rs.mean()), bypass_refusing=float((rs > 0).float().mean()), kl=kl)
                self.say(f"layer {key[0]:>3} pos {key[1]:>3}: {prefix}bypass {float(rs.mean()):+.3f} {prefix}kl {kl:.4f}")
            self.save()

    def induce_pass(self, order: list[Key], harmless: list[str], lazy: bool) -> None:
        """induce on ``harmless`` for the keys in ``order``; ``lazy``: stop after the first chunk with a pass."""
        scores = self.scores
        for chunk in chunks(order, self.per_pass(len(harmless))):
            need = [k for k in chunk if scores[k].induce is None]
            if need:
                vectors = torch.stack([self.vec(k) * self.cfg.coeff for k in need])  # [K, d_model]
                where = torch.tensor([k[0] for k in need])
                logits = added_logits(self.lm, vectors, where, harmless, self.batch_size, self.system)
                for key, row in zip(need, logits):
                    self.record(key, induce=float(refusal_score(row, self.ids).mean()))
                    self.say(f"layer {key[0]:>3} pos {key[1]:>3}: induce {scores[key].induce:+.3f}")
                self.save()
            if lazy and any((v := scores[k].induce) is not None and v >= self.cfg.induce_threshold for k in chunk):
                break
