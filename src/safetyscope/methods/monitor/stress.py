"""Stress tests at fitting time: harm readers chosen to keep reading harm when refusal is removed.

An attacker who removes refusal ablates a refusal direction (hooks, or an orthogonalised checkpoint).
That changes the residual stream everywhere downstream, and a harm reader fitted on the unmodified
model reads the change as "less harmful": its ranking survives, but every score moves down past the
calibrated threshold (on the default model the late-block readers lost all their detections). So the
monitor simulates such attacks on its own fitting prompts, never on calibration or test prompts:

1. **stress directions**: the difference of means (harmful - harmless train prompts) at the last
   post-instruction token of a few monitored blocks (``stress``: "auto" = 1/4, 1/2 and 3/4 of the
   monitored range; "quick" = the middle block; or explicit blocks);
2. a subset of the train prompts (``n_stress`` per group) and all validation prompts are read again
   with each direction ablated (:class:`~..direction.artifact.Direction` hooks, full ablation);
3. **erasure**: each reader is made orthogonal, at its own site, to the stress directions and to the
   mean shift each ablation causes there (harmful and harmless prompts separately), so neither the
   direct removal nor the average downstream change moves its score (training on the ablated prompts
   as well was tried and dropped: on the built-in development prompts it kept fewer detections under
   the block-19 ablation, 0.23 against 0.77 without it);
4. **selection** by the worst case over conditions (clean and each stress ablation) of the
   validation harmful prompts' detection rate at the highest harmless validation score, then
   validation AUROC.

Cost: ``len(blocks) * (2 * n_stress + n_val)`` extra forward passes at fitting time; none at run time.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ...models.adapter import LoadedModel
from .fit_features import Features, collect

StressSpec = str | Sequence[int]


def stress_blocks(spec: StressSpec, layers: Sequence[int]) -> tuple[int, ...]:
    """The blocks (among the monitored ``layers``) whose refusal candidate is ablated: "auto" (the monitored
    blocks at 1/4, 1/2 and 3/4 of the range), "quick" (the middle one), "none", or block numbers."""
    ordered = sorted(int(v) for v in layers)
    if isinstance(spec, str):
        if spec in ("none", ""):
            return ()
        if spec in ("auto", "quick"):
            usable = [v for v in ordered if v > 0] or ordered  # block 0's input is the embedding: nothing upstream
            fractions = (0.5,) if spec == "quick" else (0.25, 0.5, 0.75)
            return tuple(sorted({usable[round(f * (len(usable) - 1))] for f in fractions})) if usable else ()
        try:
            spec = [int(v) for v in spec.split(",") if v.strip()]
        except ValueError:
            raise ValueError(f"stress must be auto, quick, none or block numbers like 6,12,18; not {spec!r}") from None
    blocks = tuple(sorted({int(v) for v in spec}))
    bad = [b for b in blocks if b not in ordered]
    if bad:
        raise ValueError(f"stress blocks {bad} are outside the monitored blocks {ordered[0]}-{ordered[-1]}; "
                         "pick blocks among them (or widen --layers)")
    return blocks


@dataclass(frozen=True)
class Stress:
    """Fitting prompts read again under each simulated refusal-direction ablation."""

    blocks: tuple[int, ...]
    directions: np.ndarray  # [k, d_model] unit difference-of-means directions (last post-instruction token)
    rows: np.ndarray  # [m] indices (into the fitting prompts) of the prompts read under ablation
    feats: tuple[Features, ...]  # one per block: features of ``rows`` under that block's ablation

    def of_rows(self, wanted: np.ndarray) -> np.ndarray:
        """Positions in ``rows`` of the fitting-prompt indices ``wanted`` that were read under ablation."""
        where = {int(r): i for i, r in enumerate(self.rows)}
        return np.array([where[int(w)] for w in wanted if int(w) in where], dtype=int)


def stress_rows(y: np.ndarray, tr: np.ndarray, va: np.ndarray, n_stress: int, seed: int) -> np.ndarray:
    """Up to ``n_stress`` train prompts per group (seeded) and every validation prompt."""
    rng = np.random.default_rng(seed + 7)
    picked = []
    for label in (1, 0):
        pool = tr[y[tr] == label]
        picked.append(np.sort(rng.choice(pool, min(n_stress, pool.size), replace=False)))
    return np.concatenate([*picked, va])


def simulate(lm: LoadedModel, texts: Sequence[str], fit: Features, y: np.ndarray, tr: np.ndarray, va: np.ndarray, *,
             blocks: Sequence[int], n_stress: int, seed: int, batch_size: int, system: str | None,
             token_ids: Sequence[int]) -> Stress | None:
    """Read the stress rows of the fitting prompts ``texts`` under each block's refusal-candidate ablation."""
    from ..direction.artifact import Direction

    if not blocks:
        return None
    last = fit.x[:, :, -1]  # [n, n_layers, d_model]: the last post-instruction token
    dirs = []
    for block in blocks:
        j = fit.layers.index(block)
        dom = last[tr][y[tr] == 1, j].astype(np.float64).mean(0) - last[tr][y[tr] == 0, j].astype(np.float64).mean(0)
        dirs.append(dom / (np.linalg.norm(dom) or 1.0))
    rows = stress_rows(y, tr, va, n_stress, seed)
    sub = [texts[int(i)] for i in rows]
    feats = []
    for block, v in zip(blocks, dirs):
        with Direction(torch.from_numpy(v).float(), int(block)).apply(lm):
            feats.append(collect(lm, sub, fit.layers, batch_size=batch_size, system=system, token_ids=token_ids))
    return Stress(tuple(int(b) for b in blocks), np.stack(dirs), rows, tuple(feats))


def orthonormal(vectors: Sequence[np.ndarray], d: int) -> np.ndarray:
    """[k, d] orthonormal rows spanning ``vectors`` (numerically null ones dropped)."""
    if not vectors:
        return np.zeros((0, d))
    q, r = np.linalg.qr(np.stack(vectors).T)
    diag = np.abs(np.diag(r))
    return q[:, diag > 1e-8 * (diag.max() or 1.0)].T


def site_basis(stress: Stress | None, fit: Features, y: np.ndarray, position: str, j: int,
               protect: np.ndarray) -> np.ndarray:
    """What a reader at (block index ``j``, ``position``) is made orthogonal to: the protected refusal subspace,
    the stress directions and each ablation's mean shift there (harmful and harmless separately)."""
    vecs = list(protect)
    if stress is not None:
        clean = fit.at(position)[stress.rows, j]  # [m, d]
        labels = y[stress.rows]
        vecs += list(stress.directions)
        for f in stress.feats:
            delta = f.at(position)[:, j] - clean  # [m, d]
            vecs += [delta[labels == lab].mean(0) for lab in (1, 0) if (labels == lab).any()]
    return orthonormal(vecs, fit.x.shape[-1])


def worst_case_tpr(scores: Sequence[np.ndarray], y_val: Sequence[np.ndarray], clean_harmless: np.ndarray) -> float:
    """The lowest detection rate of the harmful validation prompts over conditions, at the threshold that
    flags no clean harmless validation prompt (its highest score)."""
    t = float(np.max(clean_harmless)) if clean_harmless.size else 0.0
    rates = [float((s[lab == 1] > t).mean()) for s, lab in zip(scores, y_val) if (lab == 1).any()]
    return min(rates) if rates else float("nan")
