"""Measurement: refusal judges, refusal-token scores and pure metrics (no model loading here)."""

from __future__ import annotations

from safetyscope.measure.judges import (
    DEFAULT_REFUSAL_MARKERS,
    STRONG_REFUSAL_MARKERS,
    Judge,
    PhraseJudge,
    Verdict,
    as_judge,
    load_judge,
)
from safetyscope.measure.metrics import (
    RateWithCI,
    agreement,
    auroc,
    kl_divergence,
    mean_kl,
    perplexity,
    rate_with_ci,
    refusal_score,
    token_cross_entropy,
    wilson_interval,
)
from safetyscope.measure.refusal_tokens import DEFAULT_REFUSAL_OPENINGS, refusal_token_ids, refusal_tokens

# Generation and evaluation (e.g. ``generate_replies``, ``evaluate``) are written by others and will be
# re-exported here later, next to the pure measurement functions above.
# isort: split
from safetyscope.measure.capability import CrossEntropy as CrossEntropy
from safetyscope.measure.capability import KLResult as KLResult
from safetyscope.measure.capability import compare_cross_entropy as compare_cross_entropy
from safetyscope.measure.capability import cross_entropy as cross_entropy
from safetyscope.measure.capability import generate_with_logits as generate_with_logits
from safetyscope.measure.capability import reply_kl as reply_kl
from safetyscope.measure.evaluate import EvalResult as EvalResult
from safetyscope.measure.evaluate import evaluate as evaluate  # note: shadows the submodule attribute

__all__ = [
    "DEFAULT_REFUSAL_MARKERS",
    "DEFAULT_REFUSAL_OPENINGS",
    "STRONG_REFUSAL_MARKERS",
    "Judge",
    "PhraseJudge",
    "RateWithCI",
    "Verdict",
    "agreement",
    "as_judge",
    "auroc",
    "kl_divergence",
    "load_judge",
    "mean_kl",
    "perplexity",
    "rate_with_ci",
    "refusal_score",
    "refusal_token_ids",
    "refusal_tokens",
    "token_cross_entropy",
    "wilson_interval",
]
