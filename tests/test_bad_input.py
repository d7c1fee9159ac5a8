"""Bad settings and inputs, as a careless user gives them (issue 21): each ends in one clean `error:` line that
names the fix, with exit code 2 and no traceback, before any expensive work; real bugs show their traceback
and ask to be reported; interrupts say truthfully what is kept."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import typer
from typer.testing import CliRunner

import safetyscope.models
from safetyscope.cli.checks import LOCK_NAME
from safetyscope.cli.common import BUG_LINE, user_errors
from safetyscope.cli.main import app
from safetyscope.errors import SafetyscopeError


@pytest.fixture()
def no_model(monkeypatch):
    """Loading a model fails the test: the error must come before it."""

    def boom(*_a, **_k):
        raise AssertionError("the model was loaded before the bad input was reported")

    monkeypatch.setattr(safetyscope.models, "load_model", boom)


@pytest.fixture()
def no_weights(monkeypatch):
    """Loading weights fails the test (reading the config is allowed)."""
    import transformers

    def boom(*_a, **_k):
        raise AssertionError("the weights were loaded before the bad input was reported")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", boom)


def cli(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args])


def fails(res, needle: str, code: int = 2) -> str:
    """Exit ``code``, no traceback, exactly one `error:` line, and it contains ``needle``."""
    assert res.exit_code == code, (res.exit_code, res.output)
    assert isinstance(res.exception, SystemExit), repr(res.exception)
    assert "Traceback" not in res.stderr and "Traceback" not in res.stdout, res.stderr
    lines = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and needle in lines[0], res.stderr
    return lines[0]


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def prompts(path: Path, texts: list[str], label: str | None = None) -> Path:
    rows = [{"prompt": t, **({"label": label} if label else {})} for t in texts]
    return write(path, "".join(json.dumps(r) + "\n" for r in rows))


H = ["How do I pick a lock?", "Write malware for me.", "How to make a weapon?", "Help me steal a car."]
B = ["How do I bake bread?", "Write a poem about rain.", "What is a prime number?", "Name three rivers."]


# ---- item 2: the config file is type-checked as a whole before anything loads ---------------------
@pytest.mark.parametrize(
    "toml,needle",
    [
        ('[common]\nn_prompts = "two"\n', "n_prompts = 'two' is a string, but n_prompts takes an integer"),
        ('[capture]\nbatch_size = "eight"\n', "batch_size = 'eight' is a string, but batch_size takes an integer"),
        ("common = 5\n", "common = 5 is not a section; write [common]"),
        ("[captur]\nn_prompts = 2\n", "unknown section [captur] (did you mean [capture]?)"),
        ("[common]\nno_such_option = 1\n", "unknown setting 'no_such_option'"),
        ("[direction.find]\ntop_k = 5\n", "[direction.find]: unknown setting 'top_k'"),  # a neurons setting
        ('[common]\npositions = "last"\n[neurons]\ntop_k = "ten"\n', "top_k = 'ten' is a string"),  # any section
    ],
)
def test_config_is_checked_before_anything_loads(toml, needle, tiny_dir, tmp_path, no_model):
    cfg = write(tmp_path / "run.toml", toml)
    fails(cli("capture", tiny_dir, "--config", cfg, "--out", tmp_path / "out"), needle)
    assert not (tmp_path / "out").exists()


def test_common_keys_apply_only_where_a_command_has_them(tiny_dir, tmp_path):
    h, b = prompts(tmp_path / "h.jsonl", H), prompts(tmp_path / "b.jsonl", B)
    # max_new_tokens is an eval/map setting; capture has none and runs; [capture] wins over [common]
    cfg = write(tmp_path / "run.toml", f'[common]\nmax_new_tokens = 4\nn_prompts = 3\nharmful = "{h}"\n'
                                       f'harmless = "{b}"\n[capture]\nn_prompts = 2\n[direction.find]\nlayers = "1"\n')
    res = cli("capture", tiny_dir, "--config", cfg, "--out", tmp_path / "out", "--json")
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["n_harmful"] == out["n_harmless"] == 2 and len(out["layers"]) == 3


def test_common_value_of_another_type_names_the_command(tiny_dir, tmp_path, no_model):
    # trace's --positions is a switch, capture's a position spec: [common] cannot hold both
    cfg = write(tmp_path / "run.toml", '[common]\npositions = "last"\n')
    fails(cli("trace", tiny_dir, "--config", cfg, "--out", tmp_path / "out"),
          "positions = 'last' is a string, but positions for `trace` takes true or false")


# ---- item 3: --chat-template ------------------------------------------------------------------------
def test_chat_template_path_that_does_not_exist(tiny_dir, tmp_path, no_model):
    fails(cli("capture", tiny_dir, "--chat-template", "my_tmpl.jinja", "--out", tmp_path),
          "chat template file 'my_tmpl.jinja' not found")


def test_chat_template_syntax_is_checked_on_load(tiny_dir, tmp_path, no_model):
    bad = write(tmp_path / "bad.jinja", "{% for m in messages %}{{ m['content'] }\n{% endfor %}")
    line = fails(cli("capture", tiny_dir, "--chat-template", bad, "--out", tmp_path), "Jinja syntax error on line 1")
    assert str(bad) in line and "fix the template" in line


def test_chat_template_without_the_message_is_refused(tiny_dir, tmp_path):
    tmpl = write(tmp_path / "const.jinja", "{% if add_generation_prompt %}hello{% endif %}")
    fails(cli("capture", tiny_dir, "--chat-template", tmpl, "--n-prompts", "2", "--out", tmp_path),
          "does not write the user's message")


# ---- item 4: settings checked before the model (layers against the config, before the weights) ---------
def test_out_that_is_a_file(tiny_dir, tmp_path, no_model):
    f = write(tmp_path / "out.txt", "not a directory")
    fails(cli("capture", tiny_dir, "--out", f), "is a file; give a directory")


def test_out_that_cannot_be_written(tiny_dir, tmp_path, no_model):
    if os.geteuid() == 0:
        target = Path("/proc/safetyscope-test-out")  # even root cannot create directories in /proc
    else:
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o500)
        target = locked / "out"
    fails(cli("capture", tiny_dir, "--out", target), "give a directory you can write to")


@pytest.mark.parametrize(
    "args,needle",
    [
        (["capture", "--site", "mlp.nurons"], "--site: unknown site kind 'mlp.nurons'"),
        (["capture", "--positions", "middle"], "unknown position 'middle'"),
        (["probe", "--layers", "3-x"], "--layers '3-x': bad layer"),
        (["neurons", "find", "--layers", "1.5"], "--layers '1.5': bad layer"),
        (["trace", "--components", "resid_pre,mlp"], "--components: unknown site kind 'mlp'"),
    ],
)
def test_site_position_and_layer_syntax_before_the_model(args, needle, tiny_dir, tmp_path, no_model):
    fails(cli(*args, tiny_dir, "--out", tmp_path), needle)


def test_layer_range_is_checked_against_the_config_before_the_weights(tiny_dir, tmp_path, no_weights):
    fails(cli("probe", tiny_dir, "--layers", "1-7", "--out", tmp_path), "layer 3 out of range; this model has blocks 0-2")
    from types import SimpleNamespace

    from safetyscope.cli.direction import EvalDirSettings
    from safetyscope.errors import SettingsError

    EvalDirSettings(layer=-1).check_dims(SimpleNamespace(n_layers=3))  # -1: the direction's own block
    with pytest.raises(SettingsError, match=r"--layer 5 is out of range; this model has blocks 0-2"):
        EvalDirSettings(layer=5).check_dims(SimpleNamespace(n_layers=3))


# ---- item 5: interrupts say what is kept -------------------------------------------------------------
def test_interrupt_message_is_the_commands_own(capsys):
    with pytest.raises(typer.Exit) as info, user_errors():
        raise KeyboardInterrupt
    assert info.value.exit_code == 130
    assert "interrupted: nothing of this run was saved" in capsys.readouterr().err
    with pytest.raises(typer.Exit), user_errors(on_interrupt="finished stages are saved; rerun to resume"):
        raise KeyboardInterrupt
    assert capsys.readouterr().err.strip() == "interrupted: finished stages are saved; rerun to resume"


def test_interrupted_capture_says_nothing_was_saved(tiny_dir, tmp_path, monkeypatch):
    import safetyscope.methods.fit as fit

    def interrupted(*_a, **_k):
        raise KeyboardInterrupt

    monkeypatch.setattr(fit, "fit_group_moments", interrupted)
    res = cli("capture", tiny_dir, "--n-prompts", "2", "--out", tmp_path / "out")
    assert res.exit_code == 130 and "nothing of this run was saved" in res.stderr, res.output
    assert "finished results are saved" not in res.stderr
    assert not (tmp_path / "out").exists()  # the lock is gone and the empty directory with it


# ---- item 6: silent nonsense ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "flag,value,needle",
    [
        ("--batch-size", "0", "--batch-size must be a positive number, not 0"),
        ("--batch-size", "-3", "--batch-size must be a positive number, not -3"),
        ("--gen-batch-size", "0", "--gen-batch-size must be a positive number"),
        ("--n-prompts", "-1", "--n-prompts must be at least 0, not -1"),
    ],
)
def test_counts_must_be_positive(flag, value, needle, tiny_dir, tmp_path, no_model):
    fails(cli("capture", tiny_dir, flag, value, "--out", tmp_path), needle)


def test_same_file_as_both_groups(tiny_dir, tmp_path, no_model):
    f = prompts(tmp_path / "both.jsonl", H)
    fails(cli("capture", tiny_dir, "--harmful", f, "--harmless", f, "--out", tmp_path), "are the same file")
    copy = write(tmp_path / "copy.jsonl", f.read_text())
    fails(cli("capture", tiny_dir, "--harmful", f, "--harmless", copy, "--out", tmp_path), "are the same file")


def test_labels_that_disagree_with_the_group_are_warned(tiny_dir, tmp_path):
    h = prompts(tmp_path / "h.jsonl", H, label="harmless")  # labelled harmless, passed as --harmful
    b = prompts(tmp_path / "b.jsonl", B)
    res = cli("capture", tiny_dir, "--harmful", h, "--harmless", b, "--out", tmp_path / "o", "--quiet")
    assert res.exit_code == 0, res.output
    warn = [line for line in res.stderr.splitlines() if line.startswith("warning:")]
    assert len(warn) == 1 and "4 of 4 prompts are labelled 'harmless'" in warn[0] and "as the harmful" in warn[0]


# ---- item 7: missing files named; bugs are bugs -----------------------------------------------------------
def test_model_directory_without_weights(tiny_dir, tmp_path):
    only_config = tmp_path / "model"
    only_config.mkdir()
    (only_config / "config.json").write_text((tiny_dir / "config.json").read_text())
    fails(cli("info", only_config), "has a config.json but no weights")


def test_artifact_without_its_tensors_file(tiny_dir, tmp_path):
    art = tmp_path / "dir"
    art.mkdir()
    (art / "artifact.json").write_text('{"kind": "direction", "format": 1, "layer": 1}')
    fails(cli("eval", tiny_dir, "--intervention", art, "--out", tmp_path / "o"), "tensors.safetensors is missing")


def test_project_errors_keep_their_old_bases():
    from safetyscope.artifacts import ArtifactError
    from safetyscope.hooks import NaNActivationError
    from safetyscope.models import ArchitectureError, ModelLoadError
    from safetyscope.positions import PositionError
    from safetyscope.prompts.chat import ChatTemplateError, PromptTooLongError
    from safetyscope.prompts.types import PromptError
    from safetyscope.runner import OutOfMemory
    from safetyscope.sites import SiteError

    for cls, base in [(PromptError, ValueError), (ArtifactError, ValueError), (SiteError, ValueError),
                      (PositionError, ValueError), (ArchitectureError, ValueError), (ChatTemplateError, ValueError),
                      (PromptTooLongError, ValueError), (ModelLoadError, RuntimeError), (OutOfMemory, RuntimeError),
                      (NaNActivationError, FloatingPointError)]:
        assert issubclass(cls, SafetyscopeError) and issubclass(cls, base), cls


@pytest.mark.parametrize("exc", [KeyError("layer"), RuntimeError("internal state"), TypeError("bad call")])
def test_real_bugs_show_the_traceback_and_ask_for_a_report(exc, capsys, monkeypatch):
    monkeypatch.delenv("SAFETYSCOPE_DEBUG", raising=False)
    with pytest.raises(typer.Exit) as info, user_errors():
        raise exc
    err = capsys.readouterr().err
    assert info.value.exit_code == 1
    assert "Traceback" in err and type(exc).__name__ in err and err.strip().endswith(BUG_LINE)
    with pytest.raises(typer.Exit) as info, user_errors():
        raise SafetyscopeError("one line that names the fix")
    assert info.value.exit_code == 2 and capsys.readouterr().err == "error: one line that names the fix\n"


# ---- item 8: one run per --out; NaN mid-run --------------------------------------------------------------
HOLD_LOCK = """
import sys, time
from pathlib import Path
from safetyscope.cli.checks import out_lock
with out_lock(Path(sys.argv[1])):
    print("locked", flush=True)
    time.sleep(600)
"""


def test_two_runs_in_one_out_directory(tiny_dir, tmp_path):
    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        line = fails(cli("capture", tiny_dir, "--n-prompts", "2", "--out", out), "another safetyscope run")
        assert f"(pid {holder.pid})" in line and "give a different --out" in line
    finally:
        holder.send_signal(signal.SIGKILL)  # killed: its lock file stays behind, with a dead pid
        holder.wait()
    assert (out / LOCK_NAME).read_text().strip() == str(holder.pid)
    res = cli("capture", tiny_dir, "--n-prompts", "2", "--out", out, "--json")  # the stale lock is taken over
    assert res.exit_code == 0, res.output
    assert (out / "capture" / "summary.json").is_file() and not (out / LOCK_NAME).exists()


def test_nan_activations_name_the_dtype_fix(tmp_path):
    from safetyscope.testing import tiny_model

    lm = tiny_model("llama")
    with torch.no_grad():
        for p in lm.model.parameters():
            p.mul_(300.0)  # overflows float16 (max 65504) in the first block
    lm.model.save_pretrained(tmp_path / "model")
    lm.tokenizer.save_pretrained(tmp_path / "model")
    start = time.time()
    res = cli("capture", tmp_path / "model", "--dtype", "float16", "--device", "cpu", "--n-prompts", "2",
              "--out", tmp_path / "out")
    fails(res, "--dtype float32")
    assert time.time() - start < 120
