"""Fragility curves: how refusal and harmless behaviour change as more components are ablated.

General over the kind of component (neurons, heads, directions, ...): give ranked candidate lists
(``{"top_by_diff": [...], ...}``) and ``make_intervention(prefix) -> intervention`` (anything
:func:`safetyscope.measure.compare.enter` accepts). At each k the first k candidates of every
ranking are ablated together; random baselines ablate, per seed, the same number of components
*from the same groups* (e.g. layers) as the top-k of a reference ranking.

Measured at each point, with one forward pass over held-out harmful + harmless prompts:
the logit refusal score on harmful prompts (mean, and the fraction with score > 0), the first-token
KL(original || ablated) on harmless prompts, and optionally the judged refusal rate of generated
replies (``max_new_tokens > 0``; phrase judge by default). Rows are plain dicts (JSON-ready).
"""

from __future__ import annotations

import random as _random
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch

from ...measure.compare import Intervention, enter, logits_under
from ...measure.generation import generate
from ...measure.metrics import kl_divergence, rate_with_ci, refusal_score
from ...measure.refusal_tokens import refusal_token_ids
from ...models.adapter import LoadedModel

T = TypeVar("T")
METRICS = ("refusal_score", "score_refusal_rate", "refusal_rate", "kl", "kl_median")


def parse_ks(spec: str | Iterable[int | str], total: int) -> list[int]:
    """``"0,10,50,1%,5%"`` -> sorted unique counts; percentages are of ``total`` components."""
    items = [p.strip() for p in spec.split(",")] if isinstance(spec, str) else [str(p).strip() for p in spec]
    out = set()
    for item in items:
        if not item:
            continue
        try:
            k = round(float(item[:-1]) / 100 * total) if item.endswith("%") else int(item)
        except ValueError:
            raise ValueError(f"bad k {item!r}; give counts and percentages like 0,10,50,1%,5%") from None
        if k < 0 or k > total:
            raise ValueError(f"k={item} is outside 0..{total} (the number of candidate components)")
        out.add(int(k))
    if not out:
        raise ValueError("no ks given; use e.g. --ks 0,10,50,100,1%")
    return sorted(out)


def matched_random(
    ranking: Sequence[T],
    pools: Mapping[Hashable, Sequence[T]],
    group: Callable[[T], Hashable],
    seed: int,
    *,
    exclude: Iterable[T] = (),
) -> list[T]:
    """A random ordering whose every prefix has the same per-group counts as ``ranking``'s prefix.

    Each group's pool is shuffled with ``seed``; walking ``ranking``, the next unused member of the
    item's group is emitted. Prefixes are nested, so curves are monotone in k by construction.
    """
    rng = _random.Random(seed)
    skip = set(exclude)
    shuffled: dict[Hashable, list[T]] = {}
    for g in sorted(pools, key=repr):
        members = [m for m in pools[g] if m not in skip]
        rng.shuffle(members)
        shuffled[g] = members
    used = {g: 0 for g in shuffled}
    out = []
    for item in ranking:
        g = group(item)
        if g not in shuffled:
            raise ValueError(f"group {g!r} of {item!r} has no random pool; give pools for every group")
        if used[g] >= len(shuffled[g]):
            raise ValueError(f"group {g!r} has only {len(shuffled[g])} random candidates; lower the largest k")
        out.append(shuffled[g][used[g]])
        used[g] += 1
    return out


@dataclass(frozen=True)
class FragilityResult:
    ks: list[int]
    rows: list[dict[str, Any]]  # one per (curve, seed, k): {"curve", "seed", "k", **metrics}
    baseline: dict[str, Any]
    n_harmful: int
    n_harmless: int
    info: dict[str, Any] = field(default_factory=dict)

    def curves(self) -> list[str]:
        return list(dict.fromkeys(r["curve"] for r in self.rows))

    def summary(self) -> list[dict[str, Any]]:
        """Per (curve, k): mean, std, min and max over seeds of each metric."""
        out = []
        for curve in self.curves():
            for k in self.ks:
                rows = [r for r in self.rows if r["curve"] == curve and r["k"] == k]
                if not rows:
                    continue
                item: dict[str, Any] = {"curve": curve, "k": k, "n_seeds": len(rows)}
                for m in METRICS:
                    vals = [float(r[m]) for r in rows if r.get(m) is not None]
                    if not vals:
                        continue
                    t = torch.tensor(vals, dtype=torch.float64)
                    item[m] = float(t.mean())
                    item[f"{m}_std"] = float(t.std()) if len(vals) > 1 else 0.0
                    item[f"{m}_min"], item[f"{m}_max"] = float(t.min()), float(t.max())
                out.append(item)
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"ks": self.ks, "n_harmful": self.n_harmful, "n_harmless": self.n_harmless, "baseline": self.baseline,
                "rows": self.rows, "summary": self.summary(), "info": self.info}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> FragilityResult:
        return cls(list(d["ks"]), list(d["rows"]), dict(d["baseline"]), int(d["n_harmful"]), int(d["n_harmless"]),
                   dict(d.get("info", {})))


def measure_point(
    lm: LoadedModel,
    intervention: Intervention | None,
    harmful: Sequence[str],
    harmless: Sequence[str],
    reference: torch.Tensor,
    *,
    token_ids: Sequence[int],
    judge: Callable[[str, str], Any] | None = None,
    max_new_tokens: int = 0,
    batch_size: int = 16,
    system: str | None = None,
    logits: torch.Tensor | None = None,
    keep_replies: bool = False,
) -> dict[str, Any]:
    """Refusal on ``harmful`` and first-token KL on ``harmless`` (vs ``reference`` logits) under an intervention.

    ``logits``: precomputed [n_harmful + n_harmless, vocab] first-token logits under the intervention.
    ``keep_replies``: also return the judged harmful replies (``replies``; for other judges to read).
    """
    if logits is None:
        logits = logits_under(lm, [*harmful, *harmless], intervention, batch_size=batch_size, system=system)
    lh, ls = logits[: len(harmful)], logits[len(harmful):]  # [n_h, vocab], [n_s, vocab]
    scores = refusal_score(lh, token_ids)
    kl = kl_divergence(reference, ls)
    row: dict[str, Any] = {
        "refusal_score": float(scores.mean()),
        "score_refusal_rate": float((scores > 0).double().mean()),
        "kl": float(kl.mean()),
        "kl_median": float(kl.median()),
    }
    if max_new_tokens > 0:
        from ...measure.judges import PhraseJudge, as_judge

        j = as_judge(judge) if judge is not None else PhraseJudge()
        with enter(lm, intervention):
            replies = generate(lm, harmful, max_new_tokens=max_new_tokens, batch_size=batch_size, system=system)
        rate = rate_with_ci([bool(j(p, r)) for p, r in zip(harmful, replies)])
        row.update(refusal_rate=rate["rate"], refusal_rate_lo=rate["lo"], refusal_rate_hi=rate["hi"],
                   example_reply=replies[0][:200] if replies else "")
        if keep_replies:
            row["replies"] = list(replies)
    return row


def _curves(rankings: Mapping[str, Sequence[T]], longest: int, like: Sequence[str], seeds: Sequence[int],
            pools: Mapping[Hashable, Sequence[T]] | None,
            group: Callable[[T], Hashable] | None) -> dict[tuple[str, int | None], Sequence[T]]:
    """{(curve, seed): ordering}: every ranking, and per seed a random ordering matching each ``like`` ranking."""
    curves: dict[tuple[str, int | None], Sequence[T]] = {(n, None): list(r[:longest]) for n, r in rankings.items()}
    if like and seeds:
        if pools is None or group is None:
            raise ValueError("random baselines need random_pools and group (or pass random_like=[])")
        for ref in like:
            name = "random" if len(like) == 1 else f"random~{ref}"
            for seed in seeds:
                curves[(name, int(seed))] = matched_random(rankings[ref][:longest], pools, group, int(seed))
    return curves


def fragility_curves(
    lm: LoadedModel,
    rankings: Mapping[str, Sequence[T]],
    make_intervention: Callable[[Sequence[T]], Intervention],
    ks: Sequence[int],
    harmful: Sequence[str],
    harmless: Sequence[str],
    *,
    random_pools: Mapping[Hashable, Sequence[T]] | None = None,
    group: Callable[[T], Hashable] | None = None,
    seeds: Sequence[int] = (0, 1, 2),
    random_like: str | Sequence[str] | None = None,
    judge: Callable[[str, str], Any] | None = None,
    max_new_tokens: int = 0,
    token_ids: Sequence[int] | None = None,
    batch_size: int = 16,
    system: str | None = None,
    done: Iterable[Mapping[str, Any]] = (),
    on_row: Callable[[dict[str, Any]], None] | None = None,
) -> FragilityResult:
    """Measure every ranking (and matched random baselines) at every k; see the module docstring.

    ``random_like`` names the ranking(s) whose per-group counts the random baselines match (default:
    the first ranking; ``[]`` for none). ``done`` holds rows of an interrupted run (resumed, not
    recomputed); ``on_row`` is called after each new row (e.g. to save progress).
    """
    if not harmful or not harmless:
        raise ValueError("fragility needs held-out harmful and harmless prompts; give at least one of each")
    ks = sorted({int(k) for k in ks})
    longest = max(ks)
    for name, ranked in rankings.items():
        if len(ranked) < longest:
            raise ValueError(f"ranking {name!r} has {len(ranked)} candidates, fewer than k={longest}; lower --ks")
    like = [next(iter(rankings))] if random_like is None else (
        [random_like] if isinstance(random_like, str) else list(random_like))
    curves = _curves(rankings, longest, like, seeds, random_pools, group)
    ids = list(token_ids) if token_ids is not None else refusal_token_ids(lm.tokenizer)
    # Reference logits come from the same combined run (same batches) as every point, so KL(k=0) = 0 exactly.
    base_logits = logits_under(lm, [*harmful, *harmless], None, batch_size=batch_size, system=system)
    reference = base_logits[len(harmful):]  # [n_s, vocab]
    kw: dict[str, Any] = {"token_ids": ids, "judge": judge, "max_new_tokens": max_new_tokens,
                          "batch_size": batch_size, "system": system}
    prior = {(r["curve"], r["seed"], r["k"]): dict(r) for r in done}
    baseline = next((r for r in prior.values() if r["k"] == 0), None)
    if baseline is None:
        baseline = measure_point(lm, None, harmful, harmless, reference, logits=base_logits, **kw)
    baseline = {m: v for m, v in baseline.items() if m not in ("curve", "seed", "k")}
    rows = []
    for (name, curve_seed), ranked in curves.items():
        for k in ks:
            key = (name, curve_seed, k)
            if key in prior:
                row = prior[key]
            else:
                metrics = baseline if k == 0 else measure_point(
                    lm, make_intervention(ranked[:k]), harmful, harmless, reference, **kw)
                row = {"curve": name, "seed": curve_seed, "k": k, **metrics}
                if on_row is not None:
                    on_row(row)
            rows.append(row)
    return FragilityResult(ks, rows, baseline, len(harmful), len(harmless),
                           {"random_like": like, "seeds": list(seeds), "max_new_tokens": max_new_tokens})


def direction_fragility(
    lm: LoadedModel,
    direction: Any,
    harmful: Sequence[str],
    harmless: Sequence[str],
    *,
    seeds: Sequence[int] = (0, 1, 2),
    judge: Callable[[str, str], Any] | None = None,
    max_new_tokens: int = 0,
    token_ids: Sequence[int] | None = None,
    batch_size: int = 16,
    system: str | None = None,
) -> FragilityResult:
    """The refusal direction as one removable component, against random directions (same layer, same hooks).

    Curves ``direction`` and ``random direction`` at k = 0 (unablated) and k = 1 (one direction ablated
    at every layer), measured exactly like the neuron curves, so they share one plot and one table.
    ``direction``: a :class:`~safetyscope.methods.direction.artifact.Direction`; the random directions are built
    by its own class (this package does not import the direction package).
    """
    make_direction = type(direction)
    if not harmful or not harmless:
        raise ValueError("direction fragility needs held-out harmful and harmless prompts; give at least one of each")
    ids = list(token_ids) if token_ids is not None else refusal_token_ids(lm.tokenizer)
    base_logits = logits_under(lm, [*harmful, *harmless], None, batch_size=batch_size, system=system)
    reference = base_logits[len(harmful):]  # [n_s, vocab]
    kw: dict[str, Any] = {"token_ids": ids, "judge": judge, "max_new_tokens": max_new_tokens,
                          "batch_size": batch_size, "system": system}
    baseline = measure_point(lm, None, harmful, harmless, reference, logits=base_logits, **kw)
    rows = [{"curve": "direction", "seed": None, "k": 0, **baseline},
            {"curve": "direction", "seed": None, "k": 1, **measure_point(lm, direction, harmful, harmless, reference, **kw)}]
    d_model = int(direction.direction.numel())
    for seed in seeds:
        g = torch.Generator().manual_seed(int(seed))
        # Zero ablation even when the direction uses mean ablation (random directions have no harmless means):
        # zeroing a component is the larger change, so "random does nothing" is the conservative reading.
        rand = make_direction(torch.randn(d_model, generator=g, dtype=torch.float64), direction.layer, direction.position)
        rows.append({"curve": "random direction", "seed": int(seed), "k": 0, **baseline})
        rows.append({"curve": "random direction", "seed": int(seed), "k": 1,
                     **measure_point(lm, rand, harmful, harmless, reference, **kw)})
    return FragilityResult([0, 1], rows, baseline, len(harmful), len(harmless),
                           {"seeds": list(seeds), "max_new_tokens": max_new_tokens, "layer": direction.layer})
