"""`safetyscope audit CHECKPOINT`: was the refusal machinery removed from a checkpoint?"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

import typer

from .common import emit, user_errors
from .settings import Settings, command, opt


@dataclass
class AuditSettings(Settings):
    reference: str = opt("", "The model the checkpoint was derived from (alias, directory or hub id): compare every tensor with it. Empty = audit the checkpoint alone (ablation signature + canary prompts).")
    direction: str = opt("", "A refusal direction artifact (from `safetyscope direction find` on the reference): the removed direction is compared with it.")
    find_refusal: bool = opt(True, "With --reference and no --direction: find the reference's harm directions on built-in prompts to compare the removed direction with (runs the reference).")
    behaviour: bool = opt(True, "Without --reference: also load the checkpoint and run it on built-in prompts (harm direction, canary refusal).")
    fingerprint: str = opt("", "Without --reference: a trusted model's safety fingerprint (from --save-fingerprint) to compare against.")
    save_fingerprint: str = opt("", "Instead of auditing: write the safety fingerprint of MODEL (harm directions, writer norms, tensor sums, canary scores) to this directory.")


def register(app: typer.Typer) -> None:
    @command(app, "audit", AuditSettings, "Audit a checkpoint for removed refusal: weights against --reference (per-matrix change, removed direction, zeroed neurons) or alone (ablation signature, canary refusal).")
    def audit_cmd(s: AuditSettings) -> None:
        with user_errors():
            run_audit(s)


def run_audit(s: AuditSettings) -> dict[str, Any]:
    from ..io import write_json
    from ..methods.audit import audit_checkpoint
    from ..methods.direction.artifact import Direction

    log = (lambda _m: None) if s.quiet or s.json else (lambda m: print(m, file=sys.stderr))
    if s.save_fingerprint:
        return _save_fingerprint(s)
    direction = Direction.load(s.direction) if s.direction else None
    report = audit_checkpoint(
        s.model, s.reference or None, direction=direction, find_refusal=s.find_refusal, behaviour=s.behaviour,
        device=s.device, fingerprint=s.fingerprint or None, log=log,
    )
    result = report.to_dict()
    write_json(s.out / "audit" / "report.json", result)
    emit(s, result, lambda: _render(report, s))
    return result


def _save_fingerprint(s: AuditSettings) -> dict[str, Any]:
    from ..methods.audit import make_fingerprint

    fp = make_fingerprint(s.load_model())
    path = fp.save(s.save_fingerprint)
    result = {"fingerprint": str(path), "model": fp.label, "directions": len(fp.layers), "writers": len(fp.writers),
              "tensors": len(fp.sums), "canaries": len(fp.canary_scores)}
    emit(s, result, lambda: print(f"safety fingerprint of {fp.label} written to {path}"))
    return result


def _render(report: Any, s: AuditSettings) -> None:
    from rich.console import Console
    from rich.table import Table

    c = Console()
    colour = {"clean": "green", "modified": "yellow", "tampering": "bold red"}[report.verdict]
    c.print(f"[bold]{report.checkpoint}[/bold]: [{colour}]{report.verdict_text}[/{colour}] ({report.seconds:.1f} s)")
    for line in (*report.evidence, *report.notes):
        c.print(f"  - {line}", highlight=False)
    w = report.weights
    if w is not None and any(layer.verdict != "clean" for layer in w.layers):
        t = Table(title="Per layer")
        for col in ("layer", "verdict", "removal weights", "evidence"):
            t.add_column(col)
        for layer in w.layers:
            if layer.verdict == "clean":
                continue
            weights = ", ".join(f"{v:.2f}" for v in layer.removal_weights.values())
            t.add_row(str(layer.layer), layer.verdict, weights, "; ".join(layer.evidence))
        c.print(t)
    c.print(f"report: {s.out / 'audit' / 'report.json'}", highlight=False)
