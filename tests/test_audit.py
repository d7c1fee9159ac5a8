"""Audit: weights against a reference, the no-reference ablation signature, runtime interventions, bad input."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from safetyscope.artifacts.checkpoint import Checkpoint
from safetyscope.cli.main import app
from safetyscope.hooks import hooks
from safetyscope.methods.audit import AuditInputError, audit_checkpoint, audit_runtime
from safetyscope.methods.direction.artifact import Direction
from safetyscope.methods.neurons.artifact import NeuronSet
from safetyscope.models import load_model
from safetyscope.models.loading import param_hash
from safetyscope.sites import Site
from safetyscope.testing import tiny_model


def _unit(d: int, seed: int) -> torch.Tensor:
    r = torch.randn(d, generator=torch.Generator().manual_seed(seed))
    return r / r.norm()


def _save(model: nn.Module, lm, path: Path) -> Path:
    model.save_pretrained(path, safe_serialization=True)
    lm.tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def lm():
    return tiny_model("llama", seed=3)


@pytest.fixture(scope="module")
def ref(lm, tmp_path_factory) -> Path:
    return _save(lm.model, lm, tmp_path_factory.mktemp("audit") / "ref")


@pytest.fixture(scope="module")
def r(lm) -> torch.Tensor:
    return _unit(lm.dims.d_model, 11)


@pytest.fixture(scope="module")
def abliterated(lm, r, tmp_path_factory) -> Path:
    return Direction(r, 1, -1).export(lm, tmp_path_factory.mktemp("audit") / "abl")


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return abs(float(a.double() @ b.double()) / float(a.double().norm() * b.double().norm()))


# ---- weights against a reference ---------------------------------------------------------------
def test_clean_checkpoint_is_clean_with_and_without_reference(lm, ref):
    rep = audit_checkpoint(ref, lm, find_refusal=False)
    assert rep.verdict == "clean" and rep.weights is not None
    assert rep.weights.counts["none"] == len(rep.weights.matrices) and rep.weights.n_removal == 0
    assert all(layer.verdict == "clean" for layer in rep.weights.layers)
    alone = audit_checkpoint(ref)
    assert alone.verdict == "clean" and alone.signature is not None and alone.signature.n_collapsed < 3  # min_removals
    assert alone.signature.null_ratio > 1e-3 and len(alone.signature.canary_scores) > 0


def test_orthogonalised_export_is_tampering_and_the_direction_is_recovered(lm, ref, r, abliterated):
    n = lm.n_layers
    for kwargs in ({"direction": Direction(r, 1, -1)}, {"find_refusal": False}):
        rep = audit_checkpoint(abliterated, ref, **kwargs)
        w = rep.weights
        assert rep.verdict == "tampering" and w is not None and w.direction is not None
        assert _cos(w.direction, r) >= 0.95
        assert w.n_removal == w.n_aligned == 2 * n + 1  # o_proj and down_proj of every block, and the embedding
        assert all(layer.verdict == "tampering" for layer in w.layers)
        for layer in w.layers:  # full removal: weight 1 in every writer
            assert len(layer.removal_weights) == 2 and all(abs(v - 1) < 1e-3 for v in layer.removal_weights.values())
    assert audit_checkpoint(abliterated, ref, direction=Direction(r, 1, -1)).weights.cos_reference >= 0.95


def test_partial_per_layer_removal_recovers_the_kernel(lm, ref, r, tmp_path):
    kernel = torch.tensor([0.0, 0.5, 1.0])
    path = Direction(r, 1, -1, layer_weights=kernel, embed_weight=0.0).export(lm, tmp_path / "kernel")
    w = audit_checkpoint(path, ref, find_refusal=False).weights
    assert w is not None and w.verdict == "tampering" and _cos(w.direction, r) >= 0.95
    assert w.layers[0].verdict == "clean" and w.layers[0].removal_weights == {}
    for layer, k in ((1, 0.5), (2, 1.0)):
        assert all(abs(v - k) < 1e-3 for v in w.layers[layer].removal_weights.values())


def test_a_removed_direction_unrelated_to_refusal_is_modified_not_tampering(lm, ref, r, abliterated):
    other = _unit(lm.dims.d_model, 99)
    other = other - (other @ r) * r  # orthogonal to the removed direction
    rep = audit_checkpoint(abliterated, ref, direction=other)
    assert rep.verdict == "modified" and rep.weights.cos_reference < 0.05


def test_zeroed_and_scaled_neurons_are_found(lm, ref, tmp_path):
    zeroed = NeuronSet([(1, 5), (2, 7), (2, 40)]).export(lm, tmp_path / "zero")
    w = audit_checkpoint(zeroed, ref, find_refusal=False).weights
    assert w.verdict == "tampering"
    assert sorted((e.layer, i) for e in w.neurons for i in e.zeroed) == [(1, 5), (2, 7), (2, 40)]
    assert [layer.verdict for layer in w.layers] == ["clean", "tampering", "tampering"]
    s = audit_checkpoint(zeroed, behaviour=False).signature  # without a reference: all-zero down-projection columns
    assert s.verdict == "tampering" and sorted(i for v in s.zeroed_neurons.values() for i in v) == [5, 7, 40]
    scaled = NeuronSet([(0, 3)], mode="scale", strength=0.25).export(lm, tmp_path / "scale")
    w = audit_checkpoint(scaled, ref, find_refusal=False).weights
    assert w.verdict == "tampering" and [(e.layer, e.scaled[0][0]) for e in w.neurons] == [(0, 3)]
    assert abs(w.neurons[0].scaled[0][1] - 0.25) < 1e-5


def test_random_direction_removed_from_one_matrix_is_modified(lm, ref, tmp_path):
    model = copy.deepcopy(lm.model)
    u = _unit(lm.dims.d_model, 5)
    with torch.no_grad():
        o = model.get_submodule(lm.table.expand(lm.table.attn_out_proj, 1)).weight  # [d_model, in]
        o.copy_(o - torch.outer(u, u @ o))
    w = audit_checkpoint(_save(model, lm, tmp_path / "one"), ref, find_refusal=False).weights
    assert w.verdict == "modified" and w.n_removal == 1 and _cos(w.direction, u) >= 0.95
    assert [layer.verdict for layer in w.layers] == ["clean", "modified", "clean"]


def test_low_rank_benign_update_is_modified(lm, ref, tmp_path):
    model = copy.deepcopy(lm.model)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("q_proj.weight", "v_proj.weight")):  # a merged rank-2 LoRA
                p.add_(0.05 * torch.randn(p.shape[0], 2, generator=g) @ torch.randn(2, p.shape[1], generator=g))
    w = audit_checkpoint(_save(model, lm, tmp_path / "lora"), ref, find_refusal=False).weights
    assert w.verdict == "modified" and w.counts["low_rank"] == 2 * lm.n_layers and w.n_removal == 0
    assert {m.rank for m in w.changed()} == {2}


def test_dtype_and_8bit_round_trips_are_noise(lm, ref, tmp_path):
    half = _save(copy.deepcopy(lm.model).half(), lm, tmp_path / "fp16")
    w = audit_checkpoint(half, ref, find_refusal=False).weights
    assert w.verdict == "clean" and w.counts["noise"] > 0 and w.counts["low_rank"] == w.counts["full_rank"] == 0
    model = copy.deepcopy(lm.model)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:  # per-row absmax int8 quantisation, dequantised
                scale = p.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / 127
                p.copy_((p / scale).round().clamp(-127, 127) * scale)
    w = audit_checkpoint(_save(model, lm, tmp_path / "int8"), ref, find_refusal=False).weights
    assert w.verdict == "clean" and w.counts["noise"] > 0 and w.counts["low_rank"] == w.counts["full_rank"] == 0


# ---- without a reference -------------------------------------------------------------------------
def test_signature_without_reference_finds_the_removed_direction(lm, r, abliterated, tmp_path, plant_readers):
    rep = audit_checkpoint(abliterated)
    s = rep.signature
    # r is a random direction of a random model: removed (strong weight evidence), but the checkpoint's own harmful -
    # harmless differences do not lie along it and writing it back restores nothing beyond random directions
    assert s is not None and _cos(s.null_direction, r) >= 0.95
    assert s.restore is not None and not s.restore["restored"] and len(s.restore["random_rises"]) == 6
    # float32 on the CPU; on a GPU the audit loads bfloat16, whose rounding leaves |cos| ~0.01 along r (x sqrt(d_model)
    # ~0.08), still far below the 5.0 at which alignment changes a verdict (docs/scale.md)
    cos_bound, align_bound = (1e-3, 1e-3) if not torch.cuda.is_available() else (0.03, 0.2)
    assert len(s.restore["harm_random_rises"]) == 6 and s.harm_alignment is not None and s.harm_alignment < align_bound
    assert rep.verdict == "modified" and "not a harm/refusal one" in " ".join(rep.evidence)
    assert s.null_ratio < 1e-4 and s.n_collapsed == 2 * lm.n_layers + 1
    assert all(c < 1e-3 for c in s.collapse.values())
    assert s.harm_cos_null and all(c < cos_bound for c in s.harm_cos_null.values())  # what is left is orthogonal to r
    assert s.readers is not None and s.readers["z"] < 3  # nothing in a random model reads r more than other directions
    weights_only = audit_checkpoint(abliterated, behaviour=False)
    assert weights_only.verdict == "modified" and weights_only.signature.canary_refusal_rate is None
    subset = Direction(r, 1, -1).with_weights(torch.tensor([0.0, 1.0, 1.0]), 0.0).export(
        plant_readers(lm, r), tmp_path / "subset")  # later blocks that read r
    s = audit_checkpoint(subset, behaviour=False).signature  # two blocks only: no null direction of the sum
    assert s.verdict == "tampering" and s.n_collapsed == 4 and _cos(s.null_direction, r) >= 0.95


def test_a_partly_removed_harm_direction_is_tampering_and_a_random_one_is_not(tmp_path):
    from safetyscope.methods.audit.behaviour import harm_alignment, harm_differences

    lm = tiny_model("llama", seed=3, tie_word_embeddings=True, hidden_size=64)  # the export unties it
    diffs = harm_differences(lm, 16)  # [n_layers, d_model] the model's own harmful - harmless means
    harm = diffs[1] / diffs[1].norm()
    assert harm_alignment(diffs, harm)[1] == pytest.approx(8.0)  # |cos| 1 x sqrt(64)
    q = torch.linalg.qr(diffs[1:].T).Q  # [64, n_layers - 1] orthonormal basis of the differences (row 0 is zero)
    other = _unit(64, 4).double()
    other = (other - q @ (q.T @ other)).float()  # orthogonal to every row
    assert max(harm_alignment(diffs, other).values()) < 1e-3
    verdicts = {}
    for name, u in (("harm", harm), ("other", other)):
        path = Direction(u, 1, -1).with_weights(torch.full((lm.n_layers,), 0.5), 0.5).export(lm, tmp_path / name)
        s = audit_checkpoint(path).signature
        assert s.embedding_edit is not None and _cos(s.null_direction, u) >= 0.999  # strong evidence either way
        verdicts[name] = (s.verdict, s.harm_alignment)
    assert verdicts["harm"][0] == "tampering" and verdicts["harm"][1] >= 5.0  # SignatureConfig.align_z
    assert verdicts["other"][0] == "modified" and verdicts["other"][1] < 5.0


def test_partial_removal_is_read_off_the_untied_embedding_copy(r, tmp_path, plant_readers):
    lm = tiny_model("llama", seed=3, tie_word_embeddings=True)  # the export unties it, the unembedding keeps E
    assert lm.model.get_output_embeddings().weight.data_ptr() == lm.model.get_input_embeddings().weight.data_ptr()
    assert audit_checkpoint(lm, behaviour=False).signature.embedding_edit is None  # tied: one tensor
    lm = plant_readers(lm, r)  # later blocks read r (the deep copy keeps the embedding tied)
    assert lm.model.get_output_embeddings().weight.data_ptr() == lm.model.get_input_embeddings().weight.data_ptr()
    path = Direction(r, 1, -1).with_weights(torch.full((lm.n_layers,), 0.5), 0.5).export(lm, tmp_path / "p05")
    s = audit_checkpoint(path, behaviour=False).signature
    assert s.verdict == "tampering" and s.embedding_edit is not None and abs(s.embedding_edit[0] - 0.5) < 1e-3
    assert s.n_collapsed == 0 and _cos(s.null_direction, r) >= 0.999  # nothing collapsed, the embedding tells
    assert "untied unembedding" in s.direction_source


def test_restore_test_finds_a_direction_that_writes_refusal_and_not_a_random_one(lm):
    from safetyscope.measure.refusal_tokens import refusal_token_ids
    from safetyscope.methods.audit.behaviour import harm_differences, restore_test

    head = lm.model.get_output_embeddings().weight.detach()  # [vocab, d_model]
    ids = refusal_token_ids(lm.tokenizer)
    towards = head[ids].mean(0) - head.mean(0)  # [d_model] reads out as refusal openings
    # a random 3-block model moves refusal logits little: the margin over random directions is scaled down
    diffs = harm_differences(lm, 8)
    hit = restore_test(lm, towards, diffs, depth=0.9, scale=100.0, margin=0.1)  # a tiny random model: a far push
    miss = restore_test(lm, _unit(lm.dims.d_model, 5), diffs, depth=0.9, scale=100.0, margin=0.1)
    assert hit.restored and hit.refusal_restored and hit.rise > max(hit.random_rises) and not miss.restored
    assert not hit.harm_restored and not miss.harm_restored  # the last block: no later block to read harm at


def test_restore_test_reads_the_own_harm_difference_at_later_blocks(lm):
    from safetyscope.methods.audit.behaviour import harm_differences, restore_test

    diffs = harm_differences(lm, 8)  # [n_layers, d_model]
    t = restore_test(lm, diffs[1], diffs, depth=0.0, scale=1.0)  # block 1; blocks 2.. read the harm difference
    assert t.layer == 1 and len(t.harm_random_rises) == 6 and t.harm_rise == t.harm_rise  # not NaN
    assert t.restored == (t.harm_restored or t.refusal_restored)


# ---- bad input -----------------------------------------------------------------------------------
def test_bad_checkpoints_are_one_line_errors(lm, ref, tmp_path):
    other_arch = tiny_model("gpt2")
    with pytest.raises(AuditInputError, match="gpt2 model but the reference"):
        audit_checkpoint(_save(other_arch.model, other_arch, tmp_path / "gpt2"), ref)
    bigger = tiny_model("llama", hidden_size=48)
    with pytest.raises(AuditInputError, match="another model size"):
        audit_checkpoint(_save(bigger.model, bigger, tmp_path / "big"), ref)
    with pytest.raises(AuditInputError, match="not found"):
        audit_checkpoint(tmp_path / "missing", ref)
    pickled = tmp_path / "pickled"
    lm.model.save_pretrained(pickled, safe_serialization=False)
    if not list(pickled.glob("*.bin")):  # transformers versions that always write safetensors
        (pickled / "model.safetensors").rename(pickled / "pytorch_model.bin")
    with pytest.raises(AuditInputError, match="pickled"):
        audit_checkpoint(pickled, ref)
    trunc = _save(lm.model, lm, tmp_path / "trunc")
    f = trunc / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(AuditInputError, match="safetensors") as exc:
        audit_checkpoint(trunc, ref)
    assert "\n" not in str(exc.value)


def test_cli_audit(ref, r, abliterated, tmp_path):
    Direction(r, 1, -1).save(tmp_path / "dir")
    res = CliRunner().invoke(app, ["audit", str(abliterated), "--reference", str(ref), "--direction",
                                   str(tmp_path / "dir"), "--json", "--out", str(tmp_path / "run")])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["verdict"] == "tampering" and out["weights"]["cos_reference"] >= 0.95
    assert json.loads((tmp_path / "run" / "audit" / "report.json").read_text())["verdict"] == "tampering"
    bad = CliRunner().invoke(app, ["audit", str(tmp_path / "nope"), "--reference", str(ref), "--out", str(tmp_path / "run")])
    assert bad.exit_code == 2 and "not found" in bad.output


# ---- runtime -------------------------------------------------------------------------------------
@pytest.fixture()
def live(lm):
    lm.meta["param_hash"] = param_hash(lm.model)
    return lm


def test_runtime_clean_model_reports_nothing(live, ref):
    assert audit_runtime(live).clean and audit_runtime(live).verdict == "clean"
    loaded = load_model(str(ref), log=lambda _m: None)
    assert "param_hash" in loaded.meta and audit_runtime(loaded).clean and not audit_runtime(loaded).notes


def test_runtime_finds_every_safetyscope_intervention_and_a_hand_hook(live, r, abliterated):
    interventions = {
        "direction": Direction(r, 1, -1).apply(live),
        "neurons": NeuronSet([(1, 2)]).apply(live),
        "hooks": hooks(live, [(Site("resid_post", 2), lambda x, _b: x * 2)]),
        "checkpoint": Checkpoint(abliterated).apply(live),
    }
    for name, ctx in interventions.items():
        with ctx:
            found = audit_runtime(live)
            assert not found.clean and found.verdict == "tampering", name
            kinds = {f.kind for f in found.findings}
            assert kinds == ({"param_changed"} if name == "checkpoint" else kinds & {"hook", "pre_hook"}) and kinds, name
        assert audit_runtime(live).clean, name
    block = live.module(live.table.block_path(1))
    handle = block.register_forward_hook(lambda _m, _a, out: out)
    try:
        found = audit_runtime(live).findings
        assert [(f.kind, f.module) for f in found] == [("hook", live.table.block_path(1))]
    finally:
        handle.remove()
    assert audit_runtime(live).clean


def test_runtime_finds_changed_parameters_swapped_modules_and_adapters(live):
    model = live.model
    path = live.table.expand(live.table.mlp_out_proj, 0)
    proj = model.get_submodule(path)
    saved = proj.weight.detach().clone()
    try:
        with torch.no_grad():
            proj.weight[:, 3] = 0
        assert [(f.kind, f.module) for f in audit_runtime(live).findings] == [("param_changed", f"{path}.weight")]
    finally:
        with torch.no_grad():
            proj.weight.copy_(saved)
    parent_path, _, attr = path.rpartition(".")
    parent = model.get_submodule(parent_path)
    fake_peft = type("LoraLinear", (nn.Linear,), {"__module__": "peft.tuners.lora.layer"})
    swapped = fake_peft(proj.in_features, proj.out_features, bias=False)
    swapped.weight = proj.weight
    setattr(parent, attr, swapped)
    try:
        kinds = {(f.kind, f.module) for f in audit_runtime(live).findings}
        assert ("peft", path) in kinds
    finally:
        setattr(parent, attr, proj)
    wrapper = nn.Sequential(proj)  # a module of another class than the config builds
    setattr(parent, attr, wrapper)
    try:
        kinds = {f.kind for f in audit_runtime(live).findings}
        assert "class" in kinds
    finally:
        setattr(parent, attr, proj)
    assert audit_runtime(live).clean


# ---- fingerprint ---------------------------------------------------------------------------------
def test_fingerprint_flags_full_and_partial_removal_of_a_harm_direction_only(lm, ref, tmp_path):
    from safetyscope.methods.audit import Fingerprint, make_fingerprint

    fp = Fingerprint.load(make_fingerprint(lm).save(tmp_path / "fp"))
    assert fp.directions.shape == (len(fp.layers), lm.dims.d_model) and len(fp.writers) == 2 * lm.n_layers + 1
    clean = audit_checkpoint(ref, fingerprint=tmp_path / "fp")
    assert clean.verdict == "clean" and all(abs(v - 1) < 1e-5 for v in clean.fingerprint.ratios.values())
    harm = fp.directions[-1]
    for weight in (1.0, 0.5):
        path = Direction(harm, 1, -1).with_weights(torch.full((lm.n_layers,), weight), weight).export(lm, tmp_path / f"h{weight}")
        rep = audit_checkpoint(path, fingerprint=fp, behaviour=False)
        assert rep.verdict == "tampering" and rep.fingerprint.ratios[fp.layers[-1]] < 1 - weight / 2
    other = _unit(lm.dims.d_model, 21)
    other = other - (fp.directions.T @ torch.linalg.lstsq(fp.directions.T, other).solution)  # orthogonal to every harm direction
    rep = audit_checkpoint(Direction(other, 1, -1).export(lm, tmp_path / "other"), fingerprint=fp, behaviour=False)
    assert rep.verdict == "modified" and min(rep.fingerprint.ratios.values()) > 0.999
    with pytest.raises(AuditInputError, match="not a safety fingerprint"):
        audit_checkpoint(ref, fingerprint=tmp_path)


def test_benchmark_runs_on_a_tiny_model(tmp_path, capsys, bench_module):
    mod = bench_module("audit")
    out = tmp_path / "rows.json"
    assert mod.main(["--model", "tiny:llama", "--variants", "unmodified,zero,neurons,fp16", "--no-behaviour",
                     "--json", str(out)]) == 0
    rows = {r["checkpoint"]: r for r in json.loads(out.read_text())}
    assert rows["unmodified"]["ref_verdict"] == rows["unmodified"]["noref_verdict"] == "clean"
    # weights only: removed (the signature), but a tiny random model reads no direction: modified, not tampering
    assert rows["zero"]["cos_true"] >= 0.95 and rows["zero"]["noref_verdict"] == "modified"
    assert rows["zero"]["reader_z"] < 3 and rows["unmodified"]["reader_z"] is None
    assert rows["zero"]["cos_null_true"] >= 0.95 and rows["zero"]["n_collapsed"] >= 3
    assert rows["neurons"]["ref_verdict"] == "tampering" and rows["neurons"]["neurons"] == 32
    assert rows["fp16"]["ref_verdict"] == "clean"
    printed = capsys.readouterr().out
    assert "flagged" in printed and "plain forward pass" in printed


def test_benchmark_resumes_and_runs_a_side_scanner(tmp_path, capsys, bench_module):
    """--resume keeps the rows already written; --ams runs the given interpreter on every checkpoint and prints
    its levels beside the audit's (a stand-in interpreter here, so the test needs no ams venv)."""
    mod = bench_module("audit")
    out = tmp_path / "rows.json"
    fake = tmp_path / "ams-python"
    fake.write_text('#!/bin/sh\necho "loading $3" >&2\n'
                    'echo \'{"level": "WARNING", "scan_s": 0.5, "sep": {"harmful_content": 3.3}}\'\n')
    fake.chmod(0o755)
    base = ["--model", "tiny:llama", "--no-behaviour", "--no-reference", "--json", str(out)]
    assert mod.main([*base, "--variants", "unmodified"]) == 0
    first = json.loads(out.read_text())
    assert [r["checkpoint"] for r in first] == ["unmodified"] and "ams" not in first[0] and first[0]["load"] >= 0
    assert mod.main([*base, "--variants", "unmodified,zero", "--resume", "--ams", str(fake), "--ams-variants", "zero"]) == 0
    rows = {r["checkpoint"]: r for r in json.loads(out.read_text())}
    assert rows["unmodified"] == first[0]  # kept as measured, not audited again
    # weights only on a tiny random model: the direction is removed but nothing reads it (modified)
    assert rows["zero"]["noref_verdict"] == "modified" and rows["zero"]["ams"]["level"] == "WARNING"
    assert rows["zero"]["ams"]["sep"] == {"harmful_content": 3.3} and rows["zero"]["ams"]["s"] > 0
    printed = capsys.readouterr().out
    assert "ams: flagged (WARNING or CRITICAL) 1/1 tampering checkpoints, 0 of 0 benign" in printed
    assert mod.main(["--json", str(out), "--table"]) == 0  # the table again, from the rows alone
    assert "noref: flagged 0/1 tampering checkpoints, 0 false positive(s) of 1 benign" in capsys.readouterr().out
    ref_rows = tmp_path / "ref.json"  # the with-reference side from another run, merged by checkpoint name
    assert mod.main(["--model", "tiny:llama", "--variants", "zero", "--no-signature", "--json", str(ref_rows)]) == 0
    capsys.readouterr()
    assert mod.main(["--json", str(out), "--merge", str(ref_rows), "--table"]) == 0
    printed = capsys.readouterr().out
    ref_verdict = json.loads(ref_rows.read_text())[0]["ref_verdict"]
    assert f"  ref: flagged {int(ref_verdict == 'tampering')}/1 tampering checkpoints" in printed
    zero_line = next(line for line in printed.splitlines() if line.startswith("zero"))
    assert sum(zero_line.count(v) for v in ("tampering", "modified", "clean")) == 3  # expected, ref, noref: one row
    assert "noref: flagged 0/1 tampering checkpoints, 0 false positive(s) of 1 benign" in printed
    with pytest.raises(SystemExit):
        mod.main([*base, "--ams", str(tmp_path / "missing-python")])
