"""Re-anchoring: set a monitor's threshold again on its own calibration prompts, as the served model reads them.

A refusal-direction ablation (hooks, or an orthogonalised checkpoint) keeps the harm readers' *ranking*
but shifts every harm score, so the threshold calibrated on the unmodified model misses harmful prompts.
:func:`reanchor` reads the harmless prompts the monitor was calibrated on (rebuilt from the record the
artifact keeps: the built-in prompts by id, or the user's prompts checked against a digest; never test
prompts) through the model as it is now (one forward pass each, under any intervention the caller entered)
and returns a copy whose threshold flags at most ``fpr`` of them there.

This is a different operating rule from "the same threshold": it is opt-in, and the copy records it
(``info["reanchored"]``: whether it was applied, on which model, the fitted threshold, the calibration FPR
of both thresholds as this model reads the prompts, and the tamper check read on those prompts). With
``when="tampering"`` it applies only when that check finds refusal removed (``refusal_tampering``); an
unmodified model then keeps its threshold.

>>> m2 = reanchor(lm, monitor, when="tampering")               # doctest: +SKIP
>>> m2.threshold, m2.info["reanchored"]["applied"]              # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any, Literal

from ...models.adapter import LoadedModel
from ...prompts.sets import PromptsLike
from .artifact import Monitor
from .fit import calibration_threshold, check_fpr, recorded_calibration, texts_digest
from .read import read_prompts

When = Literal["always", "tampering"]
WHEN: tuple[str, ...] = ("always", "tampering")


def reanchor(lm: LoadedModel, monitor: Monitor, *, calibration: PromptsLike | None = None, fpr: float | None = None,
             when: When = "always", batch_size: int = 8, system: str | None = None, strict: bool = True) -> Monitor:
    """A copy of ``monitor`` whose threshold hits ``fpr`` (default: the monitor's) on its own calibration prompts
    as ``lm`` reads them now; ``when="tampering"``: only if the tamper check on those prompts fires.

    ``calibration``: the prompts, needed only when the monitor was calibrated on prompts you gave (checked
    against the recorded digest). The original is not changed.
    """
    if when not in WHEN:
        raise ValueError(f"unknown re-anchoring policy {when!r}; use {' or '.join(WHEN)}")
    target = check_fpr(monitor.fpr if fpr is None else fpr)
    texts = recorded_calibration(monitor.info, calibration)
    sys_prompt = system if system is not None else (monitor.system or None)
    read = read_prompts(lm, monitor, texts, batch_size=batch_size, system=sys_prompt, strict=strict)
    prior: dict[str, Any] = monitor.info.get("reanchored") or {}
    fitted = float(prior.get("threshold_fitted", monitor.threshold))  # a re-anchored monitor keeps the fitted one
    applied = when == "always" or read.tamper.kind == "refusal_tampering"
    out = Monitor.from_state(*monitor.to_state())
    if applied:
        out.threshold, out.fpr = calibration_threshold(read.harm, target), target
    out.info = {**monitor.info, "reanchored": {
        "applied": applied, "when": when, "model": lm.name, "tamper": read.tamper.kind,
        "threshold_fitted": fitted, "threshold": out.threshold, "fpr": out.fpr, "n_calibration": len(texts),
        "calibration_sha256": texts_digest(texts),
        "calibration_fpr_at_fitted": float((read.harm > fitted).mean()),
        "calibration_fpr": float((read.harm > out.threshold).mean()),
    }}
    return out


def is_reanchored(monitor: Monitor) -> bool:
    """Whether ``monitor``'s threshold was set by :func:`reanchor` (not the fitted one)."""
    return bool((monitor.info.get("reanchored") or {}).get("applied"))


__all__ = ["WHEN", "When", "is_reanchored", "reanchor"]
