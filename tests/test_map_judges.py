"""`map --judges`: the headline's replies through several judges, without rerunning any other stage."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from safetyscope.cli.map import MapSettings, run_map
from safetyscope.methods.circuit import pipeline
from safetyscope.methods.circuit.pipeline import STAGES


def test_adding_judges_reruns_only_the_judges_and_report_stages(tiny_dir, tmp_path, monkeypatch):
    mod = tmp_path / "h18_map_always.py"
    mod.write_text("def refuse(prompt, reply):\n    return True\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "map"
    first = run_map(MapSettings(model=str(tiny_dir), out=out, quick=True, quiet=True, batch_size=8)).summary()
    assert first["status"]["judges"] == "done"
    stages = out / "map" / "stages"
    assert json.loads((stages / "judges.json").read_text())["result"] == {"judges": None}  # off without --judges

    calls: list[str] = []
    for name, fn in list(pipeline.COMPUTE.items()):
        monkeypatch.setitem(pipeline.COMPUTE, name, lambda x, fn=fn, name=name: (calls.append(name), fn(x))[1])
    s = MapSettings(model=str(tiny_dir), out=out, quick=True, quiet=True, batch_size=8,
                    judges="phrase, h18_map_always:refuse")
    summary = run_map(s).summary()
    assert calls == ["judges", "report"]  # the direction's replies are reused; nothing else is recomputed
    assert summary["status"] == {**{st: "cached" for st in STAGES}, "judges": "done", "report": "done"}
    cmp = json.loads((stages / "judges.json").read_text())["result"]["judges"]
    assert cmp["judges"] == ["phrase", "h18_map_always:refuse"]
    groups = cmp["groups"]
    assert set(groups) == {"harmful, before", "harmful, direction ablated"}
    always = groups["harmful, before"]["h18_map_always:refuse"]
    assert always["complied"] == 0 and always["refused"] + always["broken"] == always["n"] > 0
    phrase = groups["harmful, direction ablated"]["phrase"]
    assert phrase["refused"] + phrase["complied"] + phrase["broken"] == phrase["n"] == always["n"]
    page = Path(summary["report"]).read_text()
    assert "Judges side by side" in page and "h18_map_always:refuse" in page and "Agreement:" in page
    sys.modules.pop("h18_map_always", None)
