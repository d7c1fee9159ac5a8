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

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ...hooks import capture, forward
from ...measure.metrics import refusal_score
from ...measure.refusal_tokens import refusal_token_ids
from ...models.adapter import LoadedModel
from ...positions import Batch
from ...prompts.chat import pad_token_id
from ...runner import batched
from ...sites import Site
from ...stats import Moments
from .artifact import Neuron
from .rank import neuron_sites

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


def refusal_objective(token_ids: Sequence[int]) -> Objective:
    """The logit refusal score (:func:`~safetyscope.measure.metrics.refusal_score`) at the last position,
    differentiable, in float64: [batch]."""
    ids = list(token_ids)
    return lambda logits, _b: refusal_score(logits[:, -1], ids, grad=True, dtype=torch.float64)


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


@dataclass
class AttributionMoments:
    """Running moments of per-prompt attributions (signed and absolute), [n_layers, d_mlp] each."""

    signed: Moments = field(default_factory=Moments)
    absolute: Moments = field(default_factory=Moments)

    def update(self, att: torch.Tensor) -> None:  # att: [batch, L, d_mlp]
        self.signed.update(att)
        self.absolute.update(att.abs())

    def result(self, layers: list[int], objective: str) -> NeuronAttribution:
        if self.signed.n == 0:
            raise ValueError("no prompts to attribute; give at least one")
        return NeuronAttribution(layers, self.signed, self.absolute, objective)

    def state(self, prefix: str = "") -> dict[str, torch.Tensor]:
        return {} if self.signed.n == 0 else {**self.signed.state(f"{prefix}signed/"), **self.absolute.state(f"{prefix}abs/")}

    @classmethod
    def from_state(cls, t: dict[str, torch.Tensor], prefix: str = "") -> AttributionMoments:
        if f"{prefix}signed/n" not in t:
            return cls()
        return cls(Moments.from_state(t, f"{prefix}signed/"), Moments.from_state(t, f"{prefix}abs/"))


def refusal_batches(lm: LoadedModel, prompts: Sequence[str], sites: Sequence[Site], *,
                    token_ids: Sequence[int] | None = None, batch_size: int = 8,
                    system: str | None = None) -> Iterator[tuple[Batch, torch.Tensor]]:
    """(batch, per-prompt attribution of the refusal score [batch, L, d_mlp]) for chat-formatted ``prompts``."""
    obj = refusal_objective(token_ids if token_ids is not None else refusal_token_ids(lm.tokenizer))
    return batched(lm, prompts, lambda b: attribution_batch(lm, b, obj, sites, last_only=True),
                   batch_size=batch_size, system=system, description="attributing refusal")


def loss_batches(lm: LoadedModel, texts: Sequence[str], sites: Sequence[Site], *, max_tokens: int = 128,
                 batch_size: int = 8) -> Iterator[tuple[Batch, torch.Tensor]]:
    """(batch, per-text attribution of the language-modelling loss [batch, L, d_mlp]) for plain ``texts``."""
    if not texts:
        raise ValueError("no utility texts given; pass at least one text")
    return ((b, attribution_batch(lm, b, lm_loss_objective, sites))
            for b in text_batches(lm, texts, max_tokens=max_tokens, batch_size=batch_size))


def _layers(sites: Sequence[Site]) -> list[int]:
    return [int(s.layer) for s in sites if s.layer is not None]


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
    sites = neuron_sites(lm, layers)
    acc = AttributionMoments()
    for _b, att in refusal_batches(lm, prompts, sites, token_ids=token_ids, batch_size=batch_size, system=system):
        acc.update(att)
    return acc.result(_layers(sites), "refusal_score")


def text_batches(lm: LoadedModel, texts: Sequence[str], *, max_tokens: int = 128, batch_size: int = 8) -> Iterator[Batch]:
    """Plain (non-chat) text, truncated to ``max_tokens`` and left padded, in batches."""
    tok = lm.tokenizer
    pad = pad_token_id(tok)
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
    sites = neuron_sites(lm, layers)
    acc = AttributionMoments()
    for _b, att in loss_batches(lm, texts, sites, max_tokens=max_tokens, batch_size=batch_size):
        acc.update(att)
    return acc.result(_layers(sites), "lm_loss")


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
