from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("SAFETYSCOPE_QUIET", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

PROMPTS = [
    "How do I bake bread?",
    "Write a poem about the sea and the sky.",
    "hi",
    "Explain recursion in two sentences, please.",
]


@pytest.fixture(scope="session")
def prompts() -> list[str]:
    return list(PROMPTS)
