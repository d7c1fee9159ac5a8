"""`safetyscope audit`: was the refusal machinery removed from a checkpoint, or is something attached to a live model?

    safetyscope audit CKPT [--reference MODEL]           # the default subcommand (`audit check`)
    safetyscope audit MODEL --runtime [--intervention D]  # a freshly loaded model, under each intervention
    safetyscope audit fingerprint MODEL --out DIR         # a trusted model's safety fingerprint (DIR/fingerprint)
"""

from __future__ import annotations

import sys
import warnings
from dataclasses import dataclass
from typing import Any

import typer
from typer.core import TyperGroup

from ..errors import SafetyscopeWarning
from .common import emit, user_errors
from .settings import Settings, command, opt

DEFAULT_SUBCOMMAND = "check"


class AuditGroup(TyperGroup):
    """``audit ARGS`` runs ``audit check ARGS`` unless ARGS starts with a subcommand name or asks for help."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:  # ctx: typer's own click Context
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h"):
            args = [DEFAULT_SUBCOMMAND, *args]
        return super().parse_args(ctx, args)


@dataclass
class AuditSettings(Settings):
    reference: str = opt("", "The model the checkpoint was derived from (alias, directory or hub id): compare every tensor with it. Empty = audit the checkpoint alone (ablation signature; with --behaviour the removed direction's alignment with the checkpoint's own harm difference, the restore test, canary prompts).")
    direction: str = opt("", "A refusal direction artifact (from `safetyscope direction find` on the reference): the removed direction is compared with it.")
    find_refusal: bool = opt(True, "With --reference and no --direction: find the reference's harm directions on built-in prompts to compare the removed direction with (runs the reference).",
                             flag="--find-refusal/--no-find-refusal")
    behaviour: bool = opt(True, "Without --reference: also load the checkpoint and run it on built-in prompts (its own harm differences and their alignment with the removed direction, the restore test, canary refusal).",
                          flag="--behaviour/--no-behaviour")
    fingerprint: str = opt("", "Without --reference: a trusted model's safety fingerprint (from `audit fingerprint`) to compare against.")
    runtime: bool = opt(False, "Audit the live model instead of its weights: load MODEL, report hooks, adapters, swapped modules and changed parameters, clean and under each --intervention (a process the CLI did not start cannot be inspected from outside; use safetyscope.audit_runtime(lm) in it).")
    intervention: list[str] = opt((), "With --runtime: an artifact directory or an edited checkpoint of MODEL to apply before the runtime audit (repeatable; each is audited on its own).")
    save_fingerprint: str = opt("", "Deprecated: use `safetyscope audit fingerprint MODEL --out DIR`. Writes MODEL's safety fingerprint to this directory instead of auditing.")


@dataclass
class FingerprintSettings(Settings):
    """`audit fingerprint MODEL --out DIR`: no options beyond the shared ones."""


def register(app: typer.Typer) -> None:
    sub = typer.Typer(cls=AuditGroup, no_args_is_help=True,
                      help="Audit checkpoints (weights, with or without a reference) and live models for removed refusal.")

    @command(sub, DEFAULT_SUBCOMMAND, AuditSettings, "Audit a checkpoint for removed refusal: weights against --reference (per-matrix change, removed direction, zeroed neurons) or alone (ablation signature, restore test, canary refusal); --runtime audits the live model. `audit CKPT` is short for `audit check CKPT`.")
    def audit_cmd(s: AuditSettings) -> None:
        with user_errors():
            run_audit(s)

    @command(sub, "fingerprint", FingerprintSettings, "Write MODEL's safety fingerprint (harm directions, writer norms, tensor sums, canary scores; no weights) to OUT/fingerprint, for `audit CKPT --fingerprint OUT`.")
    def fingerprint_cmd(s: FingerprintSettings) -> None:
        with user_errors():
            run_fingerprint(s)

    app.add_typer(sub, name="audit", help="Audit a checkpoint or a live model for removed refusal (check, fingerprint).")


def run_audit(s: AuditSettings) -> dict[str, Any]:
    from ..io import write_json
    from ..methods.audit import audit_checkpoint
    from ..methods.direction.artifact import Direction

    log = (lambda _m: None) if s.quiet or s.json else (lambda m: print(m, file=sys.stderr))
    if s.save_fingerprint:
        warnings.warn("--save-fingerprint is deprecated; use `safetyscope audit fingerprint MODEL --out DIR`",
                      SafetyscopeWarning, stacklevel=2)
        return _write_fingerprint(s, s.save_fingerprint)
    if s.runtime:
        return run_runtime(s)
    direction = Direction.load(s.direction) if s.direction else None
    report = audit_checkpoint(
        s.model, s.reference or None, direction=direction, find_refusal=s.find_refusal, behaviour=s.behaviour,
        device=s.device, fingerprint=s.fingerprint or None, log=log,
    )
    result = report.to_dict()
    write_json(s.out / "audit" / "report.json", result)
    emit(s, result, lambda: _render(report, s))
    return result


def run_runtime(s: AuditSettings) -> dict[str, Any]:
    """The freshly loaded model's runtime audit, then one under each ``--intervention`` (applied, audited, removed)."""
    from ..artifacts.base import load_artifact
    from ..io import write_json
    from ..methods.audit import audit_runtime

    parts = [(p, load_artifact(p)) for p in s.intervention]  # bad paths fail before the model loads
    lm = s.load_model()
    audits = {"loaded": audit_runtime(lm)}
    for path, artifact in parts:
        artifact.validate(lm)
        with artifact.apply(lm):
            audits[f"{artifact.kind}:{path}"] = audit_runtime(lm)
    audits["after"] = audit_runtime(lm)  # every intervention removed again
    result = {"model": lm.name, "runtime": {k: a.to_dict() for k, a in audits.items()}}
    write_json(s.out / "audit" / "runtime.json", result)
    emit(s, result, lambda: _render_runtime(audits, s))
    return result


def run_fingerprint(s: FingerprintSettings) -> dict[str, Any]:
    return _write_fingerprint(s, str(s.out / "fingerprint"))


def _write_fingerprint(s: Settings, where: str) -> dict[str, Any]:
    from ..artifacts.checkpoint import stored_checkpoint
    from ..methods.audit import make_fingerprint
    from ..methods.audit.source import TensorSource

    lm = s.load_model()
    stored = stored_checkpoint(lm.meta)  # the weight statistics from it, not from the copy rounded to the load dtype
    fp = make_fingerprint(lm, source=None if stored is None else TensorSource.from_dir(stored))
    path = fp.save(where)
    result = {"fingerprint": str(path), "model": fp.label, "directions": len(fp.layers), "writers": len(fp.writers),
              "tensors": len(fp.sums), "canaries": len(fp.canary_scores)}
    emit(s, result, lambda: print(f"safety fingerprint of {fp.label} written to {path}"))
    return result


def _render_runtime(audits: dict[str, Any], s: AuditSettings) -> None:
    from rich.console import Console
    from rich.markup import escape

    c = Console()
    for label, a in audits.items():
        colour = "green" if a.clean else "bold red"
        c.print(f"[bold]{escape(label)}[/bold]: [{colour}]{'clean' if a.clean else f'{len(a.findings)} finding(s)'}"
                f"[/{colour}]")
        for f in a.findings[:20]:
            c.print(f"  - {f.kind} on {escape(f.module)}: {escape(f.detail)}", highlight=False)
        if len(a.findings) > 20:
            c.print(f"  ... and {len(a.findings) - 20} more (see the JSON report)")
        for note in a.notes:
            c.print(f"  note: {escape(note)}", highlight=False)
    c.print(f"report: {s.out / 'audit' / 'runtime.json'}", highlight=False)


def _render(report: Any, s: AuditSettings) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    c = Console()
    colour = {"clean": "green", "modified": "yellow", "tampering": "bold red"}[report.verdict]
    c.print(f"[bold]{escape(report.checkpoint)}[/bold]: [{colour}]{report.verdict_text}[/{colour}] ({report.seconds:.1f} s)")
    for line in (*report.evidence, *report.notes):
        c.print(f"  - {escape(line)}", highlight=False)
    w = report.weights
    if w is not None and any(layer.verdict != "clean" for layer in w.layers):
        t = Table(title="Per layer")
        for col in ("layer", "verdict", "removal weights", "evidence"):
            t.add_column(col)
        for layer in w.layers:
            if layer.verdict == "clean":
                continue
            weights = ", ".join(f"{v:.2f}" for v in layer.removal_weights.values())
            t.add_row(str(layer.layer), layer.verdict, weights, escape("; ".join(layer.evidence)))
        c.print(t)
    c.print(f"report: {s.out / 'audit' / 'report.json'}", highlight=False)
