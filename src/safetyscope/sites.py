"""The one site-name grammar of safetyscope, parsed and validated here and nowhere else.

Grammar (``{l}`` is a block index; ``*`` all blocks, ``a-b`` an inclusive range, ``a,b,c`` a list,
negative indices count from the end)::

    embed                       token embeddings (output of the embedding module)  [batch, pos, d_model]
    blocks.{l}.resid_pre        residual stream entering block l                  [batch, pos, d_model]
    blocks.{l}.resid_mid        residual stream between attention and MLP         [batch, pos, d_model]
    blocks.{l}.resid_post       residual stream leaving block l                   [batch, pos, d_model]
    blocks.{l}.attn.out         what attention writes into the residual stream    [batch, pos, d_model]
    blocks.{l}.attn.heads       per-head input of the attention output projection [batch, pos, n_heads, d_head]
    blocks.{l}.mlp.out          what the MLP writes into the residual stream      [batch, pos, d_model]
    blocks.{l}.mlp.neurons      MLP neurons: the input of the down projection     [batch, pos, d_mlp]
    final                       output of the final norm (what the unembedding reads) [batch, pos, d_model]

Examples: ``blocks.*.resid_post``, ``blocks.0-5.mlp.neurons``, ``blocks.-1.attn.heads``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from .errors import SafetyscopeError

BLOCK_KINDS: tuple[str, ...] = (
    "resid_pre",
    "resid_mid",
    "resid_post",
    "attn.out",
    "attn.heads",
    "mlp.out",
    "mlp.neurons",
)
GLOBAL_SITES: tuple[str, ...] = ("embed", "final")
GRAMMAR_HINT = (
    "use 'embed', 'final' or 'blocks.{l}.<kind>' with <kind> one of "
    + ", ".join(BLOCK_KINDS)
    + "; {l} may be an index, '*', 'a-b' or 'a,b'"
)

_BLOCK_RE = re.compile(r"^blocks\.([^.]+)\.(.+)$")


class SiteError(SafetyscopeError, ValueError):
    """A site name that does not follow the grammar, or names a layer the model lacks."""


@dataclass(frozen=True, order=True)
class Site:
    """One concrete site: a block kind at one layer, or a global site (layer is None)."""

    kind: str
    layer: int | None = None

    @property
    def name(self) -> str:
        return self.kind if self.layer is None else f"blocks.{self.layer}.{self.kind}"

    def __str__(self) -> str:
        return self.name

    @property
    def is_residual(self) -> bool:
        return self.kind in ("embed", "final", "resid_pre", "resid_mid", "resid_post")


def _parse_layers(spec: str, n_layers: int | None, text: str) -> list[int]:
    if spec == "*":
        if n_layers is None:
            raise SiteError(f"site {text!r}: a wildcard needs the model's layer count")
        return list(range(n_layers))
    out: list[int] = []
    for part in spec.split(","):
        m = re.fullmatch(r"(-?\d+)(?:-(-?\d+))?", part) if part else None
        if m is None:
            raise SiteError(f"site {text!r}: bad layer {part!r}; {GRAMMAR_HINT}")
        lo = int(m.group(1))
        hi = int(m.group(2)) if m.group(2) is not None else lo
        if n_layers is not None:
            lo, hi = (v + n_layers if v < 0 else v for v in (lo, hi))
        if hi < lo:
            raise SiteError(f"site {text!r}: empty layer range {part!r}")
        out.extend(range(lo, hi + 1))
    if n_layers is not None:
        bad = [v for v in out if not 0 <= v < n_layers]
        if bad:
            raise SiteError(f"site {text!r}: layer {bad[0]} out of range; this model has blocks 0-{n_layers - 1}")
    return out


def parse_layers(spec: str, n_layers: int | None = None) -> tuple[int, ...]:
    """Block numbers of a layer spec (``*``, ``a-b`` or ``a,b``; negative counts from the end when
    ``n_layers`` is given); a :class:`SiteError` naming the grammar otherwise."""
    return tuple(_parse_layers(spec.strip(), n_layers, f"layers {spec}"))


def parse_sites(spec: str | Site | Iterable[str | Site], n_layers: int | None = None) -> list[Site]:
    """Parse one pattern or many into concrete sites, in order, without duplicates.

    >>> [s.name for s in parse_sites("blocks.0-1.resid_post", n_layers=4)]
    ['blocks.0.resid_post', 'blocks.1.resid_post']
    """
    items: Sequence[str | Site] = [spec] if isinstance(spec, (str, Site)) else list(spec)
    out: list[Site] = []
    for item in items:
        for site in [item] if isinstance(item, Site) else _parse_one(item.strip(), n_layers):
            if site not in out:
                out.append(site)
    if not out:
        raise SiteError(f"no sites given; {GRAMMAR_HINT}")
    return out


def _parse_one(text: str, n_layers: int | None) -> list[Site]:
    if text in GLOBAL_SITES:
        return [Site(text)]
    m = _BLOCK_RE.match(text)
    if m is None:
        raise SiteError(f"unknown site {text!r}; {GRAMMAR_HINT}")
    layer_spec, kind = m.groups()
    if kind not in BLOCK_KINDS:
        raise SiteError(f"unknown site kind {kind!r} in {text!r}; {GRAMMAR_HINT}")
    return [Site(kind, layer) for layer in _parse_layers(layer_spec, n_layers, text)]


def parse_site(text: str | Site, n_layers: int | None = None) -> Site:
    """Parse exactly one concrete site (no wildcards)."""
    sites = parse_sites(text, n_layers)
    if len(sites) != 1:
        raise SiteError(f"{text!r} names {len(sites)} sites; exactly one is needed here")
    return sites[0]


# ---- trainable components (fine-tuning selections) -------------------------------------------------
# A component names parameters rather than an activation: a whole attention or MLP module, some of
# its heads, or some of its neurons. Grammar (``{l}`` as above)::
#
#     blocks.{l}.attn  | blocks.{l}.attn.out        every parameter of the attention module
#     blocks.{l}.mlp   | blocks.{l}.mlp.out         every parameter of the MLP module
#     blocks.{l}.attn.heads[3,7]                    heads 3 and 7 (their q/k/v rows and o columns)
#     blocks.{l}.mlp.neurons[5,9-12]                neurons (their gate/up rows and down column)
#     blocks.{l}.mlp.neurons[set]                   the neurons a neuron set names in those blocks
#     L{l}.N{i}                                     one neuron, as the map's neuron ranking names it
#
# Without brackets ``attn.heads`` means every head and ``mlp.neurons`` every neuron.
COMPONENT_ALIASES: dict[str, str] = {"attn": "attn.out", "mlp": "mlp.out"}
COMPONENT_KINDS: tuple[str, ...] = ("attn.out", "mlp.out", "attn.heads", "mlp.neurons")
COMPONENT_HINT = (
    "use blocks.{l}.attn, blocks.{l}.mlp, blocks.{l}.attn.heads[3,7], blocks.{l}.mlp.neurons[5,9-12], "
    "blocks.{l}.mlp.neurons[set] or L{l}.N{i}"
)
_INDEX_RE = re.compile(r"^(.*?)(?:\[([^\]]*)\])?$")
_NEURON_NAME_RE = re.compile(r"^L(\d+)\.N(\d+)$")


@dataclass(frozen=True)
class Component:
    """Trainable parameters at one block: ``site`` is attn.out / mlp.out (the whole module), attn.heads or
    mlp.neurons; ``index`` the heads / neurons (None = all); ``from_set`` = indices come from a neuron set."""

    site: Site
    index: tuple[int, ...] | None = None
    from_set: bool = False

    @property
    def name(self) -> str:
        if self.from_set:
            return f"{self.site.name}[set]"
        if self.index is None:
            return self.site.name
        return f"{self.site.name}[{','.join(str(i) for i in self.index)}]"

    def __str__(self) -> str:
        return self.name


def _parse_index(spec: str, text: str) -> tuple[int, ...]:
    out: list[int] = []
    for part in spec.split(","):
        m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if m is None:
            raise SiteError(f"component {text!r}: bad index {part!r}; give indices like [3,7] or [0-15]")
        lo = int(m.group(1))
        hi = int(m.group(2)) if m.group(2) is not None else lo
        if hi < lo:
            raise SiteError(f"component {text!r}: empty index range {part!r}")
        out.extend(i for i in range(lo, hi + 1) if i not in out)
    return tuple(out)


def _component_one(text: str, n_layers: int | None) -> list[Component]:
    m = _NEURON_NAME_RE.match(text)
    if m is not None:
        return [Component(s, (int(m.group(2)),)) for s in _parse_one(f"blocks.{m.group(1)}.mlp.neurons", n_layers)]
    base, bracket = _INDEX_RE.match(text).groups()  # type: ignore[union-attr]  # the pattern always matches
    bm = _BLOCK_RE.match(base)
    if bm is None:
        raise SiteError(f"unknown component {text!r}; {COMPONENT_HINT}")
    kind = COMPONENT_ALIASES.get(bm.group(2), bm.group(2))
    if kind not in COMPONENT_KINDS:
        raise SiteError(f"component {text!r}: {bm.group(2)!r} holds no parameters; {COMPONENT_HINT}")
    if bracket is not None and kind not in ("attn.heads", "mlp.neurons"):
        raise SiteError(f"component {text!r}: only attn.heads and mlp.neurons take [indices]; {COMPONENT_HINT}")
    sites = _parse_one(f"blocks.{bm.group(1)}.{kind}", n_layers)
    if bracket is not None and bracket.strip() == "set":
        if kind != "mlp.neurons":
            raise SiteError(f"component {text!r}: [set] selects neurons; use blocks.{{l}}.mlp.neurons[set]")
        return [Component(s, None, True) for s in sites]
    index = None if bracket is None else _parse_index(bracket, text)
    if index == ():
        raise SiteError(f"component {text!r}: empty index list; {COMPONENT_HINT}")
    return [Component(s, index) for s in sites]


def parse_components(spec: str | Iterable[str], n_layers: int | None = None) -> list[Component]:
    """Parse trainable-component names (comma-separated outside brackets, or a list), in order.

    >>> [c.name for c in parse_components("blocks.1.mlp, blocks.0-1.attn.heads[3,7]", n_layers=4)]
    ['blocks.1.mlp.out', 'blocks.0.attn.heads[3,7]', 'blocks.1.attn.heads[3,7]']
    """
    items = _split_top(spec) if isinstance(spec, str) else [t.strip() for t in spec]
    out: list[Component] = []
    for item in items:
        if not item:
            continue
        for comp in _component_one(item, n_layers):
            if comp not in out:
                out.append(comp)
    if not out:
        raise SiteError(f"no components given; {COMPONENT_HINT}")
    return out


def _split_top(text: str) -> list[str]:
    """Split on commas outside brackets: ``a[1,2],b`` -> ``['a[1,2]', 'b']``."""
    parts, depth, cur = [], 0, ""
    for ch in text:
        depth += (ch == "[") - (ch == "]")
        if ch == "," and depth == 0:
            parts.append(cur.strip())
            cur = ""
        else:
            cur += ch
    parts.append(cur.strip())
    return parts
