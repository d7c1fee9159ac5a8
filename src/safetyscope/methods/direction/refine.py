"""Beyond Arditi et al.: refine a refusal direction by gradient descent on what its ablation should do.

A difference of means is a statistic. Estimated from about a hundred prompts per group it carries
sampling noise (on the default model, directions from two halves of the train split agree at cosine
~0.85), and that noise follows the within-group covariance: it leans towards the directions along which
harmless prompts differ most, which are the ones whose ablation moves harmless behaviour most.
Refinement keeps every model weight frozen and trains only the direction, ``r = v / ||v||`` with ``v``
starting at the given direction, to minimise under the direction's own ablation (zero or mean, with its
per-layer weights)::

    loss(r) = mean_harmful relu(score(x; r) - tau) + kl_weight * mean_harmless KL(P(. | x) || P(. | x; r))

* ``score``: the logit refusal score (log-odds of refusal-opening tokens at the first reply position);
* ``tau``: the unmodified model's mean score on the harmless training prompts ("treated like harmless
  prompts", as ``direction tune``'s target), so harmful prompts already below it cost nothing;
* ``KL``: first-token KL to the unmodified model (the capability metric of the selection).

For mean ablation the targets follow the direction: ``t_l = mean_harmless(resid_pre[l]) . r`` at the
direction's position, with the means taken once over the harmless training prompts (so step 0 is the
given direction with its targets recomputed from those prompts).

Adam, seeded minibatches of ``batch`` prompts per group (in micro-batches of ``micro_batch`` rows, halved
on out-of-memory). At step 0 and every ``eval_every`` steps the same loss is measured on validation
prompts without gradient; the checkpoint with the lowest validation loss is returned, so the result is
never worse than the input by that measure on those prompts. The idea is that of Wollschläger et al.
(2025)'s refusal direction optimisation; this version uses the first-token retain loss and the logit
score instead of target completions, so it needs no generated targets.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from ...hooks import forward, hooks
from ...measure.compare import logits_under
from ...measure.memo import LogitsMemo
from ...measure.metrics import kl_divergence, refusal_score
from ...measure.refusal_tokens import refusal_token_ids
from ...models.adapter import LoadedModel
from ...prefix import same_rows
from ...prompts.chat import tokenize_prompts
from ...prompts.sets import PromptsLike
from ...runner import is_oom, run_capture_logits
from ..fit import fit_group_moments, stacked_means
from .artifact import Direction
from .inputs import file_records, train_val_texts, with_fit_files


@dataclass
class RefineStep:
    """One measured checkpoint: training minibatch terms (None at step 0) and validation terms."""

    step: int
    cosine: float  # with the starting direction
    train_bypass: float | None = None
    train_kl: float | None = None
    val_bypass: float | None = None  # mean relu(score - tau) on the harmful validation prompts
    val_kl: float | None = None  # mean first-token KL on the harmless validation prompts
    val_loss: float | None = None
    val_refusing: float | None = None  # fraction of harmful validation prompts still scoring above tau
    seconds: float = 0.0


@dataclass
class RefineResult:
    direction: Direction
    history: list[RefineStep]
    chosen: int  # step of the returned checkpoint
    settings: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"chosen": self.chosen, "settings": self.settings, "history": [asdict(h) for h in self.history]}


def harmless_means(lm: LoadedModel, harmless: Sequence[str], position: int, *, batch_size: int = 8,
                   system: str | None = None) -> torch.Tensor:
    """[n_layers, d_model] float64 mean of every block's resid_pre over ``harmless`` at ``position``."""
    stats = fit_group_moments(lm, {"harmless": list(harmless)}, "blocks.*.resid_pre", [int(position)],
                              batch_size=batch_size, system=system)
    return stacked_means(stats, "harmless", "resid_pre", range(lm.n_layers))[:, 0]


def logits_and_means(lm: LoadedModel, prompts: Sequence[str], position: int, *, batch_size: int = 8,
                     system: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The unmodified model's first-token logits [n, vocab] (float32, CPU) and :func:`harmless_means`
    [n_layers, d_model] (float64) from one forward pass per batch instead of two."""
    sites = lm.sites("blocks.*.resid_pre")
    rows: dict[int, torch.Tensor] = {}
    total = torch.zeros(lm.n_layers, lm.dims.d_model, dtype=torch.float64)   # [n_layers, d_model]
    for batch, (values, logits) in run_capture_logits(lm, prompts, sites, [int(position)], batch_size=batch_size,
                                                      system=system, description="reference"):
        acts = torch.stack([values[site][:, 0] for site in sites], 1)  # [batch, n_layers, d_model]
        rows.update(zip(batch.index, logits))
        total += acts.double().sum(0)
    return torch.stack([rows[i] for i in range(len(prompts))]), total / len(prompts)


def refine_direction(
    lm: LoadedModel,
    direction: Direction,
    harmful: PromptsLike,
    harmless: PromptsLike,
    *,
    val_harmful: PromptsLike | None = None,
    val_harmless: PromptsLike | None = None,
    steps: int = 30,
    lr: float = 0.002,
    kl_weight: float = 20.0,
    batch: int = 16,
    micro_batch: int = 32,
    eval_every: int = 10,
    seed: int = 0,
    system: str | None = None,
    log: Callable[[str], None] | None = None,
    memo: LogitsMemo | None = None,
) -> RefineResult:
    """Train ``direction`` (only it; the model stays frozen) on the loss in the module docstring.

    Prompts: lists of strings, PromptSets or prompt files. Without validation prompts each group is split
    with :func:`safetyscope.prompts.sets.split_prompts` (train to train on, val to choose the checkpoint).
    Prompt files it trains on are recorded (sha256) in the refined direction's metadata. ``memo``: the unmodified
    model's first-token logits (e.g. from :func:`search_direction` on the same prompts; :mod:`safetyscope.measure.memo`)
    for the KL reference, read and filled (zero ablation; mean ablation computes its reference with the means).
    """
    if steps < 0 or lr <= 0 or kl_weight < 0 or batch < 1 or micro_batch < 1 or eval_every < 1:
        raise ValueError("refinement settings must be positive: --steps >= 0, --lr > 0, --kl-weight >= 0, "
                         "--batch >= 1, --batch-size >= 1, --eval-every >= 1")
    tv = train_val_texts(harmful, harmless, val_harmful, val_harmless, what="refinement")
    h, s, vh, vs = tv.harmful, tv.harmless, tv.val_harmful, tv.val_harmless
    say = log or (lambda _m: None)
    if not tv.held_out:
        say("too few prompts to hold some out for validation: the checkpoint is chosen on the training prompts")
    run = _Refinement(lm, direction, s, vs, micro_batch=micro_batch, system=system, log=say, memo=memo)
    rng = random.Random(seed)
    opt = torch.optim.Adam([run.v], lr=lr)
    history: list[RefineStep] = []
    best: tuple[float, int, torch.Tensor] | None = None
    with hooks(lm, direction.edits(lm, same_rows(lambda _b: run.state["r"]), same_rows(lambda _b: run.state["t"]))):
        t0 = time.perf_counter()
        for step in range(steps + 1):
            train = run.train_step(opt, rng, h, s, batch, kl_weight) if step else {}
            if step % eval_every == 0 or step == steps:
                rec = run.validate(vh, step, t0, kl_weight, **train)
                history.append(rec)
                assert rec.val_loss is not None
                if best is None or rec.val_loss < best[0]:
                    best = (rec.val_loss, step, run.v.detach().clone())
                say(f"refine step {step}/{steps}: val KL {rec.val_kl:.4f}, val bypass {rec.val_bypass:.3f} "
                    f"({rec.val_refusing:.0%} above the harmless mean score), cosine to start {rec.cosine:.3f}")
                t0 = time.perf_counter()
    assert best is not None
    _loss, chosen, vec = best
    out = refined(direction, vec.cpu(), None if run.means is None else run.means.cpu())
    out = with_fit_files(out, file_records({"harmful": harmful, "harmless": harmless, "val_harmful": val_harmful,
                                            "val_harmless": val_harmless}))
    return RefineResult(
        out, history, chosen,
        {"steps": steps, "lr": lr, "kl_weight": kl_weight, "batch": batch, "eval_every": eval_every, "seed": seed,
         "tau": run.tau, "n_harmful": len(h), "n_harmless": len(s), "n_val": [len(vh), len(vs)]},
    )


@dataclass(frozen=True)
class _Row:
    """One training row: a harmful prompt (``ref`` None: the bypass term) or a harmless one (``ref``: its row in
    the reference logits: the KL term), and its weight in the step's loss."""

    prompt: str
    ref: int | None
    weight: float


class _Refinement:
    """The trained vector ``v``, the hooks' state (unit ``r`` [d_model], mean targets ``t`` [n_layers]) and
    the reference logits of the unmodified model."""

    def __init__(self, lm: LoadedModel, direction: Direction, harmless: list[str], val_harmless: list[str], *,
                 micro_batch: int, system: str | None, log: Callable[[str], None], memo: LogitsMemo | None):
        self.lm, self.micro_batch, self.system, self.say = lm, micro_batch, system, log
        self.ids = refusal_token_ids(lm.tokenizer)
        device = lm.input_device
        self.means: torch.Tensor | None = None
        if direction.ablation == "mean":  # the reference logits and the harmless means in one pass
            self.ref_train, means = logits_and_means(lm, harmless, direction.position, batch_size=micro_batch,
                                                     system=system)  # [n, V], [n_layers, d_model]
            self.means = means.to(device=device, dtype=torch.float32)
        else:
            self.ref_train = logits_under(lm, harmless, None, batch_size=micro_batch, system=system, memo=memo)  # [n, V]
        self.val_harmless = list(val_harmless)
        self.ref_val = logits_under(lm, val_harmless, None, batch_size=micro_batch, system=system, memo=memo)
        self.tau = float(refusal_score(self.ref_train, self.ids).mean())
        self.start = direction.direction.to(device=device, dtype=torch.float32)  # [d_model] unit
        self.v = self.start.clone().requires_grad_(True)
        self.state: dict[str, torch.Tensor] = {}

    def set_r(self, vec: torch.Tensor) -> None:
        r = vec / vec.norm()
        self.state["r"] = r
        if self.means is not None:
            self.state["t"] = self.means @ r  # [n_layers]

    def train_step(self, opt: torch.optim.Optimizer, rng: random.Random, harmful: list[str], harmless: list[str],
                   batch: int, kl_weight: float) -> dict[str, float]:
        """One Adam step on a seeded minibatch of each group; the minibatch means of both terms.

        Both groups' rows go through the model together (``micro_batch`` rows per pass, mixed): on a CPU one
        pass of 32 rows costs about 0.8x two passes of 16, and the gradient is the same sum either way."""
        hb = rng.sample(list(harmful), min(batch, len(harmful)))
        sb_idx = rng.sample(range(len(harmless)), min(batch, len(harmless)))
        rows = [_Row(p, None, 1.0 / len(hb)) for p in hb]
        rows += [_Row(harmless[i], i, kl_weight / len(sb_idx)) for i in sb_idx]
        opt.zero_grad()
        b_sum, k_sum = self.backward(rows)
        opt.step()
        return {"train_bypass": b_sum / len(hb), "train_kl": k_sum / len(sb_idx)}

    def backward(self, rows: Sequence[_Row]) -> tuple[float, float]:
        """Backward of the weighted sum of relu(score - tau) over harmful rows (``ref`` None) and of first-token KL
        over harmless rows, in micro-batches (halved on out-of-memory); the unweighted sums of both terms."""
        sums, size, i = [0.0, 0.0], self.micro_batch, 0
        while i < len(rows):
            chunk = list(rows[i:i + size])
            try:
                with torch.enable_grad():
                    self.set_r(self.v)
                    batch = tokenize_prompts(self.lm.tokenizer, [r.prompt for r in chunk], system=self.system)
                    logits = forward(self.lm, batch, last_only=True)[:, -1]  # [b, vocab]
                    vals, kinds = self.row_terms(logits, chunk)  # [b], [b] bool (True: KL term)
                    weights = torch.tensor([r.weight for r in chunk], device=vals.device, dtype=vals.dtype)  # [b]
                    (vals * weights).sum().backward()
            except RuntimeError as exc:
                if not is_oom(exc) or size == 1:
                    raise
                size = max(1, size // 2)
                self.say(f"out of memory: retrying with micro-batches of {size}")
                continue
            vals = vals.detach()
            sums[0] += float(vals[~kinds].sum())
            sums[1] += float(vals[kinds].sum())
            i += len(chunk)
        return sums[0], sums[1]

    def row_terms(self, logits: torch.Tensor, rows: Sequence[_Row]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per row of ``logits`` [b, vocab]: relu(score - tau) for harmful rows, KL to the reference for harmless
        rows; and which rows are KL rows. Both [b]."""
        kl_rows = [j for j, r in enumerate(rows) if r.ref is not None]
        kinds = torch.zeros(len(rows), dtype=torch.bool, device=logits.device)
        kinds[kl_rows] = True
        vals = torch.relu(refusal_score(logits, self.ids, grad=True) - self.tau)  # [b]
        if kl_rows:
            ref = self.ref_train[[rows[j].ref for j in kl_rows]].to(logits.device)  # [k, vocab]
            kl = kl_divergence(ref, logits[kl_rows], grad=True)  # [k]
            vals = vals.index_put((kinds.nonzero()[:, 0],), kl.to(vals.dtype))
        return vals, kinds

    def validate(self, val_harmful: list[str], step: int, t0: float, kl_weight: float, **train: float) -> RefineStep:
        """The loss on the validation prompts, without gradient (the hooks are installed)."""
        v = self.v.detach()
        self.set_r(v)
        logits = logits_under(self.lm, val_harmful + self.val_harmless, None, batch_size=self.micro_batch,
                              system=self.system)  # [n_vh + n_vs, vocab]
        scores = refusal_score(logits[: len(val_harmful)], self.ids)
        bypass = float(torch.relu(scores - self.tau).mean())
        kl = float(kl_divergence(self.ref_val, logits[len(val_harmful):]).mean())
        cos = float(v @ self.start / v.norm())
        return RefineStep(step, cos, val_bypass=bypass, val_kl=kl, val_loss=bypass + kl_weight * kl,
                          val_refusing=float((scores > self.tau).float().mean()), seconds=time.perf_counter() - t0,
                          **train)


def refined(direction: Direction, vector: torch.Tensor, means: torch.Tensor | None) -> Direction:
    """A copy of ``direction`` along ``vector`` [d_model] (mean-ablation targets recomputed from ``means``
    [n_layers, d_model] when given); the difference-of-means norm, layer and position are kept."""
    unit = (vector / vector.norm()).float()
    targets = direction.targets if means is None else (means.float() @ unit)
    return Direction(unit, direction.layer, direction.position, norm=direction.norm, token=direction.token,
                     scores=direction.scores, layer_weights=direction.layer_weights, embed_weight=direction.embed_weight,
                     norm_preserving=direction.norm_preserving, targets=targets, ablation=direction.ablation,
                     meta={**direction.meta, "refined": True})
