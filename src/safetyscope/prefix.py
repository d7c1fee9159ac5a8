"""Shared-prefix reuse: run the chat template's common opening once per batch and reuse its key/value cache.

Every chat-formatted prompt starts with the same tokens (the system prompt and the user-turn header: about
40% of the tokens on the default model). :func:`safetyscope.hooks.forward` with ``last_only=True`` splits a
left-padded batch ``[pad.. P P P S S S]`` into

* the **prefix** ``P`` (the longest token prefix every row shares), run once per distinct *row key* (one
  row when no intervention differs between rows) with ``use_cache=True``; its cache is then gathered to
  one entry per row; and
* the **suffix**, right-aligned behind the prefix with the padding in between (``[P P P pad S S S]``):
  attention mask ``[1 1 1 0 1 1 1]``, position ids continuing from the prefix, so every real token sees
  the same keys at the same positions as in the full pass and the logits agree within float tolerance.

Hooks see two calls: the prefix (``x: [rows, p, ...]``, a Batch with ``extra[PART] == "prefix"``) and the
suffix (``x: [batch, s, ...]``, a Batch of the suffix tokens, right-aligned, ``extra[PART] == "suffix"``).
Reuse is exact only when every hook on the model says how it treats positions, so it is used only then:

* ``pointwise`` edits (the same map at every position, e.g. directional ablation, activation addition,
  neuron ablation) run in both calls: the prefix is recomputed under the same intervention. Per-row edits
  give a *row key* (rows with equal keys get the same edit); the prefix runs once per distinct key.
* ``suffix`` hooks (captures and edits at the last ``depth`` positions, e.g. ``last``,
  ``post_instruction``) are skipped in the prefix call; the split keeps ``depth`` tokens of every row
  in the suffix.
* ``neutral`` hooks (the capture's call-batch bookkeeping) do nothing to activations.

Known read-only hooks of other libraries (``FOREIGN_NEUTRAL``: transformers' output-capturing hooks, which stay on
a model once any call asked for ``output_hidden_states``) count as neutral.
Any other hook on any module (an edit without a declaration, ``capture(..., "mean" | "all")``, a monitor's
own hooks, a hook registered with plain torch, backward hooks) turns reuse off for that call, as do full
logits (``last_only=False``), a batch of one row key per row, and :func:`prefix_reuse` ``(False)``.

When no edit runs in the prefix call (no ``pointwise`` hook), the prefix is the unmodified model's, the same
for every batch of a run: its cache is kept (:func:`memo_key`, a few per model) and the prefix call is skipped
for later batches. The key holds the prefix tokens, the device, the autograd mode and every parameter's and
buffer's storage and in-place version, and every module's identity, so a weight edit, a swapped module or an
adapter starts a new entry; nothing is kept while gradients flow into parameters. A change the key cannot
see (a monkeypatched ``forward``) needs :func:`forget_prefixes` or ``prefix_reuse(False)``.
"""

from __future__ import annotations

import contextvars
import copy
import inspect
import itertools
import weakref
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any, Literal

import torch
from torch import nn

from .positions import Batch

PART = "prefix_part"  # Batch.extra key: "prefix" or "suffix" while a split forward runs
TAG = "safetyscope_reuse"  # attribute on edit functions and on the torch hooks that wrap them
ROW_KEY = "safetyscope_row_key"  # attribute on per-row sources (DirectionFn): batch -> one key per row
MIN_PREFIX = 4  # shorter shared prefixes are not worth a second model call
MEMO_SIZE = 4  # unmodified prefixes kept per model (e.g. a few system prompts)

RowKey = Callable[[Batch], Sequence[Hashable]]
Kind = Literal["pointwise", "suffix", "neutral", "undeclared"]

_ENABLED: contextvars.ContextVar[bool] = contextvars.ContextVar("safetyscope_prefix_reuse", default=True)


@dataclass(frozen=True)
class Reuse:
    """How a hook treats positions: see the module docstring."""

    kind: Kind
    rows: RowKey | None = None  # pointwise: one key per row of a batch (None: the same edit for every row)
    depth: Callable[[Batch], int] | None = None  # suffix: how many positions from the end it reads or edits


UNDECLARED = Reuse("undeclared")
NEUTRAL = Reuse("neutral")

# Hooks other libraries install that only read activations, and only inside their own calls: (module, name) of
# the hook function. transformers registers ``output_capturing_hook`` on every decoder layer and attention module
# the first time a call asks for ``output_hidden_states`` / ``output_attentions``, and keeps it for the model's
# life; it records outputs only while that call runs and never returns a replacement.
FOREIGN_NEUTRAL = frozenset({("transformers.utils.output_capturing", "output_capturing_hook")})


@contextmanager
def prefix_reuse(enabled: bool) -> Iterator[None]:
    """Turn shared-prefix reuse on or off inside the block (on by default; off gives the plain full pass)."""
    token = _ENABLED.set(bool(enabled))
    try:
        yield
    finally:
        _ENABLED.reset(token)


def reuse_enabled() -> bool:
    return _ENABLED.get()


# ---- declarations -------------------------------------------------------------------------------
def pointwise(fn: Any, rows: RowKey | None = None) -> Any:
    """Declare an edit the same map at every position (row-dependent only through ``rows``); returns ``fn``."""
    setattr(fn, TAG, Reuse("pointwise", rows))
    return fn


def suffix_only(fn: Any, depth: Callable[[Batch], int]) -> Any:
    """Declare a hook that reads or edits only the last ``depth(batch)`` positions; returns ``fn``."""
    setattr(fn, TAG, Reuse("suffix", depth=depth))
    return fn


def neutral(fn: Any) -> Any:
    """Declare a hook that leaves activations alone and needs no positions; returns ``fn``."""
    setattr(fn, TAG, NEUTRAL)
    return fn


def policy_of(fn: Any) -> Reuse:
    """``fn``'s declaration; a known read-only hook of another library (FOREIGN_NEUTRAL) counts as neutral."""
    declared = getattr(fn, TAG, None)
    if isinstance(declared, Reuse):
        return declared
    origin = (getattr(fn, "__module__", None), getattr(fn, "__name__", None))
    return NEUTRAL if origin in FOREIGN_NEUTRAL else UNDECLARED


def same_rows(source: Any) -> Any:
    """Declare a per-batch source (e.g. a DirectionFn) that returns the same value for every row."""
    setattr(source, ROW_KEY, None)
    return source


def keyed_rows(source: Any, key: RowKey) -> Any:
    """Declare a per-batch source whose rows with equal ``key(batch)`` entries get equal values."""
    setattr(source, ROW_KEY, key)
    return source


def pointwise_over(fn: Any, *sources: Any) -> Any:
    """Declare ``fn`` pointwise when every source is a tensor or a declared source (else leave it undeclared)."""
    keys: list[RowKey] = []
    for src in sources:
        if isinstance(src, torch.Tensor) or src is None:
            continue
        if not hasattr(src, ROW_KEY):
            return fn
        if (key := getattr(src, ROW_KEY)) is not None:
            keys.append(key)
    if not keys:
        return pointwise(fn)
    return pointwise(fn, keys[0] if len(keys) == 1 else (lambda b: list(zip(*(k(b) for k in keys)))))


def skip_in_prefix(fn: Any, batch: Batch | None) -> bool:
    """True while the prefix call runs and ``fn`` only concerns the suffix."""
    return batch is not None and batch.extra.get(PART) == "prefix" and policy_of(fn).kind == "suffix"


# ---- planning -----------------------------------------------------------------------------------
def active_policies(model: nn.Module) -> list[Reuse] | None:
    """The declarations of every hook on ``model``; None when any hook is undeclared or foreign."""
    if nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks:
        return None
    out: list[Reuse] = []
    for m in model.modules():
        if m._backward_hooks or m._backward_pre_hooks:
            return None
        for h in [*m._forward_hooks.values(), *m._forward_pre_hooks.values()]:
            p = policy_of(h)
            if p.kind == "undeclared":
                return None
            out.append(p)
    return out


@dataclass(frozen=True)
class Split:
    """A batch cut at its shared prefix (see the module docstring)."""

    prefix: Batch  # [rows, p]: one row per distinct row key
    suffix: Batch  # [batch, s]: the rest of every row, right-aligned
    rows: torch.Tensor  # [batch]: the prefix row each batch row reuses
    position_ids: torch.Tensor  # [batch, s]
    attention_mask: torch.Tensor  # [batch, p + s]
    unedited: bool = False  # no edit runs in the prefix call (its cache may be kept across batches)


def shared_prefix_length(batch: Batch) -> int:
    """Length of the longest token prefix all rows' real tokens share."""
    mask = batch.attention_mask.bool()
    lengths = mask.sum(1)  # [batch]
    shortest = int(lengths.min())
    starts = batch.seq_len - lengths  # [batch]
    cols = starts.unsqueeze(1) + torch.arange(shortest, device=starts.device)  # [batch, shortest]
    aligned = batch.input_ids.gather(1, cols.to(batch.input_ids.device))  # [batch, shortest]
    same = (aligned == aligned[:1]).all(0)  # [shortest]
    diff = (~same).nonzero()
    return shortest if diff.numel() == 0 else int(diff[0, 0])


def _row_map(policies: list[Reuse], batch: Batch) -> tuple[list[int], torch.Tensor] | None:
    """(representative rows, the representative index of every row) for the pointwise policies' row keys;
    None when a key function does not give one key per row."""
    keyed = [list(p.rows(batch)) for p in policies if p.kind == "pointwise" and p.rows is not None]
    if any(len(k) != len(batch) for k in keyed):
        return None
    keys = list(zip(*keyed)) if keyed else [()] * len(batch)
    first: dict[Hashable, int] = {}
    which = [first.setdefault(k, len(first)) for k in keys]
    reps = [0] * len(first)
    for row, j in reversed(list(enumerate(which))):
        reps[j] = row
    return reps, torch.tensor(which, dtype=torch.long)


def plan(model: nn.Module, batch: Batch, *, last_only: bool) -> Split | None:
    """The split of ``batch`` for one forward, or None where reuse would not be exact or not pay."""
    if not last_only or not reuse_enabled() or len(batch) < 2 or batch.extra.get(PART):
        return None
    policies = active_policies(model)
    if policies is None:
        return None
    mask = batch.attention_mask.bool()
    lengths = mask.sum(1)  # [batch]
    depth = max([1, *(int(p.depth(batch)) for p in policies if p.kind == "suffix" and p.depth is not None)])
    p = min(shared_prefix_length(batch), int(lengths.min()) - depth)
    if p < MIN_PREFIX:
        return None
    mapped = _row_map(policies, batch)
    if mapped is None or len(mapped[0]) >= len(batch):
        return None
    return replace(_cut(batch, p, *mapped), unedited=all(q.kind != "pointwise" for q in policies))


def _cut(batch: Batch, p: int, reps: list[int], rows: torch.Tensor) -> Split:
    ids, mask = batch.input_ids, batch.attention_mask
    lengths = mask.sum(1)  # [batch]
    s = batch.seq_len - p - int((batch.seq_len - lengths).min())  # the longest suffix
    start = batch.seq_len - lengths  # [batch]: first real column of each row
    prefix_ids = ids[reps[0], int(start[reps[0]]) : int(start[reps[0]]) + p].unsqueeze(0).expand(len(reps), p)
    pad = ids[mask == 0].reshape(-1)[:1]
    fill = int(pad[0]) if pad.numel() else 0
    suffix_ids = torch.full((len(batch), s), fill, dtype=ids.dtype, device=ids.device)  # [batch, s]
    suffix_mask = torch.zeros((len(batch), s), dtype=mask.dtype, device=mask.device)  # [batch, s]
    n_suffix = lengths - p  # [batch]
    for i in range(len(batch)):
        n = int(n_suffix[i])
        suffix_ids[i, s - n :] = ids[i, batch.seq_len - n :]
        suffix_mask[i, s - n :] = 1
    positions = (p + suffix_mask.long().cumsum(-1) - 1).clamp(min=p)  # [batch, s]
    head = replace(batch, input_ids=prefix_ids.contiguous(), attention_mask=torch.ones_like(prefix_ids),
                   texts=tuple(batch.texts[r] for r in reps) if batch.texts else (),
                   index=tuple(batch.index[r] for r in reps) if batch.index else (),
                   extra={**batch.extra, PART: "prefix"})
    tail = replace(batch, input_ids=suffix_ids, attention_mask=suffix_mask, extra={**batch.extra, PART: "suffix"})
    full_mask = torch.cat([torch.ones(len(batch), p, dtype=mask.dtype, device=mask.device), suffix_mask], 1)
    return Split(head, tail, rows, positions, full_mask)


def cache_keyword(model: nn.Module) -> str:
    """The keyword ``model``'s forward takes its key/value cache by (and the output field that returns it):
    ``cache`` in newer transformers, ``past_key_values`` before. Read from the signature, not guessed from a
    version: an unknown keyword would be swallowed by ``**kwargs`` and the call would run without its context."""
    cls = type(model)
    if cls not in _CACHE_KEYWORD:
        params = inspect.signature(cls.forward).parameters
        _CACHE_KEYWORD[cls] = "cache" if "cache" in params else "past_key_values"
    return _CACHE_KEYWORD[cls]


_CACHE_KEYWORD: dict[type, str] = {}


def gather_cache(cache: Any, rows: torch.Tensor) -> Any:
    """The prefix cache with one entry per batch row (``rows`` [batch] indexes the prefix rows)."""
    cache.batch_select_indices(rows)
    return cache


# ---- the unmodified prefix across batches -------------------------------------------------------
_MEMO: weakref.WeakKeyDictionary[nn.Module, OrderedDict[Hashable, Any]] = weakref.WeakKeyDictionary()


def memo_key(model: nn.Module, split: Split) -> Hashable | None:
    """The key of ``split``'s prefix cache, or None where it must be computed afresh (an edit runs in the
    prefix call, or gradients flow into parameters)."""
    if not split.unedited or len(split.prefix) != 1:
        return None
    if torch.is_grad_enabled() and any(t.requires_grad for t in model.parameters()):
        return None
    ids = split.prefix.input_ids  # [1, p]
    return (tuple(ids[0].tolist()), str(ids.device), torch.is_grad_enabled(), torch.is_inference_mode_enabled(),
            weights_key(model))


def weights_key(model: nn.Module) -> Hashable:
    """The weights' identity: storage, in-place version and dtype of every parameter and buffer, and every module's
    identity (a weight edit, a swapped module or an adapter gives another key)."""
    tensors = itertools.chain(model.parameters(), model.buffers())
    return (tuple((t.data_ptr(), _version(t), t.dtype) for t in tensors), tuple(id(m) for m in model.modules()))


def _version(t: torch.Tensor) -> int:
    """The in-place version counter (inference tensors, e.g. weights made under inference mode, keep none)."""
    return -1 if t.is_inference() else int(t._version)


def recall_prefix(model: nn.Module, key: Hashable) -> Any | None:
    """A private copy of the kept cache under ``key`` (None when there is none)."""
    kept = _MEMO.get(model)
    if kept is None or key not in kept:
        return None
    kept.move_to_end(key)
    return copy.deepcopy(kept[key])


def keep_prefix(model: nn.Module, key: Hashable, cache: Any) -> Any:
    """Keep a copy of ``cache`` (one prefix row) under ``key``; returns ``cache``."""
    kept = _MEMO.setdefault(model, OrderedDict())
    kept[key] = copy.deepcopy(cache)
    while len(kept) > MEMO_SIZE:
        kept.popitem(last=False)
    return cache


def forget_prefixes(model: nn.Module | None = None) -> None:
    """Drop the kept prefix caches of ``model`` (of every model when None)."""
    if model is None:
        _MEMO.clear()
    else:
        _MEMO.pop(model, None)
