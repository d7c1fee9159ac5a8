"""Component grammar (sites.parse_components) and the gradient masks it turns into, on tiny random models."""

from __future__ import annotations

import pytest
import torch

from safetyscope.methods.finetune.components import (
    ComponentError,
    random_like,
    random_neurons,
    select,
    select_all,
    trainable,
)
from safetyscope.sites import Component, Site, SiteError, parse_components
from safetyscope.testing import tiny_model


def test_grammar_forms_and_order():
    got = parse_components("blocks.1.mlp, blocks.0-1.attn.heads[3,1], blocks.2.mlp.neurons[5,9-11],L2.N7,"
                           "blocks.-1.attn, blocks.0.mlp.neurons[set]", n_layers=3)
    assert [c.name for c in got] == [
        "blocks.1.mlp.out", "blocks.0.attn.heads[3,1]", "blocks.1.attn.heads[3,1]", "blocks.2.mlp.neurons[5,9,10,11]",
        "blocks.2.mlp.neurons[7]", "blocks.2.attn.out", "blocks.0.mlp.neurons[set]"]
    assert got[-1].from_set and got[-1].index is None
    assert parse_components(["blocks.0.attn.heads"], 2) == [Component(Site("attn.heads", 0))]


@pytest.mark.parametrize("bad", ["blocks.0.resid_post", "blocks.0.mlp[3]", "blocks.0.attn.heads[]", "blocks.0.attn.heads[x]",
                                 "blocks.9.mlp", "blocks.0.attn.heads[set]", "mlp", "blocks.0.attn.heads[5-2]"])
def test_grammar_errors_are_one_line(bad):
    with pytest.raises(SiteError) as e:
        parse_components(bad, n_layers=3)
    assert "\n" not in str(e.value)


def _changed_rows(mask: torch.Tensor, dim: int) -> list[int]:
    other = 1 - dim
    return sorted(int(i) for i in torch.nonzero(mask.any(dim=other)).flatten())


def test_head_masks_touch_exactly_their_rows_and_columns_under_gqa():
    lm = tiny_model("qwen2")  # 4 heads, 2 kv heads, d_head 8, q/k/v biases
    sel = select(lm, "blocks.1.attn.heads[1,2]")
    m = sel.masks
    pre = "model.layers.1.self_attn."
    assert _changed_rows(m[pre + "q_proj.weight"], 0) == list(range(8, 24))
    assert bool(m[pre + "q_proj.weight"][8:24].all())
    # heads 1 and 2 belong to kv groups 0 and 1 (2 query heads per kv head): both kv heads
    assert _changed_rows(m[pre + "k_proj.weight"], 0) == list(range(16))
    assert _changed_rows(m[pre + "q_proj.bias"][:, None], 0) == list(range(8, 24))
    assert _changed_rows(m[pre + "o_proj.weight"], 1) == list(range(8, 24))
    assert bool(m[pre + "o_proj.weight"][:, 8:24].all()) and not bool(m[pre + "o_proj.weight"][:, :8].any())
    assert sel.n_trainable == 16 * 32 + 16 + 2 * (16 * 32 + 16) + 32 * 16
    only_q = select(lm, "blocks.1.attn.heads[0]", kv=False)
    assert set(only_q.masks) == {pre + "q_proj.weight", pre + "q_proj.bias", pre + "o_proj.weight"}
    one_kv = select(lm, "blocks.1.attn.heads[0,1]")  # one group: kv head 0 only
    assert _changed_rows(one_kv.masks[pre + "v_proj.weight"], 0) == list(range(8))


def test_neuron_masks_gated_fused_and_conv1d():
    lm = tiny_model("llama")
    m = select(lm, "blocks.2.mlp.neurons[3,40]").masks
    pre = "model.layers.2.mlp."
    assert _changed_rows(m[pre + "gate_proj.weight"], 0) == [3, 40] == _changed_rows(m[pre + "up_proj.weight"], 0)
    assert _changed_rows(m[pre + "down_proj.weight"], 1) == [3, 40]
    fused = select(tiny_model("phi3"), "blocks.0.mlp.neurons[3]").masks
    assert _changed_rows(fused["model.layers.0.mlp.gate_up_proj.weight"], 0) == [3, 64 + 3]
    gpt = select(tiny_model("gpt2"), "blocks.0.mlp.neurons[5]").masks  # Conv1D: [in, out]
    assert _changed_rows(gpt["transformer.h.0.mlp.c_fc.weight"], 1) == [5]
    assert bool(gpt["transformer.h.0.mlp.c_fc.bias"][5]) and int(gpt["transformer.h.0.mlp.c_fc.bias"].sum()) == 1
    assert _changed_rows(gpt["transformer.h.0.mlp.c_proj.weight"], 0) == [5]


def test_whole_modules_counts_and_neuron_sets():
    from safetyscope.methods.neurons.artifact import NeuronSet

    lm = tiny_model("llama")
    sel = select(lm, "blocks.0.mlp, blocks.0.mlp.neurons[1]")  # the whole module wins
    assert all(v is None for v in sel.masks.values())
    assert sel.n_trainable == 3 * 32 * 64
    assert select_all(lm).n_trainable == sum(p.numel() for p in lm.model.parameters()) == sel.n_total
    ns = NeuronSet([(1, 4), (2, 7), (1, 9)])
    s2 = select(lm, "blocks.1-2.mlp.neurons[set]", neuron_set=ns)
    assert _changed_rows(s2.masks["model.layers.1.mlp.up_proj.weight"], 0) == [4, 9]
    with pytest.raises(ComponentError):
        select(lm, "blocks.1.mlp.neurons[set]")
    with pytest.raises(ComponentError):
        select(lm, "blocks.1.attn.heads[4]")
    with pytest.raises(ComponentError):
        select(tiny_model("gpt_neox"), "blocks.1.attn.heads[0]")  # the table has no per-head layout


def test_random_neurons_match_the_count_and_are_seeded():
    lm = tiny_model("llama")
    target = select(lm, "blocks.1.attn.heads[0]", kv=False).n_trainable  # 8*32 + 32*8 = 512
    a, b = random_neurons(lm, target, seed=3), random_neurons(lm, target, seed=3)
    assert a == b and a != random_neurons(lm, target, seed=4)
    got = select(lm, a).n_trainable
    assert abs(got - target) <= 96 // 2  # one neuron owns 3 * 32 parameters


def test_trainable_masks_gradients_and_restores_flags(hook_count):
    lm = tiny_model("llama")
    sel = select(lm, "blocks.1.mlp.neurons[2]")
    n_hooks = hook_count(lm)
    with trainable(lm.model, sel) as params:
        assert sum(p.requires_grad for p in lm.model.parameters()) == len(params) == 3
        ids = torch.tensor([[5, 6, 7, 8]])
        with torch.enable_grad():
            lm.model(input_ids=ids).logits.sum().backward()
        g = dict(lm.model.named_parameters())["model.layers.1.mlp.down_proj.weight"].grad
        assert g is not None and bool((g[:, 2] != 0).any())
        assert not bool(g[:, :2].any()) and not bool(g[:, 3:].any())
    assert not any(p.requires_grad for p in lm.model.parameters())
    assert hook_count(lm) == n_hooks


def _entries(sel):
    """(parameter name, flat index) of every trainable entry."""
    out = set()
    for name, mask in sel.masks.items():
        flat = torch.ones(sel.sizes[name], dtype=torch.bool) if mask is None else mask.flatten()
        out.update((name, int(i)) for i in torch.nonzero(flat).flatten())
    return out


def test_random_like_matches_kinds_and_count_exactly_and_is_disjoint():
    from safetyscope.methods.neurons.artifact import NeuronSet

    lm = tiny_model("qwen2")  # 3 blocks, 4 heads in 2 kv groups, d_mlp 64
    spec = "blocks.1.attn.heads[0,1], blocks.2.mlp, blocks.0.mlp.neurons[3,5,9], blocks.0.mlp.neurons[set]"
    ns = NeuronSet([(0, 4), (0, 60), (2, 7)])
    sel = select(lm, spec, neuron_set=ns)
    rnd = random_like(lm, spec, neuron_set=ns, seed=5)
    assert rnd == random_like(lm, spec, neuron_set=ns, seed=5) and rnd != random_like(lm, spec, neuron_set=ns, seed=6)
    kinds = [c.site.kind for c in rnd]
    assert sorted(kinds) == sorted(["attn.heads", "mlp.out", "mlp.neurons", "mlp.neurons"])
    heads = next(c for c in rnd if c.site.kind == "attn.heads")
    assert heads.site.layer != 1 and len(heads.index) == 2
    assert len({h // 2 for h in heads.index}) == 1  # two heads of one kv group, as heads 0 and 1 are
    assert next(c for c in rnd if c.site.kind == "mlp.out").site.layer == 1  # not 2 (selected), not 0 (its neurons)
    r_sel = select(lm, rnd)
    assert r_sel.n_trainable == sel.n_trainable
    assert not _entries(r_sel) & _entries(sel)
    assert sorted((c.site.layer, len(c.index)) for c in rnd if c.site.kind == "mlp.neurons") == [(0, 2), (0, 3)]
