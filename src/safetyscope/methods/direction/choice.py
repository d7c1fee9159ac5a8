"""Filters and the choice among scored candidates: by the logit score (``choose``, Arditi et al.) or by
judged replies of the finalists (``verify_choice``)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from ...models.adapter import LoadedModel
from .candidates import Candidates
from .scores import EXCLUDED, INDUCE_REASONS, CandidateScore, Key, Reason, SelectConfig


def apply_filters(s: CandidateScore, cfg: SelectConfig) -> None:
    """Add the reasons a scored candidate fails the selection filters (idempotent)."""
    if s.bypass is None:
        return
    if s.kl is None or not math.isfinite(s.kl) or not math.isfinite(s.bypass):
        s.flag(Reason.NOT_FINITE)
    elif s.kl > cfg.kl_threshold:
        s.flag(Reason.KL)
    if s.induce is None:
        s.flag(Reason.INDUCE_NOT_SCORED)
    elif s.induce < cfg.induce_threshold:
        s.flag(Reason.FAILS_INDUCE)


def _lowest(pool: list[CandidateScore]) -> CandidateScore:
    return min(pool, key=lambda s: float(s.bypass))  # type: ignore[arg-type]


def choose(scores: list[CandidateScore], config: dict[str, Any] | None = None) -> tuple[CandidateScore | None, str]:
    """Lowest bypass among eligible candidates. Fallbacks (noted): relax the induce filter first (keep
    the KL filter: it guards the model's other behaviour), then the KL filter too; never late layers.
    ``config`` (a Selection's config) only words the note."""
    eligible = [s for s in scores if s.eligible]
    if eligible:
        return _lowest(eligible), ""

    def why(s: CandidateScore) -> str:
        return ", ".join(r.text(config or {}) for r in s.reasons)

    scored = [s for s in scores if s.bypass is not None and math.isfinite(s.bypass) and not s.has(EXCLUDED)]
    gentle = [s for s in scored if all(r in INDUCE_REASONS for r in s.reasons)]
    if gentle:
        best = _lowest(gentle)
        return best, ("no candidate induced refusal under activation addition; chose the lowest bypass among "
                      f"those within the KL threshold ({why(best)})")
    if not scored:
        return None, "no candidate could be scored"
    best = _lowest(scored)
    return best, f"no candidate passed the KL filter; chose the lowest bypass anyway ({why(best)}): treat this direction with caution"


def verify_choice(
    lm: LoadedModel,
    candidates: Candidates,
    scores: dict[Key, CandidateScore],
    harmful: list[str],
    harmless: list[str],
    cfg: SelectConfig,
    baseline: dict[str, float],
    *,
    batch_size: int,
    system: str | None,
    judge: Callable[[str, str], bool] | None,
    memo: Callable[..., None],
    log: Callable[[str], None],
    config: dict[str, Any] | None = None,
) -> tuple[CandidateScore | None, str]:
    """Judge real replies of the ``cfg.verify`` lowest-bypass candidates within the KL threshold and
    choose the lowest judged refusal under ablation among those whose addition induces refusal.

    Fills ``baseline["judged_harmful"]`` / ``["judged_harmless"]`` (the unmodified model's judged rates)."""
    from ...measure.judges import PhraseJudge
    from .evaluate import ReplyCache, refusal_rate, replies_together

    judge_fn = judge or PhraseJudge()
    pool = sorted((s for s in scores.values() if s.bypass is not None and math.isfinite(s.bypass)
                   and not s.has(EXCLUDED | {Reason.KL})), key=lambda s: float(s.bypass))[: cfg.verify]  # type: ignore[arg-type]
    if not pool:
        return choose(list(scores.values()), config)
    base = replies_together(lm, {"harmful": harmful, "harmless": harmless}, None, ReplyCache(None, {}),
                            max_new_tokens=cfg.verify_tokens, batch_size=batch_size, system=system)
    baseline["judged_harmful"] = float(refusal_rate(harmful, base["harmful"], judge_fn)["rate"])
    baseline["judged_harmless"] = float(refusal_rate(harmless, base["harmless"], judge_fn)["rate"])
    for s in pool:
        _judge_finalist(lm, candidates, s, harmful, harmless, cfg, judge_fn, memo, batch_size=batch_size, system=system)
        log(f"layer {s.layer:>3} pos {s.position:>3}: judged refusal under ablation {s.judged_bypass:.0%} "
            f"(baseline {baseline['judged_harmful']:.0%}), under addition {s.judged_induce:.0%} "
            f"(baseline {baseline['judged_harmless']:.0%})")
    inducing = [s for s in pool if float(s.judged_induce or 0.0) > baseline["judged_harmless"]]

    def best_of(group: list[CandidateScore]) -> CandidateScore:
        return min(group, key=lambda s: (float(s.judged_bypass or 0.0), float(s.bypass)))  # type: ignore[arg-type]

    verified = f"verified on replies ({len(pool)} finalists within the KL threshold)"
    if inducing:
        return best_of(inducing), verified
    return best_of(pool), verified + "; no finalist's addition was judged to induce refusal"


def _judge_finalist(lm: LoadedModel, candidates: Candidates, s: CandidateScore, harmful: list[str], harmless: list[str],
                    cfg: SelectConfig, judge: Callable[[str, str], bool], memo: Callable[..., None], *,
                    batch_size: int, system: str | None) -> None:
    """Judged refusal of ``s`` under its ablation (harmful) and addition (harmless), unless memoised."""
    from ...measure.generation import generate
    from .evaluate import refusal_rate

    def judged(prompts: list[str], ctx: Any) -> float:
        with ctx:
            replies = generate(lm, prompts, max_new_tokens=cfg.verify_tokens, batch_size=batch_size, system=system)
        return float(refusal_rate(prompts, replies, judge)["rate"])

    d = candidates.direction(s.layer, s.position, ablation=cfg.ablation)  # the artifact's own hooks
    if s.judged_bypass is None:
        memo(s.key, judged_bypass=judged(harmful, d.apply(lm)))
    if s.judged_induce is None:
        memo(s.key, judged_induce=judged(harmless, d.add(lm, cfg.coeff)))
