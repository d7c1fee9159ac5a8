"""Pure measurement functions: refusal score, KL divergence, cross entropy, AUROC, agreement, rates.

All tensor functions are pure (no model access) and compute in float32 or float64 whatever the input
dtype (bf16/fp16 logits are upcast first).  Shapes are given in the comments: ``B`` batch, ``P``
positions, ``V`` vocabulary.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any, TypedDict

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "RateWithCI", "agreement", "auroc", "kl_divergence", "mean_kl", "perplexity", "rate_with_ci",
    "refusal_score", "token_cross_entropy", "wilson_interval",
]

_EPS = 1e-8  # smoothing of p and 1 - p in the log-odds (as in Arditi et al.'s refusal metric)


def refusal_score(
    logits: Tensor, token_ids: Iterable[int], *, grad: bool = False, dtype: torch.dtype = torch.float32,
    fast: bool = False,
) -> Tensor:
    """Log-odds of the refusal tokens at the first response position.

    ``score = log(p + eps) - log(1 - p + eps)`` with ``p`` the softmax probability mass on ``token_ids``
    (see :func:`safetyscope.measure.refusal_tokens.refusal_token_ids`) and ``eps = 1e-8``, which keeps
    the score finite (within about +-18.4) and strictly increasing in ``p``.  Computed in float64 with
    ``logsumexp`` over the refusal and the non-refusal tokens separately, so ``1 - p`` is never formed
    by subtraction (no cancellation when ``p`` is close to 1).

    Args:
        logits: ``[B, V]`` (or ``[V]``) next-token logits at the first reply position.
        token_ids: refusal token ids (duplicates are ignored).
        grad: keep the autograd graph (a training loss); by default the logits are detached.
        dtype: of the returned scores; ``torch.float64`` keeps small differences between scores (patching
            effects) above the float32 rounding of the score.
        fast: the pass over the non-refusal tokens in float32 (no float64 copy of the vocabulary), the rest
            in float64: absolute error about 1e-5 for any ``p``. For per-token trajectories read at every
            decoding step.

    Returns:
        ``[B]`` scores in ``dtype`` (a 0-d tensor for ``[V]`` input).
    """
    if logits.dim() not in (1, 2):
        raise ValueError(f"logits must be [batch, vocab] or [vocab], got shape {tuple(logits.shape)}")
    ids = sorted({int(i) for i in token_ids})
    vocab = logits.shape[-1]
    if not ids or ids[0] < 0 or ids[-1] >= vocab:
        raise ValueError(f"token_ids must be a non-empty set of ids in [0, {vocab}); got {ids[:10]}")
    x = logits if grad else logits.detach()                              # [B, V]
    is_refusal = torch.zeros(vocab, dtype=torch.bool, device=x.device)   # [V]
    is_refusal[ids] = True
    # one pass over the vocabulary (the non-refusal tokens; float32 when fast); the refusal tokens are a gathered few
    lse_r = torch.logsumexp(x[..., torch.tensor(ids, device=x.device)].double(), dim=-1)            # [B]
    rest = x.float() if fast else x.double()                             # [B, V]
    lse_n = torch.logsumexp(rest.masked_fill(is_refusal, -math.inf), dim=-1).double()              # [B]
    log_z = torch.logaddexp(lse_r, lse_n)                                # [B]
    log_p, log_q = lse_r - log_z, lse_n - log_z                          # log p, log (1-p)  [B]
    log_eps = torch.tensor(math.log(_EPS), dtype=torch.float64, device=x.device)
    return (torch.logaddexp(log_p, log_eps) - torch.logaddexp(log_q, log_eps)).to(dtype)


def kl_divergence(logits_ref: Tensor, logits_new: Tensor, mask: Tensor | None = None, *, grad: bool = False) -> Tensor:
    """``KL(P_ref || P_new)`` per position, from logits, in float32.

    Args:
        logits_ref: ``[B, P, V]`` or ``[B, V]`` logits of the reference (unmodified) model.
        logits_new: same shape, logits of the modified model.
        mask: optional ``[B, P]`` / ``[B]`` mask (bool or 0/1); masked-out positions are set to 0.
        grad: keep the autograd graph through ``logits_new`` (a training loss); by default both are detached.

    Returns:
        ``[B, P]`` or ``[B]`` non-negative KL values in nats.
    """
    if logits_ref.shape != logits_new.shape:
        raise ValueError(f"logit shapes differ: {tuple(logits_ref.shape)} vs {tuple(logits_new.shape)}")
    log_p = F.log_softmax(logits_ref.detach().float(), dim=-1)           # [..., V]
    log_q = F.log_softmax((logits_new if grad else logits_new.detach()).float(), dim=-1)  # [..., V]
    p = log_p.exp()
    terms = torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p))  # 0 log 0 = 0 (-inf logits)
    kl = terms.sum(-1).clamp_min(0.0)                                    # [B, P] or [B]
    if mask is not None:
        if mask.shape != kl.shape:
            raise ValueError(f"mask shape {tuple(mask.shape)} must be {tuple(kl.shape)}")
        kl = kl * mask.to(device=kl.device, dtype=kl.dtype)
    return kl


def mean_kl(logits_ref: Tensor, logits_new: Tensor, mask: Tensor | None = None) -> Tensor:
    """Mean of :func:`kl_divergence` over the positions where ``mask`` is set (all if ``None``); 0-d."""
    kl = kl_divergence(logits_ref, logits_new, mask)
    if mask is None:
        return kl.mean()
    weight = mask.to(device=kl.device, dtype=kl.dtype)
    total = weight.sum()
    if total.item() <= 0:
        raise ValueError("mean_kl: mask selects no position")
    return kl.sum() / total


def token_cross_entropy(
    logits: Tensor, input_ids: Tensor, attention_mask: Tensor | None = None
) -> tuple[float, int]:
    """Summed next-token negative log-likelihood and the number of predicted tokens.

    Position ``t`` predicts token ``t + 1``; a prediction counts when both the context token ``t`` and
    the target ``t + 1`` are real (``attention_mask`` set), which handles left and right padding.

    Args:
        logits: ``[B, P, V]`` model logits.
        input_ids: ``[B, P]`` token ids.
        attention_mask: ``[B, P]`` 1 for real tokens, 0 for padding (``None``: all real).

    Returns:
        ``(sum_nll, n_tokens)`` in nats, float32 computation; feed to :func:`perplexity`.
    """
    if logits.dim() != 3 or logits.shape[:2] != input_ids.shape:
        raise ValueError(f"logits {tuple(logits.shape)} must be [B, P, V] with input_ids {tuple(input_ids.shape)}")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if attention_mask.shape != input_ids.shape:
        raise ValueError("attention_mask must have the shape of input_ids")
    am = attention_mask.to(logits.device).bool()
    valid = am[:, 1:] & am[:, :-1]                                       # [B, P-1]
    pred = logits[:, :-1].float()[valid]                                 # [N, V]
    target = input_ids.to(logits.device)[:, 1:][valid].long()            # [N]
    if target.numel() == 0:
        return 0.0, 0
    return float(F.cross_entropy(pred, target, reduction="sum").item()), int(target.numel())


def perplexity(sum_nll: float, n_tokens: int) -> float:
    """``exp(sum_nll / n_tokens)``; ``inf`` on overflow."""
    if n_tokens <= 0:
        raise ValueError("perplexity needs n_tokens > 0")
    mean = sum_nll / n_tokens
    return math.exp(mean) if mean < 700 else math.inf


def _as_numpy(x: Any) -> np.ndarray:
    if isinstance(x, Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(list(x) if not isinstance(x, np.ndarray) else x)


def auroc(scores: Any, labels: Any) -> float:
    """Area under the ROC curve of ``scores`` (higher = more positive) for boolean ``labels``.

    Raises ``ValueError`` on length mismatch, NaN scores, or when ``labels`` hold a single class.
    """
    from sklearn.metrics import roc_auc_score

    s = _as_numpy(scores).astype(np.float64).ravel()
    y = _as_numpy(labels).astype(bool).ravel()
    if s.shape != y.shape:
        raise ValueError(f"auroc: {s.size} scores but {y.size} labels")
    if np.isnan(s).any():
        raise ValueError("auroc: scores contain NaN")
    n_pos = int(y.sum())
    if n_pos == 0 or n_pos == y.size:
        raise ValueError(f"auroc needs both positive and negative labels; got {n_pos} positive "
                         f"out of {y.size}")
    return float(roc_auc_score(y, s))


def agreement(a: Sequence[bool], b: Sequence[bool]) -> dict[str, float]:
    """Agreement between two sets of boolean verdicts (e.g. two refusal judges).

    Returns ``n``, ``accuracy`` (fraction equal), Cohen's ``kappa`` (NaN when both raters are constant
    and identical, where kappa is undefined), and the counts ``both``, ``a_only``, ``b_only``, ``neither``.
    """
    x, y = _as_numpy(a).astype(bool).ravel(), _as_numpy(b).astype(bool).ravel()
    if x.shape != y.shape:
        raise ValueError(f"agreement: {x.size} vs {y.size} verdicts")
    n = x.size
    if n == 0:
        raise ValueError("agreement: empty input")
    accuracy = float((x == y).mean())
    pa, pb = float(x.mean()), float(y.mean())
    expected = pa * pb + (1 - pa) * (1 - pb)
    kappa = math.nan if expected >= 1.0 else (accuracy - expected) / (1.0 - expected)
    return {
        "n": n, "accuracy": accuracy, "kappa": kappa,
        "both": int((x & y).sum()), "a_only": int((x & ~y).sum()),
        "b_only": int((~x & y).sum()), "neither": int((~x & ~y).sum()),
    }


class RateWithCI(TypedDict):
    """A rate ``k / n`` with its Wilson score interval ``[lo, hi]``."""

    rate: float
    lo: float
    hi: float
    n: int
    k: int


def wilson_interval(k: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """Wilson score interval for ``k`` successes out of ``n`` (default 95%); ``(0, 1)`` when ``n == 0``."""
    if n < 0 or not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n, got k={k}, n={n}")
    if n == 0:
        return 0.0, 1.0
    p = k / n
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def rate_with_ci(flags: Iterable[bool] | Tensor | np.ndarray, z: float = 1.959963984540054) -> RateWithCI:
    """Rate of true ``flags`` with a Wilson interval (95% by default).

    Empty input gives ``rate = nan`` and the uninformative interval ``[0, 1]``.
    """
    arr = _as_numpy(flags).astype(bool).ravel()
    n, k = int(arr.size), int(arr.sum())
    lo, hi = wilson_interval(k, n, z)
    return RateWithCI(rate=k / n if n else math.nan, lo=lo, hi=hi, n=n, k=k)
