"""Capture and intervention context managers. Every hook is removed in ``finally``.

The batch being run is published through a context variable by :func:`forward` (and by
generation helpers), so hooks can select positions without the caller threading it through.
:func:`capture` also works with any other call of the model (``lm.model(input_ids=...,
attention_mask=...)``, ``lm.model.generate(...)``): it then reads the positions from that call's
attention mask (left padding), which gives ``last``, ``mean``, ``all`` and negative offsets;
``post_instruction`` needs the Batch, so it asks for :func:`forward`.
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .errors import SafetyscopeError
from .models.adapter import LoadedModel
from .positions import Batch, PositionSpec, offsets_for, parse_positions, select_positions
from .prefix import (
    TAG,
    Split,
    cache_keyword,
    gather_cache,
    keep_prefix,
    memo_key,
    neutral,
    plan,
    pointwise,
    policy_of,
    recall_prefix,
    skip_in_prefix,
    suffix_only,
)
from .sites import Site

_CURRENT_BATCH: contextvars.ContextVar[Batch | None] = contextvars.ContextVar("safetyscope_batch", default=None)

# An edit gets the site's activation in its natural shape (e.g. [batch, pos, d_model], or
# [batch, pos, n_heads, d_head] for attn.heads) and the running batch (None when unknown), and
# returns the replacement (same shape) or None to leave it as it is.
EditFn = Callable[[torch.Tensor, "Batch | None"], "torch.Tensor | None"]


class NaNActivationError(SafetyscopeError, FloatingPointError):
    """Non-finite activations were captured."""


def current_batch() -> Batch | None:
    return _CURRENT_BATCH.get()


@contextmanager
def running(batch: Batch | None) -> Iterator[None]:
    """Publish ``batch`` to hooks for the duration of a forward or a generation."""
    token = _CURRENT_BATCH.set(batch)
    try:
        yield
    finally:
        _CURRENT_BATCH.reset(token)


def last_position() -> torch.Tensor:
    """``logits_to_keep`` for the last position only, as an index: the model gathers the last hidden state into a
    contiguous [batch, 1, d_model]. (An int 1 slices a strided view, which torch's matmul does not fold into one
    matrix product when the weight needs no gradient: the unembedding then runs as a batched matrix-vector product
    that reads the whole unembedding matrix once per row; on a CPU about 10% of a full pass of the default model.)"""
    return torch.tensor([-1])


def forward(lm: LoadedModel, batch: Batch, *, last_only: bool = False) -> torch.Tensor:
    """Run the model on a batch; logits [batch, pos, vocab] ([batch, 1, vocab] with last_only).

    With ``last_only`` the prompts' shared prefix (the chat template's opening) runs once and its key/value
    cache is reused where that is exact (see :mod:`safetyscope.prefix`); ``prefix_reuse(False)`` turns it off.
    """
    batch = batch.to(lm.input_device)
    split = plan(lm.model, batch, last_only=last_only)
    if split is not None:
        logits = _forward_split(lm, split)
    else:
        kwargs: dict[str, Any] = {
            "input_ids": batch.input_ids,
            "attention_mask": batch.attention_mask,
            "position_ids": batch.position_ids,
            "use_cache": False,
        }
        if last_only:
            kwargs["logits_to_keep"] = last_position()
        with running(batch):
            logits = lm.model(**kwargs).logits  # [batch, pos, vocab]
    check_logits(logits)
    return logits


def prefix_cache(lm: LoadedModel, split: Split) -> Any:
    """Run a split's shared prefix (once per row key, hooks seeing the prefix Batch); its key/value cache
    gathered to one entry per batch row. An unedited prefix seen before is not run again (prefix.memo_key)."""
    head = split.prefix
    key = memo_key(lm.model, split)
    cache = recall_prefix(lm.model, key) if key is not None else None
    if cache is None:
        n = head.seq_len
        with running(head):
            out = lm.model(input_ids=head.input_ids, attention_mask=head.attention_mask,
                           position_ids=torch.arange(n, device=head.input_ids.device).expand(len(head), n),
                           use_cache=True, logits_to_keep=last_position())
        fresh = out[cache_keyword(lm.model)]
        cache = fresh if key is None else keep_prefix(lm.model, key, fresh)
    return gather_cache(cache, split.rows.to(head.input_ids.device))


def _forward_split(lm: LoadedModel, split: Split) -> torch.Tensor:
    """The prefix once per row key with its cache kept, then every row's suffix on that cache; [batch, 1, vocab]."""
    cache, tail = prefix_cache(lm, split), split.suffix
    with running(tail):
        return lm.model(input_ids=tail.input_ids, attention_mask=split.attention_mask.to(tail.input_ids.device),
                        position_ids=split.position_ids.to(tail.input_ids.device),
                        **{cache_keyword(lm.model): cache}, use_cache=True, logits_to_keep=last_position()).logits  # [batch, 1, vocab]


def check_logits(logits: torch.Tensor) -> None:
    """Raise :class:`NaNActivationError` when the last position's logits hold NaN or +inf (an overflow).

    Cheap: one reduction over ``[batch, vocab]``; the last position is real in every left-padded row,
    and an overflow anywhere earlier reaches it. ``-inf`` (a masked token) is allowed.
    """
    last = logits[:, -1].detach()  # [batch, vocab]
    if bool(torch.isnan(last).any() | torch.isposinf(last).any()):
        raise NaNActivationError(
            "the model's output is NaN/inf (activations overflowed); run with --dtype float32 "
            "(float16 overflows easily, above all on CPU), or check the model's weights"
        )


# ---- low-level hook plumbing -------------------------------------------------------------------
def _first(x: Any) -> torch.Tensor:
    return x[0] if isinstance(x, (tuple, list)) else x


def _view(site: Site, lm: LoadedModel, t: torch.Tensor) -> torch.Tensor:
    if site.kind == "attn.heads":
        return t.view(*t.shape[:-1], lm.dims.n_heads, lm.dims.d_head)  # [batch, pos, n_heads, d_head]
    return t


def _unview(site: Site, t: torch.Tensor) -> torch.Tensor:
    return t.flatten(-2) if site.kind == "attn.heads" else t


def _input_tensor(args: tuple, kwargs: dict) -> tuple[torch.Tensor, str | int]:
    if args:
        return args[0], 0
    for key in ("hidden_states", "input", "x"):
        if isinstance(kwargs.get(key), torch.Tensor):
            return kwargs[key], key
    raise RuntimeError("could not find the input tensor of a hooked module")


def add_site_hook(lm: LoadedModel, site: Site, fn: EditFn) -> torch.utils.hooks.RemovableHandle:
    """Register ``fn`` on a site; returns the handle (callers remove it in ``finally``)."""
    module, spec = lm.resolve(site)

    def apply(t: torch.Tensor) -> torch.Tensor | None:
        batch = _CURRENT_BATCH.get()
        if skip_in_prefix(fn, batch):  # a suffix-only hook while the shared prefix runs
            return None
        new = fn(_view(site, lm, t), batch)
        if new is None:
            return None
        return _unview(site, new).to(device=t.device, dtype=t.dtype)

    if spec.hook == "output":

        def out_hook(_m: nn.Module, _args: Any, output: Any) -> Any:
            new = apply(_first(output))
            if new is None:
                return None
            if isinstance(output, tuple):
                return (new, *output[1:])
            if isinstance(output, list):
                return [new, *output[1:]]
            return new

        setattr(out_hook, TAG, policy_of(fn))
        return module.register_forward_hook(out_hook)

    def in_hook(_m: nn.Module, args: tuple, kwargs: dict) -> Any:
        t, where = _input_tensor(args, kwargs)
        new = apply(t)
        if new is None:
            return None
        if spec.write == "inplace":  # the block keeps this tensor as its residual: edit it
            t.copy_(new)
            return None
        if isinstance(where, int):
            return (new, *args[1:]), kwargs
        return args, {**kwargs, where: new}

    setattr(in_hook, TAG, policy_of(fn))
    return module.register_forward_pre_hook(in_hook, with_kwargs=True)


@contextmanager
def hooks(lm: LoadedModel, edits: Mapping[Site, EditFn] | Iterable[tuple[Site, EditFn]]) -> Iterator[None]:
    """Register several site hooks at once; all are removed on exit, also on exceptions."""
    pairs = list(edits.items()) if isinstance(edits, Mapping) else list(edits)
    handles = []
    try:
        for site, fn in pairs:
            handles.append(add_site_hook(lm, site, fn))
        yield
    finally:
        for h in handles:
            h.remove()


# ---- capture ----------------------------------------------------------------------------------
@dataclass
class Capture:
    """Activations of the last forward pass at each site, positions already selected.

    ``values[site]``: [batch, k, *site_shape]; ``grads[site]`` (with grad=True, after backward)
    is the gradient of the backward's target with respect to the same selected entries.
    """

    sites: list[Site]
    positions: str | tuple[int, ...]
    to_cpu: bool = False
    grad: bool = False
    values: dict[Site, torch.Tensor] = field(default_factory=dict)
    grads: dict[Site, torch.Tensor] = field(default_factory=dict)

    def clear(self) -> None:
        self.values.clear()
        self.grads.clear()

    def check_finite(self) -> None:
        for site, v in self.values.items():
            if not torch.isfinite(v).all():
                raise NaNActivationError(
                    f"non-finite activations at {site.name}; use --dtype float32, check the model's weights, "
                    "or shorten the prompts"
                )

    # the positions of a model call made without forward (set only while that call runs)
    call_batch: Batch | None = field(default=None, repr=False)

    def _record(self, site: Site, t: torch.Tensor, batch: Batch | None) -> None:
        batch = batch if batch is not None else self.call_batch
        if batch is None:
            raise RuntimeError("capture needs the batch: call the model itself (lm.model(...)) or "
                               "run it through safetyscope.hooks.forward(lm, batch)")
        sel = select_positions(t, self.positions, batch)
        self.values[site] = sel.detach().to("cpu") if self.to_cpu else sel.detach()
        if self.grad and t.requires_grad:

            def store(g: torch.Tensor, site: Site = site, batch: Batch = batch) -> None:
                gsel = select_positions(g, self.positions, batch).detach()
                self.grads[site] = gsel.to("cpu") if self.to_cpu else gsel

            t.register_hook(store)


def batch_of_call(args: tuple, kwargs: dict) -> Batch:
    """The Batch of a plain model call (``input_ids`` or ``inputs_embeds``, optional ``attention_mask``).

    Rows must be left padded (their last token real), as the positions count from the end. With a KV
    cache the mask also covers the cached tokens: only its last ``pos`` columns belong to this call.
    """
    ids = kwargs.get("input_ids", args[0] if args else None)
    ref = ids if ids is not None else kwargs.get("inputs_embeds")
    if not isinstance(ref, torch.Tensor):
        raise RuntimeError("capture found neither input_ids nor inputs_embeds in the model call; "
                           "pass them as keyword arguments or run safetyscope.hooks.forward(lm, batch)")
    n_rows, n_pos = ref.shape[:2]
    mask = kwargs.get("attention_mask")
    if mask is None:
        mask = torch.ones(n_rows, n_pos, dtype=torch.long, device=ref.device)  # [batch, pos]
    elif mask.dim() != 2:
        raise ValueError("capture reads positions from a 2-d attention_mask [batch, pos]; pass one, "
                         "or run safetyscope.hooks.forward(lm, batch)")
    mask = mask[:, -n_pos:]  # [batch, pos]
    if not bool(mask[:, -1].all()):
        raise ValueError("capture needs left-padded inputs (every row's last token real): set "
                         "lm.tokenizer.padding_side = 'left', or run safetyscope.hooks.forward(lm, batch)")
    input_ids = ids if ids is not None else torch.zeros(n_rows, n_pos, dtype=torch.long, device=ref.device)
    return Batch(input_ids=input_ids, attention_mask=mask, n_post=0)


@contextmanager
def call_batches(lm: LoadedModel, cap: Capture) -> Iterator[None]:
    """Give ``cap`` the positions of model calls made without :func:`forward` (hooks on ``lm.model``)."""

    def before(_m: nn.Module, args: tuple, kwargs: dict) -> None:
        if _CURRENT_BATCH.get() is not None:  # forward (or a generation helper) runs: its Batch is used
            return
        if cap.positions == "post_instruction":
            raise ValueError("capture(..., 'post_instruction') needs the Batch (its post-instruction token "
                             "count): run the model through safetyscope.hooks.forward(lm, batch)")
        cap.call_batch = batch_of_call(args, kwargs)

    def after(_m: nn.Module, _args: Any, _output: Any) -> None:
        cap.call_batch = None

    handles = []
    try:
        handles.append(lm.model.register_forward_pre_hook(neutral(before), with_kwargs=True))
        handles.append(lm.model.register_forward_hook(neutral(after), always_call=True))
        yield
    finally:
        cap.call_batch = None
        for h in handles:
            h.remove()


def _declare_capture(fn: EditFn, positions: str | tuple[int, ...]) -> EditFn:
    """Captures at positions counted from the end read only the suffix of a shared-prefix split; ``mean``
    and ``all`` read every position, so they stay undeclared (no reuse)."""
    if positions in ("mean", "all"):
        return fn

    def depth(batch: Batch) -> int:
        offsets = offsets_for(positions, batch)
        return -min(offsets) if offsets else 1

    return suffix_only(fn, depth)


@contextmanager
def capture(
    lm: LoadedModel,
    sites: str | Site | Iterable[str | Site],
    positions: PositionSpec = "last",
    *,
    to_cpu: bool = False,
    grad: bool = False,
) -> Iterator[Capture]:
    """Capture every requested site in one forward pass.

    >>> with capture(lm, "blocks.*.resid_post", "last") as cap:
    ...     forward(lm, batch)  # or lm.model(input_ids=..., attention_mask=...) with left padding
    >>> cap.values[site]  # [batch, 1, d_model]

    During generation every step overwrites the values (the last step's remain).
    """
    parsed = lm.sites(sites)
    cap = Capture(parsed, parse_positions(positions), to_cpu=to_cpu, grad=grad)

    def make(site: Site) -> EditFn:
        def fn(t: torch.Tensor, batch: Batch | None) -> None:
            cap._record(site, t, batch)

        return _declare_capture(fn, cap.positions)

    pairs: list[tuple[Site, EditFn]] = [(s, make(s)) for s in parsed]
    if grad:
        # Parameters are frozen, so nothing downstream would carry a graph: start one at the embeddings.
        def track(t: torch.Tensor, _batch: Batch | None) -> torch.Tensor | None:
            return t if t.requires_grad or not torch.is_grad_enabled() else t.detach().requires_grad_(True)

        pairs.insert(0, (Site("embed"), pointwise(track)))
    with hooks(lm, pairs), call_batches(lm, cap):
        yield cap
