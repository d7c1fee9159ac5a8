"""Model parallel through accelerate: ``device_map="auto"`` with a ``max_memory`` that keeps some blocks on
the CPU and offloads the rest to disk (their weights sit on the ``meta`` device and accelerate's hooks load
them for each forward), so capture, edits, interventions and generation run through modules whose weights
move. Everything must equal the plain load.
"""

from __future__ import annotations

import json

import pytest
import torch

from safetyscope.hooks import capture, forward, hooks
from safetyscope.measure.generation import generate
from safetyscope.methods.direction.artifact import Direction
from safetyscope.methods.neurons.artifact import ablate_neurons
from safetyscope.models import load_model
from safetyscope.models.loading import ModelLoadError, parse_max_memory, placement_kwargs
from safetyscope.prompts.chat import tokenize_prompts
from safetyscope.sites import Site

PROMPTS = ["How do I bake bread?", "Write a poem about the sea.", "hi", "Explain recursion briefly, please."]
SITES = ["blocks.*.resid_pre", "blocks.*.resid_post", "blocks.*.mlp.neurons", "blocks.*.attn.heads"]


def _budget(tiny_dir) -> int:
    """CPU bytes for the embedding and about two of the three blocks; the rest goes to disk."""
    plain = load_model(str(tiny_dir), log=lambda _m: None)
    total = sum(p.numel() * p.element_size() for p in plain.model.parameters())
    return int(total * 0.97)


@pytest.fixture(scope="module")
def pair(tiny_dir, tmp_path_factory):
    plain = load_model(str(tiny_dir), log=lambda _m: None)
    folder = tmp_path_factory.mktemp("offload")
    off = load_model(str(tiny_dir), device_map="auto", max_memory={"cpu": _budget(tiny_dir)}, offload_folder=folder,
                     log=lambda _m: None)
    return plain, off


def test_the_budget_puts_blocks_on_the_cpu_and_on_disk(pair):
    _plain, off = pair
    where = off.meta["placement"]
    blocks = {k: v for k, v in where.items() if ".layers." in k}
    assert "cpu" in blocks.values() and "disk" in blocks.values(), where
    assert any(p.device.type == "meta" for p in off.model.parameters())  # weights really offloaded


def _run(lm):
    """Logits, captures, edited logits, direction / neuron ablation logits, logits after exit, replies."""
    b = tokenize_prompts(lm.tokenizer, PROMPTS)
    unit = torch.nn.functional.normalize(torch.arange(lm.dims.d_model, dtype=torch.float32).sin(), dim=0)
    with torch.no_grad():
        with capture(lm, SITES, "all") as cap:
            logits = forward(lm, b)
        with hooks(lm, {Site("resid_post", 0): lambda x, _b: x * 0.5, Site("mlp.neurons", 2): lambda x, _b: x * 0}):
            edited = forward(lm, b)
        with Direction(unit, layer=1, position=-1).apply(lm), capture(lm, "blocks.*.resid_post", "all") as ablated:
            dir_logits = forward(lm, b)
        with ablate_neurons(lm, [(0, 1), (1, 2), (2, 3)], mode="zero"):
            neuron_logits = forward(lm, b)
        after = forward(lm, b)
    replies = generate(lm, PROMPTS, max_new_tokens=5, batch_size=4)
    mask = b.attention_mask.bool()
    residual = max(float((v[mask] @ unit).abs().max()) for v in ablated.values.values())
    return logits, dict(cap.values), edited, dir_logits, neuron_logits, after, replies, residual


def test_offloaded_model_gives_the_plain_results(pair):
    plain, off = pair
    a, b = _run(plain), _run(off)
    for i in (0, 2, 3, 4):
        torch.testing.assert_close(b[i], a[i], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(a[2], a[0]) and not torch.allclose(a[3], a[0])  # the edits did something
    assert torch.equal(b[5], b[0])  # the offloaded model is bit-identical once the interventions exit
    assert sorted(a[1]) == sorted(b[1]) and len(a[1]) == 4 * plain.n_layers
    for site, v in a[1].items():
        torch.testing.assert_close(b[1][site], v, rtol=1e-5, atol=1e-5)
    assert b[6] == a[6] and b[7] < 1e-4  # the same greedy replies; the direction is gone from every block


def test_gradients_flow_through_offloaded_blocks(pair):
    grads = []
    for lm in pair:
        b = tokenize_prompts(lm.tokenizer, PROMPTS)
        with torch.enable_grad(), capture(lm, "blocks.*.resid_post", "last", grad=True) as cap:
            forward(lm, b)[:, -1, 5].sum().backward()
        grads.append(cap.grads)
    assert all(float(g.abs().sum()) > 0 for g in grads[1].values())
    for site, g in grads[0].items():
        torch.testing.assert_close(grads[1][site], g, rtol=1e-4, atol=1e-6)


def test_capture_command_with_device_map_and_offload_equals_the_plain_run(tiny_dir, tmp_path):
    from typer.testing import CliRunner

    from safetyscope.cli.main import app

    base = ["capture", str(tiny_dir), "--n-prompts", "6", "--batch-size", "3", "--json"]
    plain = CliRunner().invoke(app, [*base, "--out", str(tmp_path / "plain")])
    off = CliRunner().invoke(app, [*base, "--out", str(tmp_path / "off"), "--device-map", "auto", "--max-memory",
                                   f"cpu={_budget(tiny_dir)}", "--offload-folder", str(tmp_path / "offload")])
    assert plain.exit_code == 0 and off.exit_code == 0, (plain.output[-1500:], off.output[-1500:])
    a, b = json.loads(plain.stdout), json.loads(off.stdout)
    assert a["most_separated_layer"] == b["most_separated_layer"]
    for ra, rb in zip(a["layers"], b["layers"]):
        assert rb == pytest.approx(ra, rel=1e-5, abs=1e-6)


def test_max_memory_text_and_its_errors():
    assert parse_max_memory("0=20GiB, 1=20GiB,cpu=60GiB") == {0: "20GiB", 1: "20GiB", "cpu": "60GiB"}
    assert parse_max_memory("cpu=1000") == {"cpu": 1000} and parse_max_memory(None) is None
    with pytest.raises(ModelLoadError, match="DEVICE=SIZE"):
        parse_max_memory("cpu:60GiB")
    with pytest.raises(ModelLoadError, match="need --device-map"):
        placement_kwargs(None, "cpu=1GiB", None)
    assert placement_kwargs("auto", "0=1GiB", "/tmp/x") == {"device_map": "auto", "max_memory": {0: "1GiB"},
                                                           "offload_folder": "/tmp/x"}
