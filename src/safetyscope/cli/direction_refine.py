"""`safetyscope direction refine`: train the found direction (only it) to bypass refusal at lower harmless KL."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from .common import PromptSettings, emit
from .settings import opt


@dataclass
class RefineSettings(PromptSettings):
    direction: str = opt("", "Direction artifact directory (default: OUT/direction/artifact).")
    n_val: int = opt(32, "Validation prompts per group, for choosing the checkpoint (0 = the whole val split).")
    ablation: str = opt("", "Refine under this ablation: zero (Arditi et al.) or mean (to the harmless mean); empty = the artifact's own.")
    steps: int = opt(30, "Optimiser steps (0 = only measure the starting direction).")
    lr: float = opt(0.002, "Adam learning rate on the (unnormalised) direction vector.")
    kl_weight: float = opt(20.0, "Weight of the harmless first-token KL against the harmful bypass term.")
    batch: int = opt(16, "Prompts per group per step (a seeded sample; --batch-size rows go through the model at once).")
    eval_every: int = opt(5, "Measure the validation loss every this many steps; the best checkpoint is kept.")


def run_refine(s: RefineSettings) -> dict[str, Any]:
    from ..io import write_json
    from ..methods.direction.refine import refine_direction
    from ..report.plots.direction import refine_plot
    from .direction import _direction_dir, _load_direction, _log, _splits

    log = _log(s)
    direction = _load_direction(s)
    if s.ablation:
        direction = direction.with_ablation(s.ablation)
    h_train, s_train, h_val, s_val = _splits(s)
    lm = s.load_model()
    log(f"refining {_direction_dir(s)} ({direction.ablation} ablation) on {len(h_train)}+{len(s_train)} prompts, "
        f"{s.steps} steps; validation on {len(h_val)}+{len(s_val)}")
    res = refine_direction(lm, direction, h_train.texts, s_train.texts, val_harmful=h_val.texts, val_harmless=s_val.texts,
                           steps=s.steps, lr=s.lr, kl_weight=s.kl_weight, batch=s.batch, micro_batch=s.batch_size,
                           eval_every=s.eval_every, seed=s.seed, system=s.system, log=log)
    out = s.out / "direction_refine"
    res.direction.save(out / "artifact")
    write_json(out / "refine.json", res.to_json())
    plot = refine_plot(res, out / "refine.png", title=f"{lm.name}: direction refinement")
    first = res.history[0]
    chosen = next(h for h in res.history if h.step == res.chosen)
    result = {"artifact": out / "artifact", "chosen_step": res.chosen, "start": asdict(first), "chosen": asdict(chosen),
              "ablation": direction.ablation, "plot": plot, "settings": res.settings}

    def render() -> None:
        from rich.console import Console

        c = Console()
        c.print(f"[bold]refined direction[/bold] (block {direction.layer}, position {direction.position}, "
                f"{direction.ablation} ablation): step {res.chosen} of {s.steps} chosen on validation")
        c.print(f"  val first-token KL {first.val_kl:.4f} -> {chosen.val_kl:.4f}; "
                f"harmful prompts above the harmless mean score {first.val_refusing:.0%} -> {chosen.val_refusing:.0%}; "
                f"cosine to the start {chosen.cosine:.3f}")
        c.print(f"artifact: {out / 'artifact'}; history: {out / 'refine.json'}; plot: {plot}")
        c.print("measure it held out with `safetyscope direction ablate --direction " f"{out / 'artifact'}`")

    emit(s, result, render)
    return result
