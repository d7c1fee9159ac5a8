"""Gradient importance of MLP neurons (attribution patching, first order) and Wei et al.'s set difference.

Per prompt and neuron i the attribution is ``A_i = sum_p a_{p,i} * dS/da_{p,i}`` over the prompt's
real tokens: the derivative of the objective S when neuron i is scaled by (1 + eps) at every
position, so zero-ablating it changes S by about ``-A_i``. Objectives:

* refusal: the logit refusal score (log-odds of refusal-opening tokens at the first reply position),
  on harmful prompts; positive A = the neuron pushes towards refusal;
* utility: the mean next-token loss on plain text (e.g. the built-in capability passages).

Per-prompt attributions are aggregated in float64 running moments (signed and absolute), so memory
does not grow with the number of prompts. Following Wei et al. (2024), "Assessing the Brittleness
of Safety Alignment via Pruning and Low-Rank Modifications", safety-critical neurons are those in
the top of the refusal ranking but not in the top ``q`` of the utility ranking (:func:`set_difference`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ...hooks import capture, forward
from ...measure.refusal_tokens import refusal_token_ids
from ...models.adapter import LoadedModel
from ...positions import Batch
from ...runner import batched
from ...sites import Site
from ...stats import Moments
from .artifact import Neuron

HOW = ("signed", "abs")
Objective = Callable[[torch.Tensor, Batch], torch.Tensor]  # (logits, batch) -> [batch]


@dataclass
class NeuronAttribution:
    """Aggregated attributions for the analysed layers; tables are [n_layers_analysed, d_mlp] float64."""

    layers: list[int]
    signed: Moments  # of per-prompt A
    absolute: Moments  # of per-prompt |A|
    objective: str
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def n(self) -> int:
        return self.signed.n

    @property
    def mean(self) -> torch.Tensor:
        assert self.signed.mean is not None
        return self.signed.mean

    @property
    def mean_abs(self) -> torch.Tensor:
        assert self.absolute.mean is not None
        return self.absolute.mean

    @property
    def d_mlp(self) -> int:
        return int(self.mean.shape[-1])

    def score(self, how: str = "signed") -> torch.Tensor:
        """[L, d_mlp]: mean A (signed) or mean |A| (abs); larger = more important."""
        if how not in HOW:
            raise ValueError(f"unknown attribution score {how!r}; use signed or abs")
        return self.mean if how == "signed" else self.mean_abs

    def ranking(self, how: str = "signed", k: int | None = None, exclude: Iterable[Neuron] = ()) -> list[Neuron]:
        s = self.score(how).flatten()
        order = torch.argsort(-s, stable=True).tolist()
        skip = set(exclude)
        out: list[Neuron] = []
        for i in order:
            n = (self.layers[i // self.d_mlp], i % self.d_mlp)
            if n not in skip:
                out.append(n)
                if k is not None and len(out) >= k:
                    break
        return out

    def value(self, neuron: Neuron) -> tuple[float, float]:
        r = self.layers.index(neuron[0])
        return float(self.mean[r, neuron[1]]), float(self.mean_abs[r, neuron[1]])

    def state(self, prefix: str = "") -> dict[str, torch.Tensor]:
        return {f"{prefix}layers": torch.tensor(self.layers), **self.signed.state(f"{prefix}signed/"),
                **self.absolute.state(f"{prefix}abs/")}

    @classmethod
    def from_state(cls, t: dict[str, torch.Tensor], objective: str, prefix: str = "") -> NeuronAttribution:
        return cls([int(v) for v in t[f"{prefix}layers"].tolist()], Moments.from_state(t, f"{prefix}signed/"),
                   Moments.from_state(t, f"{prefix}abs/"), objective)


def refusal_logodds(logits: torch.Tensor, token_ids: Sequence[int]) -> torch.Tensor:
    """Differentiable log p(refusal) - log(1 - p(refusal)); logits [batch, vocab] -> [batch] (float32+)."""
    x = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    is_ref = torch.zeros(x.shape[-1], dtype=torch.bool, device=x.device)
    is_ref[list(token_ids)] = True
    return torch.logsumexp(x.masked_fill(~is_ref, -math.inf), -1) - torch.logsumexp(x.masked_fill(is_ref, -math.inf), -1)


def refusal_objective(token_ids: Sequence[int]) -> Objective:
    ids = list(token_ids)
    return lambda logits, _b: refusal_logodds(logits[:, -1], ids)


def lm_loss_objective(logits: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Mean next-token cross entropy per row over real tokens, [batch]."""
    mask = batch.attention_mask.to(logits.device).bool()
    valid = (mask[:, 1:] & mask[:, :-1]).to(torch.float32)  # [batch, pos-1]
    x = logits[:, :-1]
    logp = torch.log_softmax(x.float() if x.dtype in (torch.float16, torch.bfloat16) else x, -1)
    nll = -logp.gather(-1, batch.input_ids.to(logits.device)[:, 1:, None]).squeeze(-1)  # [batch, pos-1]
    return (nll * valid).sum(1) / valid.sum(1).clamp(min=1)


def attribution_batch(lm: LoadedModel, batch: Batch, objective: Objective, sites: Sequence[Site],
                      *, last_only: bool = False) -> torch.Tensor:
    """Per-row attribution [batch, n_sites, d_mlp] float64 on CPU for one batch."""
    with torch.enable_grad(), capture(lm, sites, "all", grad=True) as cap:
        logits = forward(lm, batch, last_only=last_only)
        objective(logits, batch).sum().backward()  # rows are independent: per-row gradients
    mask = batch.attention_mask.bool()  # [batch, pos]
    rows = []
    for site in sites:
        a, g = cap.values[site], cap.grads.get(site)
        if g is None:
            raise RuntimeError(f"no gradient reached {site.name}; the objective does not depend on it")
        ag = a.to("cpu", torch.float64) * g.to("cpu", torch.float64)  # [batch, pos, d_mlp]
        rows.append((ag * mask[..., None]).sum(1))  # [batch, d_mlp]
    return torch.stack(rows, 1)


def _accumulate(lm: LoadedModel, batches: Iterator[tuple[Batch, torch.Tensor]], layers: list[int],
                objective: str) -> NeuronAttribution:
    signed, absolute = Moments(), Moments()
    for _b, att in batches:  # att: [batch, L, d_mlp]
        signed.update(att)
        absolute.update(att.abs())
    if signed.n == 0:
        raise ValueError("no prompts to attribute; give at least one")
    return NeuronAttribution(layers, signed, absolute, objective)


def _sites(lm: LoadedModel, layers: str | Iterable[int]) -> tuple[list[Site], list[int]]:
    spec = layers if isinstance(layers, str) else ",".join(str(int(v)) for v in layers)
    sites = lm.sites(f"blocks.{spec}.mlp.neurons")
    return sites, [int(s.layer) for s in sites if s.layer is not None]


def refusal_attribution(
    lm: LoadedModel,
    prompts: Sequence[str],
    *,
    token_ids: Sequence[int] | None = None,
    layers: str | Iterable[int] = "*",
    batch_size: int = 8,
    system: str | None = None,
) -> NeuronAttribution:
    """Attribution of the logit refusal score to every neuron, aggregated over (harmful) prompts."""
    sites, layer_list = _sites(lm, layers)
    obj = refusal_objective(token_ids if token_ids is not None else refusal_token_ids(lm.tokenizer))
    it = batched(lm, prompts, lambda b: attribution_batch(lm, b, obj, sites, last_only=True),
                 batch_size=batch_size, system=system, description="attributing refusal")
    return _accumulate(lm, it, layer_list, "refusal_score")


def text_batches(lm: LoadedModel, texts: Sequence[str], *, max_tokens: int = 128, batch_size: int = 8) -> Iterator[Batch]:
    """Plain (non-chat) text, truncated to ``max_tokens`` and left padded, in batches."""
    tok = lm.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    for start in range(0, len(texts), max(1, batch_size)):
        rows = [list(tok(t, add_special_tokens=True)["input_ids"])[:max_tokens] for t in texts[start:start + batch_size]]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), int(pad), dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
            mask[i, width - len(r):] = 1
        yield Batch(ids, mask, n_post=1, index=tuple(range(start, start + len(rows))))


def loss_attribution(
    lm: LoadedModel,
    texts: Sequence[str],
    *,
    layers: str | Iterable[int] = "*",
    max_tokens: int = 128,
    batch_size: int = 8,
) -> NeuronAttribution:
    """Attribution of the language-modelling loss on plain texts (the utility objective)."""
    if not texts:
        raise ValueError("no utility texts given; pass at least one text")
    sites, layer_list = _sites(lm, layers)
    it = ((b, attribution_batch(lm, b, lm_loss_objective, sites))
          for b in text_batches(lm, texts, max_tokens=max_tokens, batch_size=batch_size))
    return _accumulate(lm, it, layer_list, "lm_loss")


def _count(k: float | int, total: int) -> int:
    return int(round(k * total)) if isinstance(k, float) and k < 1 else int(k)


def set_difference(
    refusal: NeuronAttribution,
    utility: NeuronAttribution,
    *,
    top_utility: float | int = 0.05,
    how: str = "signed",
    k: int | None = None,
) -> list[Neuron]:
    """Neurons ranked by refusal importance, minus the top ``top_utility`` (fraction or count) by |utility|.

    Utility importance is mean |A| of the loss (a neuron matters for the loss either way).
    """
    if refusal.layers != utility.layers:
        raise ValueError("refusal and utility attributions cover different layers; compute them on the same layers")
    n_util = _count(top_utility, refusal.mean.numel())
    protected = utility.ranking("abs", n_util) if n_util > 0 else []
    return refusal.ranking(how, k, exclude=protected)
