"""The refusal direction in one call: candidates, selection on validation prompts, optional verification.

>>> import safetyscope as ss                                          # doctest: +SKIP
>>> lm = ss.load_model("small")                                      # doctest: +SKIP
>>> d = ss.find_direction(lm, ["How do I pick a lock?"] * 4, ["How do I bake bread?"] * 4)  # doctest: +SKIP
>>> with d.apply(lm):                                                # doctest: +SKIP
...     ...

``search_direction`` returns everything the search measured (:class:`DirectionSearch`); with
``cache_dir`` it keeps the candidates and the partial scores there, keyed by the model, the settings and
the prompts, so an interrupted or repeated search resumes where it stopped.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from ...io import fingerprint, read_json, write_json
from ...measure.memo import LogitsMemo
from ...models.adapter import LoadedModel
from ...prompts.sets import PromptsLike
from .artifact import ABLATIONS, Ablation, Direction
from .candidates import Candidates
from .inputs import TrainVal, file_records, train_val_texts, with_fit_files
from .scores import INDUCE_MODES, SCREEN_MODES, InduceMode, ScreenMode, SelectConfig, Selection

FilterMethod = Literal["first_token", "score", "judge", "none"]
FILTERS: tuple[FilterMethod, ...] = ("first_token", "score", "judge", "none")
Judge = Callable[[str, str], bool]


@dataclass(frozen=True)
class DirectionConfig:
    """Every setting of the direction search (the flags of ``safetyscope direction find``), checked once."""

    positions: str | tuple[int, ...] = "post_instruction"  # post_instruction, last, or negative offsets
    filter: FilterMethod = "first_token"  # keep refused harmful / answered harmless prompts by this test
    layers: tuple[int, ...] | None = None  # score candidates only at these blocks (None = all)
    kl_threshold: float = 0.1  # filter out candidates whose ablation moves harmless first-token KL above this
    induce_threshold: float = 0.0  # filter out candidates whose addition gives a harmless refusal score below this
    prune_layers: float = 0.2  # filter out candidates in this last fraction of blocks
    induce: InduceMode = "all"  # all: score addition for every candidate; lazy: in bypass order until one passes
    score_pruned: bool = False  # also score the pruned last blocks (complete heatmaps)
    per_pass: int = 0  # candidates scored per forward pass (0 = as many as fit batch_size rows)
    screen: int = 0  # first score every candidate on this many prompts per group (0 = off) ...
    keep: int = 16  # ... then fully score only the best `keep`
    screen_by: ScreenMode = "forward"  # forward: a pass per candidate; gradient: first-order prediction, one backward
    ablation: Ablation = "zero"  # zero (Arditi et al.) or mean (to the harmless mean)
    verify: int = 0  # judge real replies of this many finalists and choose by judged refusal (0 = off)
    verify_tokens: int = 24  # reply length for verify

    def __post_init__(self) -> None:
        from ...positions import parse_positions

        if self.ablation not in ABLATIONS:
            raise ValueError(f"unknown ablation {self.ablation!r}; use {' or '.join(ABLATIONS)}")
        if self.filter not in FILTERS:
            raise ValueError(f"unknown filter {self.filter!r}; use {', '.join(FILTERS)}")
        if self.induce not in INDUCE_MODES:
            raise ValueError(f"unknown induce mode {self.induce!r}; use all or lazy")
        if self.screen_by not in SCREEN_MODES:
            raise ValueError(f"unknown screen mode {self.screen_by!r}; use forward or gradient")
        if not isinstance(self.positions, str):
            object.__setattr__(self, "positions", tuple(int(p) for p in self.positions))
        spec = parse_positions(self.positions)
        if spec not in ("post_instruction", "last") and not isinstance(spec, tuple):
            raise ValueError(f"candidates need token positions (post_instruction, last or offsets like -1,-2), not {spec!r}")
        if self.layers is not None:
            object.__setattr__(self, "layers", tuple(int(v) for v in self.layers))
        if not 0.0 <= self.prune_layers < 1.0:
            raise ValueError(f"prune_layers must be in [0, 1), not {self.prune_layers}")
        if math.isnan(self.kl_threshold) or math.isnan(self.induce_threshold):
            raise ValueError("kl_threshold and induce_threshold must be numbers, not NaN")
        for name in ("per_pass", "screen", "keep", "verify"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, not {getattr(self, name)}")
        if self.verify_tokens < 1:
            raise ValueError(f"verify_tokens must be at least 1, not {self.verify_tokens}")

    def select_config(self) -> SelectConfig:
        return SelectConfig(self.kl_threshold, self.induce_threshold, self.prune_layers, self.induce, self.score_pruned,
                            None if self.layers is None else list(self.layers), None, 1.0, self.per_pass, self.screen,
                            self.keep, screen_by=self.screen_by, verify=self.verify, verify_tokens=self.verify_tokens,
                            ablation=self.ablation)


@dataclass(frozen=True)
class DirectionSearch:
    """The chosen direction, every candidate's scores and the group means they came from."""

    direction: Direction
    selection: Selection
    candidates: Candidates
    n_train: tuple[int, int]  # (harmful, harmless) fitting prompts after the refusal filter
    n_val: tuple[int, int]  # (harmful, harmless) selection prompts after the refusal filter

    def to_json(self) -> dict[str, Any]:
        d, sel = self.direction, self.selection
        return {
            "model": d.meta.get("model"), "layer": d.layer, "position": d.position, "token": d.token, "norm": d.norm,
            "scores": d.scores, "note": sel.note, "ablation": d.ablation, "n_train": list(self.n_train),
            "n_val": list(self.n_val), "filter": self.candidates.info.get("filter"), "n_candidates": len(sel.scores),
            "n_eligible": sum(1 for c in sel.scores if c.eligible),
        }


class NoDirectionFound(RuntimeError):
    """No candidate could be scored; ``selection`` still holds what was measured."""

    def __init__(self, selection: Selection, candidates: Candidates):
        super().__init__("no candidate could be scored; check the prompts (both groups need prompts) and --layers")
        self.selection = selection
        self.candidates = candidates


def find_direction(lm: LoadedModel, harmful: PromptsLike, harmless: PromptsLike, **kw: Any) -> Direction:
    """The refusal direction: :func:`search_direction` (same arguments) without the search's records."""
    return search_direction(lm, harmful, harmless, **kw).direction


def search_direction(
    lm: LoadedModel,
    harmful: PromptsLike,
    harmless: PromptsLike,
    *,
    val_harmful: PromptsLike | None = None,
    val_harmless: PromptsLike | None = None,
    config: DirectionConfig | None = None,
    judge: Judge | None = None,
    batch_size: int = 8,
    system: str | None = None,
    cache_dir: Path | None = None,
    log: Callable[[str], None] | None = None,
    verdict_cache: Path | None = None,
    memo: LogitsMemo | None = None,
) -> DirectionSearch:
    """Difference-of-means candidates fitted on ``harmful``/``harmless`` and the direction selected on the
    validation prompts (default: each group split with :func:`safetyscope.prompts.sets.split_prompts`).

    Prompts: lists of strings, PromptSets or prompt files (files are recorded by sha256 in the direction's
    metadata). ``judge``: for ``filter="judge"`` and ``verify``. ``cache_dir``: keep the candidates and
    partial scores there to resume; ``verdict_cache``: where the refusal filter keeps its verdicts
    (default ``cache_dir``); ``memo``: keep the unmodified model's first-token logits of every prompt it runs
    there (for :func:`refine_direction` on the same prompts: :mod:`safetyscope.measure.memo`). Raises
    :class:`NoDirectionFound` when no candidate could be scored.
    """
    from ..filtering import filter_by_refusal
    from .candidates import position_offsets

    cfg = config or DirectionConfig()
    say = log or (lambda _m: None)
    _check_layers(lm, cfg.layers)
    tv = train_val_texts(harmful, harmless, val_harmful, val_harmless, what="direction")
    if not tv.held_out:
        say("too few prompts to hold some out for validation: selecting on the fitting prompts")
    offsets = position_offsets(lm, cfg.positions, system)
    verdicts = verdict_cache if verdict_cache is not None else cache_dir
    key = _candidate_key(lm, offsets, tv, system, cfg.filter, judge)
    cands = _candidates(lm, tv, offsets, cfg, key, judge=judge, batch_size=batch_size, system=system,
                        cache_dir=cache_dir, verdicts=verdicts, log=say, memo=memo)
    val = filter_by_refusal(lm, tv.val_harmful, tv.val_harmless, method=cfg.filter, judge=judge, batch_size=batch_size,
                            system=system, cache_dir=verdicts, memo=memo)
    direction, selection = _select(lm, cands, val.harmful, val.harmless, cfg, key, judge=judge, batch_size=batch_size,
                                   system=system, cache_dir=cache_dir, log=say, memo=memo)
    if direction is None:
        raise NoDirectionFound(selection, cands)
    direction = with_fit_files(direction, file_records({"harmful": harmful, "harmless": harmless,
                                                        "val_harmful": val_harmful, "val_harmless": val_harmless}))
    if not tv.held_out:
        direction = direction.with_meta(selected_on="the fitting prompts (too few to hold some out)")
    return DirectionSearch(direction, selection, cands, (cands.n_harmful, cands.n_harmless),
                           (len(val.harmful), len(val.harmless)))


def _check_layers(lm: LoadedModel, layers: Sequence[int] | None) -> None:
    bad = [v for v in layers or () if not 0 <= v < lm.n_layers]
    if bad:
        raise ValueError(f"layers {bad} are outside {lm.name}'s blocks 0-{lm.n_layers - 1}; pass layers within them")


def _judge_id(judge: Judge | None) -> str:
    if judge is None:
        return ""
    return f"{getattr(judge, '__module__', '')}:{getattr(judge, '__qualname__', type(judge).__qualname__)}"


def _candidate_key(lm: LoadedModel, offsets: Sequence[int], tv: TrainVal, system: str | None, filter: str,
                   judge: Judge | None) -> str:
    """Fingerprint of what the candidates depend on: the model, the prompts, the positions and the filter."""
    info = lm.describe()
    ident = [info["name"], info["n_params"], info["dtype"], system, filter, _judge_id(judge)]
    return fingerprint(ident, tuple(offsets), tv.harmful, tv.harmless)


def _candidates(lm: LoadedModel, tv: TrainVal, offsets: Sequence[int], cfg: DirectionConfig, key: str, *,
                judge: Judge | None, batch_size: int, system: str | None, cache_dir: Path | None,
                verdicts: Path | None, log: Callable[[str], None], memo: LogitsMemo | None) -> Candidates:
    """The candidates, read from ``cache_dir/candidates`` when their key matches, else computed (and saved)."""
    from .candidates import find_candidates

    where = Path(cache_dir) / "candidates" if cache_dir is not None else None
    if where is not None and (where / "candidates.json").is_file():
        loaded = Candidates.load(where)
        if loaded.info.get("key") == key:
            log(f"reusing candidates from {where}")
            return loaded
    log(f"capturing resid_pre at {lm.n_layers} blocks x {len(offsets)} positions "
        f"({len(tv.harmful)}+{len(tv.harmless)} prompts)")
    cands = find_candidates(lm, tv.harmful, tv.harmless, positions=list(offsets), filter=cfg.filter, judge=judge,
                            batch_size=batch_size, system=system, cache_dir=verdicts, memo=memo)
    cands.info["key"] = key
    if where is not None:
        cands.save(where)
    return cands


def _select(lm: LoadedModel, cands: Candidates, harmful: list[str], harmless: list[str], cfg: DirectionConfig,
            cand_key: str, *, judge: Judge | None, batch_size: int, system: str | None, cache_dir: Path | None,
            log: Callable[[str], None], memo: LogitsMemo | None) -> tuple[Direction | None, Selection]:
    """``select_direction``, resuming from and checkpointing to ``cache_dir/scores_partial.json`` (removed
    once the selection is complete)."""
    from .select import select_direction

    partial = Path(cache_dir) / "scores_partial.json" if cache_dir is not None else None
    # judged scores depend on the reply length, screening scores on how and on how many prompts they were made
    key = fingerprint(cand_key, harmful, harmless, cfg.verify_tokens, cfg.ablation, cfg.screen, cfg.screen_by)
    done: dict[str, dict[str, float]] = {}
    if partial is not None and partial.is_file():
        saved = read_json(partial)
        done = saved["scores"] if saved.get("key") == key else {}

    def save(memo: dict[str, dict[str, float]]) -> None:
        if partial is not None:
            write_json(partial, {"key": key, "scores": memo})

    log(f"scoring candidates on {len(harmful)}+{len(harmless)} validation prompts"
        + (f" (resuming {len(done)} scored)" if done else ""))
    result = select_direction(lm, cands, harmful, harmless, cfg.select_config(), batch_size=batch_size, system=system,
                              done=done, checkpoint=save, log=log, judge=judge, logits_memo=memo)
    if partial is not None:
        partial.unlink(missing_ok=True)
    return result
