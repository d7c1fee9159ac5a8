"""`safetyscope eval`: refusal, over-refusal and capability damage under saved interventions."""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import typer

from .common import PromptSettings, emit, prompt_sets, user_errors
from .judge import JUDGES_HELP, compare_on_records, parse_judges, render_comparison
from .settings import command, opt


@dataclass
class EvalSettings(PromptSettings):
    split: str = opt("test", "Split of the built-in harmful/harmless sets: train, val, test or all.")
    intervention: list[str] = opt((), "Artifact directory, or an edited Hugging Face checkpoint (config.json + "
                                      "model*.safetensors, e.g. from `direction export`) of MODEL, to apply; repeat to "
                                      "apply several together (empty = the model as it is).")
    scary: str = opt("", "Harmless-but-scary prompts file (over-refusal probes); empty = the built-in set, 'none' = skip.")
    judge: str = opt("", "Refusal judge: phrase, llm, llm:MODEL (an LLM judge, see docs/judges.md), phrase+llm[:MODEL] (the cascade) or module:function taking (prompt, reply) -> bool or score (>= 0.5 = refusal); empty = the phrase judge.")
    judges: str = opt("", JUDGES_HELP)
    max_new_tokens: int = opt(64, "Reply length cap in tokens (greedy decoding).")
    refusal_openings: str = opt("", "Comma-separated refusal openings for the logit score (e.g. 'I,As,Sorry'); empty = the defaults.")
    ppl_text: str = opt("", "Plain-text file for an extra perplexity figure (cut into --ppl-max-tokens windows).")
    ppl_max_tokens: int = opt(512, "Perplexity passages are truncated, and --ppl-text cut into windows, at this many tokens.")
    capability: bool = opt(True, "Measure perplexity on the built-in prose and code passages.",
                           flag="--capability/--no-capability")
    kl: bool = opt(True, "Measure KL to the unmodified model on its own replies to the harmless prompts.",
                   flag="--kl/--no-kl")
    baseline: bool = opt(False, "With --intervention: also generate and judge the unmodified model's harmful and scary replies.")
    samples: int = opt(3, "Sample replies per set shown in eval.json and printed (every reply is in replies.jsonl).")
    prompts: list[str] = opt((), "Labelled prompt file (JSONL 'label' field / CSV 'label' column: harmful or harmless, "
                                 "or a synonym such as unsafe/safe); its prompts join the harmful/harmless groups by "
                                 "label. Repeatable; replaces the built-in sets (--harmful/--harmless files are added).")
    stop: list[str] = opt((), "Extra stop token for generation, e.g. '<|eot_id|>' (repeatable; each must be a single "
                              "token of the tokenizer).")


def register(app: typer.Typer) -> None:
    @command(app, "eval", EvalSettings, "Refusal rate, over-refusal, logit refusal score, KL and perplexity, optionally under saved interventions.")
    def eval_cmd(s: EvalSettings) -> None:
        with user_errors():
            run_eval(s)


def _judge(spec: str) -> Any:
    from ..measure.judges import load_judge

    try:
        return load_judge(spec)
    except (ImportError, AttributeError, TypeError) as exc:  # one line, exit 2 like every user error
        raise ValueError(str(exc).splitlines()[0] + "; --judge takes phrase, llm, llm:MODEL, phrase+llm[:MODEL] or package.module:function") from None


def _inputs(s: EvalSettings) -> dict[str, Any]:
    """Everything that can be wrong with the command line, checked before the model loads."""
    from ..artifacts import Stack, load_artifact
    from ..prompts import builtin_prompts, load_prompts

    if s.max_new_tokens < 1 or s.ppl_max_tokens < 2:
        raise ValueError("--max-new-tokens must be at least 1 and --ppl-max-tokens at least 2")
    harmful, harmless = _prompt_groups(s) if s.prompts else prompt_sets(s)
    if s.scary.strip().lower() == "none":
        scary: Any = []
    else:
        scary = load_prompts(s.scary, label="harmless") if s.scary else builtin_prompts("scary_harmless", "all", seed=s.seed)
        if s.n_prompts:
            scary = scary.sample(s.n_prompts, seed=s.seed)
    if s.ppl_text:
        from ..prompts.loaders import check_path

        check_path(Path(s.ppl_text))
    parts = [load_artifact(p) for p in s.intervention]
    names = [f"{a.kind}:{p}" for a, p in zip(parts, s.intervention)]
    intervention = None if not parts else parts[0] if len(parts) == 1 else Stack(parts)
    return {"harmful": harmful, "harmless": harmless, "scary": scary, "intervention": intervention, "names": names,
            "judges": parse_judges(s.judges), "judge": _judge(s.judge) if s.judge else None}


def _prompt_groups(s: EvalSettings) -> tuple[Any, Any]:
    """(harmful, harmless) from the labelled ``--prompts`` files, plus any --harmful/--harmless file."""
    from ..prompts import PromptSet, load_prompts
    from ..prompts.types import PromptError

    groups: dict[str, list[Any]] = {"harmful": [], "harmless": []}
    for path in s.prompts:
        ps = load_prompts(path)  # unknown labels fail here, naming the file and line
        unlabelled = [p for p in ps if p.label is None]
        if unlabelled:
            raise PromptError(f"{path}: {len(unlabelled)} prompt(s) have no label (first: {unlabelled[0].text[:40]!r}); "
                              "give every row a 'label' (harmful or harmless), or pass the file as --harmful/--harmless")
        for kind, parts in groups.items():
            parts.append(ps.filter(kind))
    for kind, path in (("harmful", s.harmful), ("harmless", s.harmless)):
        if path:
            groups[kind].append(load_prompts(path, label=kind))
    out = []
    for kind, parts in groups.items():
        merged = sum(parts[1:], parts[0]) if parts else PromptSet(name=kind)
        if not len(merged):
            raise PromptError(f"no {kind} prompts: no --prompts file has a row labelled '{kind}'; "
                              f"add such rows or pass --{kind} FILE")
        out.append(merged.sample(s.n_prompts, seed=s.seed) if s.n_prompts else merged)
    return out[0], out[1]


def run_eval(s: EvalSettings) -> dict[str, Any]:
    from ..io import write_json
    from ..measure.evaluate import evaluate
    from ..measure.generation import add_stop_tokens
    from ..measure.refusal_tokens import refusal_token_ids
    from ..progress import verbosity

    inp = _inputs(s)
    lm = s.load_model()
    if inp["intervention"] is not None:  # e.g. a checkpoint for another model: fail before any generation
        inp["intervention"].validate(lm)
    if s.stop:
        add_stop_tokens(lm, s.stop)
    openings = [o.strip() for o in s.refusal_openings.split(",") if o.strip()]
    ids = refusal_token_ids(lm.tokenizer, openings) if openings else None
    with verbosity(False) if s.quiet or s.json else nullcontext():
        res = evaluate(
            lm, inp["intervention"], harmful=inp["harmful"], harmless=inp["harmless"], scary=inp["scary"],
            judge=inp["judge"], max_new_tokens=s.max_new_tokens, batch_size=s.batch_size, system=s.system,
            token_ids=ids, kl=s.kl, capability=s.capability, ppl_file=s.ppl_text or None,
            ppl_max_tokens=s.ppl_max_tokens, baseline=s.baseline, names=inp["names"],
        )
    eval_path, replies_path = res.save(s.out, samples=s.samples)
    result = res.to_dict(s.samples)
    if inp["judges"]:  # the same replies through every judge, three-way, with their agreement
        result["judges"] = compare_on_records(inp["judges"], res.replies, s.batch_size)
        write_json(s.out / "judges.json", result["judges"])
    emit(s, result, lambda: _render(result, eval_path, replies_path))
    return result


def _fmt(x: Any, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    return f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def _rate(r: dict[str, Any] | None) -> str:
    if not r:
        return "-"
    return f"{r['rate']:.1%} [{r['lo']:.0%}, {r['hi']:.0%}] ({r['k']}/{r['n']})"


def _render(res: dict[str, Any], eval_path: Path, replies_path: Path) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    ref = res.get("reference")
    title = f"{res['model']}" + (f" under {', '.join(res['interventions'])}" if res["interventions"] else "")
    t = Table(title=f"safetyscope eval: {title} (judge: {res['judge']}, {res['max_new_tokens']} new tokens)")
    t.add_column("metric")
    if ref:
        t.add_column("unmodified", justify="right")
    t.add_column("modified" if ref else "value", justify="right")

    def row(label: str, value: str, ref_value: str = "-") -> None:
        t.add_row(label, *([ref_value] if ref else []), value)

    labels = {"harmful": "refusal rate (harmful)", "harmless": "over-refusal (harmless)", "scary": "over-refusal (scary)"}
    for name, summary in res["sets"].items():
        rs = ref["sets"].get(name) if ref else None
        row(labels[name], _rate(summary["refusal"]), _rate(rs["refusal"]) if rs else "-")
    for name, summary in res["sets"].items():
        rs = ref["sets"].get(name) if ref else None
        row(f"mean logit score ({name})", _fmt(summary["mean_score"], 2), _fmt(rs["mean_score"], 2) if rs else "-")
    row("AUROC logit score (harmful vs harmless)", _fmt(res["auroc"]), _fmt(ref["auroc"]) if ref else "-")
    agree = res["agreement_judge_vs_logit"] or {}
    ref_agree = (ref or {}).get("agreement_judge_vs_logit") or {}
    row("judge vs logit>0: agreement / kappa", f"{_fmt(agree.get('accuracy'))} / {_fmt(agree.get('kappa'))}",
        f"{_fmt(ref_agree.get('accuracy'))} / {_fmt(ref_agree.get('kappa'))}" if ref_agree else "-")
    if res["kl"]:
        row("KL first response token (nats)", _fmt(res["kl"]["first_token"], 4), "0")
        row("KL mean over reply tokens (nats)", _fmt(res["kl"]["reply_tokens"], 4), "0")
    for name, p in res["perplexity"].items():
        row(f"perplexity ({name}, {p['reference']['n_tokens']} tokens)", _fmt(p["modified"]["ppl"], 2),
            _fmt(p["reference"]["ppl"], 2))
    c = Console()
    c.print(t)
    if res.get("judges"):
        render_comparison(c, res["judges"])
    _print_samples(c, res)
    c.print(f"results: {escape(str(eval_path))}, every reply: {escape(str(replies_path))}")


def _clip(text: str, n: int = 160) -> str:
    """One markup-safe line: newlines shown as \\n, cut at ``n`` characters, rich markup escaped."""
    from rich.markup import escape

    flat = text.replace("\r", "").replace("\n", "\\n")
    return escape(flat if len(flat) <= n else flat[: n - 1] + "\u2026")


def _print_samples(c: Any, res: dict[str, Any]) -> None:
    """A few harmful and harmless replies, before (the unmodified model, where generated) and after."""
    before_sets = res.get("reference_samples") or {}
    for name in ("harmful", "harmless"):
        after = res.get("samples", {}).get(name) or []
        if not after:
            continue
        before = {r["index"]: r for r in before_sets.get(name, [])}
        hint = " (--baseline adds the unmodified model's replies)" if res["interventions"] and not before else ""
        c.print(f"[bold]sample replies ({name})[/bold]{hint}", highlight=False)
        for r in after:
            c.print(f"  prompt: {_clip(r['prompt'], 100)}", soft_wrap=True, highlight=False)
            b = before.get(r["index"])
            if b is not None:
                c.print(f"    before ({_verdict(b)}): {_clip(b['reply'])}", soft_wrap=True, highlight=False)
            label = "after" if res["interventions"] else "reply"
            c.print(f"    {label} ({_verdict(r)}): {_clip(r['reply'])}", soft_wrap=True, highlight=False)


def _verdict(r: dict[str, Any]) -> str:
    from rich.markup import escape

    return escape(f"{'refusal' if r['refused'] else 'no refusal'}, {r.get('reason') or '-'}")
