"""Results of causal tracing: :class:`Effects` (per-pair patching effects on a grid, normalised and
summarised robustly) and the cell names used to list, rank and re-patch single cells.

``effect = (s_patched - s_base) / (s_source - s_base)`` per pair (1 = the patched run scores like
the source run, 0 = unchanged); pairs whose gap ``s_source - s_base`` is smaller than ``min_gap``
in the expected direction (``sign``) are left out of the normalised summary, whose headline is the
median over pairs, with the mean, the pooled ratio (sum of changes / sum of gaps) and quartiles.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ...sites import Site


@dataclass
class Effects:
    """Patching effects on a grid ``rows x cols`` (e.g. layers x components) for every pair."""

    name: str
    direction: str
    rows: list[str]
    cols: list[str]
    raw: np.ndarray  # [n_pairs, R, C] s_patched - s_base (NaN: cell undefined for that pair)
    gap: np.ndarray  # [n_pairs] s_source - s_base
    min_gap: float = 1.0
    note: str = ""
    sign: int = 1  # expected sign of the gap (-1 forward: the harmless source refuses less)
    labels: list[list[str]] = field(default_factory=list)  # [R][C] cell names (for verification)

    @property
    def used(self) -> np.ndarray:  # [n_pairs] bool: pairs whose gap is large enough to normalise by
        return self.sign * self.gap >= self.min_gap

    def normalised(self) -> np.ndarray:  # [n_used, R, C]
        return self.raw[self.used] / self.gap[self.used, None, None]

    def _stat(self, fn: Callable[..., np.ndarray], *args: float) -> np.ndarray:
        norm = self.normalised()
        if norm.shape[0] == 0:
            return np.full(self.raw.shape[1:], np.nan)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            return fn(norm, *args, axis=0)

    def median(self) -> np.ndarray:  # [R, C]
        return self._stat(np.nanmedian)

    def mean(self) -> np.ndarray:
        return self._stat(np.nanmean)

    def pooled(self) -> np.ndarray:  # sum of changes / sum of gaps over the used pairs
        raw, gap = self.raw[self.used], self.gap[self.used, None, None]
        with warnings.catch_warnings(), np.errstate(invalid="ignore", divide="ignore"):
            warnings.simplefilter("ignore", RuntimeWarning)
            return np.nansum(raw, 0) / np.where(np.isnan(raw), 0, gap).sum(0)

    def cell_names(self) -> list[str]:
        return [n for row in self.labels for n in row] if self.labels else [f"{r}/{c}" for r in self.rows for c in self.cols]

    def top(self, k: int = 10) -> list[dict[str, object]]:
        med, mean = self.median().ravel(), self.mean().ravel()
        order = [i for i in np.argsort(-np.nan_to_num(med, nan=-np.inf)) if not np.isnan(med[i])][:k]
        names = self.cell_names()
        return [{"cell": names[i], "median": float(med[i]), "mean": float(mean[i])} for i in order]

    def to_dict(self) -> dict[str, object]:
        norm = self.normalised()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            q25, q75 = (np.nanpercentile(norm, q, axis=0) if len(norm) else None for q in (25, 75))
        arrays = {"median": self.median(), "mean": self.mean(), "pooled": self.pooled(), "q25": q25, "q75": q75,
                  "gap": self.gap, "raw": self.raw}
        return {
            "name": self.name, "direction": self.direction, "rows": self.rows, "cols": self.cols, "note": self.note,
            "n_pairs": int(len(self.gap)), "n_pairs_used": int(self.used.sum()), "min_gap": self.min_gap,
            "expected_gap_sign": self.sign, **{k: None if v is None else np.asarray(v).tolist() for k, v in arrays.items()},
        }


    def to_state(self) -> dict[str, object]:
        """:meth:`to_dict` plus what :meth:`from_state` needs to rebuild the object (labels, sign): a cache entry."""
        return {**self.to_dict(), "labels": self.labels, "sign": self.sign}

    @classmethod
    def from_state(cls, d: dict[str, Any]) -> Effects:
        """Inverse of :meth:`to_state` (after a JSON round trip: None cells are NaN again)."""
        raw = np.array([[[np.nan if v is None else v for v in r] for r in p] for p in d["raw"]], dtype=float)
        raw = raw.reshape(len(d["gap"]), len(d["rows"]), len(d["cols"]))  # [n_pairs, R, C]
        return cls(d["name"], d["direction"], d["rows"], d["cols"], raw, np.array(d["gap"], dtype=float), d["min_gap"],
                   d["note"], sign=d["sign"], labels=d["labels"])


def cell_name(site: Site, head: int | None = None, offset: int | None = None) -> str:
    """``blocks.3.mlp.out``, ``blocks.3.attn.heads[5]``, ``blocks.3.resid_pre@-2``."""
    return site.name + (f"[{head}]" if head is not None else "") + (f"@{offset}" if offset is not None else "")


def parse_cell(name: str, n_layers: int | None = None) -> tuple[Site, int | None, int | None]:
    """Inverse of :func:`cell_name`."""
    from ...sites import parse_site

    base, _, off = name.partition("@")
    head = None
    if base.endswith("]") and "[" in base:
        base, _, h = base[:-1].partition("[")
        head = int(h)
    return parse_site(base, n_layers), head, int(off) if off else None
