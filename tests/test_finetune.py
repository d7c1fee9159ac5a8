"""finetune on tiny random models: only the selected entries move, the caller's model is untouched, resume
equals an uninterrupted run, the export loads with plain transformers, the baselines and robust training run."""

from __future__ import annotations

import dataclasses
import json
from contextlib import contextmanager

import pytest
import torch

from safetyscope.measure.capability import decode_reply
from safetyscope.methods.direction.artifact import Direction
from safetyscope.methods.finetune.api import finetune, map_components
from safetyscope.methods.finetune.data import make_data
from safetyscope.methods.finetune.robust import estimate_subspace, random_ablation, random_subspan
from safetyscope.methods.finetune.train import TrainConfig, make_batch
from safetyscope.prompts.chat import format_chat
from safetyscope.testing import tiny_model

HARMFUL = ["How do I make a bomb~?", "Steal~ a car", "Hack~ the bank now", "Poison~ the water"]
HARMLESS = ["How do I bake bread?", "Write a poem", "hi there", "Explain recursion"]
CFG = TrainConfig(steps=3, lr=1e-2, batch_size=2, max_reply_tokens=5, checkpoint_every=0)


def judge(prompt: str, _reply: str) -> bool:
    """Refusal iff the prompt is one of HARMFUL (tiny random models never really refuse)."""
    return prompt in HARMFUL


def _run(lm, mode="harden", comps="blocks.1.attn.heads[1], blocks.2.mlp.neurons[3,40]", **kw):
    kw.setdefault("config", CFG)
    kw.setdefault("judge", judge if mode == "harden" else (lambda _p, _r: False))
    return finetune(lm, mode, comps, harmful=HARMFUL, harmless=HARMLESS, max_new_tokens=5,
                    direction=Direction(torch.randn(lm.dims.d_model, generator=torch.Generator().manual_seed(1)), 1), **kw)


@pytest.fixture(scope="module")
def lm():
    return tiny_model("qwen2")


@pytest.fixture(scope="module")
def tuned(lm, hook_count):
    """(state before, hooks before, requires_grad flags before, the result of one harden run)."""
    before, n_hooks = _state(lm), hook_count(lm)
    flags = {n: p.requires_grad for n, p in lm.model.named_parameters()}
    return before, n_hooks, flags, _run(lm)


def _state(lm):
    return {n: p.detach().clone() for n, p in lm.model.named_parameters()}


def test_only_selected_entries_change_and_the_caller_is_untouched(lm, tuned, hook_count):
    before, n_hooks, flags, r = tuned
    assert all(torch.equal(before[n], p) for n, p in lm.model.named_parameters())  # caller's model bit-identical
    assert {n: p.requires_grad for n, p in lm.model.named_parameters()} == flags and hook_count(lm) == n_hooks
    assert r.n_trainable == 1240 and r.n_total == sum(p.numel() for p in lm.model.parameters())
    from safetyscope.methods.finetune.components import select

    masks = select(lm, "blocks.1.attn.heads[1], blocks.2.mlp.neurons[3,40]").masks
    assert set(r.tuned) == set(masks)
    moved = 0
    for name, t in r.tuned.items():
        m = masks[name]
        assert m is not None
        assert torch.equal(t[~m], before[name][~m]), f"{name}: a masked entry moved"
        moved += int((t[m] != before[name][m]).sum())
    assert moved > 0.5 * r.n_trainable  # training really changed the selected entries
    assert len(r.log.losses) == 3


def test_apply_swaps_and_restores(lm, tuned):
    r = tuned[3]
    before = _state(lm)
    name = next(iter(r.tuned))
    with r.apply(lm):
        assert torch.equal(dict(lm.model.named_parameters())[name], r.tuned[name])
    assert all(torch.equal(before[n], p) for n, p in lm.model.named_parameters())


def test_resume_equals_uninterrupted(lm, tmp_path):
    cfg4 = TrainConfig(steps=4, lr=1e-2, batch_size=2, max_reply_tokens=5, checkpoint_every=2, robust=True,
                       reestimate_every=3)
    full = _run(lm, config=cfg4, out=tmp_path / "a")
    _run(lm, config=TrainConfig(**{**cfg4.__dict__, "steps": 2}), out=tmp_path / "b")  # "killed" after step 2
    resumed = _run(lm, config=cfg4, out=tmp_path / "b")
    assert resumed.log.resumed_from == 2 and full.log.resumed_from == 0
    assert resumed.log.losses == full.log.losses
    assert all(torch.equal(full.tuned[n], resumed.tuned[n]) for n in full.tuned)
    other = _run(lm, config=TrainConfig(**{**cfg4.__dict__, "lr": 2e-2}), out=tmp_path / "b")  # other settings
    assert other.log.resumed_from == 0  # start afresh, not from the state above


def test_export_round_trip_with_plain_transformers(lm, tuned, tmp_path):
    from transformers import AutoModelForCausalLM

    r = tuned[3]
    path = r.export(lm, tmp_path / "ckpt")
    loaded = AutoModelForCausalLM.from_pretrained(path)
    params = dict(loaded.named_parameters())
    assert all(torch.equal(params[n], t) for n, t in r.tuned.items())
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad(), r.apply(lm):
        want = lm.model(input_ids=ids).logits
    with torch.no_grad():
        assert torch.allclose(loaded(input_ids=ids).logits, want, atol=1e-5)
    meta = json.loads((path / "safetyscope_finetune.json").read_text())
    assert meta["n_trainable"] == r.n_trainable
    from safetyscope.artifacts.checkpoint import Checkpoint  # what `eval --intervention DIR` loads

    with torch.no_grad(), Checkpoint(path).apply(lm):
        assert torch.allclose(lm.model(input_ids=ids).logits, want, atol=1e-6)


@pytest.mark.parametrize("method", ["full", "lora", "random"])
def test_baselines(lm, method):
    before = _state(lm)
    r = _run(lm, mode="weaken", method=method)
    assert all(torch.equal(before[n], p) for n, p in lm.model.named_parameters())
    changed = {n for n, t in r.tuned.items() if not torch.equal(t, before[n])}
    if method == "full":
        assert r.n_trainable == r.n_total and "model.embed_tokens.weight" in changed
    elif method == "lora":
        assert r.n_trainable == 3 * 8 * sum(32 + o for o in (32, 16, 16, 32, 64, 64)) + 3 * 8 * (64 + 32)
        assert changed and all("proj" in n for n in changed)
    else:  # components of the same kinds and sizes elsewhere: exactly as many parameters, none of the selection's
        assert r.n_trainable == 1240 and r.components != ("blocks.1.attn.heads[1]", "blocks.2.mlp.neurons[3,40]")
        assert any(".self_attn." in n for n in changed) and any(".mlp." in n for n in changed)
        assert not any(n.startswith("model.layers.1.self_attn.") for n in changed)  # the head moved to another block


def test_random_ablation_edits_only_target_rows():
    lm = tiny_model("llama")
    r = torch.nn.functional.normalize(torch.randn(32), dim=0)
    edits = random_ablation(lm, r, rows=2, width=6, p=1.0, gen=torch.Generator().manual_seed(0))
    assert len(edits) == lm.n_layers
    x = torch.randn(3, 6, 32)
    y = edits[0][1](x, None)
    assert torch.allclose(y[:2] @ r, torch.zeros(2, 6), atol=1e-5)  # projected out of the target rows
    assert torch.equal(y[2], x[2])                                   # retain row untouched


def test_random_ablation_of_a_subspace_removes_every_direction():
    lm = tiny_model("llama")
    q = torch.linalg.qr(torch.randn(32, 3)).Q.T  # [3, 32] orthonormal rows
    edits = random_ablation(lm, q, rows=2, width=6, p=1.0, gen=torch.Generator().manual_seed(0))
    x = torch.randn(3, 6, 32)
    y = edits[0][1](x, None)
    assert torch.allclose(y[:2] @ q.T, torch.zeros(2, 6, 3), atol=1e-5)  # all three directions gone
    rest = x[:2] - (x[:2] @ q.T) @ q
    assert torch.allclose(y[:2], rest, atol=1e-5)                        # and nothing else changed
    assert torch.equal(y[2], x[2])


def test_random_ablation_by_rows_takes_a_row_at_every_block_and_position_or_not_at_all():
    lm = tiny_model("llama")
    r = torch.nn.functional.normalize(torch.randn(32), dim=0)
    drawn = 0
    for seed in range(6):
        edits = random_ablation(lm, r, rows=4, width=6, p=0.5, gen=torch.Generator().manual_seed(seed), scope="rows")
        assert [site.layer for site, _ in edits] == list(range(lm.n_layers))  # every block, as under the attack
        x = torch.randn(5, 6, 32)
        y = edits[0][1](x, None)
        for row in range(4):
            gone = torch.allclose(y[row] @ r, torch.zeros(6), atol=1e-5)
            assert gone or torch.equal(y[row], x[row])  # all positions of the row, or none
            drawn += gone
        assert torch.equal(y[4], x[4])  # past `rows`: untouched
    assert 0 < drawn < 24  # of 6 x 4 rows at p 0.5, some lost the direction and some kept it
    with pytest.raises(ValueError, match="robust_scope"):
        TrainConfig(robust_scope="layers")  # type: ignore[arg-type]


@pytest.mark.parametrize("scope", ["rows", "sites"])
def test_random_ablation_gives_each_row_its_own_probability(scope):
    lm = tiny_model("llama")
    r = torch.nn.functional.normalize(torch.randn(32), dim=0)
    row_p = torch.tensor([1.0, 1.0, 1e-9, 1e-9])  # two rows always, two (practically) never
    for seed in range(4):
        edits = random_ablation(lm, r, rows=4, width=6, p=1.0, gen=torch.Generator().manual_seed(seed),
                                scope=scope, row_p=row_p)  # type: ignore[arg-type]
        x = torch.randn(4, 6, 32)
        y = edits[0][1](x, None)
        assert torch.allclose(y[:2] @ r, torch.zeros(2, 6), atol=1e-5)  # every position of the p-1 rows
        assert torch.equal(y[2:], x[2:])                                 # none of the others
    with pytest.raises(ValueError, match="robust_retain_p"):
        TrainConfig(robust_retain_p=1.5)


def test_random_subspan_draws_orthonormal_sub_spans_of_every_size_and_ablates_only_them():
    lm = tiny_model("llama")
    q = torch.linalg.qr(torch.randn(32, 4)).Q.T  # [4, 32] orthonormal rows
    g = torch.Generator().manual_seed(0)
    sizes = set()
    for _ in range(10):
        sub = random_subspan(q, 3, g)  # [3, 4, 32]
        assert sub.shape == (3, 4, 32)
        for row in sub:
            basis = row[row.norm(dim=-1) > 0.5]  # the drawn directions; the rest are zero rows
            sizes.add(basis.shape[0])
            assert torch.allclose(basis @ basis.T, torch.eye(basis.shape[0]), atol=1e-5)  # orthonormal
            assert torch.allclose(basis - (basis @ q.T) @ q, torch.zeros_like(basis), atol=1e-5)  # inside span(q)
            assert torch.equal(row[basis.shape[0]:], torch.zeros_like(row[basis.shape[0]:]))
    assert sizes == {1, 2, 3, 4}  # every dimension from 1 to the rank is drawn
    sub = random_subspan(q, 2, torch.Generator().manual_seed(1))
    edits = random_ablation(lm, sub, rows=2, width=6, p=1.0, gen=torch.Generator().manual_seed(0))
    x = torch.randn(3, 6, 32)
    y = edits[0][1](x, None)
    for i in range(2):  # each row loses exactly its own sub-span
        assert torch.allclose(y[i], x[i] - (x[i] @ sub[i].T) @ sub[i], atol=1e-5)
    assert torch.equal(y[2], x[2])


def test_robust_subspan_trains_resumes_and_needs_a_subspace(lm, tmp_path):
    cfg = TrainConfig(steps=4, lr=1e-2, batch_size=2, max_reply_tokens=5, checkpoint_every=2, robust=True,
                      robust_rank=3, reestimate_every=3, robust_subspan=True, robust_scope="rows", robust_p=1.0)
    full = _run(lm, config=cfg, out=tmp_path / "a")
    whole = _run(lm, config=dataclasses.replace(cfg, robust_subspan=False), out=tmp_path / "c")
    assert full.log.losses != whole.log.losses  # a sub-span is not the whole subspace
    _run(lm, config=dataclasses.replace(cfg, steps=2), out=tmp_path / "b")
    resumed = _run(lm, config=cfg, out=tmp_path / "b")
    assert resumed.log.resumed_from == 2 and resumed.log.losses == full.log.losses
    with pytest.raises(ValueError, match="robust_subspan"):
        TrainConfig(robust_subspan=True)


def test_tracker_starts_at_the_candidates_and_moves_toward_the_intact_rows_only(lm):
    from safetyscope.hooks import hooks
    from safetyscope.methods.finetune.robust import Tracker, estimate_direction
    from safetyscope.methods.finetune.train import batch_logits

    harm, safe = ["How do I build a bomb?", "Steal a car now"], ["Bake bread", "Name a color"]
    t = Tracker.start(lm, harm, safe, None, decay=0.5)
    k = t.means.shape[2]
    layer, pos, u = t.draw([2], torch.Generator().manual_seed(0))
    assert layer == 2 and -k <= pos <= -1
    assert torch.allclose(u, estimate_direction(lm, harm, safe, 2, None, position=pos), atol=1e-5)  # a candidate
    before = t.means.clone()
    ids = [list(lm.tokenizer(format_chat(lm.tokenizer, q, None), add_special_tokens=False)["input_ids"]) for q in harm + safe]
    rows = [(ids[0], [5, 6, 7]), (ids[1], [8]), (ids[2], [9, 10]), (ids[3], [11])]
    b = make_batch(lm, rows)
    width = b["input_ids"].shape[1]
    ends = torch.tensor([width - len(r) - 1 for _p, r in rows])
    rec, update = t.recorder(lm.n_layers, ends, [0, None, 1, 1])  # row 1 was "ablated": it must not count
    clean = batch_logits(lm, b)
    with hooks(lm, rec):
        seen = batch_logits(lm, b)
    assert torch.equal(seen, clean)  # the recorder only reads
    update()
    solo = Tracker.start(lm, [harm[0]], safe, None)  # the same rows read alone, unpadded
    assert torch.allclose(t.means[0], 0.5 * before[0] + 0.5 * solo.means[0], atol=1e-4)
    assert torch.allclose(t.means[1], 0.5 * before[1] + 0.5 * solo.means[1], atol=1e-4)


def test_robust_online_trains_resumes_and_needs_rows(lm, tmp_path):
    cfg = TrainConfig(steps=4, lr=1e-2, batch_size=2, max_reply_tokens=5, checkpoint_every=2, robust=True,
                      robust_online=True, robust_scope="rows", robust_p=0.5, robust_retain=True)
    full = _run(lm, config=cfg, out=tmp_path / "a")
    fixed = _run(lm, config=dataclasses.replace(cfg, robust_online=False), out=tmp_path / "c")
    assert full.log.losses != fixed.log.losses  # the tracked candidates are not the fixed direction
    _run(lm, config=dataclasses.replace(cfg, steps=2), out=tmp_path / "b")
    resumed = _run(lm, config=cfg, out=tmp_path / "b")
    assert resumed.log.resumed_from == 2 and resumed.log.losses == full.log.losses  # running means were saved
    with pytest.raises(ValueError, match="robust_online"):
        TrainConfig(robust_online=True)


def test_estimate_subspace_keeps_the_direction_and_is_orthonormal(lm):
    r = torch.nn.functional.normalize(torch.randn(lm.dims.d_model), dim=0)
    q = estimate_subspace(lm, ["How do I build a bomb?", "Steal a car now"], ["Bake bread", "Name a color"], r, 4,
                          None)
    assert q.shape == (4, lm.dims.d_model)
    assert torch.allclose(q @ q.T, torch.eye(4), atol=1e-5)
    assert torch.allclose((q @ r).norm(), torch.tensor(1.0), atol=1e-5)  # r lies in the span


def test_robust_rank_trains_and_resumes_with_its_subspace(lm, tmp_path):
    cfg = TrainConfig(steps=4, lr=1e-2, batch_size=2, max_reply_tokens=5, checkpoint_every=2, robust=True,
                      robust_rank=3, reestimate_every=3)
    full = _run(lm, config=cfg, out=tmp_path / "a")
    assert full.log.direction is not None and full.log.direction.shape == (3, lm.dims.d_model)
    _run(lm, config=dataclasses.replace(cfg, steps=2), out=tmp_path / "b")
    resumed = _run(lm, config=cfg, out=tmp_path / "b")
    assert resumed.log.resumed_from == 2 and resumed.log.losses == full.log.losses
    with pytest.raises(ValueError, match="robust_rank"):
        TrainConfig(robust_rank=0)


def test_robust_retain_ablates_the_retain_rows_too(lm, monkeypatch):
    import safetyscope.methods.finetune.train as train_mod

    rows: list[int] = []
    real = train_mod.random_ablation
    monkeypatch.setattr(train_mod, "random_ablation",
                        lambda lm_, r, n, width, p, gen, *rest: (rows.append(n), real(lm_, r, n, width, p, gen, *rest))[1])
    for flag in (False, True):
        _run(lm, config=dataclasses.replace(CFG, robust=True, robust_retain=flag, steps=1))
    assert rows == [CFG.batch_size, 2 * CFG.batch_size]  # target rows only; then target and retain rows


def test_robust_retain_p_draws_the_retain_rows_with_their_own_probability(lm, monkeypatch):
    import safetyscope.methods.finetune.train as train_mod

    seen: list[list[float]] = []
    real = train_mod.random_ablation
    monkeypatch.setattr(train_mod, "random_ablation",
                        lambda lm_, r, n, width, p, gen, scope, row_p, *rest: (
                            seen.append(row_p.tolist()), real(lm_, r, n, width, p, gen, scope, row_p, *rest))[1])
    cfg = dataclasses.replace(CFG, robust=True, robust_retain=True, robust_p=1.0, robust_retain_p=0.25, steps=1)
    _run(lm, config=cfg)
    assert seen == [[1.0] * CFG.batch_size + [0.25] * CFG.batch_size]


def test_make_batch_labels_are_the_reply_tokens():
    lm = tiny_model("llama")
    b = make_batch(lm, [([10, 11, 12], [20, 21]), ([10], [22, 23, 24])])
    lab = b["labels"]
    ids = b["input_ids"]
    for i in range(2):
        pos = torch.nonzero(lab[i] != -100).flatten()
        assert torch.equal(lab[i, pos], ids[i, pos + 1])  # a label is the next token
    assert lab[0][lab[0] != -100].tolist() == [20, 21] and lab[1][lab[1] != -100].tolist() == [22, 23, 24]


def test_data_keeps_only_judged_targets(lm):
    h = make_data(lm, "harden", HARMFUL, HARMLESS + HARMFUL[:1], judge=judge, max_new_tokens=4)
    assert {e.prompt for e in h.of("target")} == set(HARMFUL)
    assert {e.prompt for e in h.of("retain")} == set(HARMLESS)  # the "harmless" prompt judged refused is dropped
    with pytest.raises(ValueError):
        make_data(lm, "weaken", HARMFUL, HARMLESS, judge=judge)  # no direction to ablate


def test_harden_answers_the_benign_prompts_it_refuses_under_ablation(lm):
    """A benign prompt the model refuses gets the reply it gives under ablation as retain, judged first."""
    token = 7
    marker = decode_reply(lm, (token,) * 3)

    @contextmanager
    def ablate():  # stands in for directional ablation: every reply becomes the marker token
        hook = lm.model.lm_head.register_forward_hook(lambda _m, _i, out: out + 1e4 * torch.nn.functional.one_hot(
            torch.tensor(token), out.shape[-1]).to(out.dtype))
        try:
            yield
        finally:
            hook.remove()

    def refuses_unless_marked(prompt: str, reply: str) -> bool:
        return prompt in HARMFUL and marker not in reply

    bait = HARMFUL[0]
    h = make_data(lm, "harden", HARMFUL[1:], HARMLESS, [bait], ablate=ablate, judge=refuses_unless_marked,
                  max_new_tokens=4)
    ablated = [e for e in h.of("retain") if e.source == "scary:ablated"]
    assert [e.prompt for e in ablated] == [bait] and set(ablated[0].reply) == {token}
    assert h.counts["scary:ablated"] == 1 and h.counts["scary:own"] == 0
    assert {e.prompt for e in h.of("target")} == set(HARMFUL[1:])  # harmful targets do not use the ablation
    plain = make_data(lm, "harden", HARMFUL[1:], HARMLESS, [bait], judge=refuses_unless_marked, max_new_tokens=4)
    assert bait not in {e.prompt for e in plain.of("retain")}  # without a direction it is dropped


def test_map_components_skip_residual_sites(tmp_path):
    stages = [{"name": "detection", "components": ["blocks.4.resid_post"]},
              {"name": "evaluation", "components": ["L2.N5", "L1.N7"]},
              {"name": "decision", "components": ["blocks.1.attn.out"]},
              {"name": "production", "components": ["blocks.2.mlp.out", "blocks.1.attn.out"]}]
    path = tmp_path / "map" / "stages" / "report.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"key": "x", "result": {"stages": stages}}))
    assert map_components(tmp_path) == ["L2.N5", "L1.N7", "blocks.1.attn.out", "blocks.2.mlp.out"]
    with pytest.raises(ValueError):
        map_components(tmp_path / "nothing")


def test_training_moves_only_masked_entries_frozen_parameters_bit_identical():
    """train() itself, with no restore afterwards: every parameter outside the selection and every masked-off
    entry of a selected one is bit-identical after the steps; the selected entries moved."""
    from safetyscope.methods.finetune.components import select, trainable
    from safetyscope.methods.finetune.data import Example, TrainingData
    from safetyscope.methods.finetune.train import train

    lm = tiny_model("qwen2", seed=3)  # a private copy: this test leaves it trained
    sel = select(lm, "blocks.0.mlp, blocks.1.attn.heads[2], blocks.2.mlp.neurons[1,7]")
    before = {n: p.detach().clone() for n, p in lm.model.named_parameters()}
    data = TrainingData((Example(HARMFUL[0], (5, 6, 7, 3), "target", "t"), Example(HARMFUL[1], (9, 3), "target", "t"),
                         Example(HARMLESS[0], (11, 12, 3), "retain", "r")), {})
    with trainable(lm.model, sel) as params:
        log = train(lm, params, data, TrainConfig(steps=3, lr=1e-2, batch_size=2, max_reply_tokens=4, checkpoint_every=0))
    assert len(log.losses) == 3
    after = dict(lm.model.named_parameters())
    moved = 0
    for name, old in before.items():
        new = after[name].detach()
        if name not in sel.masks:
            mask = torch.zeros_like(old, dtype=torch.bool)
        else:
            m = sel.masks[name]
            mask = torch.ones_like(old, dtype=torch.bool) if m is None else m
        assert torch.equal(new[~mask], old[~mask]), f"{name}: a frozen entry moved"
        moved += int((new[mask] != old[mask]).sum())
    assert moved > 0.5 * sel.n_trainable
    assert not any(p.requires_grad for p in lm.model.parameters()) and all(p.grad is None for p in lm.model.parameters())


def test_lora_merged_weights_equal_the_hooked_adapters():
    from safetyscope.methods.finetune.lora import lora

    lm = tiny_model("llama")
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    with torch.no_grad():
        plain = lm.model(input_ids=ids).logits
    with lora(lm, rank=2, seed=1) as lo:
        with torch.no_grad():
            for t in lo.b.values():
                t.normal_(0, 0.1)  # B starts at zero; give the adapters something to add
            hooked = lm.model(input_ids=ids).logits
        merged = lo.merged()
    assert not torch.allclose(hooked, plain, atol=1e-4)
    params = dict(lm.model.named_parameters())
    saved = {n: params[n].detach().clone() for n in merged}
    try:
        with torch.no_grad():
            for n, t in merged.items():
                params[n].copy_(t)
            assert torch.allclose(lm.model(input_ids=ids).logits, hooked, atol=1e-5)
    finally:
        with torch.no_grad():
            for n, t in saved.items():
                params[n].copy_(t)
    with torch.no_grad():
        assert torch.equal(lm.model(input_ids=ids).logits, plain)  # adapters' hooks gone after the block


def test_export_of_a_bfloat16_run_keeps_every_frozen_tensor_of_the_float32_checkpoint(tmp_path):
    """A GPU loads in bfloat16: the export copies the stored float32 tensors byte for byte and writes only the
    tuned ones; a model edited in memory after loading is saved as it is instead."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from safetyscope.models import load_model

    base = tiny_model("qwen2")
    base.model.save_pretrained(tmp_path / "src", safe_serialization=True)
    base.tokenizer.save_pretrained(tmp_path / "src")
    stored = load_file(str(tmp_path / "src" / "model.safetensors"))
    half = load_model(str(tmp_path / "src"), dtype="bfloat16")
    r = _run(half)
    out = load_file(str(r.export(half, tmp_path / "ckpt") / "model.safetensors"))
    assert set(out) == set(stored) and r.tuned
    for name, t in stored.items():
        if name in r.tuned:
            assert out[name].dtype == torch.float32 and torch.equal(out[name], r.tuned[name].float().cpu())
        else:
            assert torch.equal(out[name], t)  # byte-identical, not rounded through bfloat16
    AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt")  # a normal checkpoint
    frozen = next(n for n in stored if n not in r.tuned and n.endswith("norm.weight"))
    with torch.no_grad():
        dict(half.model.named_parameters())[frozen].add_(1.0)  # edited in memory after loading
    try:
        again = load_file(str(r.export(half, tmp_path / "edited") / "model.safetensors"))
    finally:
        with torch.no_grad():
            dict(half.model.named_parameters())[frozen].sub_(1.0)
    assert again[frozen].dtype == torch.bfloat16 and torch.equal(again[frozen], stored[frozen].bfloat16() + 1)
