"""Refusal-direction candidates (Arditi et al. 2024): difference of means of the residual stream.

For every block ``l`` and every post-instruction position ``p`` (the chat-template tokens after the
user's message, e.g. ``<|im_end|>\\n<|im_start|>assistant\\n``), the candidate is

    r[l, p] = mean_harmful(resid_pre[l, p]) - mean_harmless(resid_pre[l, p])

computed in one forward pass per batch with float64 running means. By default only harmful prompts the model
refuses and harmless prompts it answers are used (``filter_by_refusal``), as in the paper; with the one-pass
filters the verdicts and the activations come from the same forward pass (``filter_and_fit``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ...io import atomic_dir, load_tensors, read_json, save_tensors, write_json
from ...measure.memo import LogitsMemo
from ...models.adapter import LoadedModel
from ...positions import parse_positions
from ...prompts.chat import post_instruction_length, tokenize_prompts
from ..filtering import filter_and_fit
from ..fit import stacked_means
from .artifact import Direction

ZERO_NORM = 1e-6  # candidates whose difference of means is (relatively) this small are degenerate


@dataclass
class Candidates:
    """Group means of ``resid_pre`` at every block x selected position.

    ``harmful_mean`` / ``harmless_mean``: [n_layers, n_positions, d_model] float64;
    ``positions``: the negative offsets of the columns (e.g. -5..-1); ``tokens``: their text.
    """

    harmful_mean: torch.Tensor
    harmless_mean: torch.Tensor
    positions: tuple[int, ...]
    tokens: list[str]
    n_harmful: int
    n_harmless: int
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def n_layers(self) -> int:
        return int(self.harmful_mean.shape[0])

    @property
    def diff(self) -> torch.Tensor:  # [n_layers, n_positions, d_model]
        return self.harmful_mean - self.harmless_mean

    @property
    def norms(self) -> torch.Tensor:  # [n_layers, n_positions]
        return self.diff.norm(dim=-1)

    def column(self, position: int) -> int:
        try:
            return self.positions.index(int(position))
        except ValueError:
            raise ValueError(f"position {position} was not captured; captured offsets: {list(self.positions)}") from None

    def degenerate(self) -> torch.Tensor:  # [n_layers, n_positions] bool
        """Candidates whose difference is ~0 relative to the activations (e.g. identical template embeddings)."""
        scale = torch.maximum(self.harmful_mean.norm(dim=-1), self.harmless_mean.norm(dim=-1))
        return self.norms <= ZERO_NORM * scale.clamp_min(1e-12)

    def direction(self, layer: int, position: int, **kwargs: Any) -> Direction:
        """The candidate at (block, negative offset) as a Direction artifact."""
        col = self.column(position)
        if bool(self.degenerate()[layer, col]):
            raise ValueError(f"the candidate at layer {layer}, position {position} is zero (both groups agree there); "
                             "pick another layer or position")
        vec = self.diff[layer, col]
        return Direction(vec, layer, int(position), norm=float(vec.norm()), token=self.tokens[col],
                         targets=self.targets(layer, position), **kwargs)

    def targets(self, layer: int, position: int) -> torch.Tensor:
        """[n_layers] mean projection of the harmless prompts on the candidate's unit direction at every
        block's resid_pre, at the candidate's position (the targets of mean ablation)."""
        col = self.column(position)
        r = self.diff[layer, col] / self.diff[layer, col].norm().clamp_min(1e-30)
        return (self.harmless_mean[:, col] @ r).float()

    def cosines(self, reference: torch.Tensor) -> torch.Tensor:
        """[n_layers, n_positions] cosine of every candidate with ``reference`` [d_model]."""
        ref = reference.to(torch.float64).flatten()
        return torch.nn.functional.cosine_similarity(self.diff, ref.expand_as(self.diff), dim=-1)

    # ---- persistence ------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        with atomic_dir(path) as tmp:
            save_tensors(tmp / "means.safetensors", {"harmful": self.harmful_mean, "harmless": self.harmless_mean})
            write_json(tmp / "candidates.json", {
                "positions": list(self.positions), "tokens": self.tokens, "n_harmful": self.n_harmful,
                "n_harmless": self.n_harmless, "info": self.info,
            })
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> Candidates:
        path = Path(path)
        if not (path / "candidates.json").is_file():
            raise FileNotFoundError(f"{path} holds no candidates; run `safetyscope direction find` first")
        meta = read_json(path / "candidates.json")
        t = load_tensors(path / "means.safetensors")
        return cls(t["harmful"].double(), t["harmless"].double(), tuple(meta["positions"]), list(meta["tokens"]),
                   int(meta["n_harmful"]), int(meta["n_harmless"]), meta.get("info", {}))


def position_offsets(lm: LoadedModel, positions: str | Sequence[int], system: str | None = None) -> tuple[int, ...]:
    """Negative offsets a position spec names (``post_instruction``, ``last`` or explicit offsets)."""
    spec = parse_positions(positions if isinstance(positions, str) else list(positions))
    if spec == "post_instruction":
        n = post_instruction_length(lm.tokenizer, system)
        return tuple(range(-n, 0))
    if spec == "last":
        return (-1,)
    if isinstance(spec, tuple):
        return spec
    raise ValueError(f"candidates need token positions (post_instruction, last or offsets like -1,-2), not {spec!r}")


def template_tokens(lm: LoadedModel, offsets: Sequence[int], system: str | None = None) -> list[str]:
    """The chat-template tokens at the given negative offsets (for labels)."""
    batch = tokenize_prompts(lm.tokenizer, ["x"], system=system)
    ids = batch.input_ids[0]
    return [lm.tokenizer.decode([int(ids[o])]) if -o <= len(ids) else "?" for o in offsets]


def find_candidates(
    lm: LoadedModel,
    harmful: Sequence[str],
    harmless: Sequence[str],
    *,
    positions: str | Sequence[int] = "post_instruction",
    filter: str = "first_token",
    judge: Callable[[str, str], bool] | None = None,
    batch_size: int = 8,
    system: str | None = None,
    cache_dir: str | Path | None = None,
    memo: LogitsMemo | None = None,
) -> Candidates:
    """Difference-of-means candidates at every block's ``resid_pre`` x every selected position.

    ``filter``: ``"first_token"`` (default), ``"score"``, ``"judge"`` or ``"none"``; see
    :func:`safetyscope.methods.filtering.filter_by_refusal` (``cache_dir``: where it keeps its verdicts;
    ``memo``: where the unmodified first-token logits it computes are kept, :mod:`safetyscope.measure.memo`).
    """
    offsets = position_offsets(lm, positions, system)
    kept, stats = filter_and_fit(lm, harmful, harmless, "blocks.*.resid_pre", list(offsets), method=filter, judge=judge,
                                 batch_size=batch_size, system=system, cache_dir=cache_dir, memo=memo)
    layers = range(lm.n_layers)
    means = {group: stacked_means(stats, group, "resid_pre", layers)  # [n_layers, n_positions, d_model]
             for group in ("harmful", "harmless")}
    return Candidates(
        means["harmful"], means["harmless"], offsets, template_tokens(lm, offsets, system),
        len(kept.harmful), len(kept.harmless), {"filter": kept.summary(), "model": lm.name, "system": system},
    )
