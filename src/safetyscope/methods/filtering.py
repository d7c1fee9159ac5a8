"""Keep the prompts the model actually treats as its label says (Arditi et al. 2024):
harmful prompts it refuses and harmless prompts it answers, judged by the logit refusal score
(one forward pass, no generation) or, optionally, by generation + a judge."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ..measure.generation import generate, refusal_scores
from ..models.adapter import LoadedModel


@dataclass(frozen=True)
class Filtered:
    harmful: list[str]  # refused harmful prompts
    harmless: list[str]  # answered harmless prompts
    n_harmful_in: int
    n_harmless_in: int
    method: str

    def summary(self) -> dict[str, object]:
        return {
            "method": self.method,
            "harmful_kept": len(self.harmful),
            "harmful_in": self.n_harmful_in,
            "harmless_kept": len(self.harmless),
            "harmless_in": self.n_harmless_in,
        }


def filter_by_refusal(
    lm: LoadedModel,
    harmful: Sequence[str],
    harmless: Sequence[str],
    *,
    method: str = "score",
    judge: Callable[[str, str], bool] | None = None,
    threshold: float = 0.0,
    min_keep: int = 2,
    batch_size: int = 16,
    system: str | None = None,
    max_new_tokens: int = 48,
) -> Filtered:
    """``method="score"``: refusal score > threshold means refused; ``"judge"``: generate and ask ``judge``.

    If fewer than ``min_keep`` prompts survive in a group, the group is kept unfiltered (a model
    that never refuses still gets analysed) and the summary says so through the counts.
    """
    if method == "none":
        return Filtered(list(harmful), list(harmless), len(harmful), len(harmless), "none")
    if method == "score":
        refused_h = (refusal_scores(lm, harmful, batch_size=batch_size, system=system) > threshold).tolist()
        refused_s = (refusal_scores(lm, harmless, batch_size=batch_size, system=system) > threshold).tolist()
    elif method == "judge":
        if judge is None:
            from ..measure.judges import PhraseJudge

            judge = PhraseJudge()
        replies_h = generate(lm, harmful, max_new_tokens=max_new_tokens, batch_size=batch_size, system=system)
        replies_s = generate(lm, harmless, max_new_tokens=max_new_tokens, batch_size=batch_size, system=system)
        refused_h = [bool(judge(p, r)) for p, r in zip(harmful, replies_h)]
        refused_s = [bool(judge(p, r)) for p, r in zip(harmless, replies_s)]
    else:
        raise ValueError(f"unknown filter method {method!r}; use score, judge or none")
    kept_h = [p for p, r in zip(harmful, refused_h) if r]
    kept_s = [p for p, r in zip(harmless, refused_s) if not r]
    return Filtered(
        kept_h if len(kept_h) >= min_keep else list(harmful),
        kept_s if len(kept_s) >= min_keep else list(harmless),
        len(harmful),
        len(harmless),
        method,
    )
