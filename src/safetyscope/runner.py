"""Batched runs over prompt lists: length-sorted batches, out-of-memory back-off, one-pass capture."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TypeVar

import torch

from .errors import SafetyscopeError
from .hooks import capture, forward
from .models.adapter import LoadedModel
from .parallel import active, gather_objects, rank, world_size
from .positions import Batch, PositionSpec
from .progress import progress_bar
from .prompts.chat import tokenize_prompts
from .sites import Site

T = TypeVar("T")


class OutOfMemory(SafetyscopeError, RuntimeError):
    """Even a batch of one prompt does not fit."""


def is_oom(exc: BaseException) -> bool:
    if isinstance(exc, (torch.cuda.OutOfMemoryError, MemoryError)):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def _free() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def oom_backoff(
    order: Sequence[int], batch_size: int, run: Callable[[list[int]], T], *, hint: str
) -> Iterator[tuple[list[int], T]]:
    """The one out-of-memory back-off: ``run(rows)`` on consecutive slices of ``order``, halving the slice
    on out-of-memory (the smaller size is kept for the rest); yields ``(rows, result)``.

    At one row, out-of-memory raises :class:`OutOfMemory` with ``hint`` (what to change) as its fix.
    """
    size = max(1, int(batch_size))
    start = 0
    while start < len(order):
        rows = list(order[start : start + size])
        try:
            result = run(rows)
        except Exception as exc:
            if not is_oom(exc):
                raise
            _free()
            if size == 1:
                raise OutOfMemory(f"out of memory with a batch of one {hint}") from None
            size = max(1, size // 2)
            continue
        yield rows, result
        start += len(rows)


def sharded_backoff(
    order: Sequence[int], batch_size: int, run: Callable[[list[int]], T], *, hint: str, gather: bool = True
) -> Iterator[tuple[list[int], T]]:
    """:func:`oom_backoff`, dealt across ``torch.distributed`` ranks (see :mod:`safetyscope.parallel`).

    In one process this is ``oom_backoff``. Under torchrun, ``order`` is cut into the batches one process
    would run and batch ``j`` runs on rank ``j % world`` (with its own out-of-memory back-off); with
    ``gather`` every rank then yields every batch's ``(rows, result)`` in the single-process order (each
    step's results are gathered; tensors from other ranks arrive on the CPU), else only its own.
    """
    if not active():
        yield from oom_backoff(order, batch_size, run, hint=hint)
        return
    size = max(1, int(batch_size))
    chunks = [list(order[i : i + size]) for i in range(0, len(order), size)]
    world, me = world_size(), rank()
    for step in range(0, len(chunks), world):
        j = step + me
        mine = list(oom_backoff(chunks[j], size, run, hint=hint)) if j < len(chunks) else []
        for part in gather_objects(mine) if gather else [mine]:
            yield from part


def batched(
    lm: LoadedModel,
    prompts: Sequence[str],
    fn: Callable[[Batch], T],
    *,
    batch_size: int = 8,
    system: str | None = None,
    description: str = "running",
    sort_by_length: bool = True,
    gather: bool = True,
) -> Iterator[tuple[Batch, T]]:
    """Apply ``fn`` to chat-formatted batches of ``prompts``; halve the batch on out-of-memory.

    Batches carry ``index`` (positions in ``prompts``), so results can be put back in order. Under
    torchrun the batches are sharded across ranks (:func:`sharded_backoff`): ``fn`` runs on this rank's
    batches only, and every rank yields every batch's result unless ``gather=False``.
    """
    if not prompts:
        raise ValueError("empty prompt set: give at least one prompt")
    order = list(range(len(prompts)))
    if sort_by_length:
        order.sort(key=lambda i: len(prompts[i]))
    max_len = lm.dims.max_positions

    def run(rows: list[int]) -> tuple[Batch, T]:
        batch = tokenize_prompts(lm.tokenizer, [prompts[i] for i in rows], system=system, max_length=max_len, index=rows)
        return batch, fn(batch)

    hint = "prompt; use a smaller model, --dtype bfloat16, --device-map auto across GPUs, or shorter prompts"
    with progress_bar(len(prompts), description) as advance:
        for rows, (batch, result) in sharded_backoff(order, batch_size, run, hint=hint, gather=gather):
            yield batch, result
            advance(len(rows))


def run_capture(
    lm: LoadedModel,
    prompts: Sequence[str],
    sites: str | Site | Iterable[str | Site],
    positions: PositionSpec = "last",
    *,
    batch_size: int = 8,
    system: str | None = None,
    to_cpu: bool = True,
    description: str = "capturing",
    gather: bool = True,
) -> Iterator[tuple[Batch, dict[Site, torch.Tensor]]]:
    """One forward pass per batch fills every site; yields (batch, {site: [batch, k, *shape]}).

    ``gather=False`` under torchrun: only this rank's batches (for statistics merged afterwards).
    """
    parsed = lm.sites(sites)
    yield from batched(lm, prompts, lambda b: _captured(lm, b, parsed, positions, to_cpu)[0], batch_size=batch_size,
                       system=system, description=description, gather=gather)


def run_capture_logits(
    lm: LoadedModel,
    prompts: Sequence[str],
    sites: str | Site | Iterable[str | Site],
    positions: PositionSpec = "last",
    *,
    batch_size: int = 8,
    system: str | None = None,
    description: str = "capturing",
    gather: bool = True,
) -> Iterator[tuple[Batch, tuple[dict[Site, torch.Tensor], torch.Tensor]]]:
    """:func:`run_capture` (values on the CPU) with the first-token logits of the same pass: yields
    (batch, ({site: [batch, k, *shape]}, [batch, vocab] float32 on the CPU))."""
    parsed = lm.sites(sites)
    yield from batched(lm, prompts, lambda b: _captured(lm, b, parsed, positions, True), batch_size=batch_size,
                       system=system, description=description, gather=gather)


def _captured(lm: LoadedModel, batch: Batch, sites: list[Site], positions: PositionSpec,
              to_cpu: bool) -> tuple[dict[Site, torch.Tensor], torch.Tensor]:
    """One forward pass: every site's values and the first-token logits [batch, vocab] (float32, CPU)."""
    with torch.inference_mode(), capture(lm, sites, positions, to_cpu=to_cpu) as cap:
        logits = forward(lm, batch, last_only=True)[:, -1].float().cpu()
    cap.check_finite()
    return dict(cap.values), logits
