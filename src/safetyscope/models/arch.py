"""Architecture tables (data in ``architectures.toml``) and their resolution against a config."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from ..errors import SafetyscopeError
from ..sites import Site

OVERRIDE_HINT = (
    "pass your own table with --arch-table FILE.toml (load_model(..., arch_table=FILE)); "
    "see src/safetyscope/models/architectures.toml for the format"
)


class ArchitectureError(SafetyscopeError, ValueError):
    """The model's architecture is unknown, or a site does not exist in it."""


@dataclass(frozen=True)
class SiteSpec:
    module: str  # dotted path, may contain {block}
    hook: str  # "input" | "output"
    write: str = "replace"  # "replace" | "inplace" (see architectures.toml)


@dataclass(frozen=True)
class ArchTable:
    """One family's row of the architecture table."""

    family: str
    model_types: tuple[str, ...]
    blocks: str
    embed: str
    final_norm: str
    unembed: str
    sites: dict[str, SiteSpec]
    config_keys: dict[str, tuple[str, ...]]
    writers: tuple[str, ...] = ()
    mlp_in: tuple[str, ...] = ()
    attn_out_proj: str = ""
    mlp_out_proj: str = ""
    attn_module: str = ""  # the whole attention module (fine-tuning a block's attention)
    mlp_module: str = ""  # the whole MLP module
    attn_in: tuple[str, ...] = ()  # q, k, v projections, or one fused [q | k | v] projection (head rows)
    conv1d: bool = False
    post_norms: bool = False
    parallel_residual: bool = False
    norm_offset: float = 0.0
    norm_centred: bool = False  # norms subtract the mean without being nn.LayerNorm (see architectures.toml)
    d_mlp_default_mult: int = 4
    extra: dict[str, Any] = field(default_factory=dict)

    def block_path(self, layer: int) -> str:
        return f"{self.blocks}.{layer}"

    def expand(self, template: str, layer: int) -> str:
        return template.replace("{block}", self.block_path(layer))

    def site_spec(self, site: Site) -> tuple[str, SiteSpec]:
        """Module path and hook spec of a concrete site."""
        if site.kind == "embed":
            return self.embed, SiteSpec(self.embed, "output")
        if site.kind == "final":
            return self.final_norm, SiteSpec(self.final_norm, "output")
        spec = self.sites.get(site.kind)
        if spec is None:
            raise ArchitectureError(
                f"site {site.name!r} does not exist in the {self.family} architecture"
                + (" (parallel residual: no resid_mid)" if self.parallel_residual else "")
                + f"; {OVERRIDE_HINT}"
            )
        assert site.layer is not None
        return self.expand(spec.module, site.layer), spec


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key != "sites":
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _build(raw: dict[str, dict[str, Any]]) -> dict[str, ArchTable]:
    resolved: dict[str, dict[str, Any]] = {}

    def resolve(name: str, seen: tuple[str, ...] = ()) -> dict[str, Any]:
        if name in resolved:
            return resolved[name]
        if name not in raw or name in seen:
            raise ArchitectureError(f"architecture table {name!r} is missing or inherits in a cycle")
        row = dict(raw[name])
        parent = row.pop("inherit", None)
        if parent:
            row = _merge(resolve(parent, (*seen, name)), row)
        resolved[name] = row
        return row

    tables = {}
    for name in raw:
        row = resolve(name)
        try:
            cfg = row["config"]
            tables[name] = ArchTable(
                family=name,
                model_types=tuple(row.get("model_types", [name])),
                blocks=row["blocks"],
                embed=row["embed"],
                final_norm=row["final_norm"],
                unembed=row["unembed"],
                sites={k: SiteSpec(v["module"], v["hook"], v.get("write", "replace")) for k, v in row["sites"].items()},
                config_keys={k: tuple(v) for k, v in cfg.items() if isinstance(v, list)},
                writers=tuple(row.get("writers", ())),
                mlp_in=tuple(row.get("mlp_in", ())),
                attn_out_proj=row.get("attn_out_proj", ""),
                mlp_out_proj=row.get("mlp_out_proj", ""),
                attn_module=row.get("attn_module", ""),
                mlp_module=row.get("mlp_module", ""),
                attn_in=tuple(row.get("attn_in", ())),
                conv1d=bool(row.get("conv1d", False)),
                post_norms=bool(row.get("post_norms", False)),
                parallel_residual=bool(row.get("parallel_residual", False)),
                norm_offset=float(row.get("norm_offset", 0.0)),
                norm_centred=bool(row.get("norm_centred", False)),
                d_mlp_default_mult=int(cfg.get("d_mlp_default_mult", 4)),
            )
        except KeyError as exc:
            raise ArchitectureError(f"architecture table {name!r} lacks the key {exc}; {OVERRIDE_HINT}") from None
    return tables


def load_tables(extra: str | Path | None = None) -> dict[str, ArchTable]:
    """The built-in tables, optionally extended or overridden by a user TOML file."""
    raw = tomllib.loads(resources.files(__package__).joinpath("architectures.toml").read_text("utf-8"))
    if extra is not None:
        path = Path(extra)
        if not path.is_file():
            raise ArchitectureError(f"architecture table {path} not found; give the path of a TOML file")
        try:
            user = tomllib.loads(path.read_text("utf-8"))
        except tomllib.TOMLDecodeError as exc:
            raise ArchitectureError(f"architecture table {path} is not valid TOML ({exc}); fix the file") from None
        for name, row in user.items():
            raw[name] = _merge(raw[name], row) if name in raw else row
    return _build(raw)


def table_for(model_type: str, extra: str | Path | None = None) -> ArchTable:
    """The table serving ``config.model_type``; user tables take precedence."""
    tables = load_tables(extra)
    matches = [t for t in tables.values() if model_type in t.model_types]
    if not matches:
        known = sorted({mt for t in tables.values() for mt in t.model_types})
        raise ArchitectureError(
            f"unsupported architecture {model_type!r} (known: {', '.join(known)}); {OVERRIDE_HINT}"
        )
    return matches[-1]


@dataclass(frozen=True)
class Dims:
    """Sizes read from a model config through the table's key lists."""

    n_layers: int
    d_model: int
    d_mlp: int
    n_heads: int
    n_kv_heads: int
    d_head: int
    max_positions: int | None

    @classmethod
    def from_config(cls, table: ArchTable, config: Any) -> Dims:
        def get(key: str) -> Any:
            for attr in table.config_keys.get(key, ()):
                value = getattr(config, attr, None)
                if value is not None:
                    return value
            return None

        n_layers, d_model, n_heads = get("n_layers"), get("d_model"), get("n_heads")
        if None in (n_layers, d_model, n_heads):
            raise ArchitectureError(
                f"could not read layer count / width / heads from the {table.family} config; {OVERRIDE_HINT}"
            )
        d_mlp = get("d_mlp") or table.d_mlp_default_mult * d_model
        return cls(
            n_layers=int(n_layers),
            d_model=int(d_model),
            d_mlp=int(d_mlp),
            n_heads=int(n_heads),
            n_kv_heads=int(get("n_kv_heads") or n_heads),
            d_head=int(get("d_head") or d_model // n_heads),
            max_positions=get("max_positions"),
        )
