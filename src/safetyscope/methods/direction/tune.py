"""Beyond Arditi et al.: per-layer ablation strength, searched to trade refusal against KL.

Full directional ablation removes the direction from every block's writes with weight 1. Here the
weight of block ``l`` follows a smooth kernel over layers (as in heretic):

    w(l) = max_weight + (|l - peak| / width) * (min_weight - max_weight)   if |l - peak| <= width
         = 0                                                                otherwise

(the embeddings get ``w(0)``). A small seeded optimiser -- exploration (uniform strengths 0.5 / 0.25 /
0.125 at every block, for the gentle low-KL end, then random kernels), then Gaussian perturbations of
points on the current Pareto front with a shrinking step -- minimises both the mean refusal score on
harmful prompts and the mean first-token KL on harmless prompts. Every trial is kept; the Pareto front
is reported, and the chosen trial is the lowest-KL one whose mean refusal score on harmful prompts is
at most ``target`` (else the lowest refusal score). The default target is the unmodified model's mean
score on the harmless prompts: "harmful prompts are treated like harmless ones" by the first-token
metric, which adapts to models that put little probability on refusal tokens even when they refuse.
Trial 0 is always full ablation, the reference. ``norm_preserving`` searches the norm-preserving variant
instead.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from ...measure.compare import logits_under
from ...measure.metrics import kl_divergence, refusal_score
from ...measure.refusal_tokens import refusal_token_ids
from ...models.adapter import LoadedModel
from .artifact import Direction

PARAM_NAMES = ("peak", "width", "max_weight", "min_weight")


@dataclass(frozen=True)
class Kernel:
    """Smooth per-layer ablation weights: linear fall-off from ``max_weight`` at ``peak`` to
    ``min_weight`` at distance ``width``, zero beyond."""

    peak: float
    width: float
    max_weight: float
    min_weight: float

    def weights(self, n_layers: int) -> torch.Tensor:  # [n_layers]
        layers = torch.arange(n_layers, dtype=torch.float64)
        dist = (layers - self.peak).abs()
        width = max(self.width, 1e-6)
        w = self.max_weight + (dist / width) * (self.min_weight - self.max_weight)
        return torch.where(dist <= width, w, torch.zeros_like(w)).float()


@dataclass
class Trial:
    index: int
    kernel: dict[str, float] | None  # None: full ablation (every weight 1)
    refusal: float  # mean refusal score on harmful prompts (lower = more bypassed)
    refusing: float  # fraction of harmful prompts whose refusal score is still > 0
    kl: float  # mean first-token KL on harmless prompts
    pareto: bool = False


@dataclass
class TuneResult:
    trials: list[Trial]
    chosen: int
    front: list[int]
    norm_preserving: bool
    settings: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"chosen": self.chosen, "front": self.front, "norm_preserving": self.norm_preserving,
                "settings": self.settings, "trials": [asdict(t) for t in self.trials]}

    def direction(self, base: Direction, n_layers: int) -> Direction:
        """``base`` with the chosen trial's weights (full ablation for trial 0)."""
        return self.trial_direction(base, n_layers, self.chosen)

    def trial_direction(self, base: Direction, n_layers: int, index: int) -> Direction:
        """``base`` with trial ``index``'s weights (full ablation for trial 0): any point of the front."""
        t = self.trials[index]
        if t.kernel is None:
            return base.with_weights(None, 1.0, self.norm_preserving)
        w = Kernel(**t.kernel).weights(n_layers)
        out = base.with_weights(w, float(w[0]), self.norm_preserving)
        out.scores = {**base.scores, "tuned_refusal": t.refusal, "tuned_refusing": t.refusing, "tuned_kl": t.kl}
        out.meta = {**base.meta, "kernel": t.kernel}
        return out


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point dominates (both coordinates minimised), by first coordinate."""
    front = []
    for i, (a, b) in enumerate(points):
        dominated = any(
            (a2 <= a and b2 <= b) and (a2 < a or b2 < b) for j, (a2, b2) in enumerate(points) if j != i
        )
        if not dominated and all(math.isfinite(v) for v in (a, b)):
            front.append(i)
    return sorted(front, key=lambda i: points[i])


def _sample(rng: random.Random, n_layers: int) -> Kernel:
    top = n_layers - 1
    max_w = rng.uniform(0.5, 1.5)
    return Kernel(rng.uniform(0, top), rng.uniform(1.0, max(1.0, float(top))), max_w, rng.uniform(0.0, 1.0) * max_w)


def _perturb(rng: random.Random, k: Kernel, n_layers: int, scale: float) -> Kernel:
    top = float(n_layers - 1)

    def clip(v: float, lo: float, hi: float) -> float:
        return min(max(v, lo), hi)

    max_w = clip(k.max_weight + rng.gauss(0, 0.3 * scale), 0.0, 1.5)
    return Kernel(
        clip(k.peak + rng.gauss(0, top * scale), 0.0, top),
        clip(k.width + rng.gauss(0, top * scale), 1.0, max(1.0, top)),
        max_w,
        clip(k.min_weight + rng.gauss(0, 0.3 * scale), 0.0, max_w),
    )


def uniform_strengths(n_explore: int) -> list[float]:
    """The uniform ablation strengths that open the exploration: ``2**-k`` for ``k = 1..m``,
    ``m = min(3, n_explore // 2)`` (0.5, 0.25, 0.125 from 19 trials on). They anchor the gentle, low-KL end
    of the front (first-token KL grows about as the square of the strength), which random kernels (peak
    weight 0.5-1.5) rarely reach."""
    m = min(3, n_explore // 2)
    return [2.0 ** -k for k in range(1, m + 1)]


def _search(run: Callable[[Kernel | None], Trial], trials: list[Trial], rng: random.Random, n_trials: int,
            n_layers: int) -> None:
    """Trial 0 full ablation, a third exploration (uniform strengths, then random kernels), the rest
    perturbations of Pareto-front kernels with a shrinking step (``run`` measures a kernel and appends its
    trial to ``trials``)."""
    run(None)
    n_explore = max(1, (n_trials - 1) // 3)
    sweep = uniform_strengths(n_explore)
    top = float(max(1, n_layers - 1))
    for i in range(1, n_trials):
        if i <= len(sweep):
            run(Kernel(0.0, top, sweep[i - 1], sweep[i - 1]))  # weight s at every block
            continue
        if i <= n_explore:
            run(_sample(rng, n_layers))
            continue
        best = [trials[j] for j in pareto_front([(t.refusal, t.kl) for t in trials]) if trials[j].kernel is not None]
        pool = best or [t for t in trials if t.kernel is not None]
        if not pool:
            run(_sample(rng, n_layers))
            continue
        parent = Kernel(**rng.choice(pool).kernel)  # type: ignore[arg-type]
        scale = 0.25 * (1.0 - (i - n_explore) / max(1, n_trials - n_explore)) + 0.03
        run(_perturb(rng, parent, n_layers, scale))


def tune_weights(
    lm: LoadedModel,
    direction: Direction,
    harmful: Sequence[str],
    harmless: Sequence[str],
    *,
    n_trials: int = 24,
    seed: int = 0,
    norm_preserving: bool = False,
    target: float | None = None,
    batch_size: int = 8,
    system: str | None = None,
    token_ids: Sequence[int] | None = None,
    log: Callable[[str], None] | None = None,
) -> TuneResult:
    """Search kernel weights for ``direction`` on validation prompts; see the module docstring."""
    if n_trials < 1:
        raise ValueError("give at least one tuning trial (--tune-trials N)")
    say = log or (lambda _m: None)
    rng = random.Random(seed)
    ids = list(token_ids) if token_ids is not None else refusal_token_ids(lm.tokenizer)
    harmful, harmless = list(harmful), list(harmless)
    n_h, n_layers = len(harmful), lm.n_layers
    base = logits_under(lm, harmless, None, batch_size=batch_size, system=system)  # [n_s, vocab]
    goal = float(refusal_score(base, ids).mean()) if target is None else float(target)
    trials: list[Trial] = []

    def run(kernel: Kernel | None) -> Trial:
        if kernel is None:
            d = direction.with_weights(None, 1.0, norm_preserving)
        else:
            w = kernel.weights(n_layers)
            d = direction.with_weights(w, float(w[0]), norm_preserving)
        logits = logits_under(lm, harmful + harmless, d, batch_size=batch_size, system=system)
        rs = refusal_score(logits[:n_h], ids)
        t = Trial(len(trials), None if kernel is None else asdict(kernel), float(rs.mean()),
                  float((rs > 0).float().mean()), float(kl_divergence(base, logits[n_h:]).mean()))
        trials.append(t)
        say(f"trial {t.index:>3}: refusal {t.refusal:+.3f} refusing {t.refusing:.0%} kl {t.kl:.4f} {t.kernel or 'full'}")
        return t

    _search(run, trials, rng, n_trials, n_layers)
    on_front = pareto_front([(t.refusal, t.kl) for t in trials])
    for j in on_front:
        trials[j].pareto = True
    ok = [t for t in trials if t.refusal <= goal]
    chosen = min(ok, key=lambda t: t.kl) if ok else min(trials, key=lambda t: t.refusal)
    settings = {"n_trials": n_trials, "seed": seed, "target": goal, "target_met": bool(ok), "n_harmful": n_h,
                "n_harmless": len(harmless), "token_ids": ids}
    return TuneResult(trials, chosen.index, on_front, norm_preserving, settings)
