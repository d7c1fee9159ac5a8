"""Mergeable running statistics in float64 (memory independent of the number of prompts).

``Moments`` keeps count, mean and the sum of squared deviations (M2). Two partial results merge
exactly (Chan et al.'s parallel update), so shards from several processes or GPUs can be reduced
with :func:`all_reduce_moments` / :func:`all_reduce_group_moments` under ``torch.distributed``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import cast

import torch

from .parallel import active, gather_objects


@dataclass
class Moments:
    """Running count / mean / M2 over the leading dimension of the tensors fed to ``update``."""

    n: int = 0
    mean: torch.Tensor | None = None  # [*shape] float64
    m2: torch.Tensor | None = None  # [*shape] float64

    def update(self, x: torch.Tensor) -> Moments:
        """x: [n, *shape]; any dtype/device (accumulated on CPU in float64)."""
        x = x.detach().to("cpu", torch.float64)
        if x.shape[0] == 0:
            return self
        bm = x.mean(0)
        bm2 = ((x - bm) ** 2).sum(0)
        return self._merge_parts(int(x.shape[0]), bm, bm2)

    def _merge_parts(self, n_b: int, mean_b: torch.Tensor, m2_b: torch.Tensor) -> Moments:
        if self.n == 0 or self.mean is None or self.m2 is None:
            self.n, self.mean, self.m2 = n_b, mean_b.clone(), m2_b.clone()
            return self
        if mean_b.shape != self.mean.shape:
            raise ValueError(f"cannot merge moments of shape {tuple(mean_b.shape)} into {tuple(self.mean.shape)}")
        n = self.n + n_b
        delta = mean_b - self.mean
        self.mean = self.mean + delta * (n_b / n)
        self.m2 = self.m2 + m2_b + delta**2 * (self.n * n_b / n)
        self.n = n
        return self

    def merge(self, other: Moments) -> Moments:
        """Combine another partial result into this one (exact)."""
        if other.n == 0 or other.mean is None or other.m2 is None:
            return self
        return self._merge_parts(other.n, other.mean, other.m2)

    def var(self, ddof: int = 1) -> torch.Tensor:
        if self.m2 is None or self.n - ddof <= 0:
            raise ValueError(f"variance needs more than {ddof} sample(s), have {self.n}")
        return self.m2 / (self.n - ddof)

    def std(self, ddof: int = 1) -> torch.Tensor:
        return self.var(ddof).sqrt()

    def state(self, prefix: str = "") -> dict[str, torch.Tensor]:
        assert self.mean is not None and self.m2 is not None
        return {f"{prefix}n": torch.tensor(self.n), f"{prefix}mean": self.mean, f"{prefix}m2": self.m2}

    @classmethod
    def from_state(cls, state: Mapping[str, torch.Tensor], prefix: str = "") -> Moments:
        return cls(int(state[f"{prefix}n"]), state[f"{prefix}mean"].double(), state[f"{prefix}m2"].double())


@dataclass
class GroupMoments:
    """Moments per (group, key), e.g. group = "harmful"/"harmless", key = a site name."""

    groups: dict[str, dict[str, Moments]] = field(default_factory=dict)

    def update(self, group: str, key: str, x: torch.Tensor) -> None:
        self.groups.setdefault(group, {}).setdefault(key, Moments()).update(x)

    def get(self, group: str, key: str) -> Moments:
        try:
            return self.groups[group][key]
        except KeyError:
            raise KeyError(f"no statistics for group {group!r} at {key!r}") from None

    def merge(self, other: GroupMoments) -> GroupMoments:
        for g, keys in other.groups.items():
            for k, m in keys.items():
                self.groups.setdefault(g, {}).setdefault(k, Moments()).merge(m)
        return self

    def keys(self, group: str) -> list[str]:
        return list(self.groups.get(group, {}))

    def state(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for g, keys in self.groups.items():
            for k, m in keys.items():
                out.update(m.state(f"{g}/{k}/"))
        return out

    @classmethod
    def from_state(cls, state: Mapping[str, torch.Tensor]) -> GroupMoments:
        gm = cls()
        for name in state:
            if name.endswith("/n"):
                g, k = name[:-2].split("/", 1)
                gm.groups.setdefault(g, {})[k] = Moments.from_state(state, f"{g}/{k}/")
        return gm


def diff_of_means(a: Moments, b: Moments) -> torch.Tensor:
    assert a.mean is not None and b.mean is not None
    return a.mean - b.mean


def pooled_std(a: Moments, b: Moments) -> torch.Tensor:
    """sqrt of the pooled within-group variance (Cohen's d denominator)."""
    assert a.m2 is not None and b.m2 is not None
    dof = max(a.n + b.n - 2, 1)
    return ((a.m2 + b.m2) / dof).sqrt()


def effect_size(a: Moments, b: Moments, eps: float = 1e-8) -> torch.Tensor:
    """Cohen's d: (mean_a - mean_b) / pooled std."""
    return diff_of_means(a, b) / (pooled_std(a, b) + eps)


def all_reduce_moments(parts: Iterable[Moments]) -> list[Moments]:
    """Merge each Moments across torch.distributed ranks, in rank order (no-op in one process).

    One collective for all parts; every rank gets the same merged result (Chan et al.'s exact merge in
    float64, so the result equals one process's up to float64 rounding).
    """
    parts = list(parts)
    if not active():
        return parts
    states = [(m.n, m.mean, m.m2) for m in parts]
    out = [Moments() for _ in parts]
    for rank_states in gather_objects(states):
        for total, (n_i, mean_i, m2_i) in zip(out, cast(list[tuple[int, torch.Tensor, torch.Tensor]], rank_states)):
            if n_i:
                total.merge(Moments(int(n_i), mean_i, m2_i))
    return out


def all_reduce_group_moments(stats: GroupMoments) -> GroupMoments:
    """``stats`` merged across torch.distributed ranks (ranks may hold different groups/keys); a new object.

    In one process, ``stats`` itself.
    """
    if not active():
        return stats
    total = GroupMoments()
    for state in gather_objects({g: {k: (m.n, m.mean, m.m2) for k, m in keys.items()} for g, keys in stats.groups.items()}):
        for g, keys in cast(dict[str, dict[str, tuple[int, torch.Tensor, torch.Tensor]]], state).items():
            for k, (n, mean, m2) in keys.items():
                total.groups.setdefault(g, {}).setdefault(k, Moments()).merge(Moments(int(n), mean, m2))
    return total
