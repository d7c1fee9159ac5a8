"""What `safetyscope direction find` and `direction refine` print (rich console lines; the CLI only renders results)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def render_find(result: dict[str, Any], selection: Any, out: Path) -> None:
    from rich.console import Console

    c = Console()
    sc = result["scores"]

    def f(key: str, fmt: str) -> str:
        return "n/a" if sc.get(key) is None else format(sc[key], fmt)

    c.print(f"[bold]refusal direction[/bold]: block {result['layer']}, position {result['position']} "
            f"({result['token']!r}), ||Δμ|| = {result['norm']:.2f}, {result['ablation']} ablation")
    c.print(f"  bypass {f('bypass', '+.3f')} (baseline {f('baseline_harmful_score', '+.3f')}), "
            f"induce {f('induce', '+.3f')}, KL {f('kl', '.4f')}; "
            f"{result['n_eligible']}/{result['n_candidates']} candidates eligible")
    if sc.get("judged_bypass") is not None:
        base = selection.baseline
        c.print(f"  judged on replies: refusal under ablation {sc['judged_bypass']:.0%} "
                f"(without: {base.get('judged_harmful', float('nan')):.0%}), under addition {sc['judged_induce']:.0%} "
                f"(without: {base.get('judged_harmless', float('nan')):.0%})")
    if selection.note:
        c.print(f"[yellow]{selection.note}[/yellow]")
    c.print(f"artifact: {out / 'artifact'}; scores: {out / 'selection.json'}; plot: {result['plot']}")


def render_refine(r: dict[str, Any]) -> None:
    from rich.console import Console

    c, first, chosen, art = Console(), r["start"], r["chosen"], r["artifact"]
    c.print(f"[bold]refined direction[/bold] (block {r['layer']}, position {r['position']}, "
            f"{r['ablation']} ablation): step {r['chosen_step']} of {r['steps']} chosen on validation")
    c.print(f"  val first-token KL {first['val_kl']:.4f} -> {chosen['val_kl']:.4f}; harmful prompts above the "
            f"harmless mean score {first['val_refusing']:.0%} -> {chosen['val_refusing']:.0%}; "
            f"cosine to the start {chosen['cosine']:.3f}")
    c.print(f"artifact: {art}; history: {art.parent / 'refine.json'}; plot: {r['plot']}")
    c.print(f"measure it held out with `safetyscope direction ablate --direction {art}`")
