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

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..io import fingerprint
from ..measure.generation import generate, last_logits, refusal_scores
from ..measure.refusal_tokens import refusal_token_ids
from ..models.adapter import LoadedModel


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
    max_new_tokens: int = 48,
    cache_dir: str | Path | None = None,
) -> Filtered:
    """``method``: ``"first_token"``, ``"score"`` (refusal score > ``threshold``), ``"judge"`` or ``"none"``.

    If fewer than ``min_keep`` prompts survive in a group, the group is kept unfiltered (a model
    that never refuses still gets analysed); ``unfiltered`` names such groups and ``notes`` says why,
    and both appear in :meth:`Filtered.summary`.

    ``cache_dir``: keep the per-prompt verdicts there (``filter_<key>.json``), keyed by the model, the
    method and its settings and the prompts, so commands sharing an output directory (``map``'s stages)
    classify the same prompts once.
    """
    if method == "none":
        return Filtered(list(harmful), list(harmless), len(harmful), len(harmless), "none")
    if method not in ("first_token", "score", "judge"):
        raise ValueError(f"unknown filter method {method!r}; use first_token, score, judge or none")
    path = None
    if cache_dir is not None:
        info = lm.describe()  # the model's name, size and dtype: another checkpoint gets other verdicts
        key = fingerprint(info.get("name"), info.get("n_params"), info.get("dtype"), method, threshold, system,
                          max_new_tokens, type(judge).__name__, list(harmful), list(harmless))
        path = Path(cache_dir) / f"filter_{key}.json"
    verdicts = _cached(path, len(harmful), len(harmless))
    if verdicts is not None:
        refused_h, refused_s = verdicts
    else:
        refused_h, refused_s = _verdicts(lm, harmful, harmless, method, judge, threshold, batch_size, system,
                                         max_new_tokens)
        if path is not None:
            from ..io import write_json

            write_json(path, {"method": method, "harmful": refused_h, "harmless": refused_s})
    return _keep(harmful, harmless, refused_h, refused_s, method, min_keep)


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
) -> tuple[list[bool], list[bool]]:
    """Per prompt: does the model refuse it (by ``method``)?"""
    if method == "first_token":
        ids = set(refusal_token_ids(lm.tokenizer))
        refused_h = [int(t) in ids for t in last_logits(lm, harmful, batch_size=batch_size, system=system).argmax(-1).tolist()]
        refused_s = [int(t) in ids for t in last_logits(lm, harmless, batch_size=batch_size, system=system).argmax(-1).tolist()]
    elif method == "score":
        refused_h = (refusal_scores(lm, harmful, batch_size=batch_size, system=system) > threshold).tolist()
        refused_s = (refusal_scores(lm, harmless, batch_size=batch_size, system=system) > threshold).tolist()
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
