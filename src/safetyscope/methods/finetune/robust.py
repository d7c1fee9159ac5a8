"""Robust hardening's ablations: random directional ablation of the residual stream while training, random
sub-spans of the ablated subspace, and the difference-of-means estimates of the direction and the subspace that
training re-estimates on the model as it is (used by :mod:`.train`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from ...models.adapter import LoadedModel
from ...runner import run_capture
from ...sites import Site


def random_ablation(lm: LoadedModel, r: torch.Tensor, rows: int, width: int, p: float,
                    gen: torch.Generator, scope: Literal["sites", "rows"] = "sites",
                    row_p: torch.Tensor | None = None, drawn: list[bool] | None = None) -> list[tuple[Site, Any]]:
    """Edits projecting unit ``r`` ([d_model], orthonormal rows [k, d_model], or one such basis per row
    [rows, k, d_model], zero-padded: :func:`random_subspan`) out of ``resid_pre`` of the first
    ``rows`` rows (the target examples, and with ``robust_retain`` the retain examples after them); the rest of
    the batch is untouched. ``scope`` "sites": at random blocks and random positions (each with probability
    ``p``); "rows": each row, with probability ``p``, at every block and every position (the attack's condition).
    ``row_p`` ([rows]) gives each row its own probability (of its positions, or of the whole row) instead of ``p``;
    blocks are still drawn with ``p``. With scope "rows", a list passed as ``drawn`` is filled with whether each
    row is ablated."""
    probs = torch.full((rows,), float(p)) if row_p is None else row_p.double()  # [rows]
    if scope == "rows":
        layers = list(range(lm.n_layers))
        pos = (torch.rand((rows, 1), generator=gen) < probs[:, None]).float().expand(rows, width)  # [rows, pos]
        if drawn is not None:  # the caller learns which rows lose the direction
            drawn[:] = [bool(v) for v in pos[:, 0]]
    else:
        layers = [layer for layer in range(lm.n_layers) if float(torch.rand((), generator=gen)) < p]
        if not layers:
            layers = [int(torch.randint(lm.n_layers, (), generator=gen))]
        pos = (torch.rand((rows, width), generator=gen) < probs[:, None]).float()  # [rows, pos]

    def edit(x: torch.Tensor, _batch: Any) -> torch.Tensor:  # x: [batch, pos, d_model]
        if x.shape[1] != width:
            return x
        m = torch.zeros(x.shape[:2], dtype=x.dtype, device=x.device)
        m[:rows] = pos.to(device=x.device, dtype=x.dtype)
        if r.dim() == 3:  # a basis per row [rows, k, d_model], zero rows where a row's span is smaller
            q = torch.zeros((x.shape[0], *r.shape[1:]), dtype=x.dtype, device=x.device)  # [batch, k, d_model]
            q[:rows] = r.to(device=x.device, dtype=x.dtype)
            c = torch.einsum("bpd,bkd->bpk", x, q) * m.unsqueeze(-1)  # [batch, pos, k]
            return x - torch.einsum("bpk,bkd->bpd", c, q)
        q = r.to(device=x.device, dtype=x.dtype).reshape(-1, x.shape[-1])  # [k, d_model]
        return x - (m.unsqueeze(-1) * (x @ q.T)) @ q

    return [(Site("resid_pre", layer), edit) for layer in layers]


def random_subspan(q: torch.Tensor, rows: int, gen: torch.Generator) -> torch.Tensor:
    """Per row, an orthonormal basis of a random sub-span of the span of ``q`` ([k, d_model], orthonormal):
    a uniformly random rotation of it, cut to a dimension drawn uniformly from 1 to k; zero-padded to
    [rows, k, d_model] (a zero row projects nothing out)."""
    k = q.shape[0]
    out = torch.zeros((rows, *q.shape), dtype=q.dtype)  # [rows, k, d_model]
    for i in range(rows):
        j = int(torch.randint(1, k + 1, (), generator=gen))
        rot = torch.linalg.qr(torch.randn((k, k), generator=gen, dtype=torch.float64)).Q[:, :j]  # [k, j]
        out[i, :j] = (rot.T @ q.double()).to(q.dtype)  # [j, d_model], orthonormal: rot has orthonormal columns
    return out


def estimate_direction(lm: LoadedModel, target: Sequence[str], retain: Sequence[str], layer: int,
                       system: str | None, batch_size: int = 8, position: int = -1) -> torch.Tensor:
    """Unit difference of means (target - retain) at ``blocks.{layer}.resid_pre``, at the prompt token
    ``position`` (negative offset from the end of the chat-formatted prompt: the direction's own)."""
    site = Site("resid_pre", layer)
    means = []
    for texts in (target, retain):
        total, n = None, 0
        for _b, vals in run_capture(lm, list(texts), site, [position], batch_size=batch_size, system=system,
                                    description="direction"):
            v = vals[site][:, 0].double().sum(0)  # [d_model]
            total, n = (v if total is None else total + v), n + int(vals[site].shape[0])
        assert total is not None
        means.append(total / n)
    d = means[0] - means[1]
    return (d / d.norm().clamp_min(1e-12)).float()


def estimate_subspace(lm: LoadedModel, target: Sequence[str], retain: Sequence[str], r: torch.Tensor, rank: int,
                      system: str | None, batch_size: int = 8, extra: torch.Tensor | None = None) -> torch.Tensor:
    """Orthonormal rows [rank, d_model]: unit ``r`` first, then the directions in ``extra`` ([n, d_model], e.g.
    what the attack's search found; as many as fit, newest last kept first), then the top singular directions
    (orthogonal to those) of the unit differences of means (target - retain) at ``resid_pre`` of every block
    from 1 on and every post-instruction position; one forward pass per batch fills every site."""
    sites = [Site("resid_pre", layer) for layer in range(1, lm.n_layers)] or [Site("resid_pre", 0)]
    sums = [post_means(lm, texts, sites, system, batch_size) for texts in (target, retain)]
    diffs = torch.cat([sums[0][site] - sums[1][site] for site in sites])  # [n_sites * k_post, d_model]
    diffs = diffs / diffs.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    rows = [r.double().reshape(-1)]
    if extra is not None:
        rows += list(extra.double().reshape(-1, rows[0].shape[0]).flip(0))  # newest first
    q = _orthonormal(rows, rank)  # [k, d_model]: r and the extras that are not (nearly) in its span
    rest = diffs - (diffs @ q.T) @ q  # the part they do not explain
    vh = torch.linalg.svd(rest, full_matrices=False).Vh  # [min(n, d), d_model], strongest first
    basis = torch.cat([q, vh[: rank - q.shape[0]]])  # [rank, d_model]
    return torch.linalg.qr(basis.T).Q.T.float()


def post_means(lm: LoadedModel, texts: Sequence[str], sites: Sequence[Site], system: str | None,
               batch_size: int = 8) -> dict[Site, torch.Tensor]:
    """Mean (float64) of each site's activations at every post-instruction position, [k_post, d_model] per site;
    one forward pass per batch fills every site."""
    acc: dict[Site, torch.Tensor] = {}
    n = 0
    for _b, vals in run_capture(lm, list(texts), list(sites), "post_instruction", batch_size=batch_size,
                                system=system, description="means"):
        for site, v in vals.items():  # v: [batch, k_post, d_model]
            acc[site] = acc.get(site, 0) + v.double().sum(0).cpu()
        n += int(next(iter(vals.values())).shape[0])
    return {site: v / max(n, 1) for site, v in acc.items()}


def _orthonormal(rows: Sequence[torch.Tensor], limit: int, tol: float = 1e-3) -> torch.Tensor:
    """Gram-Schmidt over ``rows`` in order, skipping a row (nearly) in the span of those before; at most
    ``limit`` rows [k, d_model]; the first row is always kept."""
    out: list[torch.Tensor] = []
    for v in rows:
        w = v - sum(((v @ q) * q for q in out), torch.zeros_like(v))
        if w.norm() > tol * v.norm().clamp_min(1e-12) or not out:
            out.append(w / w.norm().clamp_min(1e-12))
        if len(out) == limit:
            break
    return torch.stack(out)


@dataclass
class Tracker:
    """The attack's candidate directions, kept current at every training step (``robust_online``): running means
    (exponential, float64) of ``resid_pre`` at every block and each post-instruction position (offsets -k..-1
    from the prompt's end), of the target rows and of the retain rows; started from one pass over the prompts,
    then updated from the rows of each training batch that were not ablated."""

    means: torch.Tensor  # [2 (target, retain), n_layers, k, d_model], float64
    decay: float = 0.9

    @classmethod
    def start(cls, lm: LoadedModel, target: Sequence[str], retain: Sequence[str], system: str | None,
              batch_size: int = 8, decay: float = 0.9) -> Tracker:
        sites = [Site("resid_pre", layer) for layer in range(lm.n_layers)]
        means = [post_means(lm, texts, sites, system, batch_size) for texts in (target, retain)]
        return cls(torch.stack([torch.stack([m[site] for site in sites]) for m in means]), decay)  # [2, layers, k, d]

    def draw(self, layers: Sequence[int], gen: torch.Generator) -> tuple[int, int, torch.Tensor]:
        """A random block of ``layers`` and post-instruction offset (-k..-1), and its unit direction [d_model]."""
        layer = int(layers[int(torch.randint(len(layers), (), generator=gen))])
        j = int(torch.randint(self.means.shape[2], (), generator=gen))
        d = self.means[0, layer, j] - self.means[1, layer, j]  # [d_model]
        return layer, j - self.means.shape[2], (d / d.norm().clamp_min(1e-12)).float()

    def recorder(self, n_layers: int, ends: torch.Tensor,
                 groups: Sequence[int | None]) -> tuple[list[tuple[Site, Any]], Callable[[], None]]:
        """Read-only hooks recording each row's last k prompt positions (``ends`` [batch]: the index of each row's
        last prompt token) at every block, and the update to call after the forward pass: row i counts toward
        the target (0) or retain (1) mean per ``groups[i]``, or not at all (None: an ablated row)."""
        k = self.means.shape[2]
        idx = ends[:, None] + torch.arange(-k + 1, 1)  # [batch, k]
        got: dict[int, torch.Tensor] = {}

        def make(layer: int) -> Any:
            def edit(x: torch.Tensor, _batch: Any) -> torch.Tensor:  # x: [batch, pos, d_model]; returned unchanged
                i = idx.to(x.device)[..., None].expand(-1, -1, x.shape[-1])  # [batch, k, d_model]
                got[layer] = x.detach().gather(1, i).double().cpu()
                return x
            return edit

        def update() -> None:
            for g in (0, 1):
                rows = [i for i, grp in enumerate(groups) if grp == g]
                if not rows:
                    continue
                for layer, v in got.items():
                    self.means[g, layer] = self.decay * self.means[g, layer] + (1 - self.decay) * v[rows].mean(0)

        return [(Site("resid_pre", layer), make(layer)) for layer in range(n_layers)], update
