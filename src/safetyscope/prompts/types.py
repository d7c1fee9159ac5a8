"""Core prompt types: :class:`Prompt`, :class:`PromptSet`, :class:`MinimalPair`, :class:`PromptError`."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Hashable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar, overload

from ..errors import SafetyscopeError

LABELS: tuple[str, ...] = ("harmful", "harmless")
SPLITS: tuple[str, ...] = ("train", "val", "test", "all")
DEFAULT_FRACTIONS: tuple[float, float, float] = (0.6, 0.2, 0.2)

SplitName = Literal["train", "val", "test", "all"]

# Accepted spellings of the two labels (compared lower-cased and stripped).
_LABEL_SYNONYMS: dict[str, str] = {
    **{s: "harmful" for s in ("harmful", "unsafe", "1", "true", "yes", "y", "bad", "malicious", "toxic", "refuse")},
    **{s: "harmless" for s in ("harmless", "safe", "0", "false", "no", "n", "good", "benign", "comply")},
}

T = TypeVar("T")


class PromptError(SafetyscopeError, ValueError):
    """One-line, user-facing error that names the fix."""


def normalize_label(value: Any, *, where: str = "") -> str:
    """Map a label or a common synonym (``unsafe``/``safe``, ``1``/``0``, ``true``/``false``) to a canonical label.

    Raises :class:`PromptError` naming the accepted values if ``value`` is not recognised.
    """
    key = str(value).strip().lower() if isinstance(value, (str, bool, int)) else None
    if key is not None and key in _LABEL_SYNONYMS:
        return _LABEL_SYNONYMS[key]
    prefix = f"{where}: " if where else ""
    raise PromptError(
        f"{prefix}unknown label {value!r}; use 'harmful' or 'harmless' "
        "(also accepted: unsafe/safe, 1/0, true/false)"
    )


@dataclass(frozen=True)
class Prompt:
    """One prompt. ``label`` is ``"harmful"``, ``"harmless"`` or ``None`` (unlabelled)."""

    text: str
    label: str | None
    category: str | None = None
    source: str = "user"
    id: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.text, str) or not self.text.strip():
            where = f" {self.id!r}" if self.id else ""
            raise PromptError(f"prompt{where} has empty text; give every prompt non-empty text")
        if self.label is not None and self.label not in LABELS:
            raise PromptError(
                f"prompt {self.id or self.text[:40]!r} has label {self.label!r}; "
                "use 'harmful', 'harmless' or None (normalize_label() maps synonyms)"
            )


@dataclass(frozen=True)
class MinimalPair:
    """A harmful request and a harmless twin from the same template (same token length)."""

    id: str
    category: str | None
    harmful: str
    harmless: str


def _rank_key(seed: int, key: str) -> str:
    return hashlib.sha256(f"{seed}\x00{key}".encode()).hexdigest()


def check_split_args(split: str, fractions: Sequence[float]) -> tuple[float, float, float]:
    if split not in SPLITS:
        raise PromptError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
    fr = tuple(float(f) for f in fractions)
    if len(fr) != 3 or any(f < 0 for f in fr) or abs(sum(fr) - 1.0) > 1e-6:
        raise PromptError(
            f"split fractions {tuple(fractions)!r} are invalid; give three non-negative numbers summing to 1"
        )
    return fr[0], fr[1], fr[2]


def split_items(
    items: Sequence[T],
    split: str,
    *,
    seed: int = 0,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    key: Callable[[T], str],
    group: Callable[[T], Hashable],
) -> list[T]:
    """Deterministic, seeded, stratified split of ``items`` (original order kept).

    Within each group the items are ranked by a seeded hash of ``key(item)`` and the first
    ``round(n * f_train)`` go to train, the next ``round(n * f_val)`` to val and the rest to test,
    so an item's split depends only on the seed and the members of its group, never on input order.
    """
    f_train, f_val, _ = check_split_args(split, fractions)
    if split == "all":
        return list(items)
    groups: dict[Hashable, list[int]] = {}
    for i, item in enumerate(items):
        groups.setdefault(group(item), []).append(i)
    chosen: set[int] = set()
    for idx in groups.values():
        ranked = sorted(idx, key=lambda i: (_rank_key(seed, key(items[i])), i))
        n = len(ranked)
        n_train = round(n * f_train)
        n_val = min(round(n * f_val), n - n_train)
        bounds = {"train": (0, n_train), "val": (n_train, n_train + n_val), "test": (n_train + n_val, n)}
        lo, hi = bounds[split]
        chosen.update(ranked[lo:hi])
    return [item for i, item in enumerate(items) if i in chosen]


@dataclass(frozen=True)
class PromptSet(Sequence[Prompt]):
    """An immutable, named sequence of :class:`Prompt`."""

    name: str
    items: tuple[Prompt, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if not isinstance(self.items, tuple):
            object.__setattr__(self, "items", tuple(self.items))

    @classmethod
    def from_texts(
        cls, texts: Iterable[str], label: str | None = None, *, name: str = "user", category: str | None = None
    ) -> PromptSet:
        """Build a set from plain strings (``label`` may be a synonym such as ``"unsafe"``)."""
        lab = None if label is None else normalize_label(label)
        items = tuple(
            Prompt(text=t, label=lab, category=category, source=name, id=f"{name}-{i:04d}")
            for i, t in enumerate(texts)
        )
        return cls(name=name, items=items)

    @property
    def texts(self) -> list[str]:
        return [p.text for p in self.items]

    @property
    def labels(self) -> list[str | None]:
        return [p.label for p in self.items]

    @property
    def categories(self) -> list[str | None]:
        return [p.category for p in self.items]

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self) -> Iterator[Prompt]:
        return iter(self.items)

    @overload
    def __getitem__(self, index: int) -> Prompt: ...

    @overload
    def __getitem__(self, index: slice) -> PromptSet: ...

    def __getitem__(self, index: int | slice) -> Prompt | PromptSet:
        if isinstance(index, slice):
            return PromptSet(name=self.name, items=self.items[index])
        return self.items[index]

    def __add__(self, other: object) -> PromptSet:
        if not isinstance(other, PromptSet):
            return NotImplemented
        name = self.name if self.name == other.name else f"{self.name}+{other.name}"
        return PromptSet(name=name, items=self.items + other.items)

    def __repr__(self) -> str:
        return f"PromptSet(name={self.name!r}, n={len(self)})"

    def filter(self, label: str | None = None, category: str | None = None) -> PromptSet:
        """Keep prompts with the given label (synonyms accepted) and/or category."""
        lab = None if label is None else normalize_label(label)
        items = tuple(
            p
            for p in self.items
            if (lab is None or p.label == lab) and (category is None or p.category == category)
        )
        return PromptSet(name=self.name, items=items)

    def split(
        self, split: SplitName | str, seed: int = 0, fractions: Sequence[float] = DEFAULT_FRACTIONS
    ) -> PromptSet:
        """Deterministic seeded train/val/test split, stratified by label."""
        items = split_items(
            self.items, split, seed=seed, fractions=fractions, key=lambda p: p.text, group=lambda p: p.label
        )
        return PromptSet(name=self.name, items=tuple(items))

    def sample(self, n: int, seed: int = 0) -> PromptSet:
        """``n`` prompts chosen deterministically by ``seed`` (original order kept); all if ``n >= len``."""
        if n < 0:
            raise PromptError(f"cannot sample {n} prompts; give n >= 0")
        if n >= len(self.items):
            return self
        ranked = sorted(range(len(self.items)), key=lambda i: (_rank_key(seed, self.items[i].text), i))
        keep = set(ranked[:n])
        return PromptSet(name=self.name, items=tuple(p for i, p in enumerate(self.items) if i in keep))

    def require_nonempty(self, what: str = "") -> PromptSet:
        """Return ``self``, or raise :class:`PromptError` if the set has no prompts."""
        if not self.items:
            label = what or f"prompt set {self.name!r}"
            raise PromptError(
                f"{label} is empty: pass a prompt file with at least one prompt, "
                "or loosen the label/category filter or split"
            )
        return self
