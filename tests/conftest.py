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


def count_hooks(lm) -> int:
    """Forward and backward hooks registered on the modules of ``lm.model``."""
    return sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) + len(m._backward_pre_hooks)
        for m in lm.model.modules()
    )


@pytest.fixture(scope="session")
def hook_count():
    """``hook_count(lm)``: the hooks on lm's modules; every context manager must leave it unchanged."""
    return count_hooks
