"""Foundation invariants on tiny random models of every family in the tables."""

from __future__ import annotations

import pytest
import torch

from safetyscope.hooks import capture, forward, hooks
from safetyscope.models.arch import ArchitectureError
from safetyscope.positions import Batch
from safetyscope.prompts.chat import tokenize_prompts
from safetyscope.runner import run_capture
from safetyscope.sites import Site
from safetyscope.testing import TINY_FAMILIES, tiny_model


@pytest.fixture(scope="module", params=TINY_FAMILIES)
def lm(request):
    return tiny_model(request.param)


def _batch(lm, prompts):
    return tokenize_prompts(lm.tokenizer, prompts)


def test_resid_post_equals_hidden_states(lm, prompts):
    b = _batch(lm, prompts)
    with torch.no_grad(), capture(lm, "blocks.*.resid_post", "all") as cap:
        forward(lm, b)
    with torch.no_grad():
        hs = lm.model(
            input_ids=b.input_ids, attention_mask=b.attention_mask, position_ids=b.position_ids,
            output_hidden_states=True, use_cache=False,
        ).hidden_states
    mask = b.attention_mask.bool()
    # hidden_states[i] is the input of block i; the last entry is after the final norm.
    for layer in range(lm.n_layers - 1):
        got = cap.values[Site("resid_post", layer)]
        torch.testing.assert_close(got[mask], hs[layer + 1][mask], rtol=1e-5, atol=1e-5)


def test_resid_pre_is_previous_resid_post(lm, prompts):
    b = _batch(lm, prompts)
    with torch.no_grad(), capture(lm, ["blocks.*.resid_pre", "blocks.*.resid_post"], "last") as cap:
        forward(lm, b)
    for layer in range(1, lm.n_layers):
        torch.testing.assert_close(cap.values[Site("resid_pre", layer)], cap.values[Site("resid_post", layer - 1)])


def test_mlp_neurons_match_recomputation(lm, prompts):
    """The neurons are the input of the down projection: recompute it from the module's weights."""
    b = _batch(lm, prompts)
    seen = {}
    mlp_out = lm.module(lm.table.mlp_out_proj.replace("{block}", lm.table.block_path(1)))
    h = mlp_out.register_forward_hook(lambda m, a, o: seen.__setitem__("out", o))
    try:
        with torch.no_grad(), capture(lm, "blocks.1.mlp.neurons", "all") as cap:
            forward(lm, b)
    finally:
        h.remove()
    neurons = cap.values[Site("mlp.neurons", 1)]  # [batch, pos, d_mlp]
    assert neurons.shape[-1] == lm.dims.d_mlp
    w = mlp_out.weight
    recomputed = neurons @ (w if lm.table.conv1d else w.T)
    if getattr(mlp_out, "bias", None) is not None:
        recomputed = recomputed + mlp_out.bias
    torch.testing.assert_close(recomputed, seen["out"], rtol=1e-5, atol=1e-5)


def _mlp_recipe(lm):
    """The MLP module and a recomputation of its neurons from its input, written per family from the
    weights and the config's activation, independently of the architecture tables."""
    import torch.nn.functional as F
    from transformers.activations import ACT2FN

    cfg = lm.model.config
    block = lm.module(lm.table.block_path(1))
    mlp = block.mlp
    act_name = next(
        getattr(cfg, k) for k in ("hidden_activation", "hidden_act", "activation_function") if getattr(cfg, k, None)
    )
    act = ACT2FN[act_name]

    def linear(mod, x):  # nn.Linear stores [out, in]
        return F.linear(x, mod.weight, mod.bias)

    if cfg.model_type == "gpt2":  # Conv1D stores [in, out]
        return mlp, lambda x: act(x @ mlp.c_fc.weight + mlp.c_fc.bias)
    if cfg.model_type == "gpt_neox":
        return mlp, lambda x: act(linear(mlp.dense_h_to_4h, x))
    if cfg.model_type in ("phi3", "glm4"):  # fused [gate; up]
        def phi3(x):
            gate, up = linear(mlp.gate_up_proj, x).chunk(2, dim=-1)
            return act(gate) * up
        return mlp, phi3
    if cfg.model_type == "phi":  # ungated fc1 -> fc2
        return mlp, lambda x: act(linear(mlp.fc1, x))
    return mlp, lambda x: act(linear(mlp.gate_proj, x)) * linear(mlp.up_proj, x)


def test_mlp_neurons_equal_recomputation_from_mlp_input(lm, prompts):
    """Neurons recomputed from the MLP's own input and weights: act(gate(x)) * up(x) for gated families,
    act(c_fc(x)) for GPT-2, act(dense_h_to_4h(x)) for GPT-NeoX."""
    b = _batch(lm, prompts)
    mlp, recompute = _mlp_recipe(lm)
    seen = {}
    h = mlp.register_forward_pre_hook(lambda m, args: seen.__setitem__("x", args[0].detach().clone()))
    try:
        with torch.no_grad(), capture(lm, "blocks.1.mlp.neurons", "all") as cap:
            forward(lm, b)
    finally:
        h.remove()
    neurons = cap.values[Site("mlp.neurons", 1)]
    assert neurons.shape == (*b.input_ids.shape, lm.dims.d_mlp)
    with torch.no_grad():
        expected = recompute(seen["x"])
    mask = b.attention_mask.bool()
    assert expected.shape == neurons.shape
    assert expected[mask].abs().max() > 1e-3  # a non-degenerate comparison
    torch.testing.assert_close(neurons[mask], expected[mask], rtol=1e-5, atol=1e-5)


def test_heads_recombine_to_attention_output(lm, prompts):
    b = _batch(lm, prompts)
    proj = lm.module(lm.table.attn_out_proj.replace("{block}", lm.table.block_path(0)))
    seen = {}
    h = proj.register_forward_hook(lambda m, a, o: seen.__setitem__("o", o))
    try:
        with torch.no_grad(), capture(lm, ["blocks.0.attn.heads", "blocks.0.attn.out"], "all") as cap:
            forward(lm, b)
    finally:
        h.remove()
    heads = cap.values[Site("attn.heads", 0)]  # [batch, pos, n_heads, d_head]
    assert heads.shape[-2:] == (lm.dims.n_heads, lm.dims.d_head)
    w = proj.weight if lm.table.conv1d else proj.weight.T  # [n_heads*d_head, d_model]
    per_head = torch.einsum("bphd,hdm->bphm", heads, w.view(lm.dims.n_heads, lm.dims.d_head, -1))
    total = per_head.sum(2) + (proj.bias if getattr(proj, "bias", None) is not None else 0)
    torch.testing.assert_close(total, seen["o"], rtol=1e-5, atol=1e-5)
    if not lm.table.post_norms:  # with post-norms attn.out is the normed projection
        torch.testing.assert_close(total, cap.values[Site("attn.out", 0)], rtol=1e-5, atol=1e-5)


def test_hooks_removed_restore_logits_bit_identical(lm, prompts, hook_count):
    b = _batch(lm, prompts)
    n_hooks = hook_count(lm)
    with torch.no_grad():
        before = forward(lm, b)
        with capture(lm, ["blocks.*.resid_post", "blocks.*.mlp.neurons", "blocks.*.attn.heads"], "mean"):
            forward(lm, b)
        with hooks(lm, {Site("resid_post", 0): lambda x, _b: x * 0}):
            changed = forward(lm, b)
        after = forward(lm, b)
    assert torch.equal(before, after)
    assert not torch.equal(before, changed)
    assert hook_count(lm) == n_hooks


def test_exception_inside_context_removes_hooks(lm, prompts, hook_count):
    n_hooks = hook_count(lm)
    with pytest.raises(KeyError), capture(lm, "blocks.*.resid_post"):
        raise KeyError("boom")
    with pytest.raises(RuntimeError), hooks(lm, {Site("mlp.neurons", 0): lambda x, _b: x}):
        raise RuntimeError("boom")
    assert hook_count(lm) == n_hooks


@pytest.mark.parametrize("positions", ["last", "post_instruction", "mean"])
def test_batched_equals_unbatched(lm, prompts, positions):
    sites = ["blocks.*.resid_post", "blocks.1.mlp.neurons", "embed"]
    together = {}
    for batch, values in run_capture(lm, prompts, sites, positions, batch_size=4):
        for i, idx in enumerate(batch.index):
            together[idx] = {s: v[i] for s, v in values.items()}
    for idx, p in enumerate(prompts):
        (_, alone), = list(run_capture(lm, [p], sites, positions, batch_size=1))
        for s, v in alone.items():
            torch.testing.assert_close(together[idx][s], v[0], rtol=1e-4, atol=1e-4)


def test_editing_resid_mid_changes_the_residual(lm, prompts):
    """resid_mid is written in place: zeroing it must zero what the MLP adds to (not just its input)."""
    if lm.table.parallel_residual:  # no resid_mid exists: the site must be refused clearly
        with pytest.raises(ArchitectureError, match="parallel residual"):
            lm.sites("blocks.0.resid_mid")
        return
    b = _batch(lm, prompts)
    with torch.no_grad(), capture(lm, ["blocks.0.mlp.out", "blocks.0.resid_post"], "all") as cap, hooks(
        lm, {Site("resid_mid", 0): lambda x, _b: torch.zeros_like(x)}
    ):
        forward(lm, b)
    torch.testing.assert_close(cap.values[Site("resid_post", 0)], cap.values[Site("mlp.out", 0)])


# ---- capture with any forward call (no hooks.forward, so no running Batch) ---------------------------
CALL_SITES = ["blocks.*.resid_post", "blocks.1.mlp.neurons", "blocks.0.attn.heads", "embed"]


def _call(lm, b, **extra):
    return lm.model(input_ids=b.input_ids, attention_mask=b.attention_mask, **extra)


@pytest.mark.parametrize("positions", ["last", "mean", "-1,-2", "all"])
def test_plain_model_call_captures_what_forward_captures(lm, prompts, positions, hook_count):
    b = _batch(lm, prompts)
    assert b.attention_mask[:, 0].eq(0).any()  # the rows really are left padded
    n = hook_count(lm)
    with torch.no_grad():
        with capture(lm, CALL_SITES, positions) as ref:
            forward(lm, b)
        with capture(lm, CALL_SITES, positions) as got:
            _call(lm, b, position_ids=b.position_ids)
    assert set(got.values) == set(ref.values) == set(lm.sites(CALL_SITES))
    for site, v in ref.values.items():
        torch.testing.assert_close(got.values[site], v, rtol=1e-5, atol=1e-5)
    assert hook_count(lm) == n


def test_plain_call_without_position_ids_captures_the_last_token(lm, prompts):
    """Rotary models attend by relative position, so the model's own position ids give the same values."""
    if lm.table.family == "gpt2":  # absolute positions: the padded rows really differ without position_ids
        pytest.skip("absolute position embeddings")
    b = _batch(lm, prompts)
    with torch.no_grad():
        with capture(lm, "blocks.*.resid_post", "last") as ref:
            forward(lm, b)
        with capture(lm, "blocks.*.resid_post", "last") as got:
            _call(lm, b)
    for site, v in ref.values.items():
        torch.testing.assert_close(got.values[site], v, rtol=1e-4, atol=1e-4)


def test_plain_call_leaves_logits_bit_identical_and_no_hooks(lm, prompts, hook_count):
    b = _batch(lm, prompts)
    n = hook_count(lm)
    with torch.no_grad():
        before = _call(lm, b).logits
        with capture(lm, ["blocks.*.resid_post", "blocks.*.attn.heads"], "last") as cap:
            during = _call(lm, b).logits
        after = _call(lm, b).logits
    assert len(cap.values) == lm.n_layers * 2
    assert torch.equal(before, during) and torch.equal(before, after)
    assert hook_count(lm) == n and cap.call_batch is None


def test_generate_under_capture_records_the_last_step(lm, prompts, hook_count):
    b = _batch(lm, prompts)
    n = hook_count(lm)
    with torch.no_grad(), capture(lm, "blocks.*.resid_post", "last") as cap:
        out = lm.model.generate(input_ids=b.input_ids, attention_mask=b.attention_mask, max_new_tokens=2,
                                do_sample=False, pad_token_id=lm.tokenizer.pad_token_id)
    assert hook_count(lm) == n
    # the last step ran on the first generated token (KV cache): the same as a full pass up to it
    ids = out[:, :-1]  # [batch, pos + 1]
    mask = torch.cat([b.attention_mask, torch.ones_like(b.attention_mask[:, :1])], dim=1)
    with torch.no_grad(), capture(lm, "blocks.*.resid_post", "last") as ref:
        forward(lm, Batch(input_ids=ids, attention_mask=mask, n_post=b.n_post))
    for site, v in ref.values.items():
        assert cap.values[site].shape == (len(prompts), 1, lm.dims.d_model)
        torch.testing.assert_close(cap.values[site], v, rtol=1e-4, atol=1e-4)


def test_post_instruction_without_forward_names_the_fix(lm, prompts, hook_count):
    b = _batch(lm, prompts)
    n = hook_count(lm)
    with torch.no_grad(), capture(lm, "blocks.0.resid_post", "post_instruction") as cap:
        with pytest.raises(ValueError, match=r"post_instruction.*safetyscope\.hooks\.forward"):
            _call(lm, b)
        forward(lm, b)  # through forward it works inside the same context
    assert cap.values[Site("resid_post", 0)].shape[1] == b.n_post
    assert hook_count(lm) == n


def test_right_padded_call_is_refused(lm, prompts):
    b = _batch(lm, prompts)
    right = b.attention_mask.flip(-1)  # pads at the end of the short rows
    with torch.no_grad(), capture(lm, "blocks.0.resid_post", "last"):
        with pytest.raises(ValueError, match="left-padded.*padding_side"):
            lm.model(input_ids=b.input_ids, attention_mask=right)
