"""Is a direction *read* by the later blocks? A weights-only test for a removed direction.

Weight orthogonalisation edits the matrices that write to the residual stream and leaves the ones that
read it (q/k/v, gate/up) untouched.  A direction the model uses, such as its refusal direction, has
readers tuned to it: a few rows of the later blocks' input projections point along it far more than any
row points along a random direction.  A removed *random* direction has no such readers.  So, for a
direction ``u`` that the writers lost, the readers tell whether it was a direction the model used.

Per block ``l`` from ``from_depth`` of the depth on: the mean of the ``top_k`` largest |cos| between ``u``
and the block's reader rows (every row of the architecture table's ``mlp_in`` and ``attn_in``
projections, along the residual axis), compared with the same statistic for ``n_random`` random unit
directions: ``z_l = (own - median) / (1.4826 MAD)``.  The test's ``z`` is the median of ``z_l`` over those
blocks; a random direction gives about 0, the harmful - harmless difference of means of the default and
small models 4 to 10 (docs/audit.md).

It does not say *what* the model uses the direction for: any read direction removed from every writer
counts.  The verdict (:mod:`.signature`) uses it only for a direction that at least three writers lost
completely, which no trained model shows by itself.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from .source import TensorSource, roles

__all__ = ["ReaderTest", "reader_rows", "reader_test"]


@dataclass(frozen=True)
class ReaderTest:
    """``z``: median over the tested blocks of how far ``u``'s strongest readers exceed random directions'
    (robust z-score); ``per_block``: that z-score per block; ``top_cos``: the largest |cos| of any reader row
    with ``u`` per block."""

    z: float
    per_block: dict[int, float]
    top_cos: dict[int, float]

    def to_dict(self) -> dict[str, object]:
        return asdict(self)  # rounded where the audit is written (types.rounded)


def reader_rows(src: TensorSource, from_depth: float = 0.5) -> dict[int, torch.Tensor]:
    """{block: [rows, d_model] float32 unit rows of every matrix that reads the residual stream in that block}
    for the blocks from ``from_depth`` of the depth on (the table's ``mlp_in`` and ``attn_in`` projections)."""
    dims = src.dims
    first = int(from_depth * dims.n_layers)
    out: dict[int, list[torch.Tensor]] = {}
    for name, role in roles(src.table, dims, src.shapes).items():
        if role.role not in ("mlp_in", "attn_in") or role.layer is None or role.resid_axis is None or role.layer < first:
            continue
        w = src.get(name).movedim(role.resid_axis, 1).float()  # [rows, d_model]
        out.setdefault(role.layer, []).append(w / w.norm(dim=1, keepdim=True).clamp_min(1e-30))
    return {layer: torch.cat(ws) for layer, ws in sorted(out.items())}


def reader_test(rows: dict[int, torch.Tensor], u: torch.Tensor, *, n_random: int = 64, top_k: int = 20,
                seed: int = 0) -> ReaderTest:
    """How specifically the reader ``rows`` (:func:`reader_rows`) point along the unit direction ``u`` [d_model],
    against ``n_random`` random unit directions (the same for every block)."""
    if not rows:
        return ReaderTest(0.0, {}, {})
    d = u.numel()
    rand = torch.randn(n_random, d, generator=torch.Generator().manual_seed(seed))
    dirs = torch.cat([(u.float() / u.float().norm())[None], rand / rand.norm(dim=1, keepdim=True)])  # [1 + n_random, d]
    per_block, top = {}, {}
    for layer, w in rows.items():
        cos = (w @ dirs.T).abs()  # [rows, 1 + n_random]
        stat = cos.topk(min(top_k, cos.shape[0]), dim=0).values.mean(0)  # [1 + n_random]
        med = stat[1:].median()
        mad = (stat[1:] - med).abs().median().clamp_min(1e-12) * 1.4826
        per_block[layer] = float((stat[0] - med) / mad)
        top[layer] = float(cos[:, 0].max())
    return ReaderTest(float(torch.tensor(list(per_block.values())).median()), per_block, top)
