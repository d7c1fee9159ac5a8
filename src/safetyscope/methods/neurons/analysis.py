"""The neuron analysis behind ``find_neurons`` and ``neuron_fragility``: filter the prompts, fit per-neuron
statistics and (optionally) gradient attributions, cached and resumable.

With a ``cache_dir`` the finished analysis is kept in ``analysis.json`` + ``analysis.safetensors``, keyed by
the model and every input, and reused by a later call with the same inputs. While it runs, the running
statistics of every finished batch are saved atomically in ``analysis_partial.safetensors`` (same key), so an
interrupted analysis resumes from the last finished batch instead of starting over.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args

import torch

from ...io import fingerprint, load_tensors, read_json, save_tensors, write_json
from ...models.adapter import LoadedModel
from ...parallel import broadcast_object, is_writer
from ...positions import Batch, PositionSpec
from ...stats import GroupMoments
from .grads import AttributionMoments, NeuronAttribution, loss_batches, refusal_batches
from .rank import NeuronStats, accumulate, check_positions, neuron_sites, position_name, stats_from_moments

FilterMethod = Literal["first_token", "score", "judge", "none"]
FILTERS: tuple[str, ...] = get_args(FilterMethod)
PARTIAL = "analysis_partial.safetensors"
SAVE_EVERY_S = 10.0  # checkpoint at most this often (and at the end of every phase): big models, fast batches
T = TypeVar("T")


def check_filter(method: str, no_filter: bool = False) -> FilterMethod:
    """The prompt filter to use: ``method``, or ``none`` with its alias ``no_filter``."""
    m = method.strip().lower()
    if m not in FILTERS:
        raise ValueError(f"unknown --filter {method!r}; use {', '.join(FILTERS)}")
    if no_filter:
        if m not in ("first_token", "none"):  # first_token is the default: only an explicit other filter conflicts
            raise ValueError(f"--no-filter conflicts with --filter {m}; give one of them")
        return "none"
    return m  # type: ignore[return-value]


@dataclass(frozen=True)
class NeuronAnalysis:
    """Per-neuron statistics of the filtered prompts, and the refusal / utility attributions when computed."""

    stats: NeuronStats
    refusal: NeuronAttribution | None
    utility: NeuronAttribution | None
    filter: dict[str, Any]  # Filtered.summary()
    cached: bool = False


class Checkpoint:
    """Running statistics of finished batches, saved atomically (after the first batch, then at most every
    :data:`SAVE_EVERY_S` seconds and at the end of every phase) under one key.

    ``done[phase]`` holds the indices of the finished prompts of each phase; a checkpoint whose key differs
    from the current inputs is ignored (and overwritten by the first save).
    """

    def __init__(self, path: Path | None, key: str) -> None:
        self.path, self.key = path, key
        self.done: dict[str, set[int]] = {}
        self.tensors: dict[str, torch.Tensor] = {}
        self.saved_at = -math.inf
        if path is not None and path.is_file():
            try:
                tensors = load_tensors(path)
                meta = json.loads(_metadata(path).get("progress", "{}"))
            except (OSError, ValueError):
                return
            if meta.get("key") == key:
                self.done = {k: set(v) for k, v in meta.get("done", {}).items()}
                self.tensors = tensors

    def n_done(self) -> int:
        return sum(len(v) for v in self.done.values())

    def save(self, phase: str, done: set[int], tensors: dict[str, torch.Tensor], *, force: bool = False) -> None:
        # under torchrun rank 0's clock decides for every rank: each rank must reach the same writes
        if not force and not broadcast_object(time.monotonic() - self.saved_at >= SAVE_EVERY_S):
            return
        self.saved_at = time.monotonic()
        self.done[phase] = set(done)
        self.tensors = {**self.tensors, **tensors}
        if self.path is not None:
            meta = {"key": self.key, "done": {k: sorted(v) for k, v in self.done.items()}}
            save_tensors(self.path, self.tensors, metadata={"progress": json.dumps(meta)})

    def clear(self) -> None:
        if self.path is not None and is_writer():  # under torchrun rank 0 alone removes what it wrote
            self.path.unlink(missing_ok=True)


def _metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def saved_progress(cache_dir: str | Path | None) -> int:
    """How many prompts' statistics an interrupted analysis left in ``cache_dir`` (0 = nothing saved)."""
    if cache_dir is None or not (Path(cache_dir) / PARTIAL).is_file():
        return 0
    try:
        meta = json.loads(_metadata(Path(cache_dir) / PARTIAL).get("progress", "{}"))
    except (OSError, ValueError):
        return 0
    return sum(len(v) for v in meta.get("done", {}).values())


def _resume(ckpt: Checkpoint, phase: str, items: Sequence[T], run: Callable[[list[T]], Iterator[Batch]],
            state: Callable[[], dict[str, torch.Tensor]]) -> None:
    """Run ``items`` not yet done in ``phase`` (``run`` yields each finished batch) and checkpoint after each."""
    done = set(ckpt.done.get(phase, set()))
    todo = [i for i in range(len(items)) if i not in done]
    if not todo:
        return
    for batch in run([items[i] for i in todo]):
        done.update(todo[j] for j in batch.index)
        ckpt.save(phase, done, state())
    ckpt.save(phase, done, state(), force=True)


def _fit(lm: LoadedModel, harmful: list[str], harmless: list[str], *, positions: PositionSpec, layers: str | Sequence[int],
         gradient: bool, utility: Sequence[str], utility_tokens: int, batch_size: int, system: str | None,
         ckpt: Checkpoint) -> tuple[NeuronStats, NeuronAttribution | None, NeuronAttribution | None]:
    sites = neuron_sites(lm, layers)
    layer_list = [int(s.layer) for s in sites if s.layer is not None]
    gm = GroupMoments.from_state({k[6:]: v for k, v in ckpt.tensors.items() if k.startswith("stats/")})

    def stats_run(group: str) -> Callable[[list[str]], Iterator[Batch]]:
        return lambda todo: accumulate(lm, todo, sites, positions, gm, group, batch_size=batch_size, system=system)

    for group, prompts in (("harmful", harmful), ("harmless", harmless)):
        if not prompts:
            raise ValueError(f"the {group!r} prompt set is empty; give at least one prompt")
        _resume(ckpt, f"stats_{group}", prompts, stats_run(group), lambda: {f"stats/{k}": v for k, v in gm.state().items()})
    stats = stats_from_moments(gm, layer_list, position_name(positions))
    if not gradient:
        return stats, None, None
    ref = AttributionMoments.from_state(ckpt.tensors, "refusal/")

    def ref_run(todo: list[str]) -> Iterator[Batch]:
        for b, att in refusal_batches(lm, todo, sites, batch_size=batch_size, system=system):
            ref.update(att)
            yield b

    _resume(ckpt, "refusal", harmful, ref_run, lambda: ref.state("refusal/"))
    if not utility:
        return stats, ref.result(layer_list, "refusal_score"), None
    util = AttributionMoments.from_state(ckpt.tensors, "utility/")

    def util_run(todo: list[str]) -> Iterator[Batch]:
        for b, att in loss_batches(lm, todo, sites, max_tokens=utility_tokens, batch_size=max(1, batch_size // 4)):
            util.update(att)
            yield b

    _resume(ckpt, "utility", list(utility), util_run, lambda: util.state("utility/"))
    return stats, ref.result(layer_list, "refusal_score"), util.result(layer_list, "lm_loss")


def _load(cache: Path, key: str, positions: PositionSpec) -> NeuronAnalysis | None:
    state_path, tensors_path = cache / "analysis.json", cache / "analysis.safetensors"
    if not (state_path.is_file() and tensors_path.is_file()):
        return None
    state = read_json(state_path)
    if state.get("key") != key:
        return None
    t = load_tensors(tensors_path)
    stats = NeuronStats.from_state({k[6:]: v for k, v in t.items() if k.startswith("stats/")}, position_name(positions))
    ref = NeuronAttribution.from_state(t, "refusal_score", "refusal/") if "refusal/layers" in t else None
    util = NeuronAttribution.from_state(t, "lm_loss", "utility/") if "utility/layers" in t else None
    return NeuronAnalysis(stats, ref, util, state["filter"], cached=True)


def _save(cache: Path, key: str, a: NeuronAnalysis) -> None:
    tensors = {f"stats/{k}": v for k, v in a.stats.state().items()}
    for prefix, att in (("refusal/", a.refusal), ("utility/", a.utility)):
        if att is not None:
            tensors.update(att.state(prefix))
    save_tensors(cache / "analysis.safetensors", tensors)
    write_json(cache / "analysis.json", {"key": key, "filter": a.filter})


def analyse_neurons(
    lm: LoadedModel,
    harmful: Sequence[str],
    harmless: Sequence[str],
    *,
    positions: PositionSpec = "last",
    layers: str | Sequence[int] = "*",
    filter: FilterMethod = "first_token",
    gradient: bool = True,
    utility: Sequence[str] = (),
    utility_tokens: int = 128,
    batch_size: int = 8,
    system: str | None = None,
    cache_dir: str | Path | None = None,
    filter_cache: str | Path | None = None,
) -> NeuronAnalysis:
    """Filter the prompts (refused harmful, answered harmless), fit the neuron statistics, and with ``gradient``
    the refusal-score attribution on the kept harmful prompts and the loss attribution on ``utility`` texts."""
    from .. import filtering  # looked up at call time (tests replace filter_by_refusal)

    check_positions(positions)
    method = check_filter(filter)
    layer_key = layers if isinstance(layers, str) else [int(v) for v in layers]
    key = fingerprint(lm.name, list(harmful), list(harmless), positions, layer_key, method, system, gradient,
                      list(utility) if gradient else [], utility_tokens)
    cache = None if cache_dir is None else Path(cache_dir)
    if cache is not None and (found := _load(cache, key, positions)) is not None:
        return found
    filt = filtering.filter_by_refusal(lm, list(harmful), list(harmless), method=method, batch_size=batch_size,
                                       system=system, cache_dir=filter_cache)
    ckpt = Checkpoint(None if cache is None else cache / PARTIAL, fingerprint(key, filt.harmful, filt.harmless))
    stats, ref, util = _fit(lm, filt.harmful, filt.harmless, positions=positions, layers=layers, gradient=gradient,
                            utility=utility, utility_tokens=utility_tokens, batch_size=batch_size, system=system, ckpt=ckpt)
    out = NeuronAnalysis(stats, ref, util, filt.summary())
    if cache is not None:
        _save(cache, key, out)
        ckpt.clear()
    return out


__all__ = ["FILTERS", "Checkpoint", "FilterMethod", "NeuronAnalysis", "analyse_neurons", "check_filter", "saved_progress"]
