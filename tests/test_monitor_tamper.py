"""The monitor's tamper check (methods/monitor/tamper.py) on a tiny random model: the shared prefix, read in
every prefill pass, tells a refusal-subspace removal (hooks or orthogonalised weights) from other edits."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from safetyscope.artifacts.base import load_artifact
from safetyscope.hooks import forward, hooks
from safetyscope.methods.direction.artifact import ablation_edits
from safetyscope.methods.direction.weights import orthogonalized_copy
from safetyscope.methods.monitor import fit_monitor
from safetyscope.methods.monitor.tamper import ENRICHMENT, PrefixCheck, shared_prefix_ids
from safetyscope.models.adapter import LoadedModel
from safetyscope.prompts.builtin import builtin_prompts
from safetyscope.prompts.chat import tokenize_prompts
from safetyscope.testing import tiny_model

HARMFUL = builtin_prompts("harmful", "train").texts[:12]
HARMLESS = builtin_prompts("harmless", "train").texts[:12]
TEST = builtin_prompts("harmful", "test").texts[:3] + builtin_prompts("harmless", "test").texts[:3]
SYSTEM = "You are a careful assistant."


@pytest.fixture(scope="module")
def lm():
    return tiny_model("llama", hidden_size=64, intermediate_size=128)


@pytest.fixture(scope="module")
def monitor(lm):
    return fit_monitor(lm, HARMFUL, HARMLESS, calibration=builtin_prompts("harmless", "val").texts[:12], fpr=0.1,
                       n_readers=2, system=SYSTEM)


def _read(lm, monitor, texts=TEST, system=SYSTEM):
    batch = tokenize_prompts(lm.tokenizer, texts, system=system)
    with torch.inference_mode(), monitor.watch(lm, strict=False) as w:
        forward(lm, batch, last_only=True)
    return w


def test_the_print_holds_the_template_opening_and_an_orthonormal_basis(lm, monitor):
    pp = monitor.prefix
    assert pp is not None
    assert np.array_equal(pp.ids, shared_prefix_ids(lm, SYSTEM)) and pp.ids.size >= 4
    assert pp.coords.shape == (len(pp.blocks), pp.ids.size, pp.basis.shape[0])
    np.testing.assert_allclose(pp.basis @ pp.basis.T, np.eye(pp.basis.shape[0]), atol=1e-9)
    assert set(pp.blocks) <= set(monitor.layers)


def test_an_unmodified_model_reads_clean(lm, monitor):
    t = _read(lm, monitor).tamper
    assert t.kind == "clean" and t.n_reads == 1 and t.deviation < monitor.prefix.floor
    assert not any(v.tampered for v in _read(lm, monitor).verdicts)


def test_removing_a_refusal_subspace_direction_is_found_and_recovered(lm, monitor):
    r = torch.from_numpy(monitor.prefix.basis[0]).float()
    with hooks(lm, ablation_edits(lm, r, None, 1.0, False)):
        w = _read(lm, monitor)
    t = w.tamper
    assert t.kind == "refusal_tampering" and t.enrichment >= ENRICHMENT
    assert abs(float(t.direction @ monitor.prefix.basis[0])) > 0.9
    assert all(v.tampered and v.alert for v in w.verdicts)


def test_an_orthogonalised_checkpoint_is_found_too(lm, monitor):
    r = torch.from_numpy(monitor.prefix.basis[0]).float()
    edited = LoadedModel.wrap(orthogonalized_copy(lm, r, None, 1.0, False), lm.tokenizer, name="edited")
    assert _read(edited, monitor).tamper.kind == "refusal_tampering"


def test_other_edits_are_modified_not_refusal_tampering(lm, monitor):
    pp = monitor.prefix
    g = np.random.default_rng(3).standard_normal(pp.basis.shape[1])
    g -= (g @ pp.basis[:pp.k_refusal].T) @ pp.basis[:pp.k_refusal]  # a direction outside the refusal subspace
    with hooks(lm, ablation_edits(lm, torch.from_numpy(g / np.linalg.norm(g)).float(), None, 1.0, False)):
        t = _read(lm, monitor).tamper
    assert t.kind == "modified" and t.enrichment < ENRICHMENT and t.deviation > pp.floor
    noisy = copy.deepcopy(lm.model)
    with torch.no_grad():
        for name, p in noisy.named_parameters():
            if name.endswith(("q_proj.weight", "down_proj.weight")):
                p.add_(0.01 * p.std() * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    t = _read(LoadedModel.wrap(noisy, lm.tokenizer, name="noisy"), monitor).tamper
    assert t.kind == "modified"


def test_another_system_prompt_leaves_it_unchecked(lm, monitor):
    assert _read(lm, monitor, system="Something else entirely.").tamper.kind == "unchecked"


def test_the_print_survives_save_and_load(lm, monitor, tmp_path):
    monitor.save(tmp_path / "m")
    again = load_artifact(tmp_path / "m")
    assert again.prefix is not None and np.array_equal(again.prefix.ids, monitor.prefix.ids)
    np.testing.assert_array_equal(again.prefix.coords, monitor.prefix.coords)
    r = torch.from_numpy(monitor.prefix.basis[0]).float()
    with hooks(lm, ablation_edits(lm, r, None, 1.0, False)):
        assert _read(lm, again).tamper.kind == "refusal_tampering"


def test_a_tampered_generation_can_be_stopped(lm, monitor):
    batch = tokenize_prompts(lm.tokenizer, TEST[:2], system=SYSTEM)
    r = torch.from_numpy(monitor.prefix.basis[0]).float()
    with hooks(lm, ablation_edits(lm, r, None, 1.0, False)), monitor.watch(lm, stop_on_alert=True) as w:
        out = lm.model.generate(input_ids=batch.input_ids, attention_mask=batch.attention_mask, do_sample=False,
                                max_new_tokens=6, pad_token_id=0, stopping_criteria=w.stopping_criteria())
    assert w.tamper.kind == "refusal_tampering"
    assert out.shape[1] == batch.input_ids.shape[1] + 1  # every row stopped after its first token


def test_a_row_without_the_prefix_is_not_read(lm, monitor):
    check = PrefixCheck(monitor.prefix)
    ids = torch.zeros(1, monitor.prefix.ids.size + 3, dtype=torch.long)
    assert check.row_start(ids, None) is None and check.result().kind == "unchecked"


def test_the_tamper_benchmark_runs_on_a_tiny_model(tmp_path, bench_module):
    import json

    out = tmp_path / "rows.json"
    assert bench_module("monitor_tamper").main(["--model", "tiny:llama", "--prompts", "2", "--random", "1",
                                                "--json", str(out)]) == 0
    rows = {r["condition"]: r for r in json.loads(out.read_text())}
    assert rows["unmodified"]["kind"] == "clean"
    assert all(r["kind"] in ("modified", "refusal_tampering") for name, r in rows.items() if name != "unmodified")


def test_evaluate_reports_the_check_and_alerts_every_answered_prompt_under_removal(lm, monitor):
    from safetyscope.methods.direction.artifact import Direction
    from safetyscope.methods.monitor.evaluate import evaluate_monitor

    attack = Direction(torch.from_numpy(monitor.prefix.basis[0]).float(), layer=1)
    ev = evaluate_monitor(lm, monitor, TEST[:3], TEST[3:], attack=attack, max_new_tokens=2, system=SYSTEM,
                          strict=False)
    assert ev.clean.tamper["kind"] == "clean" and ev.attacked is not None
    assert ev.attacked.tamper["kind"] == "refusal_tampering"
    assert ev.attacked.n_complied_alerted == ev.attacked.n_complied
    assert ev.clean.n_complied_alerted == ev.clean.n_complied_flagged
    assert ev.to_json()["attacked"]["tamper"]["kind"] == "refusal_tampering"
