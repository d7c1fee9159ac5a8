"""The map's fitting stages: probes, safety neurons, attribution patching, direct logit attribution.

Each takes :class:`StageInputs` (the one loaded model included) and returns its JSON-ready result.
"""

from __future__ import annotations

import os
from typing import Any

from ...io import write_json
from ..neurons.api import find_neurons
from ..probes.api import fit_probes
from .dla import direct_logit_attribution
from .evidence import readable_layers
from .inputs import StageInputs
from .results import ProbeSummary


def probe_stage(x: StageInputs) -> dict[str, Any]:
    """Probes at every layer: where is harmfulness readable? (nested-CV fits dominate; layers fit in parallel)."""
    quick = x.config.quick
    rep = fit_probes(
        x.lm, x.prompts.fit("harmful"), x.prompts.fit("harmless"), layers="*", site="resid_post", positions="last",
        folds=x.budget.folds, controls=1 if quick else 2, c=1.0 if quick else None,
        n_jobs=1 if quick else max(1, min(4, os.cpu_count() or 1)), n_prompts=x.budget.n_prompts,
        batch_size=x.batch_size, system=x.system, seed=x.config.seed, cache_dir=x.out / "probe" / "cache",
        source_names=(x.prompts.describe("harmful", x.files), x.prompts.describe("harmless", x.files)))
    rep.probe.save(x.out / "probe" / "artifact")
    return rep.to_json(artifact=x.out / "probe" / "artifact")


def neuron_layers(x: StageInputs) -> str:
    """The layers the neuron analysis covers: where the probe reads harmfulness (all without evidence)."""
    probe = ProbeSummary.from_json(x.done["probe"]) if "probe" in x.done else None
    return readable_layers(probe, x.lm.n_layers)


def neuron_kwargs(x: StageInputs, layers: str) -> dict[str, Any]:
    """The analysis settings the neurons and fragility stages share, so the second reuses the first's cache
    (OUT/neurons; an interrupted analysis resumes from its last finished batch)."""
    return {"layers": layers, "positions": "last", "filter": "first_token", "gradient": True,
            "utility_texts": x.budget.utility_texts, "utility_tokens": 128, "n_prompts": x.budget.n_prompts,
            "batch_size": x.batch_size, "system": x.system, "seed": x.config.seed, "cache_dir": x.out / "neurons",
            "filter_cache": x.out / "cache"}


def neurons_stage(x: StageInputs) -> dict[str, Any]:
    """Safety neurons in the readable layers (activation difference + gradient importance); saves the set."""
    layers = neuron_layers(x)
    rep = find_neurons(x.lm, x.prompts.fit("harmful"), x.prompts.fit("harmless"), top_k=100, per_layer=5,
                       rank_by="effect_size", **neuron_kwargs(x, layers))
    rep.neuron_set.save(x.out / "neurons" / "set")
    result = {**rep.to_json(), "layers_analysed": layers}
    write_json(x.out / "neurons" / "records.json", result)
    return result


def trace_stage(x: StageInputs) -> dict[str, Any]:
    """Attribution patching of the full layer x component grid, the top cells verified exactly: the built-in
    minimal pairs with the largest refusal-score gap, or the user's fitting prompts zipped (unaligned)."""
    from ..patching.api import trace

    user = x.prompts.user == {"harmful", "harmless"}  # pairs need both groups; else the built-in minimal pairs
    # --quick runs on tiny random models too, whose pairs have no real refusal gap to normalise by.
    res = trace(x.lm, harmful=x.prompts.fit("harmful") if user else None, harmless=x.prompts.fit("harmless") if user else None,
                mode="attribution", n_pairs=x.budget.pairs, verify_top=5 if x.config.quick else 10,
                min_gap=0.0 if x.config.quick else 1.0, split=x.config.split, batch_size=x.batch_size, system=x.system,
                seed=x.config.seed, cache_dir=x.out / "trace" / "cache")
    return res.to_json()


def dla_stage(x: StageInputs) -> dict[str, Any]:
    """Direct logit attribution of every attention and MLP output to the refusal tokens."""
    n = x.budget.n_prompts
    res = direct_logit_attribution(x.lm, x.sampled("harmful", n), x.sampled("harmless", n), batch_size=x.batch_size,
                                   system=x.system)
    return {**res.to_json(), "top": res.top(10), "n_layers": x.lm.n_layers}
