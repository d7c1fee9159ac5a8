"""Keep the prompts the model actually treats as its label says (Arditi et al. 2024):
harmful prompts it refuses and harmless prompts it answers.

Methods, from cheap to faithful:

* ``first_token`` (default): the most likely first reply token is a refusal opening (one forward pass).
* ``score``: the logit refusal score is above ``threshold`` (Arditi et al.; one forward pass). With the
  default threshold 0 this needs more than half the probability on refusal openings, which is strict.
  On the default model, against the phrase judge on 60 AdvBench prompts' greedy replies, it agrees
  on 44 (22 kept of 38 refused), where ``first_token`` agrees on 57 (35 kept).
* ``judge``: generate greedy replies and ask a judge (the phrase judge by default).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..io import fingerprint, write_json
from ..measure.generation import generate, last_logits
from ..measure.memo import LogitsMemo
from ..measure.metrics import refusal_score
from ..measure.refusal_tokens import refusal_token_ids
from ..models.adapter import LoadedModel
from ..positions import Batch, PositionSpec
from ..sites import Site
from ..stats import GroupMoments
from .fit import fit_group_moments, fit_split_moments

JUDGE_TOKENS = 48  # reply length the judge method generates (part of every verdict cache key)


@dataclass(frozen=True)
class Filtered:
    harmful: list[str]  # refused harmful prompts
    harmless: list[str]  # answered harmless prompts
    n_harmful_in: int
    n_harmless_in: int
    method: str
    unfiltered: tuple[str, ...] = ()  # groups kept whole because fewer than min_keep prompts survived
    notes: tuple[str, ...] = ()

    def summary(self) -> dict[str, object]:
        return {
            "method": self.method,
            "harmful_kept": len(self.harmful),
            "harmful_in": self.n_harmful_in,
            "harmless_kept": len(self.harmless),
            "harmless_in": self.n_harmless_in,
            "unfiltered": list(self.unfiltered),
            "notes": list(self.notes),
        }


def filter_by_refusal(
    lm: LoadedModel,
    harmful: Sequence[str],
    harmless: Sequence[str],
    *,
    method: str = "first_token",
    judge: Callable[[str, str], bool] | None = None,
    threshold: float = 0.0,
    min_keep: int = 2,
    batch_size: int = 16,
    system: str | None = None,
    max_new_tokens: int = JUDGE_TOKENS,
    cache_dir: str | Path | None = None,
    memo: LogitsMemo | None = None,
) -> Filtered:
    """``method``: ``"first_token"``, ``"score"`` (refusal score > ``threshold``), ``"judge"`` or ``"none"``.

    If fewer than ``min_keep`` prompts survive in a group, the group is kept unfiltered (a model
    that never refuses still gets analysed); ``unfiltered`` names such groups and ``notes`` says why,
    and both appear in :meth:`Filtered.summary`.

    ``cache_dir``: keep the per-prompt verdicts there (``filter_<key>.json``), keyed by the model, the
    method and its settings and the prompts, so commands sharing an output directory (``map``'s stages)
    classify the same prompts once. ``memo``: the unmodified model's first-token logits, read and kept
    (:mod:`safetyscope.measure.memo`; the one-pass methods).
    """
    if method == "none":
        return Filtered(list(harmful), list(harmless), len(harmful), len(harmless), "none")
    if method not in ("first_token", "score", "judge"):
        raise ValueError(f"unknown filter method {method!r}; use first_token, score, judge or none")
    path = _cache_path(lm, method, threshold, system, max_new_tokens, judge, harmful, harmless, cache_dir)
    verdicts = _cached(path, len(harmful), len(harmless))
    if verdicts is not None:
        refused_h, refused_s = verdicts
    else:
        refused_h, refused_s = _verdicts(lm, harmful, harmless, method, judge, threshold, batch_size, system,
                                         max_new_tokens, memo)
        _save(path, method, refused_h, refused_s)
    return _keep(harmful, harmless, refused_h, refused_s, method, min_keep)


def filter_and_fit(
    lm: LoadedModel,
    harmful: Sequence[str],
    harmless: Sequence[str],
    sites: str | Site | Iterable[str | Site],
    positions: PositionSpec,
    *,
    method: str = "first_token",
    judge: Callable[[str, str], bool] | None = None,
    threshold: float = 0.0,
    min_keep: int = 2,
    batch_size: int = 16,
    system: str | None = None,
    cache_dir: str | Path | None = None,
    memo: LogitsMemo | None = None,
) -> tuple[Filtered, GroupMoments]:
    """:func:`filter_by_refusal` and the moments (groups ``harmful`` / ``harmless``) of the kept prompts at ``sites``.

    The one-pass methods (``first_token``, ``score``) whose verdicts are not cached read the verdicts and the
    activations from the same forward pass per batch (the activations of every prompt are captured and those of
    the kept ones accumulated): about half the passes of filtering and then capturing. The verdicts are cached
    as :func:`filter_by_refusal` caches them, and the logits kept in ``memo`` when one is given; the other
    methods filter, then capture.
    """
    path = _cache_path(lm, method, threshold, system, JUDGE_TOKENS, judge, harmful, harmless, cache_dir)
    if method not in ("first_token", "score") or _cached(path, len(harmful), len(harmless)) is not None:
        kept = filter_by_refusal(lm, harmful, harmless, method=method, judge=judge, threshold=threshold,
                                 min_keep=min_keep, batch_size=batch_size, system=system, cache_dir=cache_dir,
                                 memo=memo)
        return kept, fit_group_moments(lm, {"harmful": kept.harmful, "harmless": kept.harmless}, sites, positions,
                                       batch_size=batch_size, system=system)
    ids = refusal_token_ids(lm.tokenizer)
    keep_logits = memo is not None and memo.usable(lm)  # checked before the capture's own hooks go on

    def split(batch: Batch, logits: torch.Tensor) -> torch.Tensor:  # logits: [batch, vocab]
        if memo is not None and keep_logits:  # captures do not change the logits: they are the unmodified model's
            memo.put(lm, batch.texts, system, logits)
        return refused(logits, method, ids, threshold)

    parts, flags = fit_split_moments(lm, {"harmful": list(harmful), "harmless": list(harmless)}, sites, positions,
                                     split, batch_size=batch_size, system=system)
    _save(path, method, flags["harmful"], flags["harmless"])
    kept = _keep(harmful, harmless, flags["harmful"], flags["harmless"], method, min_keep)
    stats = GroupMoments()
    for group, wanted in (("harmful", True), ("harmless", False)):  # kept: refused harmful, answered harmless
        for part in ((True, False) if group in kept.unfiltered else (wanted,)):
            stats.merge(GroupMoments({group: parts.groups.get(f"{group}:{part}", {})}))
    return kept, stats


def refused(logits: torch.Tensor, method: str, token_ids: Sequence[int], threshold: float = 0.0) -> torch.Tensor:
    """[batch] bool from first-token logits [batch, vocab]: ``first_token``: the most likely token opens a refusal;
    ``score``: the logit refusal score is above ``threshold``."""
    if method == "first_token":
        ids = torch.tensor(list(token_ids), device=logits.device)
        return torch.isin(logits.argmax(-1), ids)
    return refusal_score(logits, list(token_ids)) > threshold


def _cache_path(lm: LoadedModel, method: str, threshold: float, system: str | None, max_new_tokens: int,
                judge: Callable[[str, str], bool] | None, harmful: Sequence[str], harmless: Sequence[str],
                cache_dir: str | Path | None) -> Path | None:
    if cache_dir is None:
        return None
    info = lm.describe()  # the model's name, size and dtype: another checkpoint gets other verdicts
    key = fingerprint(info.get("name"), info.get("n_params"), info.get("dtype"), method, threshold, system,
                      max_new_tokens, type(judge).__name__, list(harmful), list(harmless))
    return Path(cache_dir) / f"filter_{key}.json"


def _save(path: Path | None, method: str, refused_h: list[bool], refused_s: list[bool]) -> None:
    if path is not None:
        write_json(path, {"method": method, "harmful": refused_h, "harmless": refused_s})


def _cached(path: Path | None, n_harmful: int, n_harmless: int) -> tuple[list[bool], list[bool]] | None:
    from ..io import read_json

    try:
        data = read_json(path) if path is not None and path.is_file() else None
    except ValueError:  # a damaged cache file is recomputed
        return None
    if not isinstance(data, dict) or len(data.get("harmful", ())) != n_harmful or len(data.get("harmless", ())) != n_harmless:
        return None
    return [bool(x) for x in data["harmful"]], [bool(x) for x in data["harmless"]]


def _verdicts(
    lm: LoadedModel, harmful: Sequence[str], harmless: Sequence[str], method: str,
    judge: Callable[[str, str], bool] | None, threshold: float, batch_size: int, system: str | None, max_new_tokens: int,
    memo: LogitsMemo | None = None,
) -> tuple[list[bool], list[bool]]:
    """Per prompt: does the model refuse it (by ``method``)?"""
    if method in ("first_token", "score"):
        ids = refusal_token_ids(lm.tokenizer)
        refused_h = refused(last_logits(lm, harmful, batch_size=batch_size, system=system, memo=memo), method, ids,
                            threshold).tolist()
        refused_s = refused(last_logits(lm, harmless, batch_size=batch_size, system=system, memo=memo), method, ids,
                            threshold).tolist()
    else:  # "judge" (filter_by_refusal validated the method)
        if judge is None:
            from ..measure.judges import PhraseJudge

            judge = PhraseJudge()
        # both groups in one generation call: decoding is memory-bound, so it costs about one group's
        prompts = [*harmful, *harmless]
        replies = generate(lm, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size, system=system)
        flags = [bool(judge(p, r)) for p, r in zip(prompts, replies)]
        refused_h, refused_s = flags[: len(harmful)], flags[len(harmful):]
    return [bool(x) for x in refused_h], [bool(x) for x in refused_s]


def _keep(harmful: Sequence[str], harmless: Sequence[str], refused_h: list[bool], refused_s: list[bool], method: str,
          min_keep: int) -> Filtered:
    groups = {
        "harmful": ([p for p, r in zip(harmful, refused_h) if r], list(harmful), "refused"),
        "harmless": ([p for p, r in zip(harmless, refused_s) if not r], list(harmless), "answered"),
    }
    kept: dict[str, list[str]] = {}
    unfiltered: list[str] = []
    notes: list[str] = []
    for name, (survivors, everything, verb) in groups.items():
        if len(survivors) >= min_keep:
            kept[name] = survivors
            continue
        kept[name] = everything
        unfiltered.append(name)
        notes.append(f"only {len(survivors)} of {len(everything)} {name} prompts were {verb} (by {method}), "
                     f"fewer than {min_keep}: the {name} group is used unfiltered")
    return Filtered(kept["harmful"], kept["harmless"], len(harmful), len(harmless), method, tuple(unfiltered), tuple(notes))
