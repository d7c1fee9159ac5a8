"""`safetyscope map`: the whole pipeline (``safetyscope.methods.circuit.map_circuit``) on one loaded model.

This module only parses the settings, loads the model once, calls the library and prints where the
report is; the stages, their cache and the report live in ``methods/circuit`` and ``report/circuit``.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from typing import Any

import typer

from ..methods.circuit.inputs import MapConfig, MapPrompts
from ..methods.circuit.pipeline import STAGES, CircuitMap, map_circuit, parse_stages
from ..progress import verbosity
from .common import PromptSettings, user_errors
from .judge import parse_judges
from .settings import command, opt


@dataclass
class MapSettings(PromptSettings):
    stages: str = opt("all", "Stages to run (comma list of " + ", ".join(STAGES) + ") or all.")
    quick: bool = opt(False, "Tiny budgets everywhere (a smoke test in a few minutes, not findings).")
    force: bool = opt(False, "Recompute stages even when cached results with the same settings exist.")
    n_prompts: int = opt(48, "Training prompts per group (probes, neurons, direction candidates).")
    n_eval: int = opt(16, "Held-out prompts per group for fragility, capability, monitor and addition measurements.")
    n_headline: int = opt(0, "Held-out prompts per group for the headline direction ablation (0 = the whole test split).")
    pairs: int = opt(6, "Minimal pairs traced by attribution patching.")
    max_new_tokens: int = opt(32, "Reply length for judged generations (refusal rates, sample replies).")
    fragility_ks: str = opt("0,10,100,1%", "Numbers of neurons ablated along the fragility curves.")
    judges: str = opt("", "Judges to compare on the headline's harmful replies before / under the direction's "
                          "ablation (comma-separated, e.g. phrase,phrase+llm:large; see `judge eval --help`): refused / "
                          "complied / broken per judge and their agreement, in the report; empty = off. Reuses every "
                          "other cached stage.")

    def config(self) -> MapConfig:
        return MapConfig(quick=self.quick, n_prompts=self.n_prompts, n_eval=self.n_eval, n_headline=self.n_headline,
                         pairs=self.pairs,
                         max_new_tokens=self.max_new_tokens, fragility_ks=self.fragility_ks, split=self.split,
                         batch_size=self.batch_size, system=self.system, seed=self.seed,
                         judges=tuple(parse_judges(self.judges)))


INTERRUPTED = ("every finished stage is saved in {dir}; rerun the same command to resume from them "
               "(the interrupted stage starts again, reusing what it had cached)")


def run_map(s: MapSettings) -> CircuitMap:
    """Check the settings, load the model once, run the map."""
    say = (lambda _m: None) if (s.quiet or s.json) else (lambda m: print(m, file=sys.stderr, flush=True))
    wanted = parse_stages(s.stages)  # a typo fails before the model loads
    config = s.config()
    MapPrompts.of(s.harmful or None, s.harmless or None, split=s.split, seed=s.seed)  # so do too few prompts
    with verbosity(not (s.quiet or s.json)):
        lm = s.load_model()
        return map_circuit(lm, s.harmful or None, s.harmless or None, out=s.out, config=config, stages=wanted,
                           force=s.force, log=say)


def _print(s: MapSettings, cmap: CircuitMap) -> None:
    summary: dict[str, Any] = cmap.summary()
    if s.json:
        print(json.dumps(summary, indent=2, default=str))
        return
    if cmap.report_path:
        print(f"report: {cmap.report_path.resolve()}")
        if cmap.headline:
            print(cmap.headline)
    for stage, error in cmap.failed.items():
        print(f"warning: stage {stage} failed ({error}); the report says what is missing", file=sys.stderr)


def register(app: typer.Typer) -> None:
    @command(app, "map", MapSettings, "Map the refusal circuit: probes, neurons, patching, direction, fragility, capability; HTML report.")
    def map_cmd(s: MapSettings) -> None:
        with user_errors(on_interrupt=INTERRUPTED.format(dir=s.out / "map" / "stages")):
            cmap = run_map(s)
        _print(s, cmap)
