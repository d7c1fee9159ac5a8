"""The map's fitting stages: probes, safety neurons, attribution patching, direct logit attribution.

Each takes :class:`StageInputs` (the one loaded model included) and returns its JSON-ready result.
"""

from __future__ import annotations

import os
import random
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


def _pairs(x: StageInputs, min_gap: float) -> tuple[Any, list[dict[str, Any]]]:
    """Built-in minimal pairs with the largest refusal-score gap, or the user's fitting prompts zipped (unaligned)."""
    from ...measure.generation import refusal_scores
    from ...prompts.builtin import minimal_pairs
    from ..patching.exact import make_pairs

    n = x.budget.pairs
    if x.prompts.user:
        h, s = x.prompts.fit("harmful").texts, x.prompts.fit("harmless").texts
        chosen = [(f"pair-{i}", a, b) for i, (a, b) in enumerate(zip(h, s))][:n]
        aligned: bool | None = False
    else:
        pool = minimal_pairs(x.config.split, seed=x.config.seed)
        if not pool:
            raise ValueError(f"no built-in minimal pairs in split {x.config.split!r}; use split all")
        pool = random.Random(x.config.seed).sample(pool, min(len(pool), max(4 * n, 16)))
        sh = refusal_scores(x.lm, [p.harmful for p in pool], batch_size=x.batch_size, system=x.system)
        ss = refusal_scores(x.lm, [p.harmless for p in pool], batch_size=x.batch_size, system=x.system)
        ranked = sorted(range(len(pool)), key=lambda i: -float(sh[i] - ss[i]))
        keep = [i for i in ranked if float(sh[i] - ss[i]) >= min_gap][:n]
        if not keep:
            raise ValueError(f"no minimal pair has a refusal-score gap >= {min_gap}: the model barely refuses them")
        chosen = [(pool[i].id, pool[i].harmful, pool[i].harmless) for i in keep]
        aligned = None
    pairs = make_pairs(x.lm, [(a, b) for _, a, b in chosen], system=x.system, aligned=aligned, ids=[c[0] for c in chosen])
    return pairs, [{"id": c[0], "harmful": c[1], "harmless": c[2], "aligned": al} for c, al in zip(chosen, pairs.aligned)]


def trace_stage(x: StageInputs) -> dict[str, Any]:
    """Attribution patching of the full layer x component grid; the top cells verified exactly."""
    import time

    from ..patching.attribution import attribute, verify_top
    from ..patching.exact import Tracer

    # --quick runs on tiny random models too, whose pairs have no real refusal gap to normalise by.
    min_gap, k = (0.0, 5) if x.config.quick else (1.0, 10)
    comps = ["resid_pre", "attn.out", "mlp.out"]
    layers = list(range(x.lm.n_layers))
    pairs, info = _pairs(x, min_gap)
    tr = Tracer(x.lm, pairs, batch_size=x.batch_size, min_gap=min_gap)
    for row, sh, ss in zip(info, tr.runs("harmful").scores.tolist(), tr.runs("harmless").scores.tolist()):
        row.update(s_harmful=sh, s_harmless=ss)
    t0 = time.perf_counter()
    est = attribute(tr, comps, layers, span="post_instruction", heads=True, positions=False, reverse=False)
    verified = verify_top(tr, list(est.values()), k, span="post_instruction", reverse=False)
    mode = {"seconds": time.perf_counter() - t0, "top": {n: e.top(10) for n, e in est.items()},
            "grids": {n: e.to_dict() for n, e in est.items()}, "verify": {"forward": verified}}
    return {"model": x.lm.describe(), "pairs": info, "span": "post_instruction", "components": comps, "layers": layers,
            "note": pairs.alignment_note("post_instruction"), "modes": {"attribution": mode}}


def dla_stage(x: StageInputs) -> dict[str, Any]:
    """Direct logit attribution of every attention and MLP output to the refusal tokens."""
    n = x.budget.n_prompts
    res = direct_logit_attribution(x.lm, x.sampled("harmful", n), x.sampled("harmless", n), batch_size=x.batch_size,
                                   system=x.system)
    return {**res.to_json(), "top": res.top(10), "n_layers": x.lm.n_layers}
