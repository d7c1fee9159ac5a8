"""The CLI as a user runs it: first analysis on the real default and small models, and bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from safetyscope.sites import BLOCK_KINDS, GLOBAL_SITES, parse_sites

ENV = {**os.environ, "SAFETYSCOPE_QUIET": "1"}


def run(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "safetyscope", *args], capture_output=True, text=True, env=ENV, timeout=600
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}: {proc.stderr[-2000:]}")
    return proc


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A tiny random Qwen2 model saved as a local Hugging Face directory (no download)."""
    from safetyscope.testing import tiny_model

    path = tmp_path_factory.mktemp("tiny-qwen2")
    lm = tiny_model("qwen2")
    lm.model.save_pretrained(path)
    lm.tokenizer.save_pretrained(path)
    return path


def _assert_sites_follow_the_grammar(desc):
    """Every printed site name parses with the one site parser and the model resolves it."""
    n_layers = desc["n_layers"]
    kinds = set()
    for name in desc["sites"]:
        sites = parse_sites(name, n_layers=n_layers)  # raises SiteError on names outside the grammar
        if name not in GLOBAL_SITES:
            assert [s.layer for s in sites] == list(range(n_layers)), name
        kinds |= {s.kind for s in sites}
    assert set(GLOBAL_SITES) <= kinds and "mlp.neurons" in kinds and kinds <= {*BLOCK_KINDS, *GLOBAL_SITES}


def test_info_site_names_parse_with_the_site_grammar(tiny_dir):
    import safetyscope

    desc = json.loads(run("info", str(tiny_dir), "--json").stdout)
    assert (desc["n_layers"], desc["d_model"], desc["d_mlp"]) == (3, 32, 64)
    _assert_sites_follow_the_grammar(desc)
    assert "blocks.0-2.mlp.neurons" in desc["sites"]
    lm = safetyscope.load_model(str(tiny_dir), device="cpu", log=lambda _m: None)
    resolved = lm.sites(desc["sites"])  # also valid for this model, not just syntactically
    assert len(resolved) == 2 + 3 * len(lm.table.sites)


@pytest.mark.slow
@pytest.mark.parametrize("model", ["default", "small"])
def test_capture_on_shipped_models(model, tmp_path):
    proc = run("capture", model, "--n-prompts", "6", "--out", str(tmp_path), "--json", "--batch-size", "6")
    result = json.loads(proc.stdout)
    n_layers = result["model"]["n_layers"]
    assert n_layers == (24 if model == "default" else 30)
    assert len(result["layers"]) == n_layers
    assert result["n_harmful"] == result["n_harmless"] == 6
    norms = [row["diff_norm"] for row in result["layers"]]
    assert all(n > 0 for n in norms)
    assert all(-1 <= row["cosine"] <= 1 for row in result["layers"])
    saved = json.loads((tmp_path / "capture" / "summary.json").read_text())
    assert saved["layers"] == result["layers"]
    assert (tmp_path / "capture" / "moments.safetensors").stat().st_size > 0


@pytest.mark.slow
def test_info_on_default_model():
    desc = json.loads(run("info", "default", "--json").stdout)
    assert (desc["n_layers"], desc["d_model"], desc["d_mlp"], desc["n_heads"], desc["n_kv_heads"]) == (24, 896, 4864, 14, 2)
    assert desc["chat_template"] is True
    assert "blocks.0-23.mlp.neurons" in desc["sites"]
    _assert_sites_follow_the_grammar(desc)


def test_models_lists_architectures():
    data = json.loads(run("models", "--json").stdout)
    assert {"llama", "gpt2", "gemma2", "gpt_neox", "phi3"} <= set(data["architectures"])
    assert "qwen2" in data["architectures"]["llama"]


@pytest.mark.parametrize(
    "args,needle",
    [
        (["capture", "default", "--harmful", "/nonexistent/h.jsonl"], "not found"),
        (["capture", "no/such-model-anywhere", "--harmful", "/nonexistent/h.jsonl"], "not found"),
        (["capture", "./missing-dir"], "not found"),
        (["capture", "default", "--positions", "middle"], "unknown position"),
        (["direction", "find", "default", "--ablation", "half"], "unknown --ablation 'half'; use zero or mean"),
    ],
)
def test_bad_input_gives_one_line_error(args, needle, tmp_path):
    proc = run(*args, "--out", str(tmp_path), check=False)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and needle in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr


def test_empty_prompt_file_is_refused(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n# only a comment\n")
    proc = run("capture", "default", "--harmful", str(empty), "--out", str(tmp_path), check=False)
    assert proc.returncode == 2
    assert "empty" in proc.stderr.lower()


def test_config_file_feeds_settings_and_flags_override(tmp_path, tiny_dir):
    cfg = tmp_path / "cfg.toml"
    cfg.write_text(
        '[common]\nmodel = "./nowhere-from-config"\nn_prompts = 2\n'
        '[capture]\npositions = "middle"\nsite = "mlp.out"\n'
    )
    # The config feeds the settings: its model is the one looked for ...
    proc = run("capture", "--config", str(cfg), "--out", str(tmp_path), check=False)
    assert proc.returncode == 2 and "nowhere-from-config" in proc.stderr
    # ... and its (bad) positions are used when no flag is given.
    proc = run("capture", str(tiny_dir), "--config", str(cfg), "--out", str(tmp_path), check=False)
    assert proc.returncode == 2 and "unknown position" in proc.stderr and "middle" in proc.stderr, proc.stderr
    # Command-line flags beat the TOML values; settings without a flag still come from the file.
    proc = run(
        "capture", str(tiny_dir), "--config", str(cfg), "--positions", "last", "--n-prompts", "3",
        "--out", str(tmp_path), "--json",
    )
    result = json.loads(proc.stdout)
    assert result["model"]["name"] == str(tiny_dir)  # positional MODEL beats [common] model
    assert result["positions"] == "last"  # --positions beats [capture] positions = "middle"
    assert result["n_harmful"] == result["n_harmless"] == 3  # --n-prompts beats [common] n_prompts = 2
    assert result["site"] == "mlp.out"  # no flag: the config's value
    assert len(result["layers"]) == 3
    bad = tmp_path / "bad.toml"
    bad.write_text("[common]\nno_such_option = 1\n")
    proc = run("capture", "--config", str(bad), check=False)
    assert proc.returncode != 0 and "no_such_option" in proc.stderr


def test_global_quiet_flag_turns_progress_off_for_the_command(tiny_dir, tmp_path, monkeypatch):
    """`safetyscope --quiet CMD` silences progress bars through progress.verbosity, not the environment."""
    from typer.testing import CliRunner

    import safetyscope.methods.fit as fit
    from safetyscope import progress
    from safetyscope.cli.main import app

    monkeypatch.delenv("SAFETYSCOPE_QUIET", raising=False)
    real, seen = fit.fit_group_moments, []

    def spy(*args, **kwargs):
        seen.append(progress.quiet())
        return real(*args, **kwargs)

    monkeypatch.setattr(fit, "fit_group_moments", spy)
    for flags, expected in ((["--quiet"], True), ([], False)):
        res = CliRunner().invoke(app, [*flags, "capture", str(tiny_dir), "--n-prompts", "2", "--out", str(tmp_path)])
        assert res.exit_code == 0, res.output
        assert seen.pop() is expected
        assert "SAFETYSCOPE_QUIET" not in os.environ
    assert progress.quiet() is False  # the flag did not outlive the command


PROBE_MAIN = '''
import os, signal, sys
import safetyscope.__main__ as entry
signal.signal(signal.SIGINT, signal.default_int_handler)  # as Python sets it, also when started with SIGINT ignored
try:  # a KeyboardInterrupt that escapes an exec of a string: CPython 3.11 under -m remembers it
    exec("os.kill(os.getpid(), signal.SIGINT)\\nwhile True: pass")
except KeyboardInterrupt:
    print("caught", file=sys.stderr)
entry.app = lambda: sys.exit(130)  # the CLI after it handled a Ctrl-C
entry.main()
'''


def test_python_m_exits_130_after_a_handled_interrupt(tmp_path):
    """CI once saw `python -m safetyscope map` end by SIGINT (-2) after printing its interrupt message."""
    (tmp_path / "kiprobe").mkdir()
    (tmp_path / "kiprobe" / "__main__.py").write_text(PROBE_MAIN)
    proc = subprocess.run([sys.executable, "-m", "kiprobe"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert "caught" in proc.stderr, proc.stderr[-2000:]
    assert proc.returncode == 130, proc.stderr[-2000:]
