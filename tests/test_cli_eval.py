"""`safetyscope eval`: one end-to-end run on the real default model, and fast input-error checks."""

from __future__ import annotations

import json
import math
from contextlib import contextmanager
from typing import Any

import pytest
import torch
import typer
from typer.testing import CliRunner

from safetyscope.artifacts import Artifact, register
from safetyscope.cli import eval as eval_cli
from safetyscope.hooks import hooks


@register
class CliScaleSite(Artifact):
    """Test artifact: scale one site by ``factor`` (saved as a tensor)."""

    kind = "test_cli_scale_site"

    def __init__(self, site: str, factor: float):
        self.site, self.factor = site, float(factor)

    def to_state(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        return {"site": self.site}, {"factor": torch.tensor(self.factor)}

    @classmethod
    def from_state(cls, meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> CliScaleSite:
        return cls(meta["site"], float(tensors["factor"]))

    def apply(self, lm: Any):
        @contextmanager
        def run():
            with hooks(lm, {s: (lambda x, b: x * self.factor) for s in lm.sites(self.site)}):
                yield

        return run()


@pytest.fixture(scope="module")
def app() -> typer.Typer:
    app = typer.Typer()

    @app.callback()
    def _root() -> None:  # a group, so the command is called by name as in `safetyscope eval`
        pass

    eval_cli.register(app)
    return app


def _fails_cleanly(app: typer.Typer, args: list[str], needle: str) -> None:
    res = CliRunner().invoke(app, ["eval", *args])
    assert res.exit_code == 2, res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], res.stderr


def test_missing_prompt_file(app, tmp_path):
    _fails_cleanly(app, ["--harmful", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path)], "not found")


def test_empty_prompt_file(app, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n", encoding="utf-8")
    _fails_cleanly(app, ["--harmless", str(empty), "--out", str(tmp_path)], "empty")


def test_unknown_artifact_dir(app, tmp_path):
    (tmp_path / "art").mkdir()
    _fails_cleanly(app, ["--intervention", str(tmp_path / "art"), "--out", str(tmp_path)], "artifact.json")
    (tmp_path / "art" / "artifact.json").write_text('{"kind": "no_such_kind", "format": 1}')
    _fails_cleanly(app, ["--intervention", str(tmp_path / "art"), "--out", str(tmp_path)], "unknown artifact kind")


def test_bad_judge_and_scary_file(app, tmp_path):
    _fails_cleanly(app, ["--judge", "no_such_module_xyz:judge", "--out", str(tmp_path)], "--judge")
    _fails_cleanly(app, ["--judge", "nocolon", "--out", str(tmp_path)], "package.module:function")
    _fails_cleanly(app, ["--scary", str(tmp_path / "scary.csv"), "--out", str(tmp_path)], "not found")
    assert not (tmp_path / "eval.json").exists()


@pytest.mark.slow
def test_eval_end_to_end_on_the_default_model(app, tmp_path):
    art = CliScaleSite("blocks.20.mlp.out", 1.5).save(tmp_path / "scale")
    text = tmp_path / "notes.txt"  # a small user text keeps the perplexity part cheap (built-ins: --capability)
    text.write_text("The committee met on Tuesday to review the budget for the new library. "
                    "def mean(xs):\n    return sum(xs) / len(xs)\n", encoding="utf-8")
    out = tmp_path / "run"
    res = CliRunner().invoke(app, [
        "eval", "default", "--intervention", str(art), "--n-prompts", "8", "--max-new-tokens", "8",
        "--no-capability", "--ppl-text", str(text), "--out", str(out), "--json",
    ])
    assert res.exit_code == 0, res.output + res.stderr
    printed = json.loads(res.stdout)
    data = json.loads((out / "eval.json").read_text())
    assert printed["refusal_rate"] == data["refusal_rate"]
    for key in ("refusal_rate", "over_refusal", "over_refusal_scary"):
        assert 0.0 <= data[key] <= 1.0
    assert data["sets"]["harmful"]["n"] == 8 and data["sets"]["scary"]["refusal"]["n"] == 8
    assert data["refusal_tokens"] and data["interventions"] == [f"test_cli_scale_site:{art}"]
    assert 0.5 < data["auroc"] <= 1.0  # the logit score separates harmful from harmless on the real model
    assert data["sets"]["harmful"]["mean_score"] > data["sets"]["harmless"]["mean_score"]
    assert data["kl"]["first_token"] > 0 and data["kl"]["reply_tokens"] > 0
    p = data["perplexity"]["file"]
    assert set(data["perplexity"]) == {"file"} and p["reference"]["n_tokens"] > 20
    assert 1.0 < p["reference"]["ppl"] < 1000 and p["modified"]["ppl"] != p["reference"]["ppl"]
    assert data["reference"]["sets"]["harmless"]["refusal"]["n"] == 8
    assert not math.isnan(data["agreement_judge_vs_logit"]["accuracy"])
    replies = [json.loads(x) for x in (out / "replies.jsonl").read_text().splitlines()]
    assert len(replies) == 8 * 3 + 8  # modified harmful/harmless/scary + the reference's harmless replies
    assert all(r["reply"] for r in replies)
