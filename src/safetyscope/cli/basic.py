"""`safetyscope models`, `info` and `capture` (the first real analysis)."""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import asdict, dataclass
from typing import Any

import typer

from .common import PromptSettings, emit, prompt_sets, user_errors
from .settings import Settings, command, opt


def register(app: typer.Typer) -> None:
    @app.command("models", help="List supported architectures and the embedded model aliases.")
    def models_cmd(
        arch_table: str = typer.Option("", help="Extra architecture table (TOML) to include."),
        json_out: bool = typer.Option(False, "--json", help="Print JSON."),
    ) -> None:
        from ..models import EMBEDDED, load_tables

        with user_errors():
            tables = load_tables(arch_table or None)
        result: dict[str, Any] = {
            "architectures": {name: list(t.model_types) for name, t in tables.items()},
            "aliases": {a: e.title for a, e in EMBEDDED.items()},
        }
        if json_out:
            import json

            print(json.dumps(result, indent=2))
            return
        from rich.console import Console
        from rich.table import Table

        t = Table(title="Supported architectures (config.model_type)")
        t.add_column("table")
        t.add_column("model types")
        for name, types in result["architectures"].items():
            t.add_row(name, ", ".join(types))
        c = Console()
        c.print(t)
        for alias, title in result["aliases"].items():
            c.print(f"[bold]{alias}[/bold]: {title}")

    @command(app, "info", Settings, "Print a model's layers, widths, heads, chat template and site names.", writes=False)
    def info_cmd(s: Settings) -> None:
        with user_errors():
            lm = s.load_model()
            desc = lm.describe()
            # Names in the site grammar (safetyscope.sites), so they can be pasted into --site / capture.
            layers = "0" if lm.n_layers == 1 else f"0-{lm.n_layers - 1}"
            desc["sites"] = ["embed", *[f"blocks.{layers}.{k}" for k in lm.table.sites], "final"]
        def render() -> None:
            from rich.console import Console

            c = Console()
            for k, v in desc.items():
                c.print(f"[bold]{k}[/bold]: {', '.join(v) if isinstance(v, list) else v}", highlight=False, markup=True)
        emit(s, desc, render)

    @dataclass
    class CaptureSettings(PromptSettings):
        positions: str = opt("last", "Positions: last, post_instruction, mean, or offsets like -1,-2.")
        site: str = opt("resid_post", "Block site kind to compare (resid_post, resid_mid, attn.out, mlp.out, ...).")

    @command(app, "capture", CaptureSettings, "Where do harmful and harmless prompts separate? Per-layer difference of means.")
    def capture_cmd(s: CaptureSettings) -> None:
        with user_errors():
            run_capture_analysis(s)


def run_capture_analysis(s: Any) -> dict:
    from ..io import save_tensors, write_json
    from ..methods.fit import fit_group_moments
    from ..methods.separation import layer_separation
    from ..progress import verbosity

    harmful, harmless = prompt_sets(s)
    lm = s.load_model()
    with verbosity(False) if s.quiet or s.json else nullcontext():
        stats = fit_group_moments(
            lm, {"harmful": harmful.texts, "harmless": harmless.texts}, f"blocks.*.{s.site}", s.positions,
            batch_size=s.batch_size, system=s.system,
        )
    rows = layer_separation(stats, lm.n_layers, s.site)
    out = s.out / "capture"
    save_tensors(out / "moments.safetensors", stats.state())
    result = {
        "model": lm.describe(),
        "site": s.site,
        "positions": s.positions,
        "n_harmful": len(harmful),
        "n_harmless": len(harmless),
        "layers": [asdict(r) for r in rows],
        "most_separated_layer": max(rows, key=lambda r: r.relative_diff).layer,
    }
    write_json(out / "summary.json", result)

    def render() -> None:
        from rich.console import Console
        from rich.table import Table

        t = Table(title=f"{lm.name}: harmful vs harmless at {s.site} ({s.positions}), {len(harmful)}+{len(harmless)} prompts")
        for col in ("layer", "||Δμ||", "cos(μh, μs)", "||Δμ|| / ||μ||", "mean |d|"):
            t.add_column(col, justify="right")
        best = result["most_separated_layer"]
        for r in rows:
            style = "bold green" if r.layer == best else None
            t.add_row(str(r.layer), f"{r.diff_norm:.3f}", f"{r.cosine:.4f}", f"{r.relative_diff:.3f}", f"{r.mean_abs_effect:.3f}", style=style)
        c = Console()
        c.print(t)
        c.print(f"results: {out}/summary.json, {out}/moments.safetensors")

    emit(s, result, render)
    return result
