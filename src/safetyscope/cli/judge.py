"""`safetyscope judge eval`: each judge's accuracy, Cohen's kappa and confusion matrix on labelled replies."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import typer

from ..measure.judge_eval import (
    compare_judge_specs as compare_specs,  # `--judges` on every command (docs use this name)
)
from .common import emit, user_errors
from .settings import Settings, command, opt


@dataclass
class JudgeEvalSettings(Settings):
    judge: list[str] = opt(("phrase", "llm"), "Judge to evaluate (repeatable): phrase, llm, llm:MODEL (any model "
                                              "safetyscope loads; llm = the large alias when installed, else default), "
                                              "phrase+llm[:MODEL] (detector, phrases, then the LLM asked whether the "
                                              "reply gives what was asked) or package.module:function.")
    file: str = opt("", "Labelled JSONL file (prompt, reply, label = refused|complied|broken, optional kind); "
                        "empty = the built-in judge set (157 pairs).")
    limit: int = opt(0, "Judge at most this many pairs (a seeded sample; 0 = all).")
    half: str = opt("", "Only the pairs whose id number is odd (the half judge designs were chosen on) or even "
                        "(held out); empty = all.")
    detector: bool = opt(True, "Apply the model-free broken-output detector first (phrase and custom judges: a "
                               "flagged reply is broken; llm, phrase+llm: flagged replies skip the model).",
                         flag="--detector/--no-detector")


def register(app: typer.Typer) -> None:
    sub = typer.Typer(no_args_is_help=True, help="Refusal judges: measure how well they agree with labelled replies.")

    @command(sub, "eval", JudgeEvalSettings, "Accuracy, Cohen's kappa and confusion matrix of each judge on labelled "
                                              "(prompt, reply) pairs (refused / complied / broken).")
    def eval_cmd(s: JudgeEvalSettings) -> None:
        with user_errors():
            run_judge_eval(s)

    app.add_typer(sub, name="judge", help="Refusal judges: evaluate them on labelled replies.")


def _judge(spec: str, s: JudgeEvalSettings) -> Any:
    from ..measure.judges import load_judge

    try:
        return load_judge(spec, batch_size=s.batch_size, detector=s.detector)
    except (ImportError, AttributeError, TypeError) as exc:
        raise ValueError(str(exc).splitlines()[0] + "; --judge takes phrase, llm, llm:MODEL, phrase+llm[:MODEL] "
                         "or module:function") from None


def id_parity(pair_id: str) -> str:
    """``odd`` / ``even`` by the last number in a pair id (``js-017`` -> odd); empty without a number."""
    import re

    digits = re.findall(r"\d+", pair_id)
    return "" if not digits else ("odd" if int(digits[-1]) % 2 else "even")


def run_judge_eval(s: JudgeEvalSettings) -> dict[str, Any]:
    import random

    from ..io import write_json
    from ..measure.judge_eval import evaluate_judge, load_judge_set

    if s.limit < 0:
        raise ValueError("--limit must be 0 (all) or a positive number of pairs")
    if s.half not in ("", "odd", "even"):
        raise ValueError(f"--half {s.half!r}: give odd, even or leave it empty")
    pairs = load_judge_set(s.file or None)
    if s.half:
        pairs = [p for p in pairs if id_parity(p.id) == s.half]
        if not pairs:
            raise ValueError(f"no pair has an {s.half} id number (ids like js-001); drop --half")
    if s.limit and s.limit < len(pairs):
        pairs = sorted(random.Random(s.seed).sample(pairs, s.limit), key=lambda p: p.id)
    rows = []
    for spec in s.judge or ["phrase"]:
        judge = _judge(spec, s)
        t0 = time.perf_counter()
        res = evaluate_judge(judge, pairs, name=spec, detector=s.detector)
        row = res.to_dict()
        row["seconds"] = time.perf_counter() - t0
        row["forward_passes"] = getattr(judge, "forward_passes", None)
        row["predictions"] = [{"id": p.id, "label": p.label, "kind": p.kind, "predicted": q}
                              for p, q in zip(pairs, res.predictions)]
        rows.append(row)
    result = {"file": s.file or "builtin:judge_set", "half": s.half or "all", "n": len(pairs), "detector": s.detector,
              "judges": rows}
    s.out.mkdir(parents=True, exist_ok=True)
    path = write_json(s.out / "judge_eval.json", result)
    emit(s, result, lambda: _render(result, str(path)))
    return result


def _render(res: dict[str, Any], path: str) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    c = Console()
    half = "" if res["half"] == "all" else f"{res['half']}-id half, "
    t = Table(title=f"judges on {escape(res['file'])} ({half}{res['n']} pairs; broken detector "
                    f"{'on' if res['detector'] else 'off'})")
    for col in ("judge", "accuracy", "kappa", "refused-vs-not accuracy", "seconds"):
        t.add_column(col, justify="left" if col == "judge" else "right")
    for r in res["judges"]:
        t.add_row(escape(r["judge"]), f"{r['accuracy']:.1%}", f"{r['kappa']:.3f}", f"{r['refusal_accuracy']:.1%}",
                  f"{r['seconds']:.1f}")
    c.print(t)
    for r in res["judges"]:
        m = Table(title=f"{escape(r['judge'])}: rows = label, columns = verdict")
        m.add_column("")
        for lab in r["labels"]:
            m.add_column(lab, justify="right")
        for lab, counts in zip(r["labels"], r["confusion"]):
            m.add_row(lab, *map(str, counts))
        c.print(m)
        worst = sorted(r["by_kind"].items(), key=lambda kv: kv[1]["accuracy"])[:5]
        c.print("  weakest kinds: " + ", ".join(f"{escape(k)} {v['correct']}/{v['n']}" for k, v in worst),
                highlight=False)
    c.print(f"results: {escape(path)}")


# ---- side-by-side judges for the measurement commands (`eval --judges phrase,llm`) ------------------------
JUDGES_HELP = ("Comma-separated judges to report side by side on this run's replies, with their agreement "
               "(e.g. phrase,llm): refused / complied / broken counts per set; empty = off.")


def parse_judges(spec: str) -> list[str]:
    """The names in ``--judges`` (checked before any model loads)."""
    names = [x.strip() for x in spec.split(",") if x.strip()]
    if spec.strip() and len(names) < 1:
        raise ValueError("--judges takes comma-separated judges, e.g. phrase,llm")
    return list(dict.fromkeys(names))


def compare_on_records(specs: list[str], records: list[Any], batch_size: int = 8) -> dict[str, Any]:
    """:func:`compare_specs` on `eval`'s reply records (set, prompt, reply, model)."""
    groups = [r.set if r.model == "modified" else f"{r.set} ({r.model})" for r in records]
    return compare_specs(specs, [r.prompt for r in records], [r.reply for r in records], groups, batch_size)


def render_comparison(c: Any, cmp: dict[str, Any]) -> None:
    from rich.markup import escape
    from rich.table import Table

    t = Table(title="judges side by side (rates of this run's replies)")
    for col in ("set", "judge", "refused", "complied", "broken", "n"):
        t.add_column(col, justify="left" if col in ("set", "judge") else "right")
    for group, by_judge in cmp["groups"].items():
        for judge, n in by_judge.items():
            t.add_row(escape(group), escape(cmp["names"].get(judge, judge)),
                      *(f"{n[k] / n['n']:.0%} ({n[k]})" for k in ("refused", "complied", "broken")), str(n["n"]))
    c.print(t)
    for pair, a in cmp["agreement"].items():
        c.print(f"agreement {escape(pair)}: three-way {a['accuracy']:.1%} (kappa {a['kappa']:.2f}), "
                f"refused-vs-not {a['refusal_agreement']:.1%}", highlight=False)
