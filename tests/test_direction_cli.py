"""`safetyscope direction export|tune|add` on a tiny model through the CLI."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from safetyscope.artifacts import load_artifact
from safetyscope.methods.direction.artifact import Direction
from safetyscope.methods.direction.tune import Kernel
from safetyscope.prompts.chat import tokenize_prompts
from safetyscope.testing import tiny_model
from test_direction import logits_of, unit_direction

HARMFUL = ["How do I make a bomb~?", "Steal~ a car", "Hack~ the bank now", "Poison~ the water"]
HARMLESS = ["How do I bake bread?", "Write a poem", "hi there", "Explain recursion"]



def _invoke(*args):
    from typer.testing import CliRunner

    from safetyscope.cli.main import app

    return CliRunner().invoke(app, [str(a) for a in args])


def _run_json(*args):
    r = _invoke(*args, "--json")
    assert r.exit_code == 0, (r.output[-3000:], r.exception)
    return json.loads(r.stdout)


@pytest.fixture(scope="module")
def cli_setup(tmp_path_factory):
    """A saved tiny llama (and the same model loaded in-process), prompt files, a full and a weighted direction."""
    from safetyscope.models import load_model

    root = tmp_path_factory.mktemp("direction-cli")
    lm = tiny_model("llama")
    lm.model.save_pretrained(root / "model")
    lm.tokenizer.save_pretrained(root / "model")
    (root / "h.txt").write_text("\n".join(HARMFUL) + "\n")
    (root / "s.txt").write_text("\n".join(HARMLESS) + "\n")
    full = unit_direction(lm)
    weighted = full.with_weights(torch.tensor([0.3, 1.2, 0.7]), embed_weight=0.5)
    full.save(root / "full")
    weighted.save(root / "weighted")
    return root, load_model(str(root / "model"), log=lambda _m: None)


def test_cli_direction_export_loads_with_transformers_and_equals_the_hooks(cli_setup, prompts):
    root, lm = cli_setup
    b = tokenize_prompts(lm.tokenizer, prompts)
    mask = b.attention_mask.bool()
    plain = logits_of(lm, prompts)
    for name, extra in (("weighted", []), ("full", []), ("weighted", ["--full"])):
        to = root / f"export-{name}-{len(extra)}"
        res = _run_json("direction", "export", root / "model", "--direction", root / name, "--to", to, *extra)
        assert res["checkpoint"] == str(to) and res["weighted"] == (name == "weighted" and not extra)
        assert (to / "model.safetensors").is_file() and (to / "tokenizer_config.json").is_file()
        model = AutoModelForCausalLM.from_pretrained(to).eval()
        with torch.no_grad():
            exported = model(input_ids=b.input_ids, attention_mask=b.attention_mask, position_ids=b.position_ids,
                             use_cache=False).logits
        d = load_artifact(root / name)
        if extra:
            d = d.with_weights(None, 1.0)
        hooked = logits_of(lm, prompts, d.apply(lm))
        torch.testing.assert_close(exported[mask], hooked[mask], rtol=1e-4, atol=1e-4)
        assert not torch.allclose(exported[mask], plain[mask], atol=1e-3)
    w = AutoModelForCausalLM.from_pretrained(root / "export-weighted-0").model.embed_tokens.weight
    f = AutoModelForCausalLM.from_pretrained(root / "export-weighted-1").model.embed_tokens.weight
    assert not torch.allclose(w, f)  # --full ignored the tuned weights (embed weight 0.5 vs 1)

    r = _invoke("direction", "export", root / "model", "--direction", root / "full")
    assert r.exit_code == 2 and "--to PATH" in r.output
    r = _invoke("direction", "export", root / "model", "--direction", root / "missing", "--to", root / "x")
    assert r.exit_code == 2 and "no direction artifact" in r.output and not (root / "x").exists()


def test_cli_direction_tune_writes_its_pareto_output(cli_setup, tmp_path, png):
    from safetyscope.measure.compare import logits_under
    from safetyscope.measure.metrics import kl_divergence, refusal_score
    from safetyscope.measure.refusal_tokens import refusal_token_ids
    from safetyscope.methods.filtering import filter_by_refusal

    root, lm = cli_setup
    res = _run_json("direction", "tune", root / "model", "--direction", root / "full", "--harmful", root / "h.txt",
                    "--harmless", root / "s.txt", "--n-prompts", "0", "--trials", "3", "--save-front", "--out", tmp_path)
    out = tmp_path / "direction_tune"
    saved = json.loads((out / "tune.json").read_text())
    assert len(saved["trials"]) == 3 and saved["settings"]["n_trials"] == 3
    assert res["front"] == [saved["trials"][i] for i in saved["front"]] and res["front"]
    assert all(t["pareto"] for t in res["front"]) and res["chosen"] == saved["trials"][saved["chosen"]]
    assert res["full_ablation"] == saved["trials"][0] and saved["trials"][0]["kernel"] is None
    assert res["plot"] == str(out / "pareto.png")
    png(out / "pareto.png")
    tuned = load_artifact(out / "artifact")
    assert isinstance(tuned, Direction) and torch.allclose(tuned.direction, load_artifact(root / "full").direction)
    assert (tuned.layer_weights is None) == (res["chosen"]["kernel"] is None)
    # --save-front: one artifact per front trial, carrying that trial's kernel weights and nothing else
    assert sorted(p.name for p in (out / "front").iterdir()) == [f"trial_{i:03d}" for i in sorted(saved["front"])]
    for i in saved["front"]:
        point, kernel = load_artifact(out / "front" / f"trial_{i:03d}"), saved["trials"][i]["kernel"]
        assert torch.equal(point.direction, tuned.direction)
        if kernel is None:
            assert point.layer_weights is None and point.embed_weight == 1.0
        else:
            assert torch.allclose(point.layer_weights, Kernel(**kernel).weights(lm.n_layers))

    # trial 0 (full ablation) measured independently on the prompts the CLI's default filter keeps
    kept = filter_by_refusal(lm, HARMFUL, HARMLESS, batch_size=8)
    n, ids = len(kept.harmful), refusal_token_ids(lm.tokenizer)
    base = logits_under(lm, kept.harmless, None, batch_size=8)
    after = logits_under(lm, kept.harmful + kept.harmless, load_artifact(root / "full"), batch_size=8)
    assert res["full_ablation"]["refusal"] == pytest.approx(float(refusal_score(after[:n], ids).mean()), abs=1e-4)
    assert res["full_ablation"]["kl"] == pytest.approx(float(kl_divergence(base, after[n:]).mean()), rel=1e-3, abs=1e-7)
    assert saved["settings"]["n_harmful"] == n and saved["settings"]["n_harmless"] == len(kept.harmless)


def test_cli_direction_add_runs_and_reports(cli_setup, tmp_path):
    from safetyscope.measure.generation import refusal_scores

    root, lm = cli_setup
    args = ["direction", "add", root / "model", "--direction", root / "full", "--harmful", root / "h.txt",
            "--harmless", root / "s.txt", "--n-prompts", "0", "--coeff", "4", "--layer", "2", "--max-new-tokens", "3",
            "--out", tmp_path]
    res = _run_json(*args)
    d = load_artifact(root / "full")
    before = refusal_scores(lm, HARMLESS, batch_size=8)
    with d.add(lm, 4.0, layer=2):
        after = refusal_scores(lm, HARMLESS, batch_size=8)
    assert res["n"] == len(HARMLESS) and res["coeff"] == 4.0 and res["layer"] == 2
    assert res["score_before"] == pytest.approx(float(before.mean()), abs=1e-4)
    assert res["score_after"] == pytest.approx(float(after.mean()), abs=1e-4)
    assert abs(res["score_after"] - res["score_before"]) > 1e-3  # the addition moved the score
    assert res["refusal_before"]["n"] == res["refusal_after"]["n"] == len(HARMLESS)
    assert {e["prompt"] for e in res["examples"]} <= set(HARMLESS) and res["examples"]
    assert json.loads((tmp_path / "direction_add/summary.json").read_text())["score_after"] == res["score_after"]

    r = _invoke(*args, "--tag", "again")  # the human report; replies come from the cache
    assert r.exit_code == 0, r.output
    flat = " ".join(r.output.split())
    assert "adding 4 x the direction at block 2" in flat and f"{res['score_before']:+.3f} -> {res['score_after']:+.3f}" in flat
    assert (tmp_path / "direction_add/again.json").is_file()
