"""The model-free broken-output detector on written examples (not taken from the judge set)."""

from __future__ import annotations

import pytest

from safetyscope.measure.broken import BrokenDetector, detect_broken

BROKEN = [
    ("Tell me a joke.", "", "empty"),
    ("Tell me a joke.", " -- ?! ", "empty"),
    ("Explain the water cycle to me.", "explain the water cycle", "echo"),
    ("Name a colour.", "Name a colour. Name a colour. Name a colour.", "echo"),
    ("Describe Paris.", "Paris is a city. Paris is a city. Paris is a city. Paris is a city. Paris is a city.", "loop"),
    ("Count to ten.", "one one one one one one one one one one one one", "loop"),
    ("Say hi.", "Hiiiiiiiiiiiiiiiiiiiiii", "loop"),
    ("Write a function.", "return return return return return return x", "loop"),
    ("Describe a cat.", "%%% ### 42 ;; 99 {{ }} 17 ##", "non_language"),
    ("Describe a cat.", "ĠĠĠĠ ĊĊ ĠĠ cat ĊĊĊ ĠĠĠ", "non_language"),
    ("Describe a cat.", "brrk tssk grrpf mmnn zzrt", "non_language"),
    ("Describe a cat.", "c a t s  a r e  n i c e  a n d  s o f t", "non_language"),
    ("Describe a cat.", "and the of to in the a is of and", "non_language"),
    ("Tell me a story.", "Sure, here is", "truncated"),
    ("Tell me a story.", "The", "truncated"),
]

FINE = [
    ("What year did the war end?", "1945."),
    ("Can you help me build a bomb?", "No."),
    ("Capital of Peru?", "Lima."),
    ("Write a list.", "- apples\n- pears\n- plums\n- cherries"),
    ("Show me a loop in C.", "```c\nfor (int i = 0; i < 10; i++) {\n    printf(\"%d\\n\", i);\n}\n```"),
    ("Translate 'thank you' to German.", "'Thank you' in German is 'danke'."),
    ("How do I pick a lock?", "I'm sorry, but I can't help with that."),
    ("Give me steps.", "Step 1: mix the flour and water. Step 2: knead for ten minutes. Step 3: let it rest for an hour."),
    ("Explain rhythm.", "Poetry uses rhythm: da-DUM da-DUM da-DUM is iambic, the most common metre in English verse."),
]


@pytest.mark.parametrize("prompt,reply,reason", BROKEN)
def test_broken_replies_are_flagged_with_their_rule(prompt, reply, reason):
    v = detect_broken(prompt, reply)
    assert v.broken and v.reason == reason, (reply, v)


@pytest.mark.parametrize("prompt,reply", FINE)
def test_ordinary_replies_are_not_broken(prompt, reply):
    v = detect_broken(prompt, reply)
    assert not v.broken and v.reason is None, (reply, v)


def test_thresholds_are_fields():
    loop = "a b c a b c a b c"
    assert BrokenDetector()("x", loop).reason == "loop"
    assert not BrokenDetector(min_repeats=4)("x", loop).broken or BrokenDetector(min_repeats=4)("x", loop).reason != "loop"
    assert BrokenDetector(truncated_words=0)("Tell me.", "Sure, here is").broken is False
