"""Attribution screening of refusal-direction candidates: every candidate's bypass predicted from one gradient.

Scoring a candidate exactly takes a forward pass under its ablation; a model with ~20 scoreable blocks and 5
post-instruction positions has ~100 candidates. The screen only has to rank them, so it can use the first-order
prediction instead (the idea of attribution patching, Nanda 2023; Syed et al. 2023, applied to directional
ablation). Scale the ablation of unit direction ``r`` by ``alpha`` at every block's input (``resid_pre``):
``x_l <- x_l + alpha * delta_l(x_l)`` with ``delta_l = -(x_l . r) r`` (zero ablation) or ``(t_l - x_l . r) r``
(mean ablation to the harmless mean ``t_l``). At ``alpha = 0`` every edit is the identity, so the derivative of
the refusal score ``S`` is exactly

    dS/dalpha = sum_l sum_pos g_l . delta_l,    g_l = dS/dx_l of the unmodified model,

and one forward + backward pass over the screening prompts gives ``g_l`` and ``x_l`` at every block and
position, from which the prediction ``S + dS/dalpha`` of *every* candidate is two matrix products per block.
It is a linear extrapolation to ``alpha = 1``: the ranking, not the value, is what the screen uses; the kept
candidates are then scored exactly. KL has no first-order term (it is minimal at ``alpha = 0``), so the screen
ranks by predicted bypass alone. Zero ablation also edits the attention and MLP outputs (``artifact.ablation_sites``);
to first order those edits are the block-input edits again, so the prediction reads the block inputs only.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ...hooks import capture, forward
from ...measure.metrics import refusal_score
from ...models.adapter import LoadedModel
from ...prefix import prefix_reuse
from ...prompts.chat import tokenize_prompts
from ...sites import Site

__all__ = ["predicted_bypass"]


def predicted_bypass(
    lm: LoadedModel,
    units: torch.Tensor,
    prompts: Sequence[str],
    token_ids: Sequence[int],
    *,
    targets: torch.Tensor | None = None,
    batch_size: int = 8,
    system: str | None = None,
) -> tuple[torch.Tensor, float]:
    """(first-order predicted mean refusal score on ``prompts`` under each candidate's ablation [K], the
    unmodified mean score).

    ``units`` [K, d_model]: unit directions; ``targets`` [K, n_layers]: mean ablation to those projections
    (None: zero ablation). Statistics accumulate in float64.
    """
    if not prompts:
        raise ValueError("attribution screening needs at least one prompt")
    sites = [Site("resid_pre", layer) for layer in range(lm.n_layers)]
    u = units.double()  # [K, d_model]
    change = torch.zeros(units.shape[0], dtype=torch.float64)  # [K]
    base, ids = 0.0, list(token_ids)
    for start in range(0, len(prompts), batch_size):
        batch = tokenize_prompts(lm.tokenizer, list(prompts[start : start + batch_size]), system=system)
        with torch.enable_grad(), prefix_reuse(False), capture(lm, sites, "all", grad=True) as cap:
            scores = refusal_score(forward(lm, batch, last_only=True)[:, -1], ids, grad=True)  # [batch]
            scores.sum().backward()
        mask = batch.attention_mask.to(torch.float64).unsqueeze(-1)  # [batch, pos, 1]: no edit effect on padding
        for layer, site in enumerate(sites):
            x = cap.values[site].double().cpu()  # [batch, pos, d_model]
            g = cap.grads[site].double().cpu()  # [batch, pos, d_model]
            along = x @ u.T  # [batch, pos, K]: x . r
            slope = g @ u.T  # [batch, pos, K]: g . r
            shift = -along if targets is None else targets[:, layer].double() - along  # [batch, pos, K]
            change += (slope * shift * mask).sum((0, 1))
        base += float(scores.detach().double().sum())
    n = len(prompts)
    return (base + change) / n, base / n
