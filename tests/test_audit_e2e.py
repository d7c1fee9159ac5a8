"""End to end on the real default model: `safetyscope audit` of the model itself and of its own export."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from safetyscope.cli.main import app


@pytest.mark.slow
def test_cli_audit_of_the_default_model_and_of_its_export(tmp_path):
    from safetyscope.methods.direction.artifact import Direction
    from safetyscope.methods.fit import fit_group_moments
    from safetyscope.models import load_model
    from safetyscope.prompts.builtin import builtin_prompts
    from safetyscope.sites import Site

    lm = load_model("default", device="cpu", log=lambda _m: None)
    layer = 14
    groups = {k: [p.text for p in builtin_prompts(k, "val").sample(8, seed=1)] for k in ("harmful", "harmless")}
    stats = fit_group_moments(lm, groups, [Site("resid_pre", layer).name], "last", batch_size=8)
    site = Site("resid_pre", layer).name
    d = Direction(stats.get("harmful", site).mean[0] - stats.get("harmless", site).mean[0], layer, -1)
    d.save(tmp_path / "dir")
    export = d.export(lm, tmp_path / "abl")
    del lm

    def audit(*args: str) -> dict:
        res = CliRunner().invoke(app, ["audit", *args, "--json", "--quiet", "--out", str(tmp_path / "run")])
        assert res.exit_code == 0, res.output
        return json.loads(res.stdout)

    clean = audit("default", "--no-behaviour")  # the model itself, weights only
    assert clean["verdict"] == "clean" and clean["signature"]["n_collapsed"] < 3
    ref = audit(str(export), "--reference", "default", "--direction", str(tmp_path / "dir"))
    assert ref["verdict"] == "tampering" and ref["weights"]["cos_reference"] >= 0.95
    alone = audit(str(export), "--no-behaviour")  # no reference: the ablation signature from the weights
    assert alone["verdict"] == "tampering" and alone["signature"]["n_collapsed"] >= 3
