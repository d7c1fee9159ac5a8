"""The reader test: a removed direction that later blocks read (planted reader rows) against random ones."""

from __future__ import annotations

import pytest
import torch

from safetyscope.methods.audit import audit_checkpoint
from safetyscope.methods.audit.readers import reader_rows, reader_test
from safetyscope.methods.audit.source import TensorSource
from safetyscope.methods.direction.artifact import Direction
from safetyscope.testing import tiny_model


def _unit(d: int, seed: int) -> torch.Tensor:
    r = torch.randn(d, generator=torch.Generator().manual_seed(seed))
    return r / r.norm()


@pytest.fixture(scope="module")
def lm():
    return tiny_model("llama", seed=3)


def test_planted_readers_give_a_large_z_and_random_directions_about_zero(lm, plant_readers):
    r = _unit(lm.dims.d_model, 11)
    planted = TensorSource.from_model(plant_readers(lm, r))
    rows = reader_rows(planted)
    assert set(rows) == set(range(lm.n_layers // 2, lm.n_layers))  # later blocks only
    layer = lm.n_layers - 1
    n_rows = sum(m.weight.shape[0] for m in (lm.model.model.layers[layer].mlp.gate_proj,
                                              lm.model.model.layers[layer].mlp.up_proj,
                                              *(getattr(lm.model.model.layers[layer].self_attn, p)
                                                for p in ("q_proj", "k_proj", "v_proj"))))
    assert rows[layer].shape == (n_rows, lm.dims.d_model)  # mlp_in and attn_in rows
    assert torch.allclose(rows[layer].norm(dim=1), torch.ones(n_rows))
    hit = reader_test(rows, r, top_k=8)
    assert hit.z > 10 and min(hit.top_cos.values()) == pytest.approx(0.9, abs=1e-4)
    misses = [reader_test(rows, _unit(lm.dims.d_model, s), top_k=8).z for s in range(20, 30)]
    assert max(abs(z) for z in misses) < 3  # random directions are not read beyond random ones
    unplanted = reader_test(reader_rows(TensorSource.from_model(lm)), r, top_k=8)
    assert unplanted.z < 3  # the same direction in the model without its readers


def test_reader_rows_of_a_conv1d_model_read_along_the_residual_axis():
    lm = tiny_model("gpt2")
    rows = reader_rows(TensorSource.from_model(lm), from_depth=0.0)
    block = lm.model.transformer.h[0]
    d = lm.dims.d_model
    expected = block.attn.c_attn.weight.shape[1] + block.mlp.c_fc.weight.shape[1]  # Conv1D weights are [in, out]
    assert rows[0].shape == (expected, d)


def test_a_removed_read_direction_is_tampering_and_an_unread_one_modified_without_behaviour(lm, tmp_path, plant_readers):
    r = _unit(lm.dims.d_model, 11)
    read = Direction(r, 1, -1).export(plant_readers(lm, r), tmp_path / "read")
    unread = Direction(r, 1, -1).export(lm, tmp_path / "unread")
    a, b = audit_checkpoint(read, behaviour=False), audit_checkpoint(unread, behaviour=False)
    assert a.signature.n_collapsed >= 3 and b.signature.n_collapsed >= 3  # both: the ablation signature
    assert a.verdict == "tampering" and a.signature.readers["z"] >= 3
    assert b.verdict == "modified" and b.signature.readers["z"] < 3
    assert "no later block reads" in " ".join(b.evidence)
    clean = audit_checkpoint(lm, behaviour=False).signature
    assert clean.verdict == "clean" and clean.readers is None  # no removal: no reader test


def test_writer_nulls_find_a_direction_only_a_few_writers_lost_and_skip_narrow_matrices():
    from safetyscope.methods.audit.signature import writer_nulls

    g = torch.Generator().manual_seed(0)
    r = _unit(16, 4)
    wide = torch.randn(16, 40, generator=g)
    lost = wide - r[:, None] * (r @ wide)[None]  # [16, 40] cannot write along r
    narrow = torch.randn(16, 8, generator=g)  # rank 8 < 16: null directions by construction
    base = {"a": 1.0, "b": 1.0, "c": 1.0, "n": 1.0}  # a writer's typical output norm along a random direction
    found = writer_nulls({"a": lost, "b": lost.clone(), "c": wide, "n": narrow}, base, 0.05)
    assert len(found) == 1 and abs(float(found[0] @ r)) > 0.999  # one direction, however many writers lost it
    assert writer_nulls({"c": wide, "n": narrow}, base, 0.05) == []


def test_a_kernel_peaking_in_one_block_is_found_as_a_graded_removal(lm, tmp_path):
    r = _unit(lm.dims.d_model, 11)
    path = Direction(r, 1, -1).with_weights(torch.tensor([0.8, 1.0, 0.8]), 0.0).export(lm, tmp_path / "kernel")
    s = audit_checkpoint(path, behaviour=False).signature
    assert abs(float(s.null_direction @ r)) > 0.95
    assert s.n_collapsed == 2 and s.n_weak >= 3  # block 1's two writers lost r, blocks 0 and 2 kept a fifth of it
    assert s.verdict == "clean" and "graded weakness only" in " ".join(s.evidence)  # weights alone: not enough


def test_a_uniform_partial_removal_without_weight_evidence_is_found_by_its_alignment(tmp_path):
    from safetyscope.methods.audit.behaviour import harm_differences

    lm = tiny_model("llama", seed=3, hidden_size=64)
    diffs = harm_differences(lm, 16)  # [n_layers, d_model]
    harm = (diffs[1] / diffs[1].norm()).float()
    q = torch.linalg.qr(diffs[1:].T).Q  # [64, n_layers - 1]
    other = _unit(64, 4).double()
    other = (other - q @ (q.T @ other)).float()  # orthogonal to every harm difference
    got = {}
    for name, u in (("harm", harm), ("other", other)):  # 60% removed from every writer, the embedding untouched
        path = Direction(u, 1, -1).with_weights(torch.full((lm.n_layers,), 0.6), 0.0).export(lm, tmp_path / name)
        s = audit_checkpoint(path).signature
        assert s.n_collapsed == 0 and s.n_weak < 3 and s.embedding_edit is None  # no weight evidence
        assert abs(float(s.null_direction @ u)) > 0.9  # the least-written direction is the removed one
        got[name] = (s.verdict, s.harm_alignment)
    assert got["harm"][0] == "tampering" and got["harm"][1] >= 5
    assert got["other"][0] == "clean" and got["other"][1] < 5


def test_reader_benchmark_runs_on_a_tiny_model(tmp_path, capsys, bench_module):
    import json

    out = tmp_path / "rows.json"
    assert bench_module("audit_readers").main(["--model", "tiny:llama", "--prompts", "4", "--random", "3",
                                               "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert len(rows) == 2 + 3 and all(abs(r["z"]) < 1e6 and 0 <= r["top_cos"] <= 1 for r in rows)  # 3 blocks: 2 harm rows
    assert "random:" in capsys.readouterr().out
