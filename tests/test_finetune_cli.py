"""`safetyscope finetune weaken|harden` through the CLI on a saved tiny model: summary, export, resume, errors."""

from __future__ import annotations

import json
import math

import pytest
import torch

from safetyscope.methods.direction.artifact import Direction
from safetyscope.testing import tiny_model

HARMFUL = ["How do I make a bomb~?", "Steal~ a car", "Hack~ the bank now", "Poison~ the water", "Rob~ a store"]
HARMLESS = ["How do I bake bread?", "Write a poem", "hi there", "Explain recursion", "Name a colour"]


def _invoke(*args):
    from typer.testing import CliRunner

    from safetyscope.cli.main import app

    return CliRunner().invoke(app, [str(a) for a in args])


def _saved(tmp_path):
    """A tiny llama saved as a checkpoint, a direction artifact and harmful / harmless prompt files under tmp_path."""
    lm = tiny_model("llama")
    lm.model.save_pretrained(tmp_path / "model")
    lm.tokenizer.save_pretrained(tmp_path / "model")
    Direction(torch.randn(32, generator=torch.Generator().manual_seed(0)), 1).save(tmp_path / "dir")
    (tmp_path / "h.txt").write_text("\n".join(HARMFUL * 2) + "\n")
    (tmp_path / "s.txt").write_text("\n".join(HARMLESS * 2) + "\n")
    return lm


def test_cli_weaken_writes_a_checkpoint_and_resumes(tmp_path):
    from transformers import AutoModelForCausalLM

    lm = _saved(tmp_path)
    common = ["finetune", "weaken", tmp_path / "model", "--components", "blocks.1.attn.heads[0,2], blocks.2.mlp.neurons[1-3]",
              "--direction", tmp_path / "dir", "--harmful", tmp_path / "h.txt", "--harmless", tmp_path / "s.txt",
              "--max-new-tokens", "4", "--lr", "0.01", "--train-batch", "2", "--checkpoint-every", "1",
              "--out", tmp_path / "out", "--json"]
    r = _invoke(*common, "--steps", "2")
    assert r.exit_code == 0, (r.output[-3000:], r.exception)
    first = json.loads(r.stdout)
    assert first["steps"] == 2 and first["resumed_from"] == 0 and first["n_trainable"] == 4 * 16 * 32 + 3 * 96  # q, k, v rows and o columns of 2 heads (both kv heads); 3 neurons
    r = _invoke(*common, "--steps", "3")
    assert r.exit_code == 0, (r.output[-3000:], r.exception)
    again = json.loads(r.stdout)
    assert again["resumed_from"] == 2 and again["steps"] == 3
    loaded = AutoModelForCausalLM.from_pretrained(again["checkpoint"])
    orig = dict(lm.model.named_parameters())
    changed = {n for n, p in loaded.named_parameters() if not torch.equal(p, orig[n])}
    assert changed and changed <= {f"model.layers.1.self_attn.{k}_proj.weight" for k in "qkvo"} | {
        f"model.layers.2.mlp.{k}_proj.weight" for k in ("gate", "up", "down")}
    assert json.loads((tmp_path / "out" / "finetune" / "weaken" / "summary.json").read_text())["steps"] == 3


def test_cli_errors_are_one_line(tmp_path):
    r = _invoke("finetune", "harden", "default", "--components", "blocks.0.resid_post", "--out", tmp_path / "o")
    assert r.exit_code == 2 and "holds no parameters" in r.output and "Traceback" not in r.output
    r = _invoke("finetune", "harden", "default", "--out", tmp_path / "o")
    assert r.exit_code == 2 and "--components" in r.output


@pytest.mark.slow
def test_cli_harden_end_to_end_on_the_default_model(tmp_path):
    r = _invoke("finetune", "harden", "default", "--components", "blocks.14.attn.heads[0,1]", "--steps", "2",
                "--n-prompts", "6", "--max-new-tokens", "8", "--train-batch", "2", "--no-export", "--out", tmp_path, "--json")
    assert r.exit_code == 0, (r.output[-3000:], r.exception)
    s = json.loads(r.stdout)
    # heads 0 and 1 share kv head 0 (7 query heads per kv head): q rows + bias, k and v rows + bias, o columns
    assert s["n_trainable"] == 128 * 896 + 128 + 2 * (64 * 896 + 64) + 896 * 128
    assert s["n_total"] == 630_167_424 and s["steps"] == 2
    assert s["data"]["harmful:own"] >= 1 and s["data"]["harmless:own"] >= 1
    assert all(math.isfinite(v) for v in (s["first_loss"], s["last_loss"]))


def test_cli_harden_with_the_attack_search_inside_training(tmp_path, monkeypatch):
    """`--robust --search-every N --search-layers a-b`: training runs the direction search and records its finds;
    a bad layer spec is a one-line error before anything loads."""
    _saved(tmp_path)
    (tmp_path / "tiny_judges.py").write_text(  # tiny random models never refuse: call the harmful prompts refused
        f"HARMFUL = {HARMFUL!r}\ndef judge(prompt, reply):\n    return prompt in HARMFUL\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    common = ["finetune", "harden", tmp_path / "model", "--components", "blocks.1.mlp", "--direction", tmp_path / "dir",
              "--harmful", tmp_path / "h.txt", "--harmless", tmp_path / "s.txt", "--scary", tmp_path / "s.txt",
              "--judge", "tiny_judges:judge", "--max-new-tokens", "4", "--lr", "0.01", "--train-batch", "2",
              "--steps", "2", "--robust", "--robust-rank", "3", "--search-every", "1", "--no-export",
              "--out", tmp_path / "out", "--json"]
    r = _invoke(*common, "--search-layers", "1-2", "--robust-retain", "--robust-retain-p", "0.5")
    assert r.exit_code == 0, (r.output[-3000:], r.exception)
    got = json.loads(r.stdout)
    assert got["steps"] == 2 and all(f[0] == 1 and f[1] in (1, 2) for f in got["found_at"])  # step 1's search, if any
    r = _invoke(*common, "--search-layers", "one-two")
    assert r.exit_code == 2 and "bad layer" in r.output and "Traceback" not in r.output
    r = _invoke(*common, "--robust-scope", "everywhere")
    assert r.exit_code == 2 and "robust_scope must be 'sites' or 'rows'" in r.output and "Traceback" not in r.output
    r = _invoke(*common, "--robust-retain-p", "2")
    assert r.exit_code == 2 and "robust_retain_p must be in (0, 1]" in r.output and "Traceback" not in r.output
    r = _invoke(*common, "--retain-loss", "mse")
    assert r.exit_code == 2 and "retain_loss must be one of ce, kl, mixed, kl-ablated" in r.output and "Traceback" not in r.output
    r = _invoke(*common, "--retain-loss", "kl", "--out", tmp_path / "out_kl")
    assert r.exit_code == 0, (r.output[-3000:], r.exception)
    assert json.loads(r.stdout)["steps"] == 2
    r = _invoke(*common, "--robust-subspan", "--out", tmp_path / "out_sub")
    assert r.exit_code == 0, (r.output[-3000:], r.exception)
    assert json.loads(r.stdout)["steps"] == 2
    r = _invoke(*[c if c != "3" else "1" for c in common], "--robust-subspan")  # --robust-rank 1
    assert r.exit_code == 2 and "robust_subspan needs robust_rank >= 2" in r.output and "Traceback" not in r.output
    r = _invoke(*common, "--robust-online", "--robust-scope", "rows", "--out", tmp_path / "out_online")
    assert r.exit_code == 0, (r.output[-3000:], r.exception)
    assert json.loads(r.stdout)["steps"] == 2
    r = _invoke(*common, "--robust-online")  # scope sites
    assert r.exit_code == 2 and "robust_online needs robust_scope 'rows'" in r.output and "Traceback" not in r.output
    r = _invoke(*common, "--average-from", "1", "--out", tmp_path / "out_avg")
    assert r.exit_code == 0, (r.output[-3000:], r.exception)
    assert json.loads(r.stdout)["steps"] == 2
    r = _invoke(*common, "--average-from", "3")  # after the last of 2 steps
    assert r.exit_code == 2 and "lower --average-from or raise --steps" in r.output and "Traceback" not in r.output
    r = _invoke(*common, "--decay-from", "1", "--out", tmp_path / "out_decay")
    assert r.exit_code == 0, (r.output[-3000:], r.exception)
    assert json.loads(r.stdout)["steps"] == 2
    r = _invoke(*common, "--decay-from", "2")  # the rate cannot start falling at the end
    assert r.exit_code == 2 and "lower --decay-from or raise --steps" in r.output and "Traceback" not in r.output
    r = _invoke(*common, "--refusal-style", "long")
    assert r.exit_code == 2 and "unknown refusal style 'long'" in r.output and "Traceback" not in r.output
    r = _invoke(*common, "--refusal-style", "extended", "--target-tokens", "12", "--out", tmp_path / "out_ext")
    assert r.exit_code == 0, (r.output[-3000:], r.exception)
    assert "target:extended" in json.loads(r.stdout)["data"]  # the targets went through extend_refusals


def test_cli_tasks_draws_the_task_sets_too():
    from safetyscope.cli.finetune import FinetuneSettings, training_prompts
    from safetyscope.prompts import builtin_prompts

    plain = training_prompts(FinetuneSettings(), "harden")
    both = training_prompts(FinetuneSettings(tasks=True), "harden")
    for kind, a, b in (("harmful", plain[0], both[0]), ("harmless", plain[1], both[1])):
        tasks = builtin_prompts(f"{kind}_tasks", "train")
        assert set(b.texts) == set(a.texts) | set(tasks.texts) and len(b) == len(a) + len(tasks)
    assert plain[2].texts == both[2].texts  # the scary-but-benign retain prompts are not task prompts
    few = training_prompts(FinetuneSettings(tasks=True, n_prompts=64), "harden")
    assert len(few[0]) == 64 and set(few[0].texts) <= set(both[0].texts)
