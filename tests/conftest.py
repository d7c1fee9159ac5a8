from __future__ import annotations

import copy
import importlib.util
import os
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

import numpy as np
import pytest
import torch

if TYPE_CHECKING:
    from safetyscope.models.adapter import LoadedModel

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


def check_png(path, min_width: int = 200, min_height: int = 150) -> np.ndarray:
    """Assert ``path`` is a real plot: a PNG that decodes, of at least this size, with drawn content."""
    from matplotlib.image import imread

    img = imread(path)  # [height, width, channels], floats in [0, 1]
    assert img.ndim == 3 and img.shape[2] in (3, 4), f"{path}: not an RGB(A) image, shape {img.shape}"
    assert img.shape[1] >= min_width and img.shape[0] >= min_height, f"{path}: only {img.shape[1]}x{img.shape[0]} px"
    rgb = img[..., :3].reshape(-1, 3)
    assert len(np.unique(rgb, axis=0)) > 10, f"{path}: (nearly) one flat colour"
    background = np.median(rgb, axis=0)
    drawn = np.abs(rgb - background).max(axis=1) > 0.1
    assert drawn.mean() > 0.005, f"{path}: almost nothing drawn ({drawn.mean():.2%} of the pixels)"
    return img


@pytest.fixture(scope="session")
def png():
    """``png(path)``: assert a written plot decodes, has a plot's size and is not blank; returns the pixels."""
    return check_png


def load_benchmark(name: str) -> ModuleType:
    """``benchmarks/{name}.py`` imported as a module (the benchmarks are scripts, not a package)."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="session")
def bench_module():
    """``bench_module("capture")``: a benchmark script imported as a module, for smoke tests of ``main``."""
    return load_benchmark


@pytest.fixture(autouse=True)
def _grad_mode_is_left_as_found():
    """A test (or the code it runs) that leaves autograd switched off globally breaks every later test."""
    before = torch.is_grad_enabled()
    yield
    leaked = torch.is_grad_enabled() != before
    torch.set_grad_enabled(before)
    assert not leaked, "autograd mode changed by this test and not restored"


def _saved_tiny(tmp_path_factory, family: str):
    from safetyscope.testing import tiny_model

    path = tmp_path_factory.mktemp(f"tiny-{family}")
    lm = tiny_model(family)
    lm.model.save_pretrained(path)
    lm.tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A tiny random Llama (3 blocks) saved as a local Hugging Face directory (one per test module)."""
    return _saved_tiny(tmp_path_factory, "llama")


@pytest.fixture(scope="module")
def tiny_qwen2_dir(tmp_path_factory):
    """A tiny random Qwen2 (it has a chat template with a system prompt) saved as a local directory."""
    return _saved_tiny(tmp_path_factory, "qwen2")


@pytest.fixture
def monitor_cli():
    """``monitor_cli("fit", MODEL, ...)``: ``safetyscope monitor ... --quiet`` in a subprocess."""
    import subprocess
    import sys

    def run(*args):
        return subprocess.run([sys.executable, "-m", "safetyscope", "monitor", *args, "--quiet"], capture_output=True,
                              text=True, timeout=600)

    return run


def _plant_readers(lm: LoadedModel, r: torch.Tensor, n_rows: int = 8, cos: float = 0.9) -> LoadedModel:
    """A copy of ``lm`` whose later blocks have ``n_rows`` gate rows each pointing along ``r`` (|cos| ~ ``cos``)."""
    model = copy.deepcopy(lm.model)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for block in model.model.layers[len(model.model.layers) // 2:]:
            w = block.mlp.gate_proj.weight  # [d_mlp, d_model]
            noise = torch.randn(n_rows, w.shape[1], generator=g)
            noise -= (noise @ r)[:, None] * r  # orthogonal to r
            rows = cos * r + (1 - cos**2) ** 0.5 * noise / noise.norm(dim=1, keepdim=True)
            w[:n_rows] = rows * w[:n_rows].norm(dim=1, keepdim=True)
    from safetyscope.models.adapter import LoadedModel

    return LoadedModel(model, lm.tokenizer, lm.table, lm.dims, lm.name + "+readers", dict(lm.meta))


@pytest.fixture
def plant_readers():
    """``plant_readers(lm, r)``: a copy of a tiny llama model whose later blocks read the direction ``r``
    (the audit's reader test; a tiny random model reads no direction more than any other)."""
    return _plant_readers
