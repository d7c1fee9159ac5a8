"""Before/after measurements of a direction: refusal rates (greedy replies + judge), induced refusal
under activation addition, first-token KL and the perplexity of the original model's own replies.

Generations are the expensive part; ``ReplyCache`` keeps each condition's replies on disk keyed by
a fingerprint of the prompts and settings, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from ...io import fingerprint, read_json, write_json
from ...measure.capability import CrossEntropy, reply_cross_entropy
from ...measure.compare import enter, logits_under
from ...measure.generation import generate, generate_scored
from ...measure.judges import PhraseJudge
from ...measure.memo import LogitsMemo
from ...measure.metrics import kl_divergence, perplexity, rate_with_ci, refusal_score
from ...measure.refusal_tokens import refusal_token_ids
from ...models.adapter import LoadedModel
from ...positions import Batch
from ...runner import batched
from .artifact import Direction

Judge = Callable[[str, str], bool]


class ReplyCache:
    """Replies per condition in ``dir/replies_<name>.json``, reused when the fingerprint and prompts match.

    ``common`` identifies the model and generation settings; ``intervention`` the intervention, and
    enters the key only of conditions generated under it (the unmodified replies are shared).
    """

    def __init__(self, root: str | Path | None, common: dict[str, Any], intervention: dict[str, Any] | None = None):
        self.root = Path(root) if root is not None else None
        self.common = fingerprint(common)
        self.full = fingerprint(common, intervention or {})

    def _key(self, name: str) -> str:
        return self.common if name.endswith("_base") else self.full

    def _stored(self, name: str) -> dict[str, str]:
        """prompt -> reply of one condition, empty when nothing matching this cache's key is stored."""
        if self.root is None or not (self.root / f"replies_{name}.json").is_file():
            return {}
        data = read_json(self.root / f"replies_{name}.json")
        if data.get("key") != self._key(name):
            return {}
        return dict(zip(data.get("prompts", []), data.get("replies", [])))

    def get(self, name: str, prompts: Sequence[str]) -> list[str] | None:
        """The stored replies of ``prompts`` (whichever call generated each), None unless all are stored."""
        stored = self._stored(name)
        return [stored[p] for p in prompts] if all(p in stored for p in prompts) else None

    def put(self, name: str, prompts: Sequence[str], replies: list[str]) -> None:
        """Add replies to the condition's file (replies of other prompts under the same key are kept)."""
        if self.root is not None:
            merged = {**self._stored(name), **dict(zip(prompts, replies))}
            write_json(self.root / f"replies_{name}.json",
                       {"key": self._key(name), "replies": list(merged.values()), "prompts": list(merged)})


def replies_together(
    lm: LoadedModel, groups: dict[str, Sequence[str]], intervention: Any, cache: ReplyCache, *,
    max_new_tokens: int, batch_size: int, system: str | None, first: dict[str, torch.Tensor] | None = None,
) -> dict[str, list[str]]:
    """Replies of several prompt groups under one intervention, the uncached groups generated in one call.

    Decoding is memory-bound on CPUs and small models (every step reads every weight whatever the batch),
    so one call over the joined groups costs about as much as one call per group would each. ``first``:
    a dict that receives, for each group generated here (not read from the cache), its prompts'
    first-token logits [n, vocab] from the generation's own forward pass.
    """
    out: dict[str, list[str]] = {}
    for name, prompts in groups.items():
        cached = cache.get(name, prompts)
        if cached is not None:
            out[name] = cached
    todo = [(name, list(prompts)) for name, prompts in groups.items() if name not in out and prompts]
    if todo:
        joined = [p for _, prompts in todo for p in prompts]
        kw: dict[str, Any] = {"max_new_tokens": max_new_tokens, "batch_size": batch_size, "system": system}
        with enter(lm, intervention):
            if first is not None:
                done = generate_scored(lm, joined, **kw)
                replies, logits = done.replies, done.first_logits
            else:
                replies, logits = generate(lm, joined, **kw), None
        start = 0
        for name, prompts in todo:
            out[name] = replies[start : start + len(prompts)]
            if first is not None and logits is not None:
                first[name] = logits[start : start + len(prompts)]
            start += len(prompts)
            cache.put(name, prompts, out[name])
    return {name: out.get(name, []) for name in groups}


def refusal_rate(prompts: Sequence[str], replies: Sequence[str], judge: Judge) -> dict[str, Any]:
    flags = [bool(judge(p, r)) for p, r in zip(prompts, replies)]
    return dict(rate_with_ci(flags))


def reply_nll(
    lm: LoadedModel, prompts: Sequence[str], replies: Sequence[str], intervention: Any = None, *,
    batch_size: int = 4, system: str | None = None,
) -> tuple[float, int]:
    """Summed negative log-likelihood of ``replies`` (teacher forced after each chat prompt, as
    :func:`safetyscope.measure.capability.reply_cross_entropy` does) and their token count."""
    rows = [(p, lm.tokenizer(r, add_special_tokens=False)["input_ids"]) for p, r in zip(prompts, replies)]
    rows = [(p, ids) for p, ids in rows if ids]
    if not rows:
        return 0.0, 0
    reply_ids = [ids for _p, ids in rows]

    def step(batch: Batch) -> CrossEntropy:
        with enter(lm, intervention):
            return reply_cross_entropy(lm, batch, [reply_ids[i] for i in batch.index])

    total = CrossEntropy(0.0, 0)
    for _batch, ce in batched(lm, [p for p, _ids in rows], step, batch_size=max(1, batch_size), system=system,
                              description="reply likelihood"):
        total = total + ce
    return total.sum_nll, total.n_tokens


LOGITS = "unmodified_logits"  # the evaluation memo's entry holding the unmodified model's LogitsMemo


def condition_logits(
    lm: LoadedModel, name: str, prompts: Sequence[str], intervention: Any, first: dict[str, torch.Tensor],
    memo: dict[Any, Any], *, batch_size: int, system: str | None,
) -> torch.Tensor:
    """First-token logits [n, vocab] of one condition: read during its generation (``first``), else the
    unmodified model's rows kept in ``memo`` (a :class:`~safetyscope.measure.memo.LogitsMemo` under
    ``LOGITS``), else one forward pass; the unmodified model's rows are kept there."""
    kept = memo.get(LOGITS)
    if kept is None:
        kept = memo[LOGITS] = LogitsMemo(lm)
    if name not in first:
        held = kept.lookup(lm, prompts, system) if intervention is None else None
        return held if held is not None else logits_under(lm, prompts, intervention, batch_size=batch_size,
                                                           system=system, memo=kept)
    if intervention is None:
        kept.put(lm, prompts, system, first[name])
    return first[name]


def evaluate_ablation(
    lm: LoadedModel, direction: Direction, harmful: Sequence[str], harmless: Sequence[str], *,
    judge: Judge | None = None, max_new_tokens: int = 64, batch_size: int = 8, system: str | None = None,
    cache: ReplyCache | None = None, harmless_replies_ablated: bool = True, memo: dict[Any, Any] | None = None,
    reply_perplexity: bool = True,
) -> dict[str, Any]:
    """Refusal before -> after ablation on both groups, first-token KL and (``reply_perplexity``) the
    perplexity of the unmodified harmless replies under the ablation.

    The first-token logits of a generated condition come from its generation's forward pass (no second
    pass). ``memo``: a dict shared by evaluations of the same model, settings and prompts (a direction and
    its zero-ablation variant): the unmodified model's logits and reply likelihood are computed once.
    """
    judge = judge or PhraseJudge()
    cache = cache or ReplyCache(None, {})
    memo = {} if memo is None else memo
    ids = refusal_token_ids(lm.tokenizer)
    kw: dict[str, Any] = {"max_new_tokens": max_new_tokens, "batch_size": batch_size, "system": system}
    out: dict[str, Any] = {"n_harmful": len(harmful), "n_harmless": len(harmless)}
    first: dict[str, torch.Tensor] = {}  # condition -> [n, vocab] logits read during its generation
    # harmful and harmless replies of each condition in one generation call
    base = replies_together(lm, {"harmful_base": harmful, "harmless_base": harmless}, None, cache, first=first, **kw)
    ablated = replies_together(lm, {"harmful_ablated": harmful,
                                    **({"harmless_ablated": harmless} if harmless_replies_ablated else {})},
                               direction, cache, first=first, **kw)

    def last(name: str, prompts: Sequence[str], intervention: Any) -> torch.Tensor:  # [n, vocab]
        return condition_logits(lm, name, prompts, intervention, first, memo, batch_size=batch_size, system=system)

    if harmful:
        before, after = base["harmful_base"], ablated["harmful_ablated"]
        out["harmful_refusal_before"] = refusal_rate(harmful, before, judge)
        out["harmful_refusal_after"] = refusal_rate(harmful, after, judge)
        out["harmful_score_before"] = float(refusal_score(last("harmful_base", harmful, None), ids).mean())
        out["harmful_score_after"] = float(refusal_score(last("harmful_ablated", harmful, direction), ids).mean())
    if harmless:
        base_replies = base["harmless_base"]
        out["harmless_refusal_before"] = refusal_rate(harmless, base_replies, judge)
        if harmless_replies_ablated:
            out["harmless_refusal_after"] = refusal_rate(harmless, ablated["harmless_ablated"], judge)
        kl = kl_divergence(last("harmless_base", harmless, None), last("harmless_ablated", harmless, direction))
        out["kl_first_token"] = {"mean": float(kl.mean()), "median": float(kl.median()), "max": float(kl.max())}
        nll_key = ("nll", tuple(harmless), tuple(base_replies))
        if reply_perplexity and nll_key not in memo:
            memo[nll_key] = reply_nll(lm, harmless, base_replies, None, batch_size=max(1, batch_size // 2), system=system)
        nll0, n0 = memo[nll_key] if reply_perplexity else (0.0, 0)
        nll1, n1 = reply_nll(lm, harmless, base_replies, direction, batch_size=max(1, batch_size // 2),
                             system=system) if n0 else (0.0, 0)
        if n0:
            out["reply_perplexity"] = {"before": perplexity(nll0, n0), "after": perplexity(nll1, n1), "n_tokens": n0,
                                       "ratio": perplexity(nll1, n1) / perplexity(nll0, n0)}
    return out


def evaluate_addition(
    lm: LoadedModel, direction: Direction, prompts: Sequence[str], *, coeff: float = 1.0, layer: int | None = None,
    judge: Judge | None = None, max_new_tokens: int = 64, batch_size: int = 8, system: str | None = None,
    cache: ReplyCache | None = None, name: str = "harmless", memo: dict[Any, Any] | None = None,
) -> dict[str, Any]:
    """Refusal (judge and logit score) on ``prompts`` before -> after activation addition (``memo``: as
    in :func:`evaluate_ablation`)."""
    judge = judge or PhraseJudge()
    cache = cache or ReplyCache(None, {})
    memo = {} if memo is None else memo
    ids = refusal_token_ids(lm.tokenizer)
    kw: dict[str, Any] = {"max_new_tokens": max_new_tokens, "batch_size": batch_size, "system": system}
    first: dict[str, torch.Tensor] = {}

    def added() -> Any:
        return direction.add(lm, coeff, layer)

    base, tag = f"{name}_base", f"{name}_added_{coeff:g}_{direction.layer if layer is None else layer}"
    before = replies_together(lm, {base: prompts}, None, cache, first=first, **kw)[base]
    after = replies_together(lm, {tag: prompts}, added, cache, first=first, **kw)[tag]
    score_before = refusal_score(condition_logits(lm, base, prompts, None, first, memo, batch_size=batch_size,
                                                  system=system), ids)
    score_after = refusal_score(condition_logits(lm, tag, prompts, added, first, memo, batch_size=batch_size,
                                                 system=system), ids)
    return {
        "n": len(prompts), "coeff": coeff, "layer": direction.layer if layer is None else layer,
        "refusal_before": refusal_rate(prompts, before, judge), "refusal_after": refusal_rate(prompts, after, judge),
        "score_before": float(score_before.mean()), "score_after": float(score_after.mean()),
        "examples": [{"prompt": p, "reply": r} for p, r in list(zip(prompts, after))[:3]],
    }


def fmt_rate(r: dict[str, Any]) -> str:
    if not r or r.get("n", 0) == 0 or math.isnan(r.get("rate", math.nan)):
        return "n/a"
    return f"{100 * r['rate']:.1f}% [{100 * r['lo']:.1f}, {100 * r['hi']:.1f}] ({r['k']}/{r['n']})"
