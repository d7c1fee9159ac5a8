"""Direct logit attribution of every attention and MLP output to the refusal tokens.

At the first response position, each component's output c (what it writes into the residual)
reaches the logits through the final norm and the unembedding. Linearising the norm at the
actual final residual (dividing by its RMS/std and multiplying by the norm weight), the
component's direct effect on the refusal logit margin is

    DLA(c) = (c * w_norm / scale) · (mean_{t in refusal} W_U[t] - mean_t W_U[t])

computed per prompt and averaged per group. Harmful minus harmless is the component's direct
contribution to refusing: the *production* stage of the circuit.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ...measure.refusal_tokens import refusal_token_ids
from ...models.adapter import LoadedModel
from ...runner import run_capture


@dataclass(frozen=True)
class DLAResult:
    components: list[str]  # site names, e.g. blocks.20.mlp.out
    harmful: list[float]  # mean DLA on harmful prompts
    harmless: list[float]  # mean DLA on harmless prompts

    @property
    def diff(self) -> list[float]:
        return [a - b for a, b in zip(self.harmful, self.harmless)]

    def top(self, k: int = 10) -> list[dict[str, Any]]:
        order = sorted(range(len(self.components)), key=lambda i: -self.diff[i])[:k]
        return [
            {"component": self.components[i], "dla_diff": self.diff[i], "harmful": self.harmful[i], "harmless": self.harmless[i]}
            for i in order
        ]

    def to_json(self) -> dict[str, Any]:
        return {"components": self.components, "harmful": self.harmful, "harmless": self.harmless, "diff": self.diff}


def refusal_logit_direction(lm: LoadedModel, token_ids: Sequence[int] | None = None) -> torch.Tensor:
    """[d_model] unembedding direction of the refusal tokens, centred on the vocabulary mean."""
    ids = list(token_ids) if token_ids is not None else refusal_token_ids(lm.tokenizer)
    w_u = lm.unembed_matrix().detach().float()  # [vocab, d_model]
    return w_u[ids].mean(0) - w_u.mean(0)


def final_norm_centres(lm: LoadedModel) -> bool:
    """Whether the final norm subtracts the mean (a LayerNorm; the table's ``norm_centred`` for custom ones)."""
    return lm.table.norm_centred or isinstance(lm.module(lm.table.final_norm), torch.nn.LayerNorm)


def norm_linearisation(lm: LoadedModel, resid: torch.Tensor) -> torch.Tensor:
    """[n, d_model] multiplier approximating final_norm(resid) ≈ resid_centred * mult (per prompt)."""
    norm = lm.module(lm.table.final_norm)
    weight = getattr(norm, "weight", None)
    w = weight.detach().float().to(resid.device) if weight is not None else torch.ones(resid.shape[-1])
    w = w + lm.table.norm_offset  # Gemma's norms compute x * (1 + w)
    eps = float(getattr(norm, "eps", getattr(norm, "variance_epsilon", 1e-6)))
    is_layernorm = final_norm_centres(lm)
    x = resid - resid.mean(-1, keepdim=True) if is_layernorm else resid
    scale = (x.pow(2).mean(-1, keepdim=True) + eps).sqrt()
    return w / scale


def direct_logit_attribution(
    lm: LoadedModel,
    harmful: Sequence[str],
    harmless: Sequence[str],
    *,
    token_ids: Sequence[int] | None = None,
    batch_size: int = 8,
    system: str | None = None,
) -> DLAResult:
    """Mean DLA per attn.out / mlp.out component for each group (one forward pass per batch)."""
    direction = refusal_logit_direction(lm, token_ids)  # [d_model]
    sites = lm.sites(["blocks.*.attn.out", "blocks.*.mlp.out", f"blocks.{lm.n_layers - 1}.resid_post"])
    final = sites[-1]
    comps = sites[:-1]
    sums: dict[str, torch.Tensor] = {}
    for group, prompts in (("harmful", harmful), ("harmless", harmless)):
        total = torch.zeros(len(comps), dtype=torch.float64)
        for _batch, acts in run_capture(lm, prompts, sites, "last", batch_size=batch_size, system=system):
            resid = acts[final][:, 0].float()  # [batch, d_model]
            mult = norm_linearisation(lm, resid)  # [batch, d_model]
            is_ln = final_norm_centres(lm)
            for j, site in enumerate(comps):
                c = acts[site][:, 0].float()  # [batch, d_model]
                if is_ln:
                    c = c - c.mean(-1, keepdim=True)
                total[j] += ((c * mult) @ direction.to(c.device)).double().sum()
        sums[group] = total / max(len(prompts), 1)
    return DLAResult([s.name for s in comps], sums["harmful"].tolist(), sums["harmless"].tolist())
