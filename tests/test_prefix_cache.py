"""Shared-prefix reuse (safetyscope.prefix): the same logits, captures and gradients as the full pass, under
edits of every position and per-row edits; no reuse where it would not be exact."""

from __future__ import annotations

import pytest
import torch

from safetyscope.hooks import capture, forward, hooks
from safetyscope.methods.direction.artifact import Direction, ablation_edits, addition_edit
from safetyscope.methods.direction.scoring import ablated_logits, added_logits
from safetyscope.methods.neurons.artifact import ablate_neurons
from safetyscope.prefix import plan, pointwise, prefix_reuse, shared_prefix_length
from safetyscope.prompts.chat import tokenize_prompts
from safetyscope.sites import Site
from safetyscope.testing import tiny_model

SYSTEM = "You are a careful assistant. Answer briefly."
PROMPTS = ["hi", "How do I bake bread?", "Write a poem about the sea.", "x", "Explain recursion, please."]
TOL = 1e-5


@pytest.fixture(scope="module")
def lm():
    return tiny_model("qwen2")


@pytest.fixture(scope="module")
def batch(lm):
    return tokenize_prompts(lm.tokenizer, PROMPTS, system=SYSTEM)


def both(fn):
    """(with reuse, without reuse) of fn()."""
    with torch.no_grad():
        on = fn()
        with prefix_reuse(False):
            off = fn()
    return on, off


def test_shared_prefix_is_the_template_opening(lm, batch):
    import os

    from safetyscope.prompts.chat import format_chat

    opening = os.path.commonprefix([format_chat(lm.tokenizer, q, SYSTEM) for q in PROMPTS])
    assert SYSTEM in opening and opening.endswith("user\n")
    p = shared_prefix_length(batch)
    assert p == len(lm.tokenizer(opening, add_special_tokens=False)["input_ids"])
    split = plan(lm.model, batch, last_only=True)
    assert split is not None and split.prefix.seq_len == p and len(split.prefix) == 1
    assert plan(lm.model, batch, last_only=False) is None  # full logits: the plain pass
    with prefix_reuse(False):
        assert plan(lm.model, batch, last_only=True) is None


@pytest.mark.parametrize("family", ["llama", "gemma2", "gpt2", "gpt_neox"])
def test_plain_logits_match(family):
    lm = tiny_model(family)
    b = tokenize_prompts(lm.tokenizer, PROMPTS, system=SYSTEM)
    assert plan(lm.model, b, last_only=True) is not None
    on, off = both(lambda: forward(lm, b, last_only=True))
    assert on.shape == off.shape == (len(PROMPTS), 1, lm.model.config.vocab_size)
    torch.testing.assert_close(on, off, atol=TOL, rtol=0)
    with torch.no_grad():  # last_only keeps the last position (an index, not a strided slice): every family
        every = forward(lm, b)  # [batch, pos, vocab]
    assert every.shape[1] == b.seq_len
    torch.testing.assert_close(off, every[:, -1:], atol=TOL, rtol=0)


def test_edits_of_every_position_recompute_the_prefix(lm, batch):
    """Directional ablation at every position changes the prefix's keys and values: reuse must run the prefix
    under the same edits (the logits move by far more than the tolerance, and still agree)."""
    r = torch.nn.functional.normalize(torch.randn(lm.dims.d_model, generator=torch.Generator().manual_seed(1)), dim=0)
    plain, _ = both(lambda: forward(lm, batch, last_only=True))
    for edits in (ablation_edits(lm, r), [(Site("resid_pre", 1), addition_edit(3 * r))]):
        with hooks(lm, edits):
            assert plan(lm.model, batch, last_only=True) is not None
            on, off = both(lambda: forward(lm, batch, last_only=True))
        assert (off - plain).abs().max() > 100 * TOL
        torch.testing.assert_close(on, off, atol=TOL, rtol=0)
    with ablate_neurons(lm, [(0, 3), (1, 7), (2, 11)]):
        on, off = both(lambda: forward(lm, batch, last_only=True))
    torch.testing.assert_close(on, off, atol=TOL, rtol=0)


def test_per_row_edits_run_one_prefix_per_key(lm):
    """Candidate scoring gives each row its own direction: the prefix runs once per candidate."""
    units = torch.nn.functional.normalize(torch.randn(3, lm.dims.d_model, generator=torch.Generator().manual_seed(2)), dim=-1)
    targets = torch.randn(3, lm.n_layers, generator=torch.Generator().manual_seed(3))
    for run in (lambda: ablated_logits(lm, units, PROMPTS, 8, SYSTEM),
                lambda: ablated_logits(lm, units, PROMPTS, 8, SYSTEM, targets),
                lambda: added_logits(lm, 4 * units, torch.tensor([0, 1, 2]), PROMPTS, 8, SYSTEM)):
        on, off = both(run)
        assert on.shape == (3, len(PROMPTS), lm.model.config.vocab_size)
        assert (off[0] - off[1]).abs().max() > 100 * TOL  # the rows' edits differ
        torch.testing.assert_close(on, off, atol=TOL, rtol=0)


def test_per_row_split_uses_row_keys(lm):
    from safetyscope.methods.direction.scoring import row_vectors

    units = torch.nn.functional.normalize(torch.randn(2, lm.dims.d_model), dim=-1)
    b = tokenize_prompts(lm.tokenizer, PROMPTS[:3] * 2, system=SYSTEM, index=range(6))
    with hooks(lm, ablation_edits(lm, row_vectors(units, 3))):
        split = plan(lm.model, b, last_only=True)
    assert split is not None and len(split.prefix) == 2
    assert split.rows.tolist() == [0, 0, 0, 1, 1, 1]


def test_undeclared_or_foreign_hooks_turn_reuse_off(lm, batch):
    def shift_rows(x, b):  # per row and per position, undeclared: the prefix would differ by row
        return x + torch.arange(x.shape[0], dtype=x.dtype).view(-1, 1, 1) * torch.linspace(0, 1, x.shape[1]).view(1, -1, 1)

    with hooks(lm, [(Site("resid_pre", 1), shift_rows)]):
        assert plan(lm.model, batch, last_only=True) is None
        on, off = both(lambda: forward(lm, batch, last_only=True))
    torch.testing.assert_close(on, off, atol=TOL, rtol=0)
    with hooks(lm, [(Site("resid_pre", 1), pointwise(lambda x, b: x * 1.5))]):
        assert plan(lm.model, batch, last_only=True) is not None
    handle = lm.model.model.layers[0].register_forward_hook(lambda *a: None)
    try:
        assert plan(lm.model, batch, last_only=True) is None
    finally:
        handle.remove()
    for pos in ("mean", "all"):  # these read the prefix positions
        with capture(lm, "blocks.0.resid_post", pos):
            assert plan(lm.model, batch, last_only=True) is None


def test_transformers_output_capturing_hooks_keep_reuse_on():
    """transformers keeps read-only hooks on every layer once a call asked for output_hidden_states; they must not
    turn reuse off for the model's whole life (they did: the capture benchmark's plain forward ran every token)."""
    from safetyscope.prefix import TAG

    lm = tiny_model("qwen2")  # its own model: the hooks stay on it
    b = tokenize_prompts(lm.tokenizer, PROMPTS, system=SYSTEM)
    with torch.no_grad():
        full = lm.model(input_ids=b.input_ids, attention_mask=b.attention_mask, position_ids=b.position_ids,
                        output_hidden_states=True, use_cache=False)
    foreign = [h for m in lm.model.modules() for h in m._forward_hooks.values() if not hasattr(h, TAG)]
    assert len(foreign) >= lm.n_layers  # the hooks this test is about are there
    with torch.no_grad(), capture(lm, "blocks.0.resid_post", "last") as cap:
        assert plan(lm.model, b, last_only=True) is not None
        on = forward(lm, b, last_only=True)
    with torch.no_grad(), prefix_reuse(False):
        off = forward(lm, b, last_only=True)
    torch.testing.assert_close(on, off, atol=TOL, rtol=0)
    torch.testing.assert_close(on[:, -1], full.logits[:, -1], atol=TOL, rtol=0)
    torch.testing.assert_close(cap.values[Site("resid_post", 0)][:, -1], full.hidden_states[1][:, -1], atol=TOL, rtol=0)
    with torch.no_grad():  # and they still record where asked
        again = lm.model(input_ids=b.input_ids, attention_mask=b.attention_mask, position_ids=b.position_ids,
                         output_hidden_states=True, use_cache=False).hidden_states
    assert all(torch.equal(x, y) for x, y in zip(again, full.hidden_states))


@pytest.mark.parametrize("positions", ["last", "post_instruction", "-1,-4", "mean"])
def test_captures_match(lm, batch, positions):
    def run():
        with capture(lm, "blocks.*.resid_post", positions) as cap:
            forward(lm, batch, last_only=True)
        return torch.stack([cap.values[s] for s in sorted(cap.values, key=lambda s: s.layer or 0)])

    on, off = both(run)
    torch.testing.assert_close(on, off, atol=TOL, rtol=0)


def test_gradients_match(lm, batch):
    """Refinement trains a direction through the prefix: the gradient flows through the reused cache."""
    start = torch.nn.functional.normalize(torch.randn(lm.dims.d_model, generator=torch.Generator().manual_seed(4)), dim=0)
    d = Direction(start, 1, -1, norm=1.0)

    def grad(reuse: bool) -> torch.Tensor:
        v = start.clone().requires_grad_(True)
        with prefix_reuse(reuse), torch.enable_grad(), hooks(lm, d.edits(lm, same(v))):
            forward(lm, batch, last_only=True)[:, -1].logsumexp(-1).sum().backward()
        assert v.grad is not None
        return v.grad

    def same(v):
        from safetyscope.prefix import same_rows

        return same_rows(lambda _b: v / v.norm())

    g_on, g_off = grad(True), grad(False)
    assert g_off.abs().max() > 1e-4
    torch.testing.assert_close(g_on, g_off, atol=1e-5, rtol=1e-4)


def test_grad_capture_matches(lm, batch):
    def run():
        with torch.enable_grad(), capture(lm, "blocks.1.resid_post", "last", grad=True) as cap:
            forward(lm, batch, last_only=True)[:, -1, :5].sum().backward()
        return cap.values[Site("resid_post", 1)], cap.grads[Site("resid_post", 1)]

    on, off = run(), None
    with prefix_reuse(False):
        off = run()
    torch.testing.assert_close(on[0], off[0], atol=TOL, rtol=0)
    torch.testing.assert_close(on[1], off[1], atol=TOL, rtol=0)


def test_hooks_removed_and_logits_bit_identical_after(lm, batch, hook_count):
    before = hook_count(lm)
    ref = forward(lm, batch, last_only=True).detach()
    with hooks(lm, ablation_edits(lm, torch.nn.functional.normalize(torch.ones(lm.dims.d_model), dim=0))):
        forward(lm, batch, last_only=True)
    assert hook_count(lm) == before
    assert torch.equal(forward(lm, batch, last_only=True).detach(), ref)


@pytest.mark.parametrize("family", ["qwen2", "gpt2"])
def test_generation_matches(family):
    """Generation prefills the shared prefix once; greedy replies equal the plain ones, also under ablation."""
    from safetyscope.measure.generation import generate_batch

    lm = tiny_model(family)
    b = tokenize_prompts(lm.tokenizer, PROMPTS, system=SYSTEM)
    r = torch.nn.functional.normalize(torch.randn(lm.dims.d_model, generator=torch.Generator().manual_seed(5)), dim=0)
    plain, _ = both(lambda: generate_batch(lm, b, max_new_tokens=6))
    for edits in ([], ablation_edits(lm, r), [(Site("resid_pre", 1), addition_edit(20 * r))]):
        with hooks(lm, edits):
            assert plan(lm.model, b, last_only=True) is not None
            on, off = both(lambda: generate_batch(lm, b, max_new_tokens=6))
        assert on == off and len(on) == len(PROMPTS)
    assert off != plain  # the edit changes the replies (so the prefix had to be recomputed under it)


def test_benchmark_runs_and_reports_exact_outputs(tmp_path, bench_module):
    import json

    mod = bench_module("prefix_cache")
    out = tmp_path / "bench.json"
    assert mod.main(["--model", "tiny:qwen2", "--prompts", "4", "--repeats", "1", "--system", SYSTEM, "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["prefix_tokens"] > 10 and 0 < res["prefix_share"] < 1
    assert set(res["workloads"]) == {"forward", "refusal score", "capture", "ablation (mean)", "candidate scoring", "refine step"}
    for row in res["workloads"].values():
        assert row["speedup"] > 0 and row["max_abs_diff"] < 1e-4


def test_map_direction_stage_refines_and_measures_the_zero_variant(tmp_path):
    """The map's recipe: mean ablation, refined, with the exportable zero-ablation variant measured beside it."""
    from safetyscope.artifacts.base import load_artifact
    from safetyscope.methods.circuit.inputs import Budget, MapConfig, MapPrompts, StageInputs
    from safetyscope.methods.circuit.results import DirectionSummary
    from safetyscope.methods.circuit.steps_measure import direction_stage

    lm = tiny_model("llama")
    cfg = MapConfig(quick=True)
    x = StageInputs(lm, cfg, Budget.of(cfg), tmp_path, MapPrompts.of(None, None))
    res = direction_stage(x)
    assert res["find"]["ablation"] == "mean" and len(res["find"]["refine"]["history"]) >= 2
    d = load_artifact(tmp_path / "direction" / "artifact")
    assert d.ablation == "mean" and d.meta.get("refined") is True
    assert load_artifact(tmp_path / "direction" / "artifact_zero").ablation == "zero"
    assert (tmp_path / "direction" / "unrefined" / "artifact.json").is_file()
    zero = res["ablate_zero"]
    assert zero["ablation"] == "zero" and zero["kl_first_token"]["mean"] >= 0
    s = DirectionSummary.from_json(res)
    assert s.refined and s.zero_kl_mean == zero["kl_first_token"]["mean"]


def _prefix_calls(lm):
    """A neutral pre-hook counting the model calls that run a shared prefix (prefix Batch published)."""
    from safetyscope.hooks import current_batch
    from safetyscope.prefix import PART, neutral

    calls: list[int] = []

    def count(_m, _args, _kwargs):
        b = current_batch()
        if b is not None and b.extra.get(PART) == "prefix":
            calls.append(b.seq_len)

    return calls, lm.model.register_forward_pre_hook(neutral(count), with_kwargs=True)


def test_an_unedited_prefix_runs_once_across_batches(lm, batch):
    from safetyscope.prefix import forget_prefixes

    forget_prefixes(lm.model)
    other = tokenize_prompts(lm.tokenizer, ["Name three rivers.", "What is 2+2?", "Translate 'cat'."], system=SYSTEM)
    calls, handle = _prefix_calls(lm)
    try:
        with torch.no_grad():
            first = [forward(lm, b, last_only=True) for b in (batch, other)]
            again = [forward(lm, b, last_only=True) for b in (batch, other)]
            with prefix_reuse(False):
                plain = [forward(lm, b, last_only=True) for b in (batch, other)]
    finally:
        handle.remove()
    assert len(calls) == 1  # the first batch ran the prefix; every later batch reused it
    for a, b, c in zip(first, again, plain):
        assert torch.equal(a, b)  # the kept prefix is the same computation
        torch.testing.assert_close(a, c, atol=TOL, rtol=0)


def test_a_kept_prefix_is_dropped_when_weights_change(lm, batch):
    """An in-place weight edit (as a checkpoint intervention or a fine-tuning step makes) changes the key."""
    from safetyscope.prefix import forget_prefixes

    forget_prefixes(lm.model)
    w = lm.model.model.layers[0].mlp.down_proj.weight
    saved = w.detach().clone()
    try:
        with torch.no_grad():
            before = forward(lm, batch, last_only=True)
            w.mul_(1.5)
            edited = forward(lm, batch, last_only=True)
            with prefix_reuse(False):
                plain = forward(lm, batch, last_only=True)
    finally:
        with torch.no_grad():
            w.copy_(saved)
    assert (edited - before).abs().max() > 100 * TOL  # the edit shows (not a stale prefix)
    torch.testing.assert_close(edited, plain, atol=TOL, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(forward(lm, batch, last_only=True), before, atol=TOL, rtol=0)


def test_edited_or_trained_prefixes_are_not_kept(lm, batch):
    """Under an edit of every position, or with gradients into parameters, the prefix runs every batch."""
    from safetyscope.prefix import forget_prefixes

    forget_prefixes(lm.model)
    r = torch.nn.functional.normalize(torch.ones(lm.dims.d_model), dim=0)
    calls, handle = _prefix_calls(lm)
    try:
        with torch.no_grad(), hooks(lm, ablation_edits(lm, r)):
            forward(lm, batch, last_only=True)
            forward(lm, batch, last_only=True)
        assert len(calls) == 2
        p = lm.model.model.layers[0].mlp.down_proj.weight
        p.requires_grad_(True)  # fine-tuning: the prefix's keys and values depend on trained weights
        with torch.enable_grad():
            for _ in range(2):
                forward(lm, batch, last_only=True)[:, -1].logsumexp(-1).sum().backward()
        assert len(calls) == 4 and p.grad is not None and p.grad.abs().max() > 0
    finally:
        handle.remove()
        lm.model.requires_grad_(False)
        lm.model.zero_grad(set_to_none=True)


def test_map_headline_is_measured_on_the_whole_test_split_and_the_addition_on_n_eval(tmp_path, monkeypatch):
    """The headline ablation uses every test prompt (n_headline 0); the addition reuses the n_eval subset's
    cached unmodified replies instead of generating them again."""
    from safetyscope.measure import generation
    from safetyscope.methods.circuit import steps_measure
    from safetyscope.methods.circuit.inputs import Budget, MapConfig, MapPrompts, StageInputs
    from safetyscope.methods.direction import evaluate as direction_eval

    lm = tiny_model("llama")
    d = Direction(torch.nn.functional.normalize(torch.randn(lm.dims.d_model), dim=0), 1, -1, norm=3.0, ablation="mean",
                  targets=torch.zeros(lm.n_layers))
    monkeypatch.setattr(steps_measure, "find_direction_stage", lambda x: (d, {"artifact": "a"}))
    generated: list[str] = []
    for name in ("generate", "generate_scored"):
        real = getattr(generation, name)
        monkeypatch.setattr(direction_eval, name, lambda lm_, ps, real=real, **k: generated.extend(ps) or real(lm_, ps, **k))
    forwards: list[int] = []
    real_logits = direction_eval.logits_under
    monkeypatch.setattr(direction_eval, "logits_under", lambda lm_, ps, *a, **k: forwards.append(len(ps)) or real_logits(lm_, ps, *a, **k))
    cfg = MapConfig(n_eval=4, max_new_tokens=2)
    prompts = MapPrompts.of(None, None)
    x = StageInputs(lm, cfg, Budget.of(cfg), tmp_path, prompts)
    res = steps_measure.direction_stage(x)
    n_h, n_s = len(prompts.test("harmful")), len(prompts.test("harmless"))
    assert (res["ablate"]["n_harmful"], res["ablate"]["n_harmless"]) == (n_h, n_s) and n_h > 16
    assert res["add"]["n"] == 4
    subset = x.sampled("harmless", 4, "test")
    assert sum(generated.count(p) for p in subset) == 3 * 4  # base, ablated, added: the base replies once
    # first-token logits of generated conditions come from the generation and the unmodified ones are
    # shared (memo): the one extra pass is the zero variant's harmless KL (its harmless replies are not generated)
    assert forwards == [n_s]
    # the capability stage's sample replies (unmodified, under the direction) come from the same cache
    d.save(tmp_path / "direction" / "artifact")
    generated.clear()
    cap = steps_measure.capability_stage(StageInputs(lm, cfg, Budget.of(cfg), tmp_path, prompts, done={"direction": {}}))
    assert generated == [] and len(cap["samples"]) == 4 and all("after_direction" in r for r in cap["samples"])
    small = StageInputs(lm, MapConfig(n_eval=4, n_headline=5, max_new_tokens=2), Budget.of(MapConfig(n_headline=5)),
                        tmp_path / "small", prompts)
    assert steps_measure.direction_stage(small)["ablate"]["n_harmful"] == 5


class _Out(dict):
    """A forward output as older transformers return it: the KV cache under ``past_key_values``."""

    def __getattr__(self, name):
        return self[name]


def test_reuse_works_with_the_older_past_key_values_keyword(lm, batch):
    """transformers before the ``cache`` rename takes and returns ``past_key_values`` (seen on a GPU machine with
    transformers 5.17): the prefix split must use whichever keyword the model's forward declares."""
    from safetyscope.prefix import cache_keyword

    base = type(lm.model)
    assert cache_keyword(lm.model) in ("cache", "past_key_values")
    new_name = cache_keyword(lm.model)

    class Older(base):  # type: ignore[misc, valid-type]
        def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                    use_cache=None, logits_to_keep=0, **kwargs):
            assert "cache" not in kwargs, "the newer keyword reached a model that does not take it"
            out = base.forward(self, input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                               use_cache=use_cache, logits_to_keep=logits_to_keep,
                               **{new_name: past_key_values}, **kwargs)
            return _Out(logits=out.logits, past_key_values=out[new_name] if use_cache else None)

    with torch.no_grad(), prefix_reuse(False):
        plain = forward(lm, batch)[:, -1]  # [batch, vocab]
    lm.model.__class__ = Older
    try:
        assert cache_keyword(lm.model) == "past_key_values"
        assert plan(lm.model, batch, last_only=True) is not None  # the split path runs
        with torch.no_grad():
            split = forward(lm, batch, last_only=True)[:, -1]  # [batch, vocab]
    finally:
        lm.model.__class__ = base
    torch.testing.assert_close(split, plain, rtol=TOL, atol=TOL)
