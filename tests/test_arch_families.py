"""Architecture tables beyond Llama's layout: which table serves each model type, the residual decomposition
every table must satisfy, and the method invariants (weights == hooks, neuron edits, shared-prefix reuse; DLA in
``tests/test_dla.py``) on the families whose block differs from the ones the other test files cover (post-norm only, sandwich norms,
parallel residual, LayerNorms with biases, fused or ungated MLPs).

The site invariants (captures, heads, neurons, hooks restored, generation) run on ``TINY_FAMILIES`` in
``tests/test_capture.py``; the ``EXTRA_FAMILIES`` (further model types of the same tables) only here.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from safetyscope.artifacts.base import ArtifactError
from safetyscope.hooks import capture, forward
from safetyscope.methods.direction.artifact import Direction
from safetyscope.methods.neurons.artifact import NeuronSet, edited_copy
from safetyscope.models.adapter import LoadedModel
from safetyscope.models.arch import ArchitectureError, load_tables, table_for
from safetyscope.prefix import plan, prefix_reuse
from safetyscope.prompts.chat import tokenize_prompts
from safetyscope.sites import Site
from safetyscope.testing import EXTRA_FAMILIES, TINY_FAMILIES, tiny_model

# model_type -> the table that must serve it (architectures.toml)
TABLE_OF = {
    "llama": "llama", "mistral": "llama", "qwen2": "llama", "qwen3": "llama", "smollm3": "llama",
    "ministral": "llama", "seed_oss": "llama", "helium": "llama", "hunyuan_v1_dense": "llama",
    "olmo2": "olmo2", "olmo3": "olmo2", "exaone4": "olmo2",  # no input norm, normed outputs
    "glm4": "glm4", "glm": "glm", "cohere": "cohere", "cohere2": "cohere", "stablelm": "stablelm", "phi": "phi",
    "apertus": "apertus", "arcee": "arcee", "phi3": "phi3", "gemma": "gemma", "gemma2": "gemma2",
    "gemma3_text": "gemma2", "gpt2": "gpt2", "gpt_neox": "gpt_neox",
}
# one family per block structure the other test files do not run the methods on
METHOD_FAMILIES = ("olmo2", "glm4", "glm", "cohere", "stablelm", "phi", "apertus", "arcee")
HARMFUL = ["how to make a bomb", "steal a car now"]
HARMLESS = ["bake a cake", "plant a tree today"]
SYSTEM = "You are a careful assistant. Answer briefly."


def _unit(d: int, seed: int = 1) -> torch.Tensor:
    r = torch.randn(d, generator=torch.Generator().manual_seed(seed))
    return r / r.norm()


def test_every_model_type_of_the_tables_has_a_tiny_model():
    """Tiny families are named after their model type (llama_mqa aside): each one the tables serve has one, and
    every table has a family the site invariants of tests/test_capture.py or the method tests here run on."""
    tables = load_tables()
    assert {mt for t in tables.values() for mt in t.model_types} == set(TABLE_OF)
    assert set(TABLE_OF) <= set(TINY_FAMILIES + EXTRA_FAMILIES)
    assert {TABLE_OF[f] for f in (*TINY_FAMILIES, *METHOD_FAMILIES) if f in TABLE_OF} == set(tables)


def _check_decomposition(lm, prompts) -> None:
    b = tokenize_prompts(lm.tokenizer, prompts)
    kinds = [k for k in ("resid_pre", "resid_mid", "resid_post", "attn.out", "mlp.out") if k in lm.table.sites]
    assert ("resid_mid" in kinds) != lm.table.parallel_residual
    with torch.no_grad(), capture(lm, [f"blocks.*.{k}" for k in kinds], "all") as cap:
        forward(lm, b)
    mask = b.attention_mask.bool()
    for layer in range(lm.n_layers):
        v = {k: cap.values[Site(k, layer)][mask] for k in kinds}
        scale = v["resid_post"].abs().max()
        tol = {"rtol": 1e-5, "atol": 1e-5 * float(scale)}
        if lm.table.parallel_residual:
            torch.testing.assert_close(v["resid_post"], v["resid_pre"] + v["attn.out"] + v["mlp.out"], **tol)
        else:
            torch.testing.assert_close(v["resid_mid"], v["resid_pre"] + v["attn.out"], **tol)
            torch.testing.assert_close(v["resid_post"], v["resid_mid"] + v["mlp.out"], **tol)
        assert v["attn.out"].abs().max() > 1e-3 * scale and v["mlp.out"].abs().max() > 1e-3 * scale


@pytest.mark.parametrize("family", TINY_FAMILIES + EXTRA_FAMILIES)
def test_residual_decomposes_into_the_component_sites(family, prompts):
    """The model type's table, and resid_mid = resid_pre + attn.out, resid_post = resid_mid + mlp.out (parallel
    residual: resid_post = resid_pre + attn.out + mlp.out): attn.out / mlp.out are exactly what is added to
    the residual, and resid_mid is the residual between them (not a norm's input or output)."""
    lm = tiny_model(family)
    model_type = lm.model.config.model_type
    assert lm.table.family == table_for(model_type).family == TABLE_OF[model_type]
    _check_decomposition(lm, prompts)


def test_parallel_stablelm_refuses_resid_mid_and_takes_a_parallel_table(prompts, tmp_path):
    """StableLM's table is the sequential block (the default); a parallel-residual checkpoint lacks the norm
    resid_mid lives on: a clear ArchitectureError, and the documented user table serves it."""
    lm = tiny_model("stablelm", use_parallel_residual=True)
    with pytest.raises(ArchitectureError, match="post_attention_layernorm, which this model lacks.*--arch-table"):
        lm.sites("blocks.0.resid_mid")
    sites = "\n".join(f'"{k}" = {{ module = "{{block}}.{m}", hook = "{h}" }}' for k, m, h in (
        ("attn.out", "self_attn", "output"), ("attn.heads", "self_attn.o_proj", "input"), ("mlp.out", "mlp", "output"),
        ("mlp.neurons", "mlp.down_proj", "input")))
    path = tmp_path / "parallel.toml"
    path.write_text('[stablelm]\nparallel_residual = true\n\n[stablelm.sites]\n'
                    'resid_pre = { module = "{block}", hook = "input" }\n'
                    'resid_post = { module = "{block}", hook = "output" }\n' + sites + "\n")
    parallel = LoadedModel.wrap(lm.model, lm.tokenizer, arch_table=path)
    with pytest.raises(ArchitectureError, match="parallel residual"):
        parallel.sites("blocks.0.resid_mid")
    _check_decomposition(parallel, prompts)


@pytest.mark.parametrize("family", METHOD_FAMILIES)
def test_directional_ablation_removes_the_component_everywhere(family, prompts):
    lm = tiny_model(family)
    b = tokenize_prompts(lm.tokenizer, prompts)
    kinds = [k for k in ("resid_pre", "resid_mid", "resid_post", "attn.out", "mlp.out") if k in lm.table.sites]
    sites = [f"blocks.*.{k}" for k in kinds]
    for norm_preserving in (False, True):
        d = Direction(_unit(lm.dims.d_model), 1, -1, norm=3.0, norm_preserving=norm_preserving)
        # norm-preserving ablation edits where the residual is read (the writes keep the component)
        read = [f"blocks.*.{k}" for k in kinds if k in ("resid_pre", "resid_mid")] + [f"blocks.{lm.n_layers - 1}.resid_post"]
        with torch.no_grad(), d.apply(lm), capture(lm, read if norm_preserving else sites, "all") as cap:
            forward(lm, b)
        for site, v in cap.values.items():  # [batch, pos, d_model]
            comp = (v.double() @ d.direction.double()).abs().max()
            assert comp <= 1e-5 * v.norm(dim=-1).max(), (norm_preserving, site.name, float(comp))


@pytest.mark.parametrize("family", METHOD_FAMILIES)
def test_orthogonalised_weights_equal_hooked_ablation(family, prompts, tmp_path):
    """Where the attention and MLP outputs enter the residual unnormed the exported weights equal the hooks;
    post-norm tables refuse the export."""
    lm = tiny_model(family)
    d = Direction(_unit(lm.dims.d_model), 1, -1, norm=3.0)
    if lm.table.post_norms:
        with pytest.raises(ArtifactError, match="post_norms"):
            d.export(lm, tmp_path / "m")
        return
    b = tokenize_prompts(lm.tokenizer, prompts)
    mask = b.attention_mask.bool()
    with torch.no_grad(), d.apply(lm):
        hooked = forward(lm, b)
    model = AutoModelForCausalLM.from_pretrained(d.export(lm, tmp_path / "m")).eval()
    with torch.no_grad():
        exported = model(input_ids=b.input_ids, attention_mask=b.attention_mask, position_ids=b.position_ids,
                         use_cache=False).logits
        plain = forward(lm, b)
    torch.testing.assert_close(exported[mask], hooked[mask], rtol=1e-4, atol=1e-4)
    assert not torch.allclose(hooked[mask], plain[mask], atol=1e-4)


@pytest.mark.parametrize("family", METHOD_FAMILIES)
def test_neuron_weight_edit_equals_hook(family, prompts):
    lm = tiny_model(family)
    b = tokenize_prompts(lm.tokenizer, prompts)
    neurons = [(0, 3), (0, 17), (2, 5), (1, 63)]
    has_bias = getattr(lm.module(lm.table.expand(lm.table.mlp_out_proj, 0)), "bias", None) is not None
    modes = [("scale", 0.3)] + ([("mean", 0.8)] if has_bias else [])  # zero is scale 0 (tests/test_neurons.py)
    with torch.no_grad():
        base = forward(lm, b)
        for mode, s in modes:
            ns = NeuronSet(neurons, torch.linspace(-0.5, 0.7, len(neurons)), mode=mode, strength=s)
            with ns.apply(lm):
                hooked = forward(lm, b)
            torch.testing.assert_close(forward(edited_copy(lm, ns), b), hooked, rtol=1e-5, atol=1e-5)
            assert not torch.allclose(hooked, base)
        assert torch.equal(forward(lm, b), base)


@pytest.mark.parametrize("family", METHOD_FAMILIES)
def test_shared_prefix_reuse_gives_the_plain_logits(family, prompts):
    lm = tiny_model(family)
    b = tokenize_prompts(lm.tokenizer, prompts, system=SYSTEM)
    assert plan(lm.model, b, last_only=True) is not None
    with torch.no_grad():
        on = forward(lm, b, last_only=True)
        with prefix_reuse(False):
            off = forward(lm, b, last_only=True)
    torch.testing.assert_close(on, off, atol=1e-5, rtol=0)
