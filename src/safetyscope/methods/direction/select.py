"""Selecting the refusal direction among the candidates on a validation split (Arditi et al. 2024).

Each candidate (block ``l``, position ``p``) is scored with the one-pass logit refusal score:

* ``bypass``: mean refusal score on harmful prompts under directional ablation (lower = better);
* ``induce``: mean refusal score on harmless prompts under activation addition of the raw difference
  of means at ``blocks.{l}.resid_pre`` (should be > 0: the direction must cause refusal);
* ``kl``: mean first-token KL(original || ablated) on harmless prompts (the ablation must be gentle).

``ablation="mean"`` scores bypass and KL under mean ablation (the component moved to the harmless
mean, see :mod:`safetyscope.methods.direction.artifact`) instead of the paper's zero ablation.

Filters: KL above ``kl_threshold``, induce below ``induce_threshold``, and blocks in the last
``prune_layers`` fraction; the lowest bypass among the rest wins. Every candidate's scores are kept.

Beyond the paper, ``verify=k`` checks the logit proxy on real replies: the ``k`` lowest-bypass
candidates within the KL threshold generate greedy replies to the harmful prompts under ablation and
to the harmless prompts under addition, a judge reads them, and the choice is the lowest *judged*
refusal under ablation among those whose addition is judged to induce refusal (more than without it).
The first-token score is a proxy: a candidate can push "I" down yet leave "As an AI, I cannot ...".

Speed: several candidates share one forward pass (each batch row carries its own direction), and
with ``induce="lazy"`` the addition pass is run only in bypass order until a candidate passes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from ...hooks import hooks
from ...measure.compare import logits_under
from ...measure.metrics import kl_divergence, refusal_score
from ...measure.refusal_tokens import refusal_token_ids
from ...models.adapter import LoadedModel
from ...positions import Batch
from ...sites import Site
from .artifact import (
    ABLATIONS,
    Direction,
    DirectionFn,
    ablation_edits,
    addition_edit,
    mean_ablation_edits,
)
from .candidates import Candidates

Key = tuple[int, int]  # (layer, position offset)


@dataclass
class CandidateScore:
    layer: int
    position: int
    token: str
    norm: float
    bypass: float | None = None  # mean refusal score, harmful prompts, under ablation
    bypass_refusing: float | None = None  # fraction of those prompts whose score stays > 0
    kl: float | None = None  # mean first-token KL, harmless prompts, under ablation
    induce: float | None = None  # mean refusal score, harmless prompts, under addition
    screen_bypass: float | None = None  # bypass / KL on the screening subset (SelectConfig.screen)
    screen_kl: float | None = None
    judged_bypass: float | None = None  # fraction of harmful prompts judged refused under ablation (verify)
    judged_induce: float | None = None  # fraction of harmless prompts judged refused under addition (verify)
    reasons: list[str] = field(default_factory=list)  # why it was filtered out (empty = eligible)

    @property
    def key(self) -> Key:
        return (self.layer, self.position)

    @property
    def eligible(self) -> bool:
        return not self.reasons and self.bypass is not None


@dataclass
class SelectConfig:
    kl_threshold: float = 0.1
    induce_threshold: float = 0.0
    prune_layers: float = 0.2  # drop candidates in the last 20% of blocks
    induce: str = "all"  # "all": score every candidate; "lazy": only as needed, in bypass order
    score_pruned: bool = False  # also score the pruned late layers (for complete plots)
    layers: list[int] | None = None  # restrict to these blocks (None = all)
    positions: list[int] | None = None  # restrict to these offsets (None = all captured)
    coeff: float = 1.0  # activation-addition coefficient (1 = the raw difference of means)
    per_pass: int = 0  # candidates per forward pass (0 = as many as fit batch_size rows)
    screen: int = 0  # >0: first score every candidate on this many prompts per group ...
    keep: int = 16  # ... and fully score only the best `keep` of them (lowest bypass, KL-passing first)
    verify: int = 0  # >0: judge real replies of this many finalists and choose by judged refusal
    verify_tokens: int = 24  # reply length for the verification
    ablation: str = "zero"  # how bypass/KL ablate: "zero" (the paper) or "mean" (to the harmless mean; see Direction)

    def cutoff(self, n_layers: int) -> int:
        """First block that is pruned (Arditi et al.: int(n_layers * (1 - prune)))."""
        return int(n_layers * (1.0 - self.prune_layers))


@dataclass
class Selection:
    scores: list[CandidateScore]
    best: Key | None
    baseline: dict[str, float]
    config: dict[str, Any]
    n_harmful: int
    n_harmless: int
    note: str = ""

    def get(self, layer: int, position: int) -> CandidateScore:
        for s in self.scores:
            if s.key == (layer, position):
                return s
        raise KeyError(f"no score for layer {layer}, position {position}")

    def grid(self, metric: str, n_layers: int, positions: Sequence[int], screened: bool = True) -> torch.Tensor:
        """[n_layers, n_positions] of a metric (NaN where not scored), for heatmaps.

        With ``screened``, bypass/KL fall back to the screening-pass value where there is no full score.
        """
        out = torch.full((n_layers, len(positions)), math.nan)
        for s in self.scores:
            v = getattr(s, metric)
            if v is None and screened and metric in ("bypass", "kl"):
                v = getattr(s, f"screen_{metric}")
            if v is not None and s.position in positions:
                out[s.layer, list(positions).index(s.position)] = float(v)
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "best": list(self.best) if self.best else None, "baseline": self.baseline, "config": self.config,
            "n_harmful": self.n_harmful, "n_harmless": self.n_harmless, "note": self.note,
            "scores": [asdict(s) for s in self.scores],
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Selection:
        return cls([CandidateScore(**s) for s in d["scores"]], tuple(d["best"]) if d.get("best") else None,  # type: ignore[arg-type]
                   d["baseline"], d["config"], d["n_harmful"], d["n_harmless"], d.get("note", ""))


# ---- batched scoring ------------------------------------------------------------------------------
def _rows(vectors: torch.Tensor, n: int) -> DirectionFn:
    """Per-row vectors: row i of the replicated prompt list belongs to candidate i // n."""
    cache: dict[tuple[int, ...], torch.Tensor] = {}

    def get(batch: Batch | None) -> torch.Tensor:
        if batch is None:
            raise RuntimeError("candidate scoring needs the running batch; run through safetyscope.hooks.forward")
        if batch.index not in cache:
            cache.clear()
            cache[batch.index] = vectors[torch.as_tensor(batch.index) // n]  # [batch, d_model]
        return cache[batch.index]

    return get


def _masked_rows(vectors: torch.Tensor, layers: torch.Tensor, layer: int, n: int) -> DirectionFn:
    """Like :func:`_rows`, but zero for rows whose candidate adds at another layer."""
    return _rows(vectors * (layers == layer).unsqueeze(-1).to(vectors.dtype), n)


def _ablated_logits(lm: LoadedModel, units: torch.Tensor, prompts: list[str], batch_size: int, system: str | None,
                    targets: torch.Tensor | None = None) -> torch.Tensor:
    """[K, n_prompts, vocab] first-token logits with candidate k's direction ablated (targets [K, n_layers]: mean)."""
    k, n = units.shape[0], len(prompts)

    @contextmanager
    def ablate() -> Iterator[None]:
        rows = _rows(units, n)
        edits = ablation_edits(lm, rows) if targets is None else mean_ablation_edits(lm, rows, _rows(targets, n))
        with hooks(lm, edits):
            yield

    return logits_under(lm, prompts * k, ablate, batch_size=batch_size, system=system).view(k, n, -1)


def _added_logits(lm: LoadedModel, vectors: torch.Tensor, layers: torch.Tensor, prompts: list[str], batch_size: int,
                  system: str | None) -> torch.Tensor:
    """[K, n_prompts, vocab] first-token logits with candidate k's vector added at its block's resid_pre."""
    k, n = vectors.shape[0], len(prompts)
    edits = [(Site("resid_pre", int(layer)), addition_edit(_masked_rows(vectors, layers, int(layer), n)))
             for layer in sorted(set(layers.tolist()))]

    @contextmanager
    def add() -> Iterator[None]:
        with hooks(lm, edits):
            yield

    return logits_under(lm, prompts * k, add, batch_size=batch_size, system=system).view(k, n, -1)


def _chunks(items: list[Any], size: int) -> Iterator[list[Any]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def select_direction(
    lm: LoadedModel,
    candidates: Candidates,
    harmful: Sequence[str],
    harmless: Sequence[str],
    config: SelectConfig | None = None,
    *,
    batch_size: int = 8,
    system: str | None = None,
    token_ids: Sequence[int] | None = None,
    done: dict[str, dict[str, float]] | None = None,
    checkpoint: Callable[[dict[str, dict[str, float]]], None] | None = None,
    log: Callable[[str], None] | None = None,
    judge: Callable[[str, str], bool] | None = None,
) -> tuple[Direction | None, Selection]:
    """Score the candidates on validation prompts and pick the refusal direction.

    ``done``/``checkpoint``: partial scores keyed ``"layer:position"`` from an interrupted run, and a
    callback receiving them after every pass (the CLI writes them to disk to resume).
    """
    cfg = config or SelectConfig()
    if not harmful or not harmless:
        raise ValueError("selection needs harmful and harmless validation prompts; give at least one of each")
    if cfg.induce not in ("all", "lazy"):
        raise ValueError(f"unknown induce mode {cfg.induce!r}; use all or lazy")
    if cfg.ablation not in ABLATIONS:
        raise ValueError(f"unknown ablation {cfg.ablation!r}; use {' or '.join(ABLATIONS)}")
    say = log or (lambda _m: None)
    ids = list(token_ids) if token_ids is not None else refusal_token_ids(lm.tokenizer)
    harmful, harmless = list(harmful), list(harmless)
    n_h = len(harmful)
    memo: dict[str, dict[str, float]] = {k: dict(v) for k, v in (done or {}).items()}

    base_h = logits_under(lm, harmful, None, batch_size=batch_size, system=system)  # [n_h, vocab]
    base_s = logits_under(lm, harmless, None, batch_size=batch_size, system=system)  # [n_s, vocab]
    baseline = {"harmful_score": float(refusal_score(base_h, ids).mean()),
                "harmless_score": float(refusal_score(base_s, ids).mean()),
                "harmful_refusing": float((refusal_score(base_h, ids) > 0).float().mean())}

    cutoff = cfg.cutoff(candidates.n_layers)
    degenerate = candidates.degenerate()
    layers = cfg.layers if cfg.layers is not None else list(range(candidates.n_layers))
    positions = cfg.positions if cfg.positions is not None else list(candidates.positions)
    scores: dict[Key, CandidateScore] = {}
    for layer in layers:
        for pos in positions:
            col = candidates.column(pos)
            s = CandidateScore(layer, pos, candidates.tokens[col], float(candidates.norms[layer, col]))
            if layer >= cutoff:
                s.reasons.append(f"late layer (>= {cutoff})")
            if bool(degenerate[layer, col]):
                s.reasons.append("zero difference")
            for name, value in memo.get(f"{layer}:{pos}", {}).items():
                setattr(s, name, value)
            scores[(layer, pos)] = s

    def vec(key: Key) -> torch.Tensor:
        return candidates.diff[key[0], candidates.column(key[1])].float()  # [d_model]

    def per_pass(n_prompts: int) -> int:
        return cfg.per_pass or max(1, batch_size // max(1, n_prompts))

    def record(key: Key, **values: float) -> None:
        memo.setdefault(f"{key[0]}:{key[1]}", {}).update(values)
        for name, value in values.items():
            setattr(scores[key], name, value)

    # 1. ablation: bypass on harmful + KL on harmless, in one pass per chunk of candidates
    def ablation_pass(keys: list[Key], hp: list[str], sp: list[str], ref: torch.Tensor, prefix: str = "") -> None:
        for chunk in _chunks(keys, per_pass(len(hp) + len(sp))):
            units = torch.stack([vec(k) / vec(k).norm() for k in chunk])  # [K, d_model]
            targets = torch.stack([candidates.targets(*k) for k in chunk]) if cfg.ablation == "mean" else None
            logits = _ablated_logits(lm, units, hp + sp, batch_size, system, targets)  # [K, n, vocab]
            for key, row in zip(chunk, logits):
                rs = refusal_score(row[: len(hp)], ids)
                kl = float(kl_divergence(ref, row[len(hp):]).mean())
                if prefix:
                    record(key, screen_bypass=float(rs.mean()), screen_kl=kl)
                else:
                    record(key, bypass=float(rs.mean()), bypass_refusing=float((rs > 0).float().mean()), kl=kl)
                say(f"layer {key[0]:>3} pos {key[1]:>3}: {prefix}bypass {float(rs.mean()):+.3f} {prefix}kl {kl:.4f}")
            if checkpoint:
                checkpoint(memo)

    todo = [k for k, s in scores.items() if "zero difference" not in s.reasons
            and (cfg.score_pruned or not any(r.startswith("late") for r in s.reasons))]
    if 0 < cfg.screen < max(n_h, len(harmless)):
        hp, sp = harmful[: cfg.screen], harmless[: cfg.screen]
        ablation_pass([k for k in todo if scores[k].screen_bypass is None], hp, sp, base_s[: len(sp)], "screen ")
        live = [k for k in todo if not scores[k].reasons]
        ranked = sorted(live, key=lambda k: (float(scores[k].screen_kl or 0.0) > 2 * cfg.kl_threshold,
                                             float(scores[k].screen_bypass or 0.0)))
        finalists = set(ranked[: max(1, cfg.keep)])
        for k in todo:
            if k not in finalists and scores[k].bypass is None:
                scores[k].reasons.append(f"screened out (not among the best {cfg.keep} on {cfg.screen} prompts)")
        todo = [k for k in todo if k in finalists]
    ablation_pass([k for k in todo if scores[k].bypass is None], harmful, harmless, base_s)

    # 2. activation addition: induce on harmless
    def kl_ok(s: CandidateScore) -> bool:
        return s.kl is not None and math.isfinite(s.kl) and s.kl <= cfg.kl_threshold

    scored = [k for k in scores if scores[k].bypass is not None]
    if cfg.induce == "lazy":
        order = sorted((k for k in scored if not scores[k].reasons and kl_ok(scores[k])), key=lambda k: float(scores[k].bypass or 0.0))
        if cfg.verify > 0:  # the judged check decides: the score is needed only for the finalists
            order = order[: cfg.verify]
    else:
        order = scored
    for chunk in _chunks(order, per_pass(len(harmless))):
        need = [k for k in chunk if scores[k].induce is None]
        if need:
            vectors = torch.stack([vec(k) * cfg.coeff for k in need])  # [K, d_model]
            where = torch.tensor([k[0] for k in need])
            logits = _added_logits(lm, vectors, where, harmless, batch_size, system)
            for key, row in zip(need, logits):
                record(key, induce=float(refusal_score(row, ids).mean()))
                say(f"layer {key[0]:>3} pos {key[1]:>3}: induce {scores[key].induce:+.3f}")
            if checkpoint:
                checkpoint(memo)
        if cfg.induce == "lazy" and any(
            scores[k].induce is not None and scores[k].induce >= cfg.induce_threshold for k in chunk  # type: ignore[operator]
        ):
            break

    # 3. filters and choice
    for s in scores.values():
        apply_filters(s, cfg)
    if cfg.verify > 0:
        best, note = verify_choice(lm, candidates, scores, harmful, harmless, cfg, baseline, batch_size=batch_size,
                                   system=system, judge=judge, memo=record, log=say)
        if checkpoint:
            checkpoint(memo)
    else:
        best, note = choose(list(scores.values()))
    selection = Selection(list(scores.values()), best.key if best else None, baseline,
                          {**asdict(cfg), "token_ids": ids}, n_h, len(harmless), note)
    if best is None:
        return None, selection
    direction = candidates.direction(
        best.layer, best.position,
        scores={"bypass": best.bypass, "bypass_refusing": best.bypass_refusing, "induce": best.induce, "kl": best.kl,
                **({"judged_bypass": best.judged_bypass, "judged_induce": best.judged_induce} if cfg.verify > 0 else {}),
                **{f"baseline_{k}": v for k, v in baseline.items()}},
        meta={"model": lm.name, "n_val_harmful": n_h, "n_val_harmless": len(harmless), "note": note},
        ablation=cfg.ablation,
    )
    return direction, selection


def verify_choice(
    lm: LoadedModel,
    candidates: Candidates,
    scores: dict[Key, CandidateScore],
    harmful: list[str],
    harmless: list[str],
    cfg: SelectConfig,
    baseline: dict[str, float],
    *,
    batch_size: int,
    system: str | None,
    judge: Callable[[str, str], bool] | None,
    memo: Callable[..., None],
    log: Callable[[str], None],
) -> tuple[CandidateScore | None, str]:
    """Judge real replies of the ``cfg.verify`` lowest-bypass candidates within the KL threshold and
    choose the lowest judged refusal under ablation among those whose addition induces refusal."""
    from ...measure.generation import generate
    from ...measure.judges import PhraseJudge
    from .evaluate import ReplyCache, refusal_rate, replies_together

    judge_fn = judge or PhraseJudge()

    def judged(prompts: list[str], ctx: Any) -> float:
        with ctx:
            replies = generate(lm, prompts, max_new_tokens=cfg.verify_tokens, batch_size=batch_size, system=system)
        return float(refusal_rate(prompts, replies, judge_fn)["rate"])

    pool = sorted((s for s in scores.values() if s.bypass is not None and math.isfinite(s.bypass)
                   and not any(r.startswith(("late", "zero", "not finite", "screened", "kl")) for r in s.reasons)),
                  key=lambda s: float(s.bypass))[: cfg.verify]  # type: ignore[arg-type]
    if not pool:
        return choose(list(scores.values()))
    base = replies_together(lm, {"harmful": harmful, "harmless": harmless}, None, ReplyCache(None, {}),
                            max_new_tokens=cfg.verify_tokens, batch_size=batch_size, system=system)
    baseline["judged_harmful"] = float(refusal_rate(harmful, base["harmful"], judge_fn)["rate"])
    baseline["judged_harmless"] = float(refusal_rate(harmless, base["harmless"], judge_fn)["rate"])
    for s in pool:
        d = candidates.direction(s.layer, s.position, ablation=cfg.ablation)  # the artifact's own hooks
        if s.judged_bypass is None:
            memo(s.key, judged_bypass=judged(harmful, d.apply(lm)))
        if s.judged_induce is None:
            memo(s.key, judged_induce=judged(harmless, d.add(lm, cfg.coeff)))
        log(f"layer {s.layer:>3} pos {s.position:>3}: judged refusal under ablation {s.judged_bypass:.0%} "
            f"(baseline {baseline['judged_harmful']:.0%}), under addition {s.judged_induce:.0%} "
            f"(baseline {baseline['judged_harmless']:.0%})")
    inducing = [s for s in pool if float(s.judged_induce or 0.0) > baseline["judged_harmless"]]

    def best_of(group: list[CandidateScore]) -> CandidateScore:
        return min(group, key=lambda s: (float(s.judged_bypass or 0.0), float(s.bypass)))  # type: ignore[arg-type]

    verified = f"verified on replies ({len(pool)} finalists within the KL threshold)"
    if inducing:
        return best_of(inducing), verified
    return best_of(pool), verified + "; no finalist's addition was judged to induce refusal"


def apply_filters(s: CandidateScore, cfg: SelectConfig) -> None:
    """Add the reasons a scored candidate fails the selection filters (idempotent)."""
    def flag(reason: str) -> None:
        if reason not in s.reasons:
            s.reasons.append(reason)

    if s.bypass is None:
        return
    if s.kl is None or not math.isfinite(s.kl) or not math.isfinite(s.bypass):
        flag("not finite")
    elif s.kl > cfg.kl_threshold:
        flag(f"kl > {cfg.kl_threshold}")
    if s.induce is None:
        flag("induce not scored")
    elif s.induce < cfg.induce_threshold:
        flag(f"fails to induce (< {cfg.induce_threshold})")


def choose(scores: list[CandidateScore]) -> tuple[CandidateScore | None, str]:
    """Lowest bypass among eligible candidates. Fallbacks (noted): relax the induce filter first (keep
    the KL filter: it guards the model's other behaviour), then the KL filter too; never late layers."""
    def lowest(pool: list[CandidateScore]) -> CandidateScore:
        return min(pool, key=lambda s: float(s.bypass))  # type: ignore[arg-type]

    eligible = [s for s in scores if s.eligible]
    if eligible:
        return lowest(eligible), ""
    scored = [s for s in scores if s.bypass is not None and math.isfinite(s.bypass)
              and not any(r.startswith(("late", "zero", "not finite", "screened")) for r in s.reasons)]
    gentle = [s for s in scored if all(r.startswith(("fails to induce", "induce not scored")) for r in s.reasons)]
    if gentle:
        best = lowest(gentle)
        return best, ("no candidate induced refusal under activation addition; chose the lowest bypass among "
                      f"those within the KL threshold ({', '.join(best.reasons)})")
    if not scored:
        return None, "no candidate could be scored"
    best = lowest(scored)
    return best, ("no candidate passed the KL filter; chose the lowest bypass anyway "
                  f"({', '.join(best.reasons)}): treat this direction with caution")
