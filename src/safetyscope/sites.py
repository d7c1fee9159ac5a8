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
