"""How good is a judge: accuracy, Cohen's kappa and the confusion matrix on labelled (prompt, reply) pairs.

The built-in set (``prompts/data/judge_set.jsonl``, 157 pairs written for safetyscope) labels every reply
``refused``, ``complied`` or ``broken`` with a finer ``kind`` (clear_refusal, soft_refusal, over_refusal,
late_refusal, compliance, harmful_compliance, disclaimer_compliance, clarifying, gibberish, loop,
off_topic, empty, echo, truncated).  A user file has the same fields (``kind`` optional), JSONL.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, cast

import numpy as np

from ..errors import SafetyscopeError
from .judges import CATEGORIES, Category, categorize, load_judge

__all__ = ["JudgeComparison", "JudgeEvaluation", "LabelledPair", "agreement3", "compare_judge_specs", "compare_judges",
           "evaluate_judge", "load_judge_set"]


class JudgeSetError(SafetyscopeError, ValueError):
    """A labelled judge file that cannot be read."""


@dataclass(frozen=True)
class LabelledPair:
    prompt: str
    reply: str
    label: Category
    kind: str = ""
    id: str = ""


def _pair(row: Any, where: str) -> LabelledPair:
    if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) or not isinstance(row.get("reply"), str):
        raise JudgeSetError(f"{where}: each line needs string 'prompt' and 'reply' fields and a 'label'")
    label = str(row.get("label", "")).strip().lower()
    if label not in CATEGORIES:
        raise JudgeSetError(f"{where}: label {row.get('label')!r} is not one of {', '.join(CATEGORIES)}; fix the label")
    return LabelledPair(row["prompt"], row["reply"], cast(Category, label), str(row.get("kind", "")),
                        str(row.get("id", "")))


def load_judge_set(path: str | Path | None = None) -> list[LabelledPair]:
    """The built-in labelled pairs (``path=None``) or a user JSONL file of ``{prompt, reply, label[, kind]}``."""
    if path is None:
        text = resources.files("safetyscope.prompts").joinpath("data", "judge_set.jsonl").read_text(encoding="utf-8")
        origin = "built-in judge_set.jsonl"
    else:
        p = Path(path)
        if not p.is_file():
            raise JudgeSetError(f"labelled judge file not found: {p}; pass a JSONL file of prompt/reply/label rows")
        text, origin = p.read_text(encoding="utf-8"), str(p)
    pairs = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise JudgeSetError(f"{origin} line {n}: malformed JSON ({exc.msg}); write one object per line") from None
        pairs.append(_pair(row, f"{origin} line {n}"))
    if not pairs:
        raise JudgeSetError(f"{origin} has no labelled pairs")
    return pairs


def agreement3(a: Sequence[str], b: Sequence[str]) -> dict[str, Any]:
    """Accuracy (share of equal labels), Cohen's kappa and the confusion matrix (rows ``a``, columns ``b``)
    of two three-way labellings, in the order of :data:`CATEGORIES`."""
    if len(a) != len(b) or not a:
        raise ValueError(f"need two non-empty labellings of equal length, got {len(a)} and {len(b)}")
    idx: dict[str, int] = {c: i for i, c in enumerate(CATEGORIES)}
    m = np.zeros((3, 3), dtype=np.int64)
    for x, y in zip(a, b):
        m[idx[x]][idx[y]] += 1
    n = float(m.sum())
    po = float(np.trace(m)) / n
    pe = float((m.sum(1).astype(np.float64) * m.sum(0)).sum()) / (n * n)
    kappa = (po - pe) / (1.0 - pe) if pe < 1.0 else (1.0 if po == 1.0 else 0.0)
    return {"accuracy": po, "kappa": kappa, "confusion": m.tolist(), "labels": list(CATEGORIES)}


@dataclass(frozen=True)
class JudgeEvaluation:
    """One judge on labelled pairs: ``confusion[true][predicted]`` in the order of ``labels``."""

    judge: str
    n: int
    accuracy: float
    kappa: float
    confusion: list[list[int]]
    labels: list[str]
    refusal_accuracy: float  # refused vs not refused, the binary question the phrase judge answers
    by_kind: dict[str, dict[str, Any]] = field(default_factory=dict)  # kind -> {n, correct, accuracy}
    predictions: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"judge": self.judge, "n": self.n, "accuracy": self.accuracy, "kappa": self.kappa,
                "refusal_accuracy": self.refusal_accuracy, "labels": self.labels, "confusion": self.confusion,
                "by_kind": self.by_kind}


def evaluate_judge(judge: Callable[[str, str], Any], pairs: Sequence[LabelledPair] | None = None, *,
                   name: str | None = None, detector: bool = True) -> JudgeEvaluation:
    """Three-way verdicts of ``judge`` (:func:`~safetyscope.measure.judges.categorize`) against the labels of
    ``pairs`` (default: the built-in judge set)."""
    pairs = list(pairs) if pairs is not None else load_judge_set()
    predicted = categorize(judge, [p.prompt for p in pairs], [p.reply for p in pairs], detector=detector)
    truth = [p.label for p in pairs]
    stats = agreement3(truth, predicted)
    binary = sum((t == "refused") == (q == "refused") for t, q in zip(truth, predicted)) / len(pairs)
    counts: Counter[str] = Counter(p.kind or p.label for p in pairs)
    right: Counter[str] = Counter(p.kind or p.label for p, q in zip(pairs, predicted) if q == p.label)
    by_kind = {k: {"n": counts[k], "correct": right[k], "accuracy": right[k] / counts[k]} for k in sorted(counts)}
    label = name or str(getattr(judge, "__qualname__", type(judge).__name__))
    return JudgeEvaluation(label, len(pairs), stats["accuracy"], stats["kappa"], stats["confusion"], stats["labels"],
                           binary, by_kind, list(predicted))


@dataclass(frozen=True)
class JudgeComparison:
    """Several judges on the same replies: per group and judge the counts of each category, and per pair of
    judges their three-way agreement (accuracy, kappa, confusion) and refused-vs-not agreement."""

    judges: list[str]
    groups: dict[str, dict[str, dict[str, int]]]  # group -> judge -> {refused, complied, broken, n}
    agreement: dict[str, dict[str, Any]]  # "a vs b" -> agreement3(...) + refusal_agreement
    verdicts: dict[str, list[str]]  # judge -> category of every reply, in input order
    names: dict[str, str] = field(default_factory=dict)  # judge -> its full name (e.g. llm:large's qualname)

    def to_dict(self) -> dict[str, Any]:
        return {"judges": self.judges, "groups": self.groups, "agreement": self.agreement, "names": self.names}


def compare_judges(judges: dict[str, Callable[[str, str], Any]], prompts: Sequence[str], replies: Sequence[str],
                   groups: Sequence[str] | None = None, *, detector: bool = True) -> JudgeComparison:
    """Judge the same replies with every judge (three-way, :func:`categorize`) and compare them."""
    groups = list(groups) if groups is not None else ["all"] * len(prompts)
    if not (len(prompts) == len(replies) == len(groups)) or not prompts:
        raise ValueError("compare_judges needs equally many (and at least one) prompts, replies and groups")
    verdicts = {name: [str(c) for c in categorize(j, prompts, replies, detector=detector)] for name, j in judges.items()}
    table: dict[str, dict[str, dict[str, int]]] = {}
    for g in dict.fromkeys(groups):
        rows = [i for i, x in enumerate(groups) if x == g]
        table[g] = {name: {**{c: sum(v[i] == c for i in rows) for c in CATEGORIES}, "n": len(rows)}
                    for name, v in verdicts.items()}
    names = list(judges)
    pairs: dict[str, dict[str, Any]] = {}
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            stats = agreement3(verdicts[a], verdicts[b])
            same = sum((x == "refused") == (y == "refused") for x, y in zip(verdicts[a], verdicts[b]))
            pairs[f"{a} vs {b}"] = {**stats, "refusal_agreement": same / len(prompts)}
    full = {k: str(getattr(j, "__qualname__", k)) for k, j in judges.items()}
    return JudgeComparison(names, table, pairs, verdicts, full)


def compare_judge_specs(specs: Sequence[str], prompts: Sequence[str], replies: Sequence[str], groups: Sequence[str],
                        batch_size: int = 8) -> dict[str, Any]:
    """:func:`compare_judges` on judges named as ``--judge`` names them (``phrase``, ``llm:MODEL``,
    ``phrase+llm:MODEL``, ``module:function``; the LLM judges batch ``batch_size`` replies), as JSON with each
    judge's full name under ``names``."""
    judges = {spec: load_judge(spec, batch_size=batch_size) for spec in specs}
    return compare_judges(judges, prompts, replies, groups).to_dict()
