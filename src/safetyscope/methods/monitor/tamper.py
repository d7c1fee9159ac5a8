"""Noticing refusal removal at run time from the chat template's shared prefix (no extra forward pass).

Every chat-formatted prompt opens with the same tokens (the system prompt and the user-turn header), so
every prefill pass recomputes the same residual stream on them. At fitting time the monitor stores a
*prefix print*: the tokens and, at every monitored block, their ``resid_pre`` projected on ``k`` fixed
directions: the leading ``k_refusal`` directions of the **refusal subspace** (the differences of means
between harmful and harmless prompts at the post-instruction tokens, the candidates ``find_direction``
chooses from) and ``k - k_refusal`` random directions orthogonal to it (a sketch of everything else).

At run time the watch projects the same positions again and compares (:class:`PrefixCheck`):

* **deviation**: the estimated norm of the change relative to the stored norm. Any weight edit, hook
  or dtype change moves it above float noise (``floor`` depends on the dtype).
* **enrichment**: the change's energy per dimension inside the refusal subspace divided by its energy
  per dimension in the random sketch. A change unrelated to refusal (a random direction removed, a
  benign fine-tune, quantisation) spreads like any direction does: about 1. Removing a refusal
  direction (hooks or an orthogonalised checkpoint, full, partial or weighted per layer) takes out
  exactly a direction of that subspace: on the default model 37-320 against 0.6-3.5 for benign edits
  (docs/monitor.md).

Verdict: ``clean`` (deviation below the floor), ``refusal_tampering`` (enrichment >= ``ENRICHMENT``),
``modified`` (changed, not along refusal), or ``unchecked`` (no prefill pass carried the stored prefix,
e.g. another system prompt). ``direction`` is the change's leading direction inside the refusal subspace.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch

if TYPE_CHECKING:
    from ...models.adapter import LoadedModel

TamperKind = Literal["clean", "modified", "refusal_tampering", "unchecked"]
ENRICHMENT = 8.0  # refusal-subspace enrichment from which a change counts as refusal removal
MAX_REFUSAL_DIMS = 16
SKETCH_DIMS = 64


def deviation_floor(dtype: torch.dtype) -> float:
    """Relative change below which the prefix counts as unchanged: float noise of ``dtype`` across batches."""
    return max(1e-4, 4.0 * float(torch.finfo(dtype).eps)) if dtype.is_floating_point else 1e-4


@dataclass(frozen=True)
class PrefixPrint:
    """The stored reading of the shared prefix (see the module docstring)."""

    ids: np.ndarray  # [p] int64 prefix token ids
    blocks: tuple[int, ...]  # blocks whose resid_pre was read
    basis: np.ndarray  # [k, d_model] float64 orthonormal rows; the first k_refusal span the refusal subspace
    k_refusal: int
    coords: np.ndarray  # [n_blocks, p, k] float64 clean projections on basis
    norms: np.ndarray  # [n_blocks, p] float64 clean residual norms
    floor: float  # relative deviation counted as a change

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"prefix_ids": torch.from_numpy(self.ids.astype(np.int64)), "prefix_basis": torch.from_numpy(self.basis),
                "prefix_coords": torch.from_numpy(self.coords), "prefix_norms": torch.from_numpy(self.norms)}

    def meta(self) -> dict[str, Any]:
        return {"blocks": list(self.blocks), "k_refusal": self.k_refusal, "floor": self.floor}

    @classmethod
    def from_state(cls, meta: dict[str, Any] | None, tensors: dict[str, torch.Tensor]) -> PrefixPrint | None:
        if not meta or "prefix_ids" not in tensors:
            return None
        return cls(tensors["prefix_ids"].long().numpy(), tuple(int(b) for b in meta["blocks"]),
                   tensors["prefix_basis"].double().numpy(), int(meta["k_refusal"]),
                   tensors["prefix_coords"].double().numpy(), tensors["prefix_norms"].double().numpy(),
                   float(meta["floor"]))


def tamper_basis(cands: np.ndarray, d_model: int, seed: int) -> tuple[np.ndarray, int]:
    """([k, d] orthonormal rows, k_refusal): the refusal subspace of unit candidates [m, d], then random rows."""
    k1 = int(min(MAX_REFUSAL_DIMS, max(1, d_model // 32), cands.shape[0]))
    unit = cands / np.linalg.norm(cands, axis=-1, keepdims=True).clip(1e-12)
    refusal = np.linalg.svd(unit, full_matrices=False)[2][:k1]  # [k1, d]
    k2 = int(min(SKETCH_DIMS, d_model - k1))
    g = np.random.default_rng(seed).standard_normal((k2, d_model))
    g -= (g @ refusal.T) @ refusal
    sketch = np.linalg.qr(g.T)[0].T  # [k2, d] orthonormal, orthogonal to the refusal rows
    return np.concatenate([refusal, sketch]), k1


def shared_prefix_ids(lm: LoadedModel, system: str | None) -> np.ndarray:
    """The token ids every chat-formatted prompt starts with (the template's opening)."""
    from ...prefix import shared_prefix_length
    from ...prompts.chat import tokenize_prompts

    batch = tokenize_prompts(lm.tokenizer, ["Hello there.", "Write one poem?"], system=system)
    p = shared_prefix_length(batch)
    start = int((batch.attention_mask[0] == 0).sum())  # left padding
    return batch.input_ids[0, start:start + p].cpu().numpy().astype(np.int64)


def fit_prefix_print(lm: LoadedModel, cands: np.ndarray, blocks: Sequence[int], *, system: str | None,
                     seed: int = 0) -> PrefixPrint | None:
    """Read the shared prefix once (one forward pass of ``p`` tokens); None when the template has none."""
    from ...hooks import capture
    from ...sites import Site

    ids = shared_prefix_ids(lm, system)
    if ids.size < 2:
        return None
    basis, k1 = tamper_basis(cands, lm.dims.d_model, seed)
    sites = [Site("resid_pre", int(b)) for b in blocks]
    x = torch.as_tensor(ids, device=lm.input_device).unsqueeze(0)  # [1, p]
    with torch.inference_mode(), capture(lm, sites, "all", to_cpu=True) as cap:
        lm.model(input_ids=x, attention_mask=torch.ones_like(x))
    acts = np.stack([cap.values[s][0].double().numpy() for s in sites])  # [n_blocks, p, d]
    return PrefixPrint(ids, tuple(int(b) for b in blocks), basis, k1, acts @ basis.T,
                       np.linalg.norm(acts, axis=-1), deviation_floor(lm.dtype))


@dataclass(frozen=True)
class TamperReading:
    """What the prefix says about the model (see the module docstring)."""

    kind: TamperKind
    deviation: float  # estimated relative norm of the change (0 = identical)
    enrichment: float  # change energy per dimension, refusal subspace / random sketch (nan when unchanged)
    refusal_share: float  # share of the leading change direction inside the refusal subspace
    direction: np.ndarray | None  # [d_model] unit leading change direction within the refusal subspace
    n_reads: int  # prefill passes compared

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "deviation": self.deviation,
                "enrichment": None if self.enrichment != self.enrichment else self.enrichment,
                "refusal_share": None if self.refusal_share != self.refusal_share else self.refusal_share,
                "n_reads": self.n_reads}


UNCHECKED = TamperReading("unchecked", float("nan"), float("nan"), float("nan"), None, 0)


class PrefixCheck:
    """Accumulates the prefix's change over the prefill passes a watch sees (all on the CPU, float64)."""

    def __init__(self, pp: PrefixPrint):
        self.pp = pp
        self.basis = torch.from_numpy(pp.basis)  # [k, d]
        self.delta = np.zeros_like(pp.coords)  # [n_blocks, p, k] sum of coordinate changes over reads
        self.seen = np.zeros(len(pp.blocks), dtype=int)
        self.n_reads = 0

    def row_start(self, ids: torch.Tensor, mask: torch.Tensor | None) -> int | None:
        """Where the stored prefix starts in the first row of ``ids`` [batch, pos]; None if it is not there."""
        start = int((mask[0] == 0).sum()) if isinstance(mask, torch.Tensor) and mask.dim() == 2 else 0
        p = self.pp.ids.size
        got = ids[0, start:start + p].detach().cpu().numpy()
        return start if got.size == p and bool((got == self.pp.ids).all()) else None

    def read(self, j: int, x: torch.Tensor) -> None:
        """``x`` [p, d_model]: block ``j``'s (index into ``blocks``) resid_pre at the prefix positions."""
        xd = x.detach().to("cpu", torch.float64)
        self.delta[j] += (xd @ self.basis.T).numpy() - self.pp.coords[j]
        self.seen[j] += 1

    def result(self) -> TamperReading:
        if self.n_reads == 0 or not self.seen.any():
            return UNCHECKED
        ok = self.seen > 0
        d = self.delta[ok] / self.seen[ok, None, None]  # [n_seen, p, k] mean change
        k1, k = self.pp.k_refusal, self.pp.basis.shape[0]
        d_model = self.pp.basis.shape[1]
        e_ref, e_sketch = float((d[..., :k1] ** 2).sum()), float((d[..., k1:] ** 2).sum())
        total = e_ref + e_sketch * (d_model - k1) / max(k - k1, 1)  # the sketch stands for the rest
        dev = float(np.sqrt(total / max(float((self.pp.norms[ok] ** 2).sum()), 1e-300)))
        if dev < self.pp.floor:
            return TamperReading("clean", dev, float("nan"), float("nan"), None, self.n_reads)
        enrich = (e_ref / k1) / max(e_sketch / max(k - k1, 1), 1e-300)
        flat = d.reshape(-1, k)
        top = np.linalg.svd(flat, full_matrices=False)[2][0]  # [k] leading change direction in basis coordinates
        share = float(np.linalg.norm(top[:k1]))
        u = top[:k1] @ self.pp.basis[:k1]
        u = u / (np.linalg.norm(u) or 1.0)
        kind: TamperKind = "refusal_tampering" if enrich >= ENRICHMENT else "modified"
        return TamperReading(kind, dev, float(enrich), share, u, self.n_reads)
