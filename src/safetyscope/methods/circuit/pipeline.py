"""The map: every stage on one loaded model, cached and resumable, ending in the report.

>>> lm = safetyscope.load_model("small")  # doctest: +SKIP
>>> cmap = map_circuit(lm, out=Path("runs/map"), config=MapConfig(quick=True))  # doctest: +SKIP
>>> cmap.headline, cmap.report(Path("runs/map/report.html"))  # doctest: +SKIP

Stages (``stages=`` selects; each writes ``OUT/map/stages/<stage>.json`` atomically, keyed on the model,
the settings, the budget, the prompts and the results of every earlier stage, so a rerun reuses every
stage whose inputs are unchanged and a recomputed stage whose results changed reruns everything after it):

  probe       probes at every layer (where is harmfulness readable?)
  neurons     safety neurons in the readable layers (activation difference + gradient importance)
  trace       attribution patching of the full layer x component grid, top cells verified exactly
  direction   refusal direction: candidates (readable blocks from the trace's decision onset), selection,
              ablation and addition measured on test prompts
  judges      the direction stage's harmful replies through every judge of ``MapConfig.judges`` (off when
              empty; only this stage's key holds the judges, so adding some reuses every other stage)
  fragility   refusal vs number of neurons removed (top vs random), with the direction as one component
  capability  KL and perplexity under the direction and the neuron set
  dla         direct logit attribution of each component to the refusal tokens
  monitor     would we notice? a runtime monitor's TPR / FPR on test prompts, clean and under the direction
  report      circuit stages by evidence and the HTML report (always written, whatever failed before it)

A stage that raises (other than an interrupt) is recorded as failed, with its error, and the map goes on:
later stages work with the evidence there is, and the report says what is missing and why.
"""

from __future__ import annotations

import importlib
import time
import traceback
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ...io import atomic_path, fingerprint, read_json, write_json
from ...models.adapter import LoadedModel
from ...prompts.sets import PromptsLike
from .inputs import Budget, MapConfig, MapPrompts, StageInputs
from .results import Results, StageRun
from .steps_defence import monitor_stage
from .steps_fit import dla_stage, neurons_stage, probe_stage, trace_stage
from .steps_measure import capability_stage, direction_stage, fragility_stage, judges_stage

STAGES = ("probe", "neurons", "trace", "direction", "judges", "fragility", "capability", "dla", "monitor", "report")
# The HTML report lives in the report layer, above methods: it is loaded by name when a report is rendered
# (as pandas loads its plotting backend), so the technique packages never import HTML code.
REPORT_BACKEND = "safetyscope.report.circuit"


def report_stage(x: StageInputs) -> dict[str, Any]:
    """Circuit stages by evidence and the HTML page, from the results there are (``x.runs``: how each went)."""
    return importlib.import_module(REPORT_BACKEND).render_map(x.out, x.done, x.runs, x.lm.name).to_json()


COMPUTE: dict[str, Callable[[StageInputs], dict[str, Any]]] = {
    "probe": probe_stage, "neurons": neurons_stage, "trace": trace_stage, "direction": direction_stage,
    "judges": judges_stage,
    "fragility": fragility_stage, "capability": capability_stage, "dla": dla_stage, "monitor": monitor_stage,
    "report": report_stage,
}

__all__ = ["STAGES", "Budget", "CircuitMap", "MapConfig", "map_circuit", "parse_stages", "stage_key"]


def parse_stages(stages: str | Iterable[str]) -> list[str]:
    """``"all"``, a comma list or an iterable of stage names, checked once."""
    names = [s.strip() for s in (stages.split(",") if isinstance(stages, str) else stages) if s.strip()]
    if names == ["all"]:
        return list(STAGES)
    unknown = [s for s in names if s not in STAGES]
    if unknown or not names:
        raise ValueError(f"unknown stage(s) {', '.join(unknown) or '(none given)'}; use {', '.join(STAGES)} or all")
    return names


def stage_key(stage: str, settings: Mapping[str, Any], budget: Budget, upstream: Mapping[str, Any] | None = None) -> str:
    """The cache key of a stage: its name, the run's settings (model, config, prompts), the budget and the
    results of the stages before it (a recomputed earlier stage whose results changed invalidates it)."""
    return fingerprint(stage, dict(settings), asdict(budget), dict(upstream or {}))


@dataclass(frozen=True)
class CircuitMap:
    """The result of :func:`map_circuit`: every stage's result (JSON, as stored) and typed views of them."""

    out: Path
    model: str
    raw: Mapping[str, Any]  # stage -> its stored JSON result ({"error": ...} for a failed stage)
    runs: tuple[StageRun, ...]  # how each stage went (computed, cached, failed, not run)
    results: Results = field(default_factory=Results)

    @property
    def headline(self) -> str | None:
        return self.results.report.headline if self.results.report else None

    @property
    def implications(self) -> list[dict[str, Any]] | None:
        return [dict(r) for r in self.results.report.implications] if self.results.report else None

    @property
    def report_path(self) -> Path | None:
        return Path(self.results.report.path) if self.results.report else None

    @property
    def failed(self) -> dict[str, str]:
        return {r.name: r.error or "" for r in self.runs if r.status == "failed"}

    def summary(self) -> dict[str, Any]:
        """What ``OUT/map/summary.json`` holds (and ``safetyscope map --json`` prints)."""
        return {"stages": {r.name: r.seconds for r in self.runs if r.status in ("done", "cached")},
                "status": {r.name: r.status for r in self.runs}, "failed": self.failed, "out": str(self.out),
                "report": str(self.report_path) if self.report_path else None, "headline": self.headline,
                "implications": self.implications,
                "direction": None if self.results.direction is None else
                {"layer": self.results.direction.layer, "position": self.results.direction.position},
                "probe_best_layer": None if self.results.probe is None else self.results.probe.best.layer}

    def save(self, path: Path | None = None) -> Path:
        """Write the summary (default ``OUT/map/summary.json``)."""
        return write_json(path or self.out / "map" / "summary.json", self.summary())

    def report(self, path: Path | None = None) -> Path:
        """Render the HTML report (default ``OUT/report.html``) from these results; returns its path."""
        backend = importlib.import_module(REPORT_BACKEND)
        rep = backend.render_map(self.out, self.raw, self.runs, self.model, path=path)
        return Path(rep.path)


def _finish(done: dict[str, Any], runs: list[StageRun], out: Path, model: str) -> CircuitMap:
    return CircuitMap(out, model, dict(done), tuple(runs), Results.from_json(done))


def _cached(path: Path, key: str) -> dict[str, Any] | None:
    """A stored stage record whose key matches; an unreadable file counts as absent (it is recomputed)."""
    if not path.is_file():
        return None
    try:
        rec = read_json(path)
    except (ValueError, OSError):
        return None
    return rec if isinstance(rec, dict) and rec.get("key") == key and "result" in rec else None


def _run_stage(stage: str, x: StageInputs, runs: list[StageRun]) -> dict[str, Any]:
    """Compute one stage; an error (not an interrupt) becomes ``{"error": ...}`` and a failed run."""
    t0 = time.perf_counter()
    try:
        result = COMPUTE[stage](x)
        runs.append(StageRun(stage, "done", time.perf_counter() - t0))
        return result
    except Exception as exc:  # noqa: BLE001 - recorded on the page; the map goes on with the evidence it has
        msg = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}".rstrip(": ")
        log = x.out / "map" / "errors" / f"{stage}.txt"  # the whole traceback, for a bug report
        with atomic_path(log) as tmp:
            tmp.write_text("".join(traceback.format_exception(exc)), "utf-8")
        runs.append(StageRun(stage, "failed", time.perf_counter() - t0, f"{msg} (traceback: {log})"))
        x.log(f"[map] {stage} failed: {msg} (traceback: {log})")
        return {"error": msg}


def map_circuit(
    lm: LoadedModel,
    harmful: PromptsLike | None = None,
    harmless: PromptsLike | None = None,
    *,
    out: Path,
    config: MapConfig | None = None,
    stages: str | Iterable[str] = "all",
    force: bool = False,
    log: Callable[[str], None] | None = None,
) -> CircuitMap:
    """Run the map's stages on ``lm`` (loaded once by the caller), reusing every cached stage whose inputs are
    unchanged. ``harmful`` / ``harmless``: prompt files or lists (split 60/20/20 into fitting, validation and
    test prompts), or None for the built-in sets. ``force``: recompute the selected stages."""
    config = config or MapConfig()
    wanted = parse_stages(stages)
    say = log or (lambda _m: None)
    prompts = MapPrompts.of(harmful, harmless, split=config.split, seed=config.seed)  # fails before anything is written
    out = Path(out)
    files = prompts.write(out / "map" / "prompts")
    b = Budget.of(config)
    base = StageInputs(lm, config, b, out, prompts, files, {}, say)
    settings = {**base.key_settings(), "prompts": prompts.fingerprint()}
    done: dict[str, Any] = {}
    runs: list[StageRun] = []
    for stage in STAGES:
        path = out / "map" / "stages" / f"{stage}.json"
        # the judges' verdicts feed only the page: adding judges reruns the judges and report stages alone
        upstream = {k: v for k, v in done.items() if k != "report" and (k != "judges" or stage == "report")}
        key = stage_key(stage, {**settings, "judges": list(config.judges)} if stage == "judges" else settings, b,
                        upstream)
        rec = _cached(path, key)
        if stage == "report" and rec is not None and (rec["result"].get("page_error")
                                                      or not Path(rec["result"].get("report", "")).is_file()):
            rec = None  # the page was deleted, or building it failed: render it again
        if rec is not None and not (force and stage in wanted):
            done[stage] = rec["result"]
            runs.append(StageRun(stage, "cached", rec.get("seconds")))
            if stage in wanted:
                say(f"[map] {stage}: cached ({path})")
            continue
        if stage not in wanted:
            runs.append(StageRun(stage, "skipped"))
            continue
        say(f"[map] {stage} ...")
        ok = {k: v for k, v in done.items() if "error" not in v}  # later stages see only results that exist
        x = StageInputs(lm, config, b, out, prompts, files, ok, say, tuple(runs))
        result = _run_stage(stage, x, runs)
        if "error" not in result:  # a failed stage is not cached: the next run tries it again
            write_json(path, {"key": key, "seconds": runs[-1].seconds, "result": result})
            result = read_json(path)["result"]  # what later stages and the cache see (JSON round trip)
            say(f"[map] {stage}: done in {runs[-1].seconds:.0f}s")
        done[stage] = result
    cmap = _finish(done, runs, out, lm.name)
    cmap.save()
    return cmap
