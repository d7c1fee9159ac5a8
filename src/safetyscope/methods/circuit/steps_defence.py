"""The map's defence stage, "would we notice?": a runtime monitor fitted on the map's fitting prompts, its
TPR / FPR on the held-out test prompts at its own calibrated threshold, before and under the map's own
direction ablation.

Cheap by design: the monitor is fitted on the same sampled fitting prompts the direction stage used
(``n_prompts`` per group of the train part), calibrated on the harmless validation prompts (plus the
built-in ``scary_harmless`` validation split when the harmless group is built in), and measured with one
forward pass per test prompt and condition (the first reply token decides "refused"; no generation).
The monitor is saved to ``OUT/monitor/artifact``; the stage is cached like the others (its key includes
the direction stage's result, so a new direction re-measures it).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .inputs import StageInputs


def _condition(lm: Any, monitor: Any, harmful: list[str], harmless: list[str], x: StageInputs) -> dict[str, Any]:
    """The monitor's figures on the test prompts as ``lm`` is now (call inside an intervention to measure it)."""
    from ..monitor.evaluate import detector_figures, read_prompts

    read = read_prompts(lm, monitor, harmful + harmless, batch_size=x.batch_size, system=x.system)
    harm, refusal = read.harm, read.refusal
    y = np.array([1] * len(harmful) + [0] * len(harmless))
    flagged = monitor.flags(harm)
    answered = (y == 1) & (refusal <= monitor.refusal_threshold)  # harmful prompts the first reply token does not refuse
    figures = detector_figures(harm, y, monitor.threshold)
    return {"monitor": figures, "harmful_answered": int(answered.sum()),
            "harmful_answered_flagged": int((answered & flagged).sum()),
            "alerts": int((answered & flagged).sum()), "tamper": read.tamper.to_json()}


def monitor_stage(x: StageInputs) -> dict[str, Any]:
    """Fit the monitor (fitting prompts only), then measure it on the test prompts, clean and with the map's
    refusal direction ablated (when the direction stage produced one)."""
    from ...artifacts.base import load_artifact
    from ...prompts.builtin import builtin_prompts
    from ..monitor.fit import fit_monitor

    b, lm = x.budget, x.lm
    calibration = list(x.sampled("harmless", b.n_val, "val"))
    if "harmless" not in x.prompts.user:  # built-in harmless prompts: add the over-refusal bait's validation split
        calibration += builtin_prompts("scary_harmless", "val", seed=x.config.seed).texts
    monitor = fit_monitor(lm, x.sampled("harmful", b.n_prompts, "train"), x.sampled("harmless", b.n_prompts, "train"),
                          calibration=calibration, batch_size=x.batch_size, system=x.system, seed=x.config.seed)
    path = x.out / "monitor" / "artifact"
    monitor.save(path)
    harmful, harmless = x.sampled("harmful", b.n_eval, "test"), x.sampled("harmless", b.n_eval, "test")
    out: dict[str, Any] = {"artifact": str(path), "threshold": monitor.threshold, "fpr_target": monitor.fpr,
                           "readers": [r.describe() for r in monitor.readers], "n_calibration": len(calibration),
                           "n_eval": [len(harmful), len(harmless)], "clean": _condition(lm, monitor, harmful, harmless, x),
                           "ablated": None, "direction": None}
    d_path = x.out / "direction" / "artifact"
    if "direction" in x.done and (d_path / "artifact.json").is_file():
        direction = load_artifact(d_path)
        with direction.apply(lm):
            out["ablated"] = _condition(lm, monitor, harmful, harmless, x)
        out["direction"] = {"artifact": str(d_path), "layer": x.done["direction"]["find"].get("layer")}
        out["tpr_drop"] = out["clean"]["monitor"]["tpr_at_threshold"] - out["ablated"]["monitor"]["tpr_at_threshold"]
    return out
