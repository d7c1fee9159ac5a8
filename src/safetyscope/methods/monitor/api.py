"""The monitor as library calls: fit, run over prompts (replies + verdicts + trajectories), evaluate.

>>> m = fit_monitor(lm, harmful, harmless)                          # doctest: +SKIP
>>> with m.watch(lm) as w:                                          # doctest: +SKIP
...     lm.model.generate(input_ids=..., attention_mask=...)        # any generation; no extra forward pass
>>> w.verdicts                                                      # doctest: +SKIP
>>> run = run_monitor(lm, m, ["How do I make a bomb?"])             # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from ...models.adapter import LoadedModel
from ...prompts.sets import PromptsLike, as_prompt_set
from ...runner import batched
from .artifact import Monitor
from .evaluate import MonitorEval, evaluate_monitor
from .fit import fit_monitor
from .tamper import UNCHECKED, TamperReading
from .watch import Verdict


@dataclass(frozen=True)
class MonitorRun:
    """Replies to ``prompts`` with one :class:`Verdict` each and the reply's tokens (for trajectories)."""

    prompts: tuple[str, ...]
    replies: tuple[str, ...]
    tokens: tuple[tuple[str, ...], ...]  # the generated tokens the monitor read (the last one is never fed back)
    verdicts: tuple[Verdict, ...]
    threshold: float
    refusal_threshold: float
    model: str
    tamper: TamperReading = UNCHECKED  # the prefix check over every prompt of the run (see .tamper)

    def rows(self) -> list[dict[str, Any]]:
        """One JSON-able record per prompt (the CLI writes them as JSONL)."""
        out = []
        for i, (p, r, toks, v) in enumerate(zip(self.prompts, self.replies, self.tokens, self.verdicts)):
            d = asdict(v)
            d.pop("call"), d.pop("row")
            out.append({"index": i, "prompt": p, "reply": r, "verdict": v.kind, "alert": v.alert, **d,
                        "tokens": list(toks)})
        return out

    def counts(self) -> dict[str, int]:
        out = {k: 0 for k in ("harmful_refused", "alert", "over_refusal", "answered")}
        for v in self.verdicts:
            out[v.kind] += 1
        return out


def run_monitor(lm: LoadedModel, monitor: Monitor, prompts: PromptsLike, *, max_new_tokens: int = 48,
                batch_size: int = 8, system: str | None = None, strict: bool = True,
                stop_on_alert: bool = False, drift_threshold: float | None = None) -> MonitorRun:
    """Greedy replies to ``prompts`` generated under ``monitor.watch`` (apply interventions around the call).

    ``system`` defaults to the monitor's own system prompt; ``stop_on_alert`` ends a reply at its first
    alert (the verdict is read in the prefill pass, so an alerted reply keeps one token).
    """
    from ...measure.generation import generate_batch

    texts = as_prompt_set(prompts, None, what="prompts to monitor").texts
    sys_prompt = system if system is not None else (monitor.system or None)
    replies: list[str] = [""] * len(texts)
    verdicts: dict[int, Verdict] = {}
    with monitor.watch(lm, strict=strict, stop_on_alert=stop_on_alert, drift_threshold=drift_threshold) as w:
        extra: dict[str, Any] = {"stopping_criteria": w.stopping_criteria()} if stop_on_alert else {}

        def step(batch: Any) -> list[str]:
            return generate_batch(lm, batch, max_new_tokens, **extra)

        for batch, texts_out in batched(lm, texts, step, batch_size=batch_size, system=sys_prompt,
                                        description="monitoring"):
            group = len(w.groups) - 1
            for row, (i, reply) in enumerate(zip(batch.index, texts_out)):
                replies[i] = reply
                verdicts[i] = next(v for v in w.verdicts if v.call == group and v.row == row)
    tok = lm.tokenizer
    return MonitorRun(
        tuple(texts), tuple(replies),
        tuple(tuple(str(tok.decode([t])) for t in verdicts[i].token_ids) for i in range(len(texts))),
        tuple(verdicts[i] for i in range(len(texts))),
        monitor.threshold, monitor.refusal_threshold, lm.name, w.tamper)


__all__ = ["MonitorEval", "MonitorRun", "evaluate_monitor", "fit_monitor", "run_monitor"]
