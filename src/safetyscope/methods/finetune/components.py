"""Component selection -> trainable parameters with gradient masks (no copies of the weights).

A :class:`~safetyscope.sites.Component` names a whole attention or MLP module, some heads or some
neurons of one block (grammar in :mod:`safetyscope.sites`); the architecture table says where they live:

* whole module: every parameter under ``attn_module`` / ``mlp_module``;
* head ``h``: its rows of the q projection (``d_head`` rows from ``h * d_head``), the rows of its
  key/value head ``g = h // (n_heads / n_kv_heads)`` in k and v (with grouped-query attention these are
  shared by the ``n_heads / n_kv_heads`` query heads of the group, which therefore change too; pass
  ``kv=False`` to train only q and o), the same rows of their biases, and its ``d_head`` columns of the
  output projection (``attn_out_proj``); a fused ``[q | k | v]`` projection (one ``attn_in`` entry) is
  split at ``n_heads * d_head`` and ``n_kv_heads * d_head``;
* neuron ``i``: row ``i`` of every ``mlp_in`` projection (and row ``d_mlp + i`` of a fused
  ``[gate | up]`` one) with its bias entries, and column ``i`` of the down projection (``mlp_out_proj``).

GPT-2's Conv1D stores ``[in, out]``: rows and columns swap. A :class:`Selection` maps parameter names
to a boolean mask of the trainable entries (None = the whole tensor); :func:`trainable` switches exactly
those on for autograd and multiplies their gradients by the mask, so every other entry keeps a zero
gradient and, with an optimizer without weight decay, its value bit for bit.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ...errors import SafetyscopeError
from ...models.adapter import LoadedModel
from ...sites import Component, Site, parse_components


class ComponentError(SafetyscopeError, ValueError):
    """A component the model or its architecture table cannot provide."""


@dataclass(frozen=True)
class Selection:
    """Trainable entries: parameter name -> bool mask of its shape (None = every entry)."""

    masks: dict[str, torch.Tensor | None]
    components: tuple[str, ...]
    n_total: int  # parameters of the model (tied tensors once)
    sizes: dict[str, int] = field(default_factory=dict)  # numel of each selected parameter
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def n_trainable(self) -> int:
        return sum(self.count(name) for name in self.masks)

    def count(self, name: str) -> int:
        mask = self.masks[name]
        return int(mask.sum()) if mask is not None else self.sizes[name]

    @property
    def fraction(self) -> float:
        return self.n_trainable / max(1, self.n_total)


def _params(model: nn.Module) -> dict[str, nn.Parameter]:
    return dict(model.named_parameters())


def _canonical(model: nn.Module) -> dict[int, str]:
    """id(parameter) -> its first name (tied weights share one name)."""
    out: dict[int, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        out.setdefault(id(p), name)
    return out


class _Builder:
    def __init__(self, lm: LoadedModel, kv: bool):
        self.lm, self.kv, self.t, self.d = lm, kv, lm.table, lm.dims
        self.model: nn.Module = lm.model
        self.names = _canonical(self.model)
        self.masks: dict[str, torch.Tensor | None] = {}

    def module(self, template: str, layer: int, what: str) -> nn.Module:
        if not template:
            raise ComponentError(f"the {self.t.family} architecture table has no {what}; add it with --arch-table "
                                 "(see models/architectures.toml) or select other components")
        path = self.t.expand(template, layer)
        try:
            return self.model.get_submodule(path)
        except AttributeError:
            raise ComponentError(f"{self.lm.name} has no module {path} ({what} of the {self.t.family} table); "
                                 "fix the table with --arch-table") from None

    def whole(self, module: nn.Module) -> None:
        for p in module.parameters():
            self.masks[self.names[id(p)]] = None

    def part(self, p: nn.Parameter | None, dim: int, index: Sequence[int]) -> None:
        if p is None:
            return
        name = self.names[id(p)]
        if name in self.masks and self.masks[name] is None:
            return  # already whole
        mask = self.masks.get(name)
        if mask is None:
            mask = torch.zeros(p.shape, dtype=torch.bool)  # on the CPU; moved to the weight when training
        idx = torch.as_tensor(list(index), dtype=torch.long)
        if dim == 0:
            mask[idx] = True
        else:
            mask[:, idx] = True
        self.masks[name] = mask

    def rows(self, module: nn.Module, index: Sequence[int], *, out_side: bool) -> None:
        """Mark output units (out_side) or input units of a Linear/Conv1D, with bias entries on the output side."""
        w = getattr(module, "weight", None)
        if w is None:
            raise ComponentError(f"module {type(module).__name__} has no weight; fix the architecture table")
        dim = (1 if self.t.conv1d else 0) if out_side else (0 if self.t.conv1d else 1)
        self.part(w, dim, index)
        if out_side:
            self.part(getattr(module, "bias", None), 0, index)

    def heads(self, layer: int, heads: Sequence[int]) -> None:
        d = self.d
        bad = [h for h in heads if not 0 <= h < d.n_heads]
        if bad:
            raise ComponentError(f"head {bad[0]} out of range; block {layer} has heads 0-{d.n_heads - 1}")
        if not self.t.attn_in:
            raise ComponentError(f"the {self.t.family} table has no attn_in (q/k/v rows per head); select the whole "
                                 f"attention (blocks.{layer}.attn) or add attn_in with --arch-table")
        group = max(1, d.n_heads // max(1, d.n_kv_heads))
        q = [h * d.d_head + j for h in heads for j in range(d.d_head)]
        kvh = sorted({h // group for h in heads})
        kv = [g * d.d_head + j for g in kvh for j in range(d.d_head)] if self.kv else []
        mods = [self.module(p, layer, "attn_in") for p in self.t.attn_in]
        if len(mods) == 3:
            self.rows(mods[0], q, out_side=True)
            for m in mods[1:]:
                if kv:
                    self.rows(m, kv, out_side=True)
        elif len(mods) == 1:
            nq, nk = d.n_heads * d.d_head, d.n_kv_heads * d.d_head
            self.rows(mods[0], q + [nq + i for i in kv] + [nq + nk + i for i in kv], out_side=True)
        else:
            raise ComponentError(f"attn_in of the {self.t.family} table has {len(mods)} entries; give q, k, v or one fused")
        self.rows(self.module(self.t.attn_out_proj, layer, "attn_out_proj"),
                  [h * d.d_head + j for h in heads for j in range(d.d_head)], out_side=False)

    def neurons(self, layer: int, idx: Sequence[int]) -> None:
        bad = [i for i in idx if not 0 <= i < self.d.d_mlp]
        if bad:
            raise ComponentError(f"neuron {bad[0]} out of range; block {layer} has neurons 0-{self.d.d_mlp - 1}")
        if not self.t.mlp_in:
            raise ComponentError(f"the {self.t.family} table has no mlp_in; add it with --arch-table")
        for path in self.t.mlp_in:
            m = self.module(path, layer, "mlp_in")
            w = getattr(m, "weight", None)
            if not isinstance(w, torch.Tensor):
                raise ComponentError(f"{path} has no weight; fix the architecture table")
            out = w.shape[1] if self.t.conv1d else w.shape[0]
            rows = list(idx) + ([self.d.d_mlp + i for i in idx] if out == 2 * self.d.d_mlp else [])
            self.rows(m, rows, out_side=True)
        self.rows(self.module(self.t.mlp_out_proj, layer, "mlp_out_proj"), idx, out_side=False)


def _set_neurons(neuron_set: Any, layer: int) -> list[int]:
    if neuron_set is None:
        raise ComponentError("[set] needs a neuron set: pass neuron_set= (CLI: --neuron-set DIR)")
    return [i for layer_, i in neuron_set.neurons if layer_ == layer]


def as_components(lm: LoadedModel, components: str | Iterable[str | Component]) -> list[Component]:
    """Parsed components (names go through :func:`safetyscope.sites.parse_components`)."""
    items = [components] if isinstance(components, str) else list(components)
    out: list[Component] = []
    for item in items:
        for c in [item] if isinstance(item, Component) else parse_components(item, lm.n_layers):
            if c not in out:
                out.append(c)
    return out


def select(lm: LoadedModel, components: str | Iterable[str | Component], *, neuron_set: Any = None,
           kv: bool = True) -> Selection:
    """The trainable entries of ``components`` (component names or parsed :class:`Component` s)."""
    comps = as_components(lm, components)
    b = _Builder(lm, kv)
    notes: list[str] = []
    for c in comps:
        layer = c.site.layer
        assert layer is not None
        if c.site.kind == "attn.out":
            b.whole(b.module(lm.table.attn_module, layer, "attn_module"))
        elif c.site.kind == "mlp.out":
            b.whole(b.module(lm.table.mlp_module, layer, "mlp_module"))
        elif c.site.kind == "attn.heads":
            b.heads(layer, c.index if c.index is not None else range(lm.dims.n_heads))
        else:
            idx = _set_neurons(neuron_set, layer) if c.from_set else (
                c.index if c.index is not None else range(lm.dims.d_mlp))
            if not idx:
                notes.append(f"{c.name}: the neuron set has no neuron in block {layer}")
                continue
            b.neurons(layer, idx)
    return _finish(lm, b.masks, tuple(c.name for c in comps), notes)


def _finish(lm: LoadedModel, masks: dict[str, torch.Tensor | None], names: tuple[str, ...],
            notes: list[str]) -> Selection:
    params = _params(lm.model)
    if not masks:
        raise ComponentError("the components select no parameters; give heads, neurons or modules that exist")
    return Selection(dict(masks), names, sum(p.numel() for p in params.values()),
                     {n: params[n].numel() for n in masks}, tuple(notes))


def select_all(lm: LoadedModel) -> Selection:
    """Every parameter (full fine-tuning)."""
    return _finish(lm, {n: None for n in _params(lm.model)}, ("all",), [])


def neuron_size(lm: LoadedModel) -> int:
    """Parameters one neuron owns (its mlp_in rows and bias entries, its down column)."""
    return select(lm, [Component(Site("mlp.neurons", 0), (0,))]).n_trainable


def random_neurons(lm: LoadedModel, n_params: int, *, seed: int = 0, layers: Sequence[int] | None = None,
                   exclude: Iterable[tuple[int, int]] = ()) -> list[Component]:
    """Random neurons (uniform over ``layers`` x neurons, seeded) owning about ``n_params`` parameters."""
    per = neuron_size(lm)
    k = max(1, round(n_params / per))
    pool_layers = list(layers) if layers is not None else list(range(lm.n_layers))
    taken = set(exclude)
    pool = [(layer, i) for layer in pool_layers for i in range(lm.dims.d_mlp) if (layer, i) not in taken]
    if k > len(pool):
        raise ComponentError(f"{k} random neurons asked but only {len(pool)} are available")
    pick = sorted(random.Random(seed).sample(pool, k))
    by_layer: dict[int, list[int]] = {}
    for layer, i in pick:
        by_layer.setdefault(layer, []).append(i)
    return [Component(Site("mlp.neurons", layer), tuple(ix)) for layer, ix in sorted(by_layer.items())]


def _circuit_neurons(lm: LoadedModel, comps: Sequence[Component], neuron_set: Any) -> set[tuple[int, int]]:
    out: set[tuple[int, int]] = set()
    for c in comps:
        if c.site.kind == "mlp.neurons" and c.site.layer is not None:
            idx = _set_neurons(neuron_set, c.site.layer) if c.from_set else (
                c.index if c.index is not None else range(lm.dims.d_mlp))
            out.update((c.site.layer, i) for i in idx)
    return out


def _free_layer(rng: random.Random, n_layers: int, used: set[int], avoid: set[int], what: str) -> int:
    free = [layer for layer in range(n_layers) if layer not in used and layer not in avoid]
    free = free or [layer for layer in range(n_layers) if layer not in used]
    if not free:
        raise ComponentError(f"no block is left for a random {what}; select fewer whole modules")
    pick = rng.choice(free)
    used.add(pick)
    return pick


def _random_heads(rng: random.Random, lm: LoadedModel, heads: Sequence[int]) -> tuple[int, ...]:
    """The heads under a random permutation of the key/value groups and of the heads within a group (so as
    many key/value heads are touched: the same parameter count under grouped-query attention)."""
    group = max(1, lm.dims.n_heads // max(1, lm.dims.n_kv_heads))
    n_groups = lm.dims.n_heads // group
    pg, po = rng.sample(range(n_groups), n_groups), rng.sample(range(group), group)
    return tuple(sorted(pg[h // group] * group + po[h % group] for h in heads))


def random_like(lm: LoadedModel, components: str | Iterable[str | Component], *, neuron_set: Any = None,
                seed: int = 0) -> list[Component]:
    """Random components of the same kinds and sizes as ``components`` (the random baseline), disjoint from them.

    A whole attention / MLP module moves to a random block holding no selected module of that kind; heads
    move to a random block without selected attention, as many heads touching as many key/value heads;
    neurons stay in their block and are drawn among the block's unselected neurons. For a table whose
    blocks are all alike the parameter count is therefore exactly the selection's.
    """
    comps = as_components(lm, components)
    rng = random.Random(seed)
    n = lm.n_layers
    used_attn = {c.site.layer for c in comps if c.site.kind in ("attn.out", "attn.heads") and c.site.layer is not None}
    used_mlp = {c.site.layer for c in comps if c.site.kind == "mlp.out" and c.site.layer is not None}
    taken = _circuit_neurons(lm, comps, neuron_set)
    neuron_layers = {layer for layer, _ in taken}
    out: list[Component] = []
    for c in comps:
        layer = c.site.layer
        assert layer is not None
        if c.site.kind == "attn.out":
            out.append(Component(Site("attn.out", _free_layer(rng, n, used_attn, set(), "attention module"))))
        elif c.site.kind == "mlp.out":
            out.append(Component(Site("mlp.out", _free_layer(rng, n, used_mlp, neuron_layers, "MLP module"))))
        elif c.site.kind == "attn.heads":
            heads = c.index if c.index is not None else tuple(range(lm.dims.n_heads))
            new = _free_layer(rng, n, used_attn, set(), "set of heads")
            out.append(Component(Site("attn.heads", new), _random_heads(rng, lm, heads)))
        else:
            k = len([1 for layer_, _ in _circuit_neurons(lm, [c], neuron_set) if layer_ == layer])
            pool = [i for i in range(lm.dims.d_mlp) if (layer, i) not in taken]
            if k > len(pool):
                raise ComponentError(f"block {layer} has only {len(pool)} unselected neurons for {k} random ones")
            pick = sorted(rng.sample(pool, k))
            taken.update((layer, i) for i in pick)
            if pick:
                out.append(Component(Site("mlp.neurons", layer), tuple(pick)))
    return out


@contextmanager
def frozen(model: nn.Module) -> Iterator[None]:
    """Every parameter of ``model`` off for autograd (e.g. while LoRA adapters train); flags restored on exit."""
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    try:
        model.requires_grad_(False)
        yield
    finally:
        for n, p in model.named_parameters():
            p.requires_grad_(flags[n])


@contextmanager
def trainable(model: nn.Module, selection: Selection) -> Iterator[list[nn.Parameter]]:
    """Switch autograd on for exactly the selected entries (gradient masks); restore the flags on exit.

    Yields the trainable parameters, in the selection's order.
    """
    params = _params(model)
    flags = {n: p.requires_grad for n, p in params.items()}
    handles = []
    try:
        for p in params.values():
            p.requires_grad_(False)
        out = []
        for name, mask in selection.masks.items():
            p = params[name]
            p.requires_grad_(True)
            if mask is not None:
                m = mask.to(device=p.device)
                handles.append(p.register_hook(lambda g, m=m: g * m.to(g.dtype)))
            out.append(p)
        yield out
    finally:
        for h in handles:
            h.remove()
        for n, p in params.items():
            if n in selection.masks:
                p.grad = None
            p.requires_grad_(flags[n])
