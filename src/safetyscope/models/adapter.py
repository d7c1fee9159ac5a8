"""`LoadedModel`: a Hugging Face causal LM plus its tokenizer and architecture table.

It is the only object that knows how a site name maps to a module; everything above it
asks it (``resolve``), so no architecture names appear in core code.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..sites import Site, parse_sites
from .arch import OVERRIDE_HINT, ArchitectureError, ArchTable, Dims, SiteSpec


@dataclass
class LoadedModel:
    model: Any  # a transformers PreTrainedModel (typed loosely: its attributes are dynamic)
    tokenizer: Any
    table: ArchTable
    dims: Dims
    name: str = "model"
    meta: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def wrap(cls, model: Any, tokenizer: Any, name: str = "model", arch_table: Any = None) -> LoadedModel:
        """Wrap an already loaded HF model (e.g. a tiny random one built from a config)."""
        from .arch import table_for

        table = table_for(model.config.model_type, arch_table)
        if tokenizer is not None:
            tokenizer.padding_side = "left"
            if tokenizer.pad_token_id is None and tokenizer.eos_token is not None:
                tokenizer.pad_token = tokenizer.eos_token
        return cls(model=model, tokenizer=tokenizer, table=table, dims=Dims.from_config(table, model.config), name=name)

    # ---- sites -------------------------------------------------------------------------------
    @property
    def n_layers(self) -> int:
        return self.dims.n_layers

    def sites(self, spec: str | Site | Iterable[str | Site]) -> list[Site]:
        """Parse and validate site names against this model (wildcards expanded)."""
        sites = parse_sites(spec, self.n_layers)
        for site in sites:
            self.resolve(site)  # raises for sites the architecture lacks
        return sites

    def module(self, path: str) -> Any:
        return self.model.get_submodule(path)

    def resolve(self, site: Site) -> tuple[nn.Module, SiteSpec]:
        """The module a site lives on and how to hook it (``spec.hook``: "input" or "output")."""
        path, spec = self.table.site_spec(site)
        try:
            return self.module(path), spec
        except AttributeError:  # e.g. a norm the table expects but this checkpoint's config leaves out
            raise ArchitectureError(
                f"site {site.name!r}: the {self.table.family} table puts it on {path}, which this model lacks; "
                f"{OVERRIDE_HINT}"
            ) from None

    def site_shape(self, site: Site) -> tuple[int, ...]:
        """Trailing shape of a site's activation (after [batch, pos])."""
        if site.kind == "attn.heads":
            return (self.dims.n_heads, self.dims.d_head)
        if site.kind == "mlp.neurons":
            return (self.dims.d_mlp,)
        return (self.dims.d_model,)

    # ---- placement ---------------------------------------------------------------------------
    @property
    def input_device(self) -> torch.device:
        return self.module(self.table.embed).weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.module(self.table.embed).weight.dtype

    def unembed_matrix(self) -> torch.Tensor:
        """[vocab, d_model] weight of the unembedding."""
        return self.module(self.table.unembed).weight

    def describe(self) -> dict[str, Any]:
        d = self.dims
        return {
            "name": self.name,
            "family": self.table.family,
            "model_type": getattr(self.model.config, "model_type", None),
            "n_layers": d.n_layers,
            "d_model": d.d_model,
            "d_mlp": d.d_mlp,
            "n_heads": d.n_heads,
            "n_kv_heads": d.n_kv_heads,
            "d_head": d.d_head,
            "max_positions": d.max_positions,
            "n_params": sum(p.numel() for p in self.model.parameters()),
            "dtype": str(self.dtype).replace("torch.", ""),
            "device": str(self.input_device),
            "chat_template": bool(getattr(self.tokenizer, "chat_template", None)),
        }
