"""Edited Hugging Face checkpoints as interventions: exact swap-in, exact restore, clear mismatch errors."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from safetyscope.artifacts import ArtifactError, Checkpoint, load_artifact
from safetyscope.methods.direction.artifact import Direction
from safetyscope.methods.neurons.artifact import NeuronSet
from safetyscope.prompts.chat import tokenize_prompts
from safetyscope.testing import tiny_model


def _logits(model, batch) -> torch.Tensor:  # [batch, pos, vocab]
    with torch.no_grad():
        return model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids,
                     use_cache=False).logits


def _direction(lm) -> Direction:
    g = torch.Generator().manual_seed(1)
    return Direction(torch.randn(lm.dims.d_model, generator=g), layer=1)


def _params(model) -> dict[str, torch.Tensor]:
    return dict(model.named_parameters(remove_duplicate=False))


@pytest.mark.parametrize(("family", "edit"), [("llama", "direction"), ("gpt2", "direction"), ("qwen2", "neurons")])
def test_apply_equals_the_exported_model_and_exit_restores(family, edit, prompts, tmp_path):
    lm = tiny_model(family)
    art = _direction(lm) if edit == "direction" else NeuronSet([(0, 3), (1, 10), (2, 5)])
    out = art.export(lm, tmp_path / "edited")
    ck = load_artifact(out)
    assert isinstance(ck, Checkpoint) and ck.kind == "checkpoint" and ck.note.get("source_model") == lm.name
    b = tokenize_prompts(lm.tokenizer, prompts)
    mask = b.attention_mask.bool()
    before = _logits(lm.model, b)
    params = _params(lm.model)
    fresh = _logits(AutoModelForCausalLM.from_pretrained(out).eval(), b)
    with ck.apply(lm):
        under = _logits(lm.model, b)
    torch.testing.assert_close(under[mask], fresh[mask], rtol=0, atol=1e-6)  # the same weights, loaded two ways
    assert not torch.allclose(under[mask], before[mask], atol=1e-4)  # the edit did something
    assert torch.equal(_logits(lm.model, b), before)  # bit-identical after exit
    after = _params(lm.model)
    assert after.keys() == params.keys() and all(after[k] is params[k] for k in params)  # same objects, ties kept
    if family == "gpt2":  # the export untied the unembedding; the live model is tied again after exit
        assert lm.model.lm_head.weight is lm.model.transformer.wte.weight


def test_tied_checkpoint_without_unembedding_and_sharded(prompts, tmp_path):
    """save_pretrained writes a tied matrix once (and can shard): both are applied exactly."""
    lm, other = tiny_model("gpt2"), tiny_model("gpt2", seed=5)
    other.model.save_pretrained(tmp_path / "ck", max_shard_size="20KB")
    ck = load_artifact(tmp_path / "ck")
    assert len(list((tmp_path / "ck").glob("model-*.safetensors"))) > 1
    b = tokenize_prompts(lm.tokenizer, prompts)
    before = _logits(lm.model, b)
    with ck.apply(lm):
        assert lm.model.lm_head.weight is lm.model.transformer.wte.weight  # the alias follows the new tensor
        under = _logits(lm.model, b)
    torch.testing.assert_close(under, _logits(other.model, b), rtol=0, atol=1e-6)
    assert torch.equal(_logits(lm.model, b), before)


def test_restored_when_the_block_raises(prompts, tmp_path):
    lm = tiny_model("llama")
    out = _direction(lm).export(lm, tmp_path / "edited")
    b = tokenize_prompts(lm.tokenizer, prompts)
    before = _logits(lm.model, b)
    with pytest.raises(RuntimeError, match="boom"), load_artifact(out).apply(lm):
        raise RuntimeError("boom")
    assert torch.equal(_logits(lm.model, b), before)


@pytest.mark.parametrize(("target", "needle"), [
    (lambda: tiny_model("qwen2"), "is a llama checkpoint but the model is qwen2"),
    (lambda: tiny_model("llama", intermediate_size=48), "mismatched tensor"),
    (lambda: tiny_model("llama", num_hidden_layers=2), "the model lacks"),
    (lambda: tiny_model("llama", num_hidden_layers=4), "the checkpoint lacks"),
])
def test_mismatched_checkpoint_is_refused_before_any_change(target, needle, prompts, tmp_path):
    src = tiny_model("llama")
    out = _direction(src).export(src, tmp_path / "edited")
    lm = target()
    b = tokenize_prompts(lm.tokenizer, prompts)
    before = _logits(lm.model, b)
    with pytest.raises(ArtifactError, match=needle) as err, load_artifact(out).apply(lm):
        pass
    msg = str(err.value)
    assert "\n" not in msg and (needle.startswith("the checkpoint lacks") or "safetyscope eval BASE_MODEL" in msg)
    assert torch.equal(_logits(lm.model, b), before)


def test_directory_recognition_and_pointer_round_trip(tmp_path):
    lm = tiny_model("llama")
    lm.model.save_pretrained(tmp_path / "ck")
    assert isinstance(load_artifact(tmp_path / "ck"), Checkpoint)
    pointer = Checkpoint(tmp_path / "ck").save(tmp_path / "pointer")
    assert json.loads((pointer / "artifact.json").read_text())["kind"] == "checkpoint"
    again = load_artifact(pointer)
    assert isinstance(again, Checkpoint) and again.path == (tmp_path / "ck").resolve()
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text("{}")
    (pickled / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(ArtifactError, match="pickled weights.*safe_serialization=True"):
        load_artifact(pickled)
    (tmp_path / "plain").mkdir()
    with pytest.raises(ArtifactError, match="no artifact.json.*config.json"):
        load_artifact(tmp_path / "plain")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text("{}")
    (bad / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(ArtifactError, match="not a readable safetensors file"), load_artifact(bad).apply(lm):
        pass
