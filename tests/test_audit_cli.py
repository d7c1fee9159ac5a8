"""`safetyscope audit` on the command line: the default `check` subcommand, `fingerprint`, `--runtime`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from safetyscope.cli.main import app
from safetyscope.methods.direction.artifact import Direction
from safetyscope.testing import tiny_model


@pytest.fixture(scope="module")
def lm():
    return tiny_model("llama", seed=3)


@pytest.fixture(scope="module")
def ref(lm, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("audit_cli") / "ref"
    lm.model.save_pretrained(path, safe_serialization=True)
    lm.tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def direction(lm, tmp_path_factory) -> tuple[Direction, Path]:
    r = torch.randn(lm.dims.d_model, generator=torch.Generator().manual_seed(11))
    d = Direction(r, 1, -1)
    return d, d.save(tmp_path_factory.mktemp("audit_cli") / "dir")


def _json(res) -> dict:
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout)


def test_fingerprint_subcommand_and_audit_against_it(lm, ref, direction, tmp_path):
    out = _json(CliRunner().invoke(app, ["audit", "fingerprint", str(ref), "--json", "--out", str(tmp_path / "fp")]))
    assert Path(out["fingerprint"]) == tmp_path / "fp" / "fingerprint" and out["writers"] == 2 * lm.n_layers + 1
    clean = _json(CliRunner().invoke(app, ["audit", str(ref), "--fingerprint", str(tmp_path / "fp"), "--json",
                                           "--out", str(tmp_path / "a")]))
    assert clean["verdict"] == "clean" and clean["fingerprint"]["verdict"] == "clean"
    # the explicit subcommand name is the same command
    again = _json(CliRunner().invoke(app, ["audit", "check", str(ref), "--no-behaviour", "--json", "--out", str(tmp_path / "b")]))
    assert again["verdict"] == "clean" and again["signature"] is not None


def test_deprecated_save_fingerprint_flag_still_works_and_warns(ref, tmp_path):
    res = CliRunner().invoke(app, ["audit", str(ref), "--save-fingerprint", str(tmp_path / "old"), "--json",
                                   "--out", str(tmp_path / "o")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "old" / "fingerprint.json").is_file() and "deprecated" in res.stderr


def test_runtime_flag_finds_every_applied_intervention_and_nothing_on_the_clean_model(lm, ref, direction, tmp_path):
    _, dir_path = direction
    ckpt = direction[0].export(lm, tmp_path / "abl")
    out = _json(CliRunner().invoke(app, ["audit", str(ref), "--runtime", "--intervention", str(dir_path),
                                         "--intervention", str(ckpt), "--json", "--out", str(tmp_path / "rt")]))
    rt = out["runtime"]
    assert rt["loaded"]["clean"] and rt["after"]["clean"]
    hooked = rt[f"direction:{dir_path}"]
    assert not hooked["clean"] and {f["kind"] for f in hooked["findings"]} >= {"pre_hook"}
    swapped = rt[f"checkpoint:{ckpt}"]
    assert not swapped["clean"] and any(f["kind"] == "param_changed" for f in swapped["findings"])
    assert json.loads((tmp_path / "rt" / "audit" / "runtime.json").read_text())["runtime"]["loaded"]["clean"]
    bad = CliRunner().invoke(app, ["audit", str(ref), "--runtime", "--intervention", str(tmp_path / "nope"),
                                   "--out", str(tmp_path / "rt2")])
    assert bad.exit_code == 2 and "\n" not in bad.output.strip()


def test_audit_group_help_lists_the_subcommands():
    res = CliRunner().invoke(app, ["audit", "--help"])
    assert res.exit_code == 0 and "fingerprint" in res.output and "check" in res.output


def test_a_fingerprint_made_in_bfloat16_reads_the_stored_weights(lm, ref, direction, tmp_path):
    """On a GPU the model loads in bfloat16: the fingerprint's weight statistics come from the stored checkpoint,
    so an unmodified checkpoint stays clean and a small edit is still seen (the loaded copy's rounding would hide
    it or flag everything)."""
    from safetyscope.methods.audit import Fingerprint

    for dtype in ("float32", "bfloat16"):
        res = CliRunner().invoke(app, ["audit", "fingerprint", str(ref), "--dtype", dtype, "--json",
                                       "--out", str(tmp_path / dtype)])
        assert res.exit_code == 0, res.output
    fp32, bf16 = (Fingerprint.load(tmp_path / d) for d in ("float32", "bfloat16"))
    assert bf16.sums == fp32.sums and set(bf16.dtypes.values()) == {"float32"}
    clean = _json(CliRunner().invoke(app, ["audit", str(ref), "--fingerprint", str(tmp_path / "bfloat16"), "--dtype",
                                           "bfloat16", "--json", "--out", str(tmp_path / "a")]))
    assert clean["fingerprint"]["verdict"] == "clean"
    edited = direction[0].export(lm, tmp_path / "edited")  # a random direction removed: modified, not tampering
    rep = _json(CliRunner().invoke(app, ["audit", str(edited), "--fingerprint", str(tmp_path / "bfloat16"),
                                         "--no-behaviour", "--json", "--out", str(tmp_path / "b")]))
    assert rep["fingerprint"]["verdict"] in ("modified", "tampering") and rep["fingerprint"]["changed"]


def test_compare_allows_for_the_dtype_a_fingerprint_was_taken_in(lm, ref):
    """A fingerprint of the loaded copy in bfloat16 (no stored source): the comparison's tolerance is bfloat16's."""
    from safetyscope.methods.audit import make_fingerprint
    from safetyscope.methods.audit.fingerprint import compare_fingerprint
    from safetyscope.methods.audit.source import TensorSource
    from safetyscope.models import load_model

    half = load_model(str(ref), dtype="bfloat16")
    fp = make_fingerprint(half)
    assert set(fp.dtypes.values()) == {"bfloat16"}
    assert compare_fingerprint(TensorSource.from_dir(ref), fp).verdict == "clean"
    strict = type(fp)(**{**fp.__dict__, "dtypes": {}})  # as if recorded in float32: the rounding reads as a change
    assert compare_fingerprint(TensorSource.from_dir(ref), strict).verdict == "modified"
