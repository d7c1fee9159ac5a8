"""What every map stage receives: the loaded model, the settings and budget, the prompts, earlier results."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from ...io import atomic_path
from ...models.adapter import LoadedModel
from ...prompts.builtin import builtin_prompts
from ...prompts.sets import PromptsLike, Splits, as_prompt_set, split_prompts
from ...prompts.types import PromptError, PromptSet
from .results import StageRun

Kind = Literal["harmful", "harmless"]
KINDS: tuple[Kind, Kind] = ("harmful", "harmless")


@dataclass(frozen=True)
class MapConfig:
    """Settings of a map run (the CLI's ``safetyscope map`` flags, less model loading and output)."""

    quick: bool = False  # tiny budgets everywhere: a smoke test, not findings
    n_prompts: int = 48  # training prompts per group (probes, neurons, direction candidates); 0 = all
    n_eval: int = 16  # held-out prompts per group (fragility, capability, monitor, the direction's addition); 0 = all
    n_headline: int = 0  # held-out prompts per group for the headline (the direction's ablation); 0 = the whole test split
    pairs: int = 6  # minimal pairs traced by attribution patching
    max_new_tokens: int = 32  # reply length of judged generations
    fragility_ks: str = "0,10,100,1%"  # numbers of neurons ablated along the fragility curves
    split: str = "train"  # built-in split the fitting stages use (measurements always use "test")
    batch_size: int = 8
    system: str | None = None
    seed: int = 0
    judges: tuple[str, ...] = ()  # the judges stage: these judges side by side on the headline's harmful replies

    def __post_init__(self) -> None:
        for name, least in (("n_prompts", 0), ("n_eval", 0), ("n_headline", 0), ("pairs", 1), ("max_new_tokens", 1), ("batch_size", 1)):
            if int(getattr(self, name)) < least:
                flag = "--" + name.replace("_", "-")
                raise ValueError(f"{flag} must be at least {least}, not {getattr(self, name)}")


# The refinement's minibatches come from up to this many times n_prompts training prompts per group (the
# whole built-in train split): its cost is per step, not per prompt, except one reference forward pass and
# the harmless mean (issue-20 note: decided on validation prompts only).
REFINE_POOL = 4


@dataclass(frozen=True)
class Budget:
    n_prompts: int
    n_eval: int
    n_val: int
    pairs: int
    max_new_tokens: int
    ks: str
    seeds: int
    folds: int
    utility_texts: int
    n_refine: int = 0  # training prompts per group the refinement samples its minibatches from (0 = all)
    n_headline: int = 0  # held-out prompts per group the direction's ablation is measured on (0 = all)

    @classmethod
    def of(cls, c: MapConfig) -> Budget:
        if c.quick:
            return cls(n_prompts=10, n_eval=6, n_val=6, pairs=2, max_new_tokens=12, ks="0,5,20", seeds=1, folds=2,
                       utility_texts=2, n_refine=10, n_headline=6)
        return cls(n_prompts=c.n_prompts, n_eval=c.n_eval, n_val=max(8, c.n_eval * 3 // 4), pairs=c.pairs,
                   max_new_tokens=c.max_new_tokens, ks=c.fragility_ks, seeds=2, folds=5, utility_texts=8,
                   n_refine=REFINE_POOL * c.n_prompts, n_headline=c.n_headline)


MIN_PER_PART = 1  # every user group needs at least one train, one val and one test prompt


@dataclass(frozen=True)
class MapPrompts:
    """Each group's train / val / test prompts: the one seeded 60/20/20 split of a user's prompts, or the
    built-in set's own splits. ``user`` names the groups the caller gave."""

    harmful: Splits
    harmless: Splits
    user: frozenset[str] = frozenset()
    split: str = "train"  # the built-in split the fitting stages use

    @classmethod
    def of(cls, harmful: PromptsLike | None, harmless: PromptsLike | None, *, split: str = "train",
           seed: int = 0) -> MapPrompts:
        """Load and split both groups; a group too small to split fails here, before anything is written."""
        groups: dict[str, Splits] = {}
        for kind, given in zip(KINDS, (harmful, harmless)):
            if given is None or (isinstance(given, str) and not given):
                groups[kind] = Splits(*(builtin_prompts(kind, part, seed=seed) for part in (split, "val", "test")))
                continue
            full = as_prompt_set(given, kind, what=f"{kind} prompts")
            groups[kind] = parts = split_prompts(full, seed)
            short = [name for name in ("train", "val", "test") if len(getattr(parts, name)) < MIN_PER_PART]
            if short:
                raise PromptError(f"{kind} prompts ({len(full)}) are too few to split 60/20/20 into fitting, validation "
                                  f"and test prompts (no {' or '.join(short)} prompt); give at least 5")
        users = frozenset(k for k, g in zip(KINDS, (harmful, harmless)) if g is not None and not (isinstance(g, str) and not g))
        return cls(groups["harmful"], groups["harmless"], users, split)

    def splits(self, kind: Kind) -> Splits:
        return self.harmful if kind == "harmful" else self.harmless

    def fit(self, kind: Kind) -> PromptSet:
        """Prompts the fitting stages use: train + val of a user group, the built-in training split otherwise."""
        s = self.splits(kind)
        return s.fit if kind in self.user else s.train

    def test(self, kind: Kind) -> PromptSet:
        return self.splits(kind).test

    def fingerprint(self) -> dict[str, Any]:
        """What the cache keys record of the prompts (every text of every part)."""
        return {k: {p: getattr(self.splits(k), p).texts for p in ("train", "val", "test")} for k in KINDS}

    def write(self, folder: Path) -> dict[str, Path]:
        """The user groups' fitting and test prompts as JSONL files under ``folder`` (for the record)."""
        out: dict[str, Path] = {}
        for kind in sorted(self.user):
            for part, ps in (("fit", self.fit(kind)), ("test", self.test(kind))):  # type: ignore[arg-type]
                dest = folder / f"{kind}_{part}.jsonl"
                with atomic_path(dest) as tmp:
                    tmp.write_text("".join(json.dumps({"prompt": t, "label": kind}) + "\n" for t in ps.texts), "utf-8")
                out[f"{kind}_{part}"] = dest
        return out

    def describe(self, kind: Kind, files: Mapping[str, Path]) -> str:
        """How the report and results name a group's fitting prompts."""
        return str(files[f"{kind}_fit"]) if f"{kind}_fit" in files else f"built-in ({self.split})"


@dataclass(frozen=True)
class StageInputs:
    """Everything a stage function may read. ``done``: the JSON results of the stages before it."""

    lm: LoadedModel
    config: MapConfig
    budget: Budget
    out: Path
    prompts: MapPrompts
    files: Mapping[str, Path] = field(default_factory=dict)  # the written user prompt files
    done: Mapping[str, Any] = field(default_factory=dict)
    log: Callable[[str], None] = lambda _m: None
    runs: tuple[StageRun, ...] = ()  # how the stages before this one went (the report lists them)

    @property
    def system(self) -> str | None:
        return self.config.system

    @property
    def batch_size(self) -> int:
        return self.config.batch_size

    def sampled(self, kind: Kind, n: int, part: Literal["fit", "train", "val", "test"] = "fit", seed_offset: int = 0) -> list[str]:
        """``n`` prompts of one group's part (0 = all), sampled with the run's seed."""
        ps = self.prompts.fit(kind) if part == "fit" else getattr(self.prompts.splits(kind), part)
        if n:
            ps = ps.sample(n, seed=self.config.seed + seed_offset)
        return ps.require_nonempty(f"{kind} {part} prompts").texts

    def key_settings(self) -> dict[str, Any]:
        d = self.lm.describe()
        config = asdict(self.config)
        config.pop("judges")  # only the judges stage depends on them (its key adds them): other caches stay valid
        return {"model": [d["name"], d["n_params"], d["dtype"]], "config": config}
