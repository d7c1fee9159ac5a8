# %% [markdown]
# # safetyscope quickstart
#
# Where does refusal live in a chat model, and how fragile is it? This notebook (a
# [jupytext](https://jupytext.readthedocs.io) "percent" script: open it in Jupyter or run it with `python`)
# walks the public Python API on the `small` model (SmolLM2-135M-Instruct, shipped in a PyPI package):
# load, find and apply the refusal direction, fit probes, rank safety neurons, and render a mini circuit map.
# The test suite executes it (`tests/test_quickstart.py`), so it never rots.
#
# Budgets are tiny so that it runs in a minute or two on a laptop CPU: the numbers it prints are a smoke
# test, not findings. Raise `N` for real ones.

# %%
import os
import tempfile
from pathlib import Path

import safetyscope as ss

MODEL = os.environ.get("SAFETYSCOPE_QUICKSTART_MODEL", "small")
N = int(os.environ.get("SAFETYSCOPE_QUICKSTART_N", "8"))  # prompts per group
OUT = Path(os.environ.get("SAFETYSCOPE_QUICKSTART_OUT") or tempfile.mkdtemp(prefix="safetyscope-quickstart-"))

lm = ss.load_model(MODEL)
print(lm.name, lm.n_layers, "layers")

# %% [markdown]
# ## Prompts
# Every function takes plain lists of strings, prompt files (JSONL / CSV / TXT) or `PromptSet`s.
# Here: the built-in sets, written for this project.

# %%
harmful = ss.builtin_prompts("harmful", "train").sample(N, seed=0).texts
harmless = ss.builtin_prompts("harmless", "train").sample(N, seed=0).texts
val_harmful = ss.builtin_prompts("harmful", "val").sample(N, seed=0).texts
val_harmless = ss.builtin_prompts("harmless", "val").sample(N, seed=0).texts
print(harmful[0])

# %% [markdown]
# ## The refusal direction (Arditi et al. 2024)
# Difference-of-means candidates at every block x post-instruction position, selected on validation prompts.
# `find_direction` returns a `Direction` artifact; `d.apply(lm)` is a reversible intervention.

# %%
# A smoke-test budget: the last template position of four mid-depth blocks (defaults score every block x position).
mid = lm.n_layers // 2
cfg = ss.DirectionConfig(filter="none", positions="last", layers=[mid - 3, mid - 1, mid + 1, mid + 3], induce="lazy")
d = ss.find_direction(lm, harmful, harmless, val_harmful=val_harmful, val_harmless=val_harmless, config=cfg)
print(f"block {d.layer}, position {d.position}, |dmu| = {d.norm:.2f}")

with ss.verbosity(False):
    before = ss.evaluate(lm, harmful=val_harmful[:4], harmless=val_harmless[:4], max_new_tokens=8, capability=False)
    with d.apply(lm):  # hooks removed on exit, also on errors
        after = ss.evaluate(lm, harmful=val_harmful[:4], harmless=val_harmless[:4], max_new_tokens=8,
                            capability=False, kl=False)
print("harmful refusal (phrase judge):", before.sets["harmful"].refusal, "->", after.sets["harmful"].refusal)
d.save(OUT / "direction")  # safetensors + JSON; ss.load_artifact(OUT / "direction") brings it back

# %% [markdown]
# ## Probes: where is harmfulness linearly readable?

# %%
probes = ss.fit_probes(lm, harmful, harmless, folds=2, controls=1)
for row in probes.rows[:: max(1, len(probes.rows) // 6)]:
    print(f"layer {row.layer:2d}: accuracy {row.accuracy:.2f} (shuffled-label control {row.control_accuracy:.2f})")
print("best layer:", probes.best_layer)

# %% [markdown]
# ## Safety neurons: MLP neurons whose activation differs most between the groups

# %%
neurons = ss.find_neurons(lm, harmful, harmless, filter="none", gradient=False, top_k=20)
for rec in neurons.rows[:5]:
    print(rec["rank"], ss.Site("mlp.neurons", rec["layer"]).name, rec["neuron"], f"d = {rec['effect_size']:+.2f}")
with neurons.neuron_set.apply(lm):  # zero-ablate the top 20 neurons, reversibly
    pass

# %% [markdown]
# ## A mini circuit map
# `map_circuit` runs the whole pipeline (probe, neurons, trace, direction, fragility, capability, DLA) on the
# loaded model, caches every stage under `out`, and renders a self-contained HTML report. Here only the probe
# stage and the report, at the smoke-test budget.

# %%
cmap = ss.map_circuit(lm, out=OUT / "map", config=ss.MapConfig(quick=True), stages="probe,report")
print(cmap.report_path)
