"""The map's measuring stages: the refusal direction (found on fitting prompts, measured held out), the
fragility curves and the capability cost. Each takes :class:`StageInputs` and returns its JSON result."""

from __future__ import annotations

from typing import Any

from ...io import write_json
from ..direction.artifact import Direction
from ..direction.evaluate import ReplyCache, evaluate_ablation, evaluate_addition
from ..direction.select import SelectConfig
from .evidence import decision_onset, readable_layers
from .inputs import StageInputs
from .results import ProbeSummary, TraceSummary


def candidate_layers(x: StageInputs) -> str:
    """Blocks whose candidates are scored: the readable layers (probe), from 2 blocks before the trace's
    decision onset; in --quick the last position of 4 evenly spaced readable blocks before the cutoff."""
    n = x.lm.n_layers
    probe = ProbeSummary.from_json(x.done["probe"]) if "probe" in x.done else None
    layers = readable_layers(probe, n) if probe else ""
    trace = TraceSummary.from_json(x.done["trace"]) if "trace" in x.done else None
    onset = decision_onset(trace.grid if trace else None)
    if onset is not None and layers not in ("", "*"):  # and from 2 blocks before the residual patching effect sets in
        lo = max(int(layers.split("-")[0]), onset - 2)
        layers = f"{min(lo, n - 1)}-{layers.split('-')[1]}"
    if x.config.quick and probe:
        hi = max(0, SelectConfig().cutoff(n) - 1)  # the last block not pruned as "late"
        lo = min(hi, int(layers.split("-")[0]) if layers not in ("", "*") else 0)
        layers = ",".join(str(v) for v in sorted({lo + round(i * (hi - lo) / 3) for i in range(4)}))
    return "" if layers == "*" else layers


# The map's direction recipe (issue 20): mean ablation, then refinement of the chosen direction (README: on
# AdvBench/Alpaca, mean + refine 2% refusal at KL 0.048, mean alone 3% at KL 0.086). Refinement
# settings: 40% of the training steps of `direction refine`'s defaults (30 steps of 16 + 16 prompts, lr
# 0.002) with a larger step size, so the stage fits the map's 15-minute budget; the checkpoint is still chosen by
# validation loss (never worse than the start on the validation prompts). The minibatches come from the whole
# training split (Budget.n_refine), not the n_prompts sample: chosen on built-in *validation* prompts the
# refinement did not see (31 + 30; benchmarks/refine_pool.py), never on test prompts.
REFINE = {"steps": 16, "lr": 0.003, "kl_weight": 20.0, "batch": 12, "eval_every": 4}
REFINE_QUICK = {"steps": 2, "lr": 0.004, "kl_weight": 20.0, "batch": 4, "eval_every": 1}  # --quick: the path runs


def find_direction_stage(x: StageInputs) -> tuple[Direction, dict[str, Any]]:
    """Candidates in the readable blocks (cached, keyed on their inputs), screened then fully scored on the
    validation prompts; the best judged on real replies (the first-token score is only a proxy); then refined
    (only the direction trains, under its own mean ablation; checkpoint by validation loss)."""
    from ...sites import parse_sites
    from ..direction.api import DirectionConfig, NoDirectionFound, search_direction

    lm, b, out = x.lm, x.budget, x.out / "direction"
    spec = candidate_layers(x)
    layers = tuple(int(s.layer) for s in parse_sites(f"blocks.{spec}.resid_pre", lm.n_layers) if s.layer is not None) if spec else None
    if x.config.quick:  # a smoke test: the last position of a few blocks, one finalist judged on short replies
        cfg = DirectionConfig(positions="-1", layers=layers, induce="lazy", verify=1, verify_tokens=8, ablation="mean")
    else:
        cfg = DirectionConfig(layers=layers, induce="lazy", screen=3, keep=6, verify=2, ablation="mean")
    train = (x.sampled("harmful", b.n_prompts, "train"), x.sampled("harmless", b.n_prompts, "train"))
    val = (x.sampled("harmful", b.n_val, "val"), x.sampled("harmless", b.n_val, "val"))
    try:
        found = search_direction(lm, *train, val_harmful=val[0], val_harmless=val[1], config=cfg, batch_size=x.batch_size,
                                 system=x.system, cache_dir=out, log=x.log, verdict_cache=x.out / "cache")
    except NoDirectionFound as exc:
        write_json(out / "selection.json", exc.selection.to_json())  # what was measured stays on record
        raise
    write_json(out / "selection.json", found.selection.to_json())
    direction, result = found.direction, {**found.to_json(), "model": lm.name, "artifact": str(out / "artifact"),
                                          "positions": list(found.candidates.positions),
                                          "tokens": list(found.candidates.tokens), "selection": str(out / "selection.json")}
    pool = (x.sampled("harmful", b.n_refine, "train"), x.sampled("harmless", b.n_refine, "train"))
    direction, result["refine"] = refine_stage(x, direction, pool, val)
    direction.save(out / "artifact")
    return direction, result


def refine_stage(x: StageInputs, direction: Direction, train: tuple[list[str], list[str]],
                 val: tuple[list[str], list[str]]) -> tuple[Direction, dict[str, Any]]:
    """The found direction refined on the training prompts (``budget.n_refine`` per group: minibatches, the
    KL reference and the harmless mean; checkpoint by validation loss); the unrefined one is kept in
    OUT/direction/unrefined."""
    import time

    from ..direction.refine import refine_direction

    out = x.out / "direction"
    direction.save(out / "unrefined")
    t0 = time.perf_counter()
    res = refine_direction(x.lm, direction, *train, val_harmful=val[0], val_harmless=val[1], micro_batch=x.batch_size,
                           seed=x.config.seed, system=x.system, log=x.log,
                           **(REFINE_QUICK if x.config.quick else REFINE))  # type: ignore[arg-type]
    seconds = time.perf_counter() - t0
    write_json(out / "refine.json", {**res.to_json(), "seconds": seconds})
    return res.direction, {"chosen": res.chosen, "settings": res.settings, "seconds": seconds,
                           "unrefined": str(out / "unrefined"), "history": res.to_json()["history"]}


def direction_stage(x: StageInputs) -> dict[str, Any]:
    """The refusal direction, then its ablation and addition measured on held-out test prompts; beside it the
    same direction under zero ablation (what `direction export` writes into the weights)."""
    direction, found = find_direction_stage(x)
    b = x.budget
    # The headline: the whole test split by default (16 prompts move the rate in steps of 6%); the addition
    # is measured on the n_eval harmless prompts the other stages use.
    harmful, harmless = x.sampled("harmful", b.n_headline, "test"), x.sampled("harmless", b.n_headline, "test")
    kw, memo = _eval_kwargs(x, direction), dict[Any, Any]()  # memo: the unmodified logits, shared with the zero variant
    # no reply perplexity: the report's capability cost is the capability stage's (built-in passages)
    ablate = evaluate_ablation(x.lm, direction, harmful, harmless, memo=memo, reply_perplexity=False, **kw)
    ablate.update(model=x.lm.name, direction=found["artifact"], norm_preserving=direction.norm_preserving,
                  weighted=direction.layer_weights is not None, ablation=direction.ablation)
    add = evaluate_addition(x.lm, direction, x.sampled("harmless", b.n_eval, "test"), coeff=1.0, memo=memo, **kw)
    add.update(model=x.lm.name, direction=found["artifact"])
    result = {"find": found, "ablate": ablate, "add": add}
    if direction.ablation != "zero":  # the exportable variant, on the same prompts (base replies are cached)
        zero = direction.with_ablation("zero")
        zero.save(x.out / "direction" / "artifact_zero")
        result["ablate_zero"] = {**evaluate_ablation(x.lm, zero, harmful, harmless, **_eval_kwargs(x, zero, "_zero"),
                                                     harmless_replies_ablated=False, memo=memo,
                                                     reply_perplexity=False),
                                 "ablation": "zero", "direction": str(x.out / "direction" / "artifact_zero")}
    return result


def judges_stage(x: StageInputs) -> dict[str, Any]:
    """The headline's harmful replies, before and under the direction's ablation (the direction stage's reply
    cache: nothing is generated again), through every judge of ``config.judges``, side by side."""
    from ...measure.judge_eval import compare_judge_specs

    specs = list(x.config.judges)
    if not specs:
        return {"judges": None}  # off (--judges not given)
    path = x.out / "direction" / "artifact"
    if "direction" not in x.done or not (path / "artifact.json").is_file():
        raise ValueError("the judges stage compares judges on the direction stage's replies; that stage has none")
    harmful = x.sampled("harmful", x.budget.n_headline, "test")
    cache = _eval_kwargs(x, Direction.load(path))["cache"]
    before, after = cache.get("harmful_base", harmful), cache.get("harmful_ablated", harmful)
    if before is None or after is None:
        raise ValueError("the direction stage's harmful replies are not in its reply cache; rerun it with --force")
    groups = ["harmful, before"] * len(harmful) + ["harmful, direction ablated"] * len(harmful)
    return {"judges": compare_judge_specs(specs, harmful * 2, before + after, groups, x.batch_size)}


def _eval_kwargs(x: StageInputs, direction: Direction | None, suffix: str = "") -> dict[str, Any]:
    """evaluate_* settings; the replies cache of a variant (``suffix``) starts with the unmodified replies
    (``direction`` None: a cache for the unmodified replies only)."""
    import shutil

    b, root = x.budget, x.out / f"direction_eval{suffix}"
    for name in ("harmful_base", "harmless_base") if suffix else ():
        src = x.out / "direction_eval" / f"replies_{name}.json"
        if src.is_file():
            root.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, root / src.name)
    d = x.lm.describe()
    common = {"model": [d["name"], d["n_params"], d["dtype"]], "system": x.system, "max_new_tokens": b.max_new_tokens}
    cache = ReplyCache(root, common, None if direction is None else {
        "direction": direction.to_state()[0], "vector": direction.direction.tolist(), "weights": None, "coeff": 1.0,
        "layer": -1})
    return {"max_new_tokens": b.max_new_tokens, "batch_size": x.batch_size, "system": x.system, "cache": cache}


def _neuron_curves(x: StageInputs, harmful: list[str], harmless: list[str]) -> dict[str, Any]:
    """Top neurons by effect size and by gradient, and random neurons from the same layers (zero ablation);
    every finished point is kept in OUT/neurons, so an interrupted curve resumes."""
    from ..neurons.api import neuron_analysis, neuron_fragility
    from .steps_fit import neuron_kwargs

    layers = str(x.done["neurons"]["layers_analysed"]) if "neurons" in x.done else "*"
    kw = neuron_kwargs(x, layers)
    a = neuron_analysis(x.lm, x.prompts.fit("harmful"), x.prompts.fit("harmless"), **kw)  # the neurons stage's cache
    res = neuron_fragility(x.lm, a, harmful, harmless, ks=x.budget.ks, seeds=x.budget.seeds,
                           curves=("effect_size", "gradient"), mode="zero", max_new_tokens=0, batch_size=x.batch_size,
                           system=x.system, seed=x.config.seed, cache_dir=kw["cache_dir"], info={"eval_split": "test"})
    result = res.to_dict()
    write_json(x.out / "neurons" / "fragility.json", result)
    (x.out / "neurons" / "fragility_partial.json").unlink(missing_ok=True)  # finished: no resume file left behind
    return result


def fragility_stage(x: StageInputs) -> dict[str, Any]:
    """Neuron curves and the refusal direction as one component against random directions, on the same
    held-out prompts and metrics."""
    from ...artifacts.base import load_artifact
    from ..neurons.fragility import direction_fragility

    b = x.budget
    harmful, harmless = x.sampled("harmful", b.n_eval, "test"), x.sampled("harmless", b.n_eval, "test")
    res = _neuron_curves(x, harmful, harmless)
    path = x.out / "direction" / "artifact"
    if "direction" in x.done and (path / "artifact.json").is_file():
        d = direction_fragility(x.lm, load_artifact(path), harmful, harmless, seeds=[x.config.seed + i for i in range(b.seeds)],
                                batch_size=x.batch_size, system=x.system).to_dict()
        res["direction"] = d
        res["direction_summary"] = d["summary"]
    res["n_eval"] = [len(harmful), len(harmless)]
    return res


def capability_stage(x: StageInputs) -> dict[str, Any]:
    """First-token KL on held-out harmless prompts and perplexity on the built-in prose/code passages, under
    the direction and under the neuron set; plus a few replies before/after, for the report."""
    from ...artifacts.base import load_artifact
    from ...measure.capability import capability_rows, cross_entropy
    from ...measure.compare import first_token_kl, logits_under
    from ...measure.judges import PhraseJudge

    lm, b, bs, system = x.lm, x.budget, x.batch_size, x.system
    harmless = x.sampled("harmless", b.n_eval, "test")
    harmful = x.sampled("harmful", 2 if x.config.quick else 4, "test", seed_offset=1)
    rows = capability_rows(lm, max_tokens=64 if x.config.quick else 128)[: 4 if x.config.quick else None]
    reference = logits_under(lm, harmless, None, batch_size=bs, system=system)
    ref_ce = cross_entropy(lm, rows, batch_size=bs)  # once, shared by every intervention
    judge = PhraseJudge()
    before = _replies(x, harmful, None, "harmful_base")  # the direction stage's, when it generated them
    samples = [{"prompt": p, "before": r, "refused_before": judge(p, r)} for p, r in zip(harmful, before)]
    out: dict[str, Any] = {"n_harmless": len(harmless), "n_capability_tokens": sum(len(r) - 1 for r in rows),
                           "interventions": {}, "samples": samples}
    arts = {"direction": (x.out / "direction" / "artifact", "direction"), "neurons": (x.out / "neurons" / "set", "neurons")}
    for name, (path, stage) in arts.items():
        if stage not in x.done or not path.is_dir():  # only the artifacts this run's stages produced
            continue
        art = load_artifact(path)
        kl = first_token_kl(lm, harmless, art, reference=reference, batch_size=bs, system=system)
        with art.apply(lm):
            new_ce = cross_entropy(lm, rows, batch_size=bs)
        after = _replies(x, harmful, art, "harmful_ablated")
        for sample, p, r in zip(samples, harmful, after):
            sample[f"after_{name}"] = r
            sample[f"refused_after_{name}"] = judge(p, r)
        out["interventions"][name] = {
            "artifact": str(path), "kl_first_token_mean": float(kl.mean()), "kl_first_token_median": float(kl.median()),
            "ppl_before": ref_ce.ppl, "ppl_after": new_ce.ppl, "ppl_ratio": new_ce.ppl / ref_ce.ppl,
        }
    return out


def _replies(x: StageInputs, prompts: list[str], art: Any, name: str) -> list[str]:
    """Replies under ``art`` (None: unmodified); a direction's and the unmodified ones go through the
    direction stage's reply cache (reused when that stage generated them, kept there otherwise)."""
    from ...measure.generation import generate
    from ..direction.evaluate import replies_together

    b = x.budget
    if art is None or isinstance(art, Direction):
        kw = _eval_kwargs(x, art)
        return replies_together(x.lm, {name: prompts}, art, kw["cache"], max_new_tokens=b.max_new_tokens,
                                batch_size=x.batch_size, system=x.system)[name]
    with art.apply(x.lm):
        return generate(x.lm, prompts, max_new_tokens=b.max_new_tokens, batch_size=x.batch_size, system=x.system)
