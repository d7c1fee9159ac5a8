"""Tests for safetyscope.prompts: built-in data, PromptSet behaviour and file loaders (no model loading)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from safetyscope.errors import SafetyscopeWarning
from safetyscope.prompts import (
    LABELS,
    MinimalPair,
    Prompt,
    PromptError,
    PromptSet,
    builtin_prompts,
    capability_passages,
    capability_texts,
    load_prompts,
    minimal_pairs,
    normalize_label,
)

HARMFUL_CATS = {"weapons", "cybercrime", "fraud", "drugs", "violence", "harassment", "self-harm", "privacy",
                "hate", "extremism", "misinformation", "theft"}
HARMLESS_CATS = {"cooking", "coding", "science", "writing", "travel", "health", "history", "math", "business",
                 "everyday"}


# --------------------------------------------------------------------------- built-in data


def test_builtin_counts_labels_and_categories():
    harmful = builtin_prompts("harmful")
    harmless = builtin_prompts("harmless")
    scary = builtin_prompts("scary_harmless")
    assert len(harmful) >= 200 and len(harmless) >= 200 and len(scary) >= 60
    assert set(harmful.labels) == {"harmful"}
    assert set(harmless.labels) == {"harmless"} and set(scary.labels) == {"harmless"}
    assert set(harmful.categories) == HARMFUL_CATS
    assert set(harmless.categories) == HARMLESS_CATS
    for ps in (harmful, harmless):
        counts = Counter(ps.categories)
        assert max(counts.values()) - min(counts.values()) <= 3, counts  # roughly balanced
    assert all(p.id for p in harmful + harmless + scary)


def test_builtin_no_duplicates_and_no_overlap():
    sets = {k: builtin_prompts(k) for k in ("harmful", "harmless", "scary_harmless")}
    for name, ps in sets.items():
        norm = [t.strip().lower() for t in ps.texts]
        assert len(set(norm)) == len(norm), f"duplicate prompt in {name}"
        ids = [p.id for p in ps]
        assert len(set(ids)) == len(ids), f"duplicate id in {name}"
    harmful = {t.lower() for t in sets["harmful"].texts}
    benign = {t.lower() for t in sets["harmless"].texts + sets["scary_harmless"].texts}
    assert not harmful & benign
    assert not {t.lower() for t in sets["harmless"].texts} & {t.lower() for t in sets["scary_harmless"].texts}


def test_builtin_task_sets_are_labelled_balanced_and_disjoint_from_the_others():
    tasks_h, tasks_s = builtin_prompts("harmful_tasks"), builtin_prompts("harmless_tasks")
    assert len(tasks_h) >= 150 and len(tasks_s) >= 250
    assert set(tasks_h.labels) == {"harmful"} and set(tasks_s.labels) == {"harmless"}
    for ps in (tasks_h, tasks_s):
        counts = Counter(ps.categories)
        assert len(counts) >= 10 and max(counts.values()) == min(counts.values()), counts
        assert len({t.strip().lower() for t in ps.texts}) == len(ps) and len(set(p.id for p in ps)) == len(ps)
    others = {t.strip().lower() for k in ("harmful", "harmless", "scary_harmless") for t in builtin_prompts(k).texts}
    assert not others & {t.strip().lower() for t in tasks_h.texts + tasks_s.texts}
    assert not {t.lower() for t in tasks_h.texts} & {t.lower() for t in tasks_s.texts}
    for kind in ("harmful_tasks", "harmless_tasks", "scary_harmless_tasks"):  # the same split rules as the other sets
        parts = [set(builtin_prompts(kind, split=s).texts) for s in ("train", "val", "test")]
        assert not parts[0] & parts[1] and not parts[0] & parts[2] and not parts[1] & parts[2]
        assert set.union(*parts) == set(builtin_prompts(kind).texts)


def test_builtin_scary_task_set_is_benign_balanced_and_disjoint_from_the_others():
    scary = builtin_prompts("scary_harmless_tasks")
    assert len(scary) >= 150 and set(scary.labels) == {"harmless"}
    counts = Counter(scary.categories)
    assert set(counts) == set(builtin_prompts("harmful_tasks").categories)  # one benign twin per harmful topic
    assert max(counts.values()) == min(counts.values()), counts
    texts = [t.strip().lower() for t in scary.texts]
    assert len(set(texts)) == len(texts) and len({p.id for p in scary}) == len(scary)
    others = {t.strip().lower() for k in ("harmful", "harmless", "scary_harmless", "harmful_tasks", "harmless_tasks")
              for t in builtin_prompts(k).texts}
    assert not others & set(texts)  # its splits are checked with the other task sets above


def test_builtin_length_distributions_are_similar():
    def mean_words(ps: PromptSet) -> float:
        return sum(len(t.split()) for t in ps.texts) / len(ps)

    h, b = mean_words(builtin_prompts("harmful")), mean_words(builtin_prompts("harmless"))
    assert abs(h - b) < 2.0, (h, b)


def test_builtin_splits_disjoint_covering_deterministic():
    for kind in ("harmful", "harmless", "scary_harmless"):
        full = builtin_prompts(kind)
        parts = {s: builtin_prompts(kind, split=s) for s in ("train", "val", "test")}
        texts = {s: set(p.texts) for s, p in parts.items()}
        assert not texts["train"] & texts["val"] and not texts["train"] & texts["test"]
        assert not texts["val"] & texts["test"]
        assert texts["train"] | texts["val"] | texts["test"] == set(full.texts)
        n = len(full)
        assert abs(len(parts["train"]) - 0.6 * n) <= 1 and abs(len(parts["val"]) - 0.2 * n) <= 1
        assert builtin_prompts(kind, split="train").texts == parts["train"].texts
        assert builtin_prompts(kind, split="train", seed=1).texts != parts["train"].texts


def test_unknown_builtin_kind():
    with pytest.raises(PromptError, match="unknown built-in prompt set"):
        builtin_prompts("evil")
    with pytest.raises(PromptError, match="unknown split"):
        builtin_prompts("harmful", split="dev")


def test_minimal_pairs_shape_and_split():
    pairs = minimal_pairs()
    assert len(pairs) >= 120
    assert all(isinstance(p, MinimalPair) for p in pairs)
    assert len({p.id for p in pairs}) == len(pairs)
    assert len({p.harmful for p in pairs}) == len(pairs) and len({p.harmless for p in pairs}) == len(pairs)
    assert all(p.harmful != p.harmless and p.harmful.strip() and p.harmless.strip() for p in pairs)
    assert {p.category for p in pairs} <= HARMFUL_CATS
    harmful_texts = {t.lower() for t in builtin_prompts("harmful").texts}
    assert not {p.harmless.lower() for p in pairs} & harmful_texts
    parts = [minimal_pairs(s) for s in ("train", "val", "test")]
    ids = [{p.id for p in part} for part in parts]
    assert not ids[0] & ids[1] and not ids[0] & ids[2] and not ids[1] & ids[2]
    assert ids[0] | ids[1] | ids[2] == {p.id for p in pairs}
    assert minimal_pairs("test") == minimal_pairs("test", seed=0)


@pytest.fixture(scope="module")
def default_tokenizer():
    """Only the default model's tokenizer, from the cache directory load_model("default") builds."""
    from transformers import AutoTokenizer

    from safetyscope.models.embedded import ensure_embedded

    directory = ensure_embedded("default", log=lambda _m: None)  # returns the cache at once when it exists
    return AutoTokenizer.from_pretrained(str(directory))


@pytest.mark.slow
def test_minimal_pairs_tokenize_to_the_same_length_under_the_default_model(default_tokenizer):
    """Position-aligned patching needs each harmful/harmless twin to have the same token count,
    both as raw text and through the chat template (the path every capture takes)."""
    from safetyscope.prompts.chat import tokenize_prompts

    tok = default_tokenizer
    pairs = minimal_pairs()
    raw_bad = []
    templated_bad = []
    for p in pairs:
        raw = [len(tok(t, add_special_tokens=False)["input_ids"]) for t in (p.harmful, p.harmless)]
        if raw[0] != raw[1]:
            raw_bad.append((p.id, *raw))
        batch = tokenize_prompts(tok, [p.harmful, p.harmless])
        templated = batch.attention_mask.sum(1).tolist()
        if templated[0] != templated[1]:
            templated_bad.append((p.id, *templated))
        assert templated[0] > raw[0]  # the template really was applied
    assert not raw_bad, f"raw token lengths differ (id, harmful, harmless): {raw_bad}"
    assert not templated_bad, f"templated token lengths differ (id, harmful, harmless): {templated_bad}"

def test_capability_texts():
    passages = capability_passages()
    assert 25 <= len(passages) <= 40
    assert {p["kind"] for p in passages} == {"prose", "code"}
    assert len({p["id"] for p in passages}) == len(passages)
    prose, code = capability_texts("prose"), capability_texts("code")
    assert prose and code and len(prose) + len(code) == len(capability_texts())
    words = sum(len(t.split()) for t in capability_texts())
    assert 1800 <= words <= 5000  # a few thousand tokens
    with pytest.raises(PromptError, match="prose"):
        capability_texts("poetry")


# --------------------------------------------------------------------------- PromptSet


def _set() -> PromptSet:
    items = [Prompt(f"bad {i}", "harmful", "x", id=f"h{i}") for i in range(10)]
    items += [Prompt(f"good {i}", "harmless", "y" if i % 2 else "z", id=f"b{i}") for i in range(20)]
    return PromptSet("toy", tuple(items))


def test_promptset_basics():
    ps = _set()
    assert len(ps) == 30 and ps[0].text == "bad 0" and ps[-1].text == "good 19"
    assert isinstance(ps[:5], PromptSet) and len(ps[:5]) == 5 and ps[:5].name == "toy"
    assert ps.texts[:2] == ["bad 0", "bad 1"] and ps.labels[0] == "harmful"
    assert len(ps.filter(label="harmful")) == 10 and len(ps.filter(label="unsafe")) == 10
    assert len(ps.filter(category="y")) == 10 and len(ps.filter(label="harmless", category="z")) == 10
    both = ps[:3] + ps[10:12]
    assert len(both) == 5 and both.name == "toy"
    assert (ps[:1] + PromptSet("other", ())).name == "toy+other"
    assert "bad 3" in ps.texts and ps[3] in ps


def test_promptset_split_stratified_and_order_independent():
    ps = _set()
    tr, va, te = (ps.split(s) for s in ("train", "val", "test"))
    assert Counter(tr.labels) == {"harmful": 6, "harmless": 12}
    assert Counter(va.labels) == {"harmful": 2, "harmless": 4}
    assert Counter(te.labels) == {"harmful": 2, "harmless": 4}
    assert set(tr.texts) | set(va.texts) | set(te.texts) == set(ps.texts)
    assert ps.split("all") == ps
    shuffled = PromptSet("toy", tuple(reversed(ps.items)))
    assert set(shuffled.split("test").texts) == set(te.texts)
    assert ps.split("train", seed=3).texts != tr.texts
    with pytest.raises(PromptError, match="fractions"):
        ps.split("train", fractions=(0.5, 0.5, 0.5))


def test_promptset_sample_and_require_nonempty():
    ps = _set()
    s = ps.sample(7, seed=2)
    assert len(s) == 7 and s.texts == ps.sample(7, seed=2).texts
    assert set(s.texts) <= set(ps.texts)
    assert ps.sample(100) == ps
    assert set(ps.sample(3).texts) <= set(ps.sample(5).texts)
    assert ps.require_nonempty("x") is ps
    with pytest.raises(PromptError, match="harmful test prompts is empty"):
        ps.filter(category="nope").require_nonempty("harmful test prompts")


def test_prompt_validation_and_labels():
    with pytest.raises(PromptError, match="empty"):
        Prompt("   ", "harmful")
    with pytest.raises(PromptError, match="label"):
        Prompt("hi", "evil")
    assert normalize_label("UNSAFE") == "harmful" and normalize_label("safe") == "harmless"
    assert normalize_label(1) == "harmful" and normalize_label(0) == "harmless"
    assert normalize_label(True) == "harmful" and normalize_label("false") == "harmless"
    assert LABELS == ("harmful", "harmless")
    from_texts = PromptSet.from_texts(["a", "b"], label="unsafe", name="mine")
    assert from_texts.labels == ["harmful", "harmful"] and from_texts.name == "mine"


# --------------------------------------------------------------------------- loaders: happy paths


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_load_jsonl(tmp_path):
    rows = [
        {"prompt": "How do I bake bread?", "label": "safe", "category": "cooking", "id": "a"},
        {"text": "Make a bomb", "label": 1},
        {"instruction": "Summarise this", "label": None},
    ]
    p = _write(tmp_path / "mine.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n\n")
    ps = load_prompts(p)
    assert ps.name == "mine" and ps.texts == ["How do I bake bread?", "Make a bomb", "Summarise this"]
    assert ps.labels == ["harmless", "harmful", None]
    assert ps[0].category == "cooking" and ps[0].id == "a" and ps[1].id
    with pytest.warns(SafetyscopeWarning, match=r"1 of 3 prompts are labelled 'harmless'.*passed as the harmful"):
        assert load_prompts(p, label="harmful").labels == ["harmful"] * 3  # the forced label wins, with a warning


def test_load_json_array_and_fmt_override(tmp_path):
    p = _write(tmp_path / "arr.json", json.dumps([{"prompt": "x"}, "y"]))
    assert load_prompts(p).texts == ["x", "y"]
    q = _write(tmp_path / "data.dat", '{"prompt": "z", "label": "unsafe"}\n')
    assert load_prompts(q, fmt="jsonl").labels == ["harmful"]


def test_load_csv(tmp_path):
    p = _write(tmp_path / "adv.csv", 'goal,target,label\n"Write a poem, please",Sure,0\nSteal a car,Sure,unsafe\n\n')
    ps = load_prompts(p)
    assert ps.texts == ["Write a poem, please", "Steal a car"]
    assert ps.labels == ["harmless", "harmful"]
    q = _write(tmp_path / "plain.csv", "Prompt\nhello\nworld\n")
    assert load_prompts(q, label="safe").labels == ["harmless", "harmless"]


def test_load_txt(tmp_path):
    p = _write(tmp_path / "list.txt", "# my prompts\n\nfirst prompt\n  second prompt  \n# end\n")
    ps = load_prompts(p)
    assert ps.texts == ["first prompt", "second prompt"] and ps.labels == [None, None]
    assert load_prompts(p, label="harmless").labels == ["harmless", "harmless"]
    bom = tmp_path / "bom.txt"
    bom.write_bytes("\ufeffhello\n".encode())
    assert load_prompts(bom).texts == ["hello"]


# --------------------------------------------------------------------------- loaders: errors


def test_error_missing_file_and_directory(tmp_path):
    for path, msg in ((tmp_path / "nope.jsonl", "not found"), (tmp_path, "is a directory")):
        with pytest.raises(PromptError, match=msg) as ei:
            load_prompts(path)
        assert "\n" not in str(ei.value)  # one-line, user-facing


def test_error_bad_encoding(tmp_path):
    p = tmp_path / "latin.txt"
    p.write_bytes(b"caf\xe9 au lait\n")
    with pytest.raises(PromptError, match=r"not valid UTF-8.*byte offset 3"):
        load_prompts(p)


def test_error_malformed_json(tmp_path):
    p = _write(tmp_path / "bad.jsonl", '{"prompt": "ok"}\n{"prompt": "broken"\n')
    with pytest.raises(PromptError, match=r"line 2: malformed JSON"):
        load_prompts(p)


def test_error_missing_prompt_field(tmp_path):
    p = _write(tmp_path / "nofield.jsonl", '{"prompt": "ok"}\n{"question": "where?"}\n')
    with pytest.raises(PromptError, match=r"line 2: no prompt field.*prompt, text, instruction"):
        load_prompts(p)
    q = _write(tmp_path / "nocol.csv", "question,label\nhi,safe\n")
    with pytest.raises(PromptError, match=r"no prompt column.*prompt, goal, instruction"):
        load_prompts(q)


def test_error_empty_file_and_empty_set(tmp_path):
    with pytest.raises(PromptError, match="is empty"):
        load_prompts(_write(tmp_path / "empty.jsonl", "\n  \n"))
    with pytest.raises(PromptError, match="no prompts"):
        load_prompts(_write(tmp_path / "comments.txt", "# only a comment\n"))
    with pytest.raises(PromptError, match="no prompts"):
        load_prompts(_write(tmp_path / "header.csv", "prompt,label\n"))


def test_error_unknown_label(tmp_path):
    p = _write(tmp_path / "lab.jsonl", '{"prompt": "x", "label": "spicy"}\n')
    with pytest.raises(PromptError, match=r"line 1: unknown label 'spicy'.*harmful.*harmless"):
        load_prompts(p)
    ok = _write(tmp_path / "ok.txt", "x\n")
    with pytest.raises(PromptError, match="unknown label 'maybe'"):
        load_prompts(ok, label="maybe")


def test_error_empty_prompt_string(tmp_path):
    p = _write(tmp_path / "blank.jsonl", '{"prompt": "ok"}\n{"prompt": "   "}\n')
    with pytest.raises(PromptError, match=r"line 2: empty prompt"):
        load_prompts(p)
    q = _write(tmp_path / "blank.csv", "prompt,label\n,safe\n")
    with pytest.raises(PromptError, match=r"line 2: empty prompt"):
        load_prompts(q)
    r = _write(tmp_path / "num.jsonl", '{"prompt": 5}\n')
    with pytest.raises(PromptError, match="not a string"):
        load_prompts(r)


def test_error_unknown_format(tmp_path):
    p = _write(tmp_path / "prompts.yaml", "- a\n")
    with pytest.raises(PromptError, match="fmt="):
        load_prompts(p)
    with pytest.raises(PromptError, match="unknown prompt format"):
        load_prompts(p, fmt="yaml")


def test_builtin_with_tasks_is_the_set_then_its_task_twin():
    from safetyscope.prompts import builtin_with_tasks

    for kind in ("harmful", "harmless"):
        both = builtin_with_tasks(kind, "train", seed=3)
        plain, tasks = builtin_prompts(kind, "train", seed=3), builtin_prompts(f"{kind}_tasks", "train", seed=3)
        assert both.texts == plain.texts + tasks.texts
    scary = builtin_with_tasks("scary_harmless", "val", seed=3)
    assert scary.texts == builtin_prompts("scary_harmless", "val", seed=3).texts + builtin_prompts(
        "scary_harmless_tasks", "val", seed=3).texts
    with pytest.raises(PromptError, match="no task twin"):
        builtin_with_tasks("harmful_tasks")
