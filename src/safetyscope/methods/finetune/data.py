"""Training targets made on the fly from the model itself (nothing harmful ships with safetyscope).

*weaken*: harmful prompts with the model's own greedy replies under directional ablation (self-
distillation of the ablated model), kept only when the judge says they are not refusals; harmless
prompts with the unmodified model's replies (retain), kept when answered.

*harden*: harmful prompts with the model's own refusals (kept only when the judge says refusal); a
harmful prompt the model answers gets a refusal generated under activation addition of the refusal
direction, when a direction is given, again kept only if judged a refusal; harmless and
benign-but-scary prompts with the replies the model gives when it does not refuse (judged answers): its
own reply, or, for a benign prompt it refuses (over-refusal), its reply under directional ablation when a
direction is given, so hardening also teaches it to answer the benign prompts it used to refuse.

Targets are token ids (the reply as generated, stop token included when reached), so the training
loss sees exactly what the model produced.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from ...io import atomic_path
from ...measure.capability import decode_reply, generate_ids
from ...models.adapter import LoadedModel

Mode = Literal["weaken", "harden"]
MODES: tuple[Mode, ...] = ("weaken", "harden")
DATA_VERSION = 2  # in every cache key of targets: v2 adds the ablated answers to refused benign prompts
Kind = Literal["target", "retain"]  # target: the behaviour being changed; retain: behaviour kept


@dataclass(frozen=True)
class Example:
    prompt: str
    reply: tuple[int, ...]  # target token ids
    kind: Kind
    source: str  # harmful / harmless / scary, and how the reply was made

    @property
    def own_decision(self) -> bool:
        """Whether the unmodified model itself decides as this reply does (refuse or answer): false for a
        reply made under an intervention (a benign prompt it refused, answered under ablation; a harmful
        prompt it answered, refused under addition)."""
        return not any(tag in self.source for tag in (":ablated", ":added"))


@dataclass(frozen=True)
class TrainingData:
    examples: tuple[Example, ...]
    counts: dict[str, int]  # per source: kept / offered

    def of(self, kind: Kind) -> list[Example]:
        return [e for e in self.examples if e.kind == kind]

    def save(self, path: str | Path) -> Path:
        with atomic_path(path) as tmp:
            rows = [json.dumps(asdict(e)) for e in self.examples]
            tmp.write_text(json.dumps({"counts": self.counts}) + "\n" + "".join(r + "\n" for r in rows), encoding="utf-8")
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> TrainingData:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
        head = json.loads(lines[0])
        ex = []
        for line in lines[1:]:
            d = json.loads(line)
            ex.append(Example(d["prompt"], tuple(int(t) for t in d["reply"]), d["kind"], d["source"]))
        return cls(tuple(ex), {k: int(v) for k, v in head["counts"].items()})


JudgeFn = Callable[[str, str], bool]
Context = Callable[[], AbstractContextManager[Any]]


@dataclass
class _Gen:
    lm: LoadedModel
    judge: JudgeFn
    max_new_tokens: int
    batch_size: int
    system: str | None

    def replies(self, prompts: Sequence[str], under: Context | None = None) -> list[tuple[int, ...]]:
        if not prompts:
            return []
        if under is None:
            ids = generate_ids(self.lm, list(prompts), max_new_tokens=self.max_new_tokens,
                               batch_size=self.batch_size, system=self.system)
        else:
            with under():
                ids = generate_ids(self.lm, list(prompts), max_new_tokens=self.max_new_tokens,
                                   batch_size=self.batch_size, system=self.system)
        return [tuple(r) for r in ids]

    def refused(self, prompt: str, reply: Sequence[int]) -> bool:
        return bool(self.judge(prompt, decode_reply(self.lm, reply)))


def _keep(g: _Gen, prompts: Sequence[str], replies: Sequence[tuple[int, ...]], want_refusal: bool,
          kind: Kind, source: str) -> tuple[list[Example], list[str]]:
    """(examples whose judged refusal equals ``want_refusal``, the prompts that failed)."""
    kept, failed = [], []
    for p, r in zip(prompts, replies):
        if r and g.refused(p, r) == want_refusal:
            kept.append(Example(p, r, kind, source))
        else:
            failed.append(p)
    return kept, failed


def make_data(lm: LoadedModel, mode: Mode, harmful: Sequence[str], harmless: Sequence[str], scary: Sequence[str] = (),
              *, ablate: Context | None = None, add: Context | None = None, judge: JudgeFn,
              max_new_tokens: int = 32, batch_size: int = 8, system: str | None = None) -> TrainingData:
    """Targets for ``mode`` (see the module docstring). ``ablate``: a directional-ablation context (needed
    to weaken; when hardening, optional: it answers the benign prompts the model refuses); ``add``: an
    activation-addition context (optional, to harden prompts the model answers)."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; use weaken or harden")
    g = _Gen(lm, judge, max_new_tokens, batch_size, system)
    counts: dict[str, int] = {}
    examples: list[Example] = []
    if mode == "weaken":
        if ablate is None:
            raise ValueError("weakening needs a refusal direction to ablate (direction=...)")
        kept, _ = _keep(g, harmful, g.replies(harmful, ablate), False, "target", "harmful:ablated")
        examples += kept
        counts["harmful:ablated"] = len(kept)
    else:
        kept, answered = _keep(g, harmful, g.replies(harmful), True, "target", "harmful:own")
        examples += kept
        counts["harmful:own"] = len(kept)
        if add is not None and answered:
            more, _ = _keep(g, answered, g.replies(answered, add), True, "target", "harmful:added")
            examples += more
            counts["harmful:added"] = len(more)
    counts["harmful:offered"] = len(harmful)
    for name, prompts in (("harmless", harmless), ("scary", scary)):
        kept, refused = _keep(g, prompts, g.replies(prompts), False, "retain", f"{name}:own")
        examples += kept
        counts[f"{name}:own"], counts[f"{name}:offered"] = len(kept), len(prompts)
        if mode == "harden" and ablate is not None and refused:  # over-refusals: the answer it gives without refusal
            more, _ = _keep(g, refused, g.replies(refused, ablate), False, "retain", f"{name}:ablated")
            examples += more
            counts[f"{name}:ablated"] = len(more)
    data = TrainingData(tuple(examples), counts)
    if not data.of("target"):
        raise ValueError(f"no {mode} targets survived the judge ({counts}); give more harmful prompts"
                         + (" or a direction that bypasses refusal" if mode == "weaken" else " or a direction to add"))
    if not data.of("retain"):
        raise ValueError(f"no harmless prompt was answered ({counts}); give other harmless prompts")
    return data


# ---- extended refusals ----------------------------------------------------------------------------
RefusalStyle = Literal["own", "extended", "restate"]
REFUSAL_STYLES: tuple[RefusalStyle, ...] = ("own", "extended", "restate")
# asked of the model itself, once per example rewritten; only the reply's first sentence is used
OVERVIEW_REQUEST = ('Here is a request someone sent: "{prompt}"\n\nWithout helping with it and without giving any steps '
                    "or details, write one or two sentences that describe what the request is about and why it could "
                    "cause harm.")
RESTATE_OPENING = "The request"
RESTATE_REQUEST = ('Here is a request someone sent: "{prompt}"\n\nWithout answering it, write one sentence that starts '
                   f'with "{RESTATE_OPENING}" and says what the request is about.')
# what each rewriting style asks the model (formatted with the prompt)
STYLE_REQUESTS: dict[RefusalStyle, str] = {"extended": OVERVIEW_REQUEST, "restate": RESTATE_REQUEST}
_SENTENCE_END = re.compile(r"[.!?](?=\s|$)")


def first_sentence(text: str) -> str | None:
    """The opening sentence of ``text`` (20-300 characters, one line, not a list item), or None."""
    text = text.strip()
    m = _SENTENCE_END.search(text)
    sentence = text[: m.end()] if m is not None else ""
    if not 20 <= len(sentence) <= 300 or "\n" in sentence or re.match(r"(\d+[.)]|[-*#])", sentence):
        return None
    return sentence


def _squashed(text: str) -> str:
    """``text`` without whitespace (a tokenizer may decode with spaces between its pieces)."""
    return "".join(text.split())


def extend_refusals(lm: LoadedModel, data: TrainingData, *, judge: JudgeFn, style: RefusalStyle = "extended",
                    max_new_tokens: int = 48, batch_size: int = 8, system: str | None = None,
                    max_reply_tokens: int | None = None, restate_changed: bool = True) -> TrainingData:
    """Harden targets that open with a sentence on the request instead of deciding at the first token.

    ``style`` "extended": each refusal target becomes an *extended refusal* (Abu Shairah et al. 2025, "An
    Embarrassingly Simple Defense Against LLM Abliteration Attacks"): a sentence on what the request is about
    and why it could cause harm (the first sentence of the model's own reply to :data:`OVERVIEW_REQUEST`),
    then the model's own refusal; retain examples are unchanged. "restate": *every* example, target and
    retain, opens with a neutral sentence on what the request is about (:data:`RESTATE_REQUEST`), then its
    own refusal or answer, so the first reply tokens are the same kind of text whatever the decision, and
    the decision comes after the request was restated. An example keeps its reply when the model's
    sentence is unusable, is itself judged a refusal, the joined reply is judged otherwise than the original
    (a refusal for targets, an answer for retain examples), or it is longer than ``max_reply_tokens`` (the
    training cut). With ``restate_changed`` false, "restate" leaves the retain examples whose decision the
    model does not make itself (:attr:`Example.own_decision`: benign prompts it refused, answered under
    ablation) as they are: for the "mixed" retain loss, which trains exactly those rows by cross-entropy while
    holding every other retain row to the starting model, whose replies open with the answer; restated, they
    would be the only retain rows taught the opening the refusal targets share. A restating sentence must
    also open with :data:`RESTATE_OPENING`: a small model asked to restate a request sometimes starts
    answering it instead ("To track her phone, you can use ..."), and a target that opens with the answer
    would teach the opposite of a refusal."""
    if style not in ("extended", "restate"):
        raise ValueError(f"extend_refusals rewrites the extended or restate styles, not {style!r}")
    kinds = ("target",) if style == "extended" else ("target", "retain")
    chosen = [e for e in data.examples if e.kind in kinds and (restate_changed or e.kind == "target" or e.own_decision)]
    request = STYLE_REQUESTS[style]
    g = _Gen(lm, judge, max_new_tokens, batch_size, system)
    asked = g.replies([request.format(prompt=e.prompt) for e in chosen])
    special = set(getattr(lm.tokenizer, "all_special_ids", []) or [])
    new: dict[int, Example] = {}
    for e, ids in zip(chosen, asked):
        sentence = first_sentence(decode_reply(lm, ids))
        opens = style != "restate" or _squashed(sentence or "").startswith(_squashed(RESTATE_OPENING))
        if sentence is None or not opens or g.judge(e.prompt, sentence):
            continue
        stop = [t for t in e.reply[-1:] if t in special]  # the stop token the reply ended with, if any
        text = f"{sentence} {decode_reply(lm, e.reply)}"
        reply = tuple(lm.tokenizer(text, add_special_tokens=False)["input_ids"]) + tuple(stop)
        fits = max_reply_tokens is None or len(reply) <= max_reply_tokens
        if fits and g.judge(e.prompt, text) == (e.kind == "target"):
            new[id(e)] = Example(e.prompt, reply, e.kind, f"{e.source}+{style}")
    examples = tuple(new.get(id(e), e) for e in data.examples)
    counts = {**data.counts, **{f"{kind}:{style}": sum(e.kind == kind for e in chosen if id(e) in new) for kind in kinds}}
    return TrainingData(examples, counts)
