"""Selecting the refusal direction among the candidates on a validation split (Arditi et al. 2024).

Each candidate (block ``l``, position ``p``) is scored with the one-pass logit refusal score:

* ``bypass``: mean refusal score on harmful prompts under directional ablation (lower = better);
* ``induce``: mean refusal score on harmless prompts under activation addition of the raw difference
  of means at ``blocks.{l}.resid_pre`` (should be > 0: the direction must cause refusal);
* ``kl``: mean first-token KL(original || ablated) on harmless prompts (the ablation must be gentle).

``ablation="mean"`` scores bypass and KL under mean ablation (the component moved to the harmless
mean, see :mod:`safetyscope.methods.direction.artifact`) instead of the paper's zero ablation.

Filters: KL above ``kl_threshold``, induce below ``induce_threshold``, and blocks in the last
``prune_layers`` fraction; the lowest bypass among the rest wins. Every candidate's scores are kept,
and why each was filtered out (:class:`~safetyscope.methods.direction.scores.Reason`).

Beyond the paper, ``verify=k`` checks the logit proxy on real replies: the ``k`` lowest-bypass
candidates within the KL threshold generate greedy replies to the harmful prompts under ablation and
to the harmless prompts under addition, a judge reads them, and the choice is the lowest *judged*
refusal under ablation among those whose addition is judged to induce refusal (more than without it).
The first-token score is a proxy: a candidate can push "I" down yet leave "As an AI, I cannot ...".

Speed: several candidates share one forward pass (each batch row carries its own direction), and
with ``induce="lazy"`` the addition pass is run only in bypass order until a candidate passes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict

import torch

from ...measure.compare import logits_under
from ...measure.memo import LogitsMemo
from ...measure.metrics import refusal_score
from ...measure.refusal_tokens import refusal_token_ids
from ...models.adapter import LoadedModel
from .artifact import Direction
from .attribution import predicted_bypass
from .candidates import Candidates
from .choice import apply_filters, choose, verify_choice
from .scores import CandidateScore, Key, Reason, SelectConfig, Selection, shortlist_size
from .scoring import CandidateScoring, Memo

__all__ = ["CandidateScore", "Key", "Reason", "SelectConfig", "Selection", "apply_filters", "choose",
           "select_direction", "verify_choice"]


def select_direction(
    lm: LoadedModel,
    candidates: Candidates,
    harmful: Sequence[str],
    harmless: Sequence[str],
    config: SelectConfig | None = None,
    *,
    batch_size: int = 8,
    system: str | None = None,
    token_ids: Sequence[int] | None = None,
    done: Memo | None = None,
    checkpoint: Callable[[Memo], None] | None = None,
    log: Callable[[str], None] | None = None,
    judge: Callable[[str, str], bool] | None = None,
    logits_memo: LogitsMemo | None = None,
) -> tuple[Direction | None, Selection]:
    """Score the candidates on validation prompts and pick the refusal direction.

    ``done``/``checkpoint``: partial scores keyed ``"layer:position"`` from an interrupted run, and a
    callback receiving them after every pass (``search_direction`` writes them to disk to resume).
    ``logits_memo``: the unmodified model's first-token logits (:mod:`safetyscope.measure.memo`) for the baseline.
    """
    cfg = config or SelectConfig()
    if not harmful or not harmless:
        raise ValueError("selection needs harmful and harmless validation prompts; give at least one of each")
    say = log or (lambda _m: None)
    ids = list(token_ids) if token_ids is not None else refusal_token_ids(lm.tokenizer)
    harmful, harmless = list(harmful), list(harmless)
    run = CandidateScoring(lm, candidates, cfg, ids, batch_size=batch_size, system=system, done=done,
                           checkpoint=checkpoint, log=say)
    base_s, baseline = _baseline(lm, harmful, harmless, ids, batch_size, system, logits_memo)
    todo = [k for k, s in run.scores.items()
            if Reason.ZERO not in s.reasons and (cfg.score_pruned or Reason.LATE not in s.reasons)]
    if 0 < cfg.screen < max(len(harmful), len(harmless)):
        todo = _screen(run, todo, harmful, harmless, base_s)
    run.ablation_pass([k for k in todo if run.scores[k].bypass is None], harmful, harmless, base_s)
    run.induce_pass(_induce_order(run), harmless, lazy=cfg.induce == "lazy")

    settings = {**asdict(cfg), "token_ids": ids, "cutoff": cfg.cutoff(candidates.n_layers)}
    for s in run.scores.values():
        apply_filters(s, cfg)
    if cfg.verify > 0:
        best, note = verify_choice(lm, candidates, run.scores, harmful, harmless, cfg, baseline, batch_size=batch_size,
                                   system=system, judge=judge, memo=run.record, log=say, config=settings)
        run.save()
    else:
        best, note = choose(list(run.scores.values()), settings)
    selection = Selection(list(run.scores.values()), best.key if best else None, baseline, settings, len(harmful),
                          len(harmless), note)
    if best is None:
        return None, selection
    return _chosen(lm, candidates, best, selection, cfg), selection


def _baseline(lm: LoadedModel, harmful: list[str], harmless: list[str], ids: list[int], batch_size: int,
              system: str | None, memo: LogitsMemo | None) -> tuple[torch.Tensor, dict[str, float]]:
    """(harmless first-token logits [n_s, vocab], the unmodified model's mean scores)."""
    base_h = logits_under(lm, harmful, None, batch_size=batch_size, system=system, memo=memo)  # [n_h, vocab]
    base_s = logits_under(lm, harmless, None, batch_size=batch_size, system=system, memo=memo)  # [n_s, vocab]
    return base_s, {"harmful_score": float(refusal_score(base_h, ids).mean()),
                    "harmless_score": float(refusal_score(base_s, ids).mean()),
                    "harmful_refusing": float((refusal_score(base_h, ids) > 0).float().mean())}


def _screen(run: CandidateScoring, todo: list[Key], harmful: list[str], harmless: list[str],
            base_s: torch.Tensor) -> list[Key]:
    """Score ``todo`` on the first ``cfg.screen`` prompts per group; the best ``cfg.keep`` go on (KL-passing first)."""
    cfg, scores = run.cfg, run.scores
    hp, sp = harmful[: cfg.screen], harmless[: cfg.screen]
    if cfg.screen_by == "gradient":
        todo = _shortlist(run, todo, harmful)
    run.ablation_pass([k for k in todo if scores[k].screen_bypass is None], hp, sp, base_s[: len(sp)], screen=True)
    live = [k for k in todo if not scores[k].reasons]
    ranked = sorted(live, key=lambda k: (float(scores[k].screen_kl or 0.0) > 2 * cfg.kl_threshold,
                                         float(scores[k].screen_bypass or 0.0)))
    return _keep_only(run, todo, ranked[: max(1, cfg.keep)])


def _keep_only(run: CandidateScoring, todo: list[Key], best: list[Key]) -> list[Key]:
    """The keys of ``todo`` in ``best`` (in ``todo``'s order); the others not yet fully scored are flagged SCREENED."""
    kept = set(best)
    for k in todo:
        if k not in kept and run.scores[k].bypass is None:
            run.scores[k].flag(Reason.SCREENED)
    return [k for k in todo if k in kept]


def _shortlist(run: CandidateScoring, todo: list[Key], harmful: list[str]) -> list[Key]:
    """The keys of ``todo`` with the lowest first-order predicted bypass on every ``harmful`` prompt (one forward +
    backward pass per batch; attribution.py), ``shortlist_size(keep)`` of them; the rest are flagged SCREENED.
    The prediction ranks bypass well but knows nothing of KL, so the forward screen follows on the shortlist."""
    scores = run.scores
    _predict(run, [k for k in todo if scores[k].predicted_bypass is None], harmful)
    ranked = sorted(todo, key=lambda k: float(scores[k].predicted_bypass or 0.0))
    return _keep_only(run, todo, ranked[: shortlist_size(run.cfg.keep)])


def _predict(run: CandidateScoring, keys: list[Key], harmful: list[str]) -> None:
    """Record each key's first-order predicted bypass on ``harmful``."""
    if not keys:
        return
    units = torch.stack([run.vec(k) / run.vec(k).norm() for k in keys])  # [K, d_model]
    targets = (torch.stack([run.candidates.targets(*k) for k in keys])  # [K, n_layers]
               if run.cfg.ablation == "mean" else None)
    predicted, base = predicted_bypass(run.lm, units, harmful, run.ids, targets=targets, batch_size=run.batch_size,
                                       system=run.system)
    run.say(f"attribution shortlist: {len(keys)} candidates predicted from the gradient on {len(harmful)} prompts "
            f"(unmodified score {base:+.3f})")
    for key, value in zip(keys, predicted.tolist()):
        run.record(key, predicted_bypass=float(value))
    run.save()


def _induce_order(run: CandidateScoring) -> list[Key]:
    """The candidates whose addition is scored, in order (lazy: KL-passing, by bypass; verify: the finalists)."""
    cfg, scores = run.cfg, run.scores
    scored = [k for k in scores if scores[k].bypass is not None]
    if cfg.induce != "lazy":
        return scored

    def kl_ok(s: CandidateScore) -> bool:
        return s.kl is not None and math.isfinite(s.kl) and s.kl <= cfg.kl_threshold

    order = sorted((k for k in scored if not scores[k].reasons and kl_ok(scores[k])),
                   key=lambda k: float(scores[k].bypass or 0.0))
    return order[: cfg.verify] if cfg.verify > 0 else order  # the judged check decides: only finalists need it


def _chosen(lm: LoadedModel, candidates: Candidates, best: CandidateScore, selection: Selection,
            cfg: SelectConfig) -> Direction:
    """The chosen candidate as a Direction carrying its scores."""
    judged = {"judged_bypass": best.judged_bypass, "judged_induce": best.judged_induce} if cfg.verify > 0 else {}
    return candidates.direction(
        best.layer, best.position,
        scores={"bypass": best.bypass, "bypass_refusing": best.bypass_refusing, "induce": best.induce, "kl": best.kl,
                **judged, **{f"baseline_{k}": v for k, v in selection.baseline.items()}},
        meta={"model": lm.name, "n_val_harmful": selection.n_harmful, "n_val_harmless": selection.n_harmless,
              "note": selection.note},
        ablation=cfg.ablation,
    )
