"""The quickstart notebook (docs/quickstart.py, a jupytext percent script) runs top to bottom on the small model."""

from __future__ import annotations

import runpy
from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).resolve().parents[1] / "docs" / "quickstart.py"


@pytest.mark.slow
def test_quickstart_notebook_runs_on_the_small_model(tmp_path, monkeypatch):
    monkeypatch.setenv("SAFETYSCOPE_QUICKSTART_OUT", str(tmp_path))
    ns = runpy.run_path(str(NOTEBOOK), run_name="__main__")
    lm, d = ns["lm"], ns["d"]
    assert lm.name and 0 <= d.layer < lm.n_layers
    assert (tmp_path / "direction" / "artifact.json").is_file()
    assert 0 <= ns["probes"].best_layer < lm.n_layers
    assert len(ns["neurons"].rows) == 20
    page = ns["cmap"].report_path
    assert page is not None and page.is_file() and "<html" in page.read_text().lower()


def test_every_public_name_resolves_and_import_stays_light():
    import subprocess
    import sys

    code = ("import sys, safetyscope as ss; light = 'torch' not in sys.modules; "
            "[getattr(ss, n) for n in ss.__all__]; print(light, len(ss.__all__))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out[0] == "True" and int(out[1]) >= 30
