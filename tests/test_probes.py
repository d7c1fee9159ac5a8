"""Probes: planted separable layers are found, controls stay at chance, CV is stratified and seeded,
held-out scoring, the Probe artifact (sklearn-exact scores, round trip, read-only monitor) and the CLI."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from safetyscope.artifacts import ArtifactError, load_artifact
from safetyscope.hooks import forward
from safetyscope.measure.generation import generate_batch
from safetyscope.methods.probes.artifact import Probe
from safetyscope.methods.probes.fitting import (
    Features,
    ProbeConfig,
    collect_features,
    cv_folds,
    fit_on_features,
    load_features,
    make_probe,
    refusal_labels,
)
from safetyscope.prompts.chat import tokenize_prompts
from safetyscope.runner import run_capture
from safetyscope.sites import Site
from safetyscope.testing import tiny_model

PLANTED = 3


def planted(n: int = 80, n_layers: int = 5, width: int = 16, seed: int = 0) -> tuple[Features, np.ndarray]:
    """Gaussian noise at every layer; only layer PLANTED separates the classes (along dimension 0)."""
    rng = np.random.default_rng(seed)
    y = np.array([0, 1] * (n // 2))
    x = rng.standard_normal((n, n_layers, width)).astype(np.float32)
    x[:, PLANTED, 0] += 3.0 * (2 * y - 1)
    return Features(x, list(range(n_layers))), y


# ---- fitting on synthetic activations ----------------------------------------------------------
@pytest.fixture(scope="module")
def synthetic():
    train, y = planted()
    test, y_test = planted(n=60, seed=1)
    return train, y, test, y_test, fit_on_features(train, y, ProbeConfig(c=1.0, n_controls=2, n_random=1), test=test, y_test=y_test)


def test_probe_finds_the_planted_layer_and_the_control_stays_at_chance(synthetic):
    *_, res = synthetic
    assert res.best_layer == PLANTED
    for row in res.layers:
        assert abs(row.control_accuracy - 0.5) < 0.15, row  # shuffled labels: nothing to learn
        assert abs(row.control_auroc - 0.5) < 0.15, row
        if row.layer == PLANTED:
            assert row.accuracy >= 0.9 and row.auroc >= 0.98 and row.dom_auroc >= 0.98
            assert row.selectivity > 0.35
            assert row.cosine_dom > 0.8  # the probe direction is the planted one, like the class means
            assert row.random_auroc is not None and row.random_auroc < 0.85  # a random projection sees little
        else:
            assert row.accuracy < 0.7 and row.auroc < 0.75, row
    assert res.summary()["best_layer"] == PLANTED


def test_held_out_scores_generalise_only_at_the_planted_layer(synthetic):
    *_, res = synthetic
    assert res.n_test == 60
    for row in res.layers:
        assert row.test_accuracy is not None and row.test_auroc is not None and row.test_dom_auroc is not None
        if row.layer == PLANTED:
            assert row.test_accuracy >= 0.9 and row.test_auroc >= 0.98 and row.test_dom_auroc >= 0.98
        else:
            assert row.test_accuracy < 0.72 and row.test_auroc < 0.75, row


def test_cv_folds_are_stratified_disjoint_and_seeded():
    y = np.array([1] * 30 + [0] * 45)
    folds = cv_folds(y, 5, seed=7)
    tests = np.concatenate([te for _, te in folds])
    assert sorted(tests.tolist()) == list(range(75))  # every prompt tested exactly once
    for tr, te in folds:
        assert set(tr).isdisjoint(te)
        assert (y[te].sum(), (1 - y[te]).sum()) == (6, 9)  # class proportions kept in every fold
    again, other = cv_folds(y, 5, seed=7), cv_folds(y, 5, seed=8)
    assert all(np.array_equal(a[1], b[1]) for a, b in zip(folds, again))
    assert not all(np.array_equal(a[1], b[1]) for a, b in zip(folds, other))


def test_same_seed_same_result_other_seed_other_folds():
    train, y = planted(n=40, n_layers=4)
    a = fit_on_features(train, y, ProbeConfig(folds=4, seed=3, c=1.0, n_controls=1)).summary()
    b = fit_on_features(train, y, ProbeConfig(folds=4, seed=3, c=1.0, n_controls=1)).summary()
    c = fit_on_features(train, y, ProbeConfig(folds=4, seed=4, c=1.0, n_controls=1)).summary()
    assert a == b
    assert [r["control_accuracy"] for r in a["layers"]] != [r["control_accuracy"] for r in c["layers"]]


def test_too_few_prompts_per_class_names_the_fix():
    train, y = planted(n=40, n_layers=4)
    y = np.zeros(40, dtype=int)
    y[:3] = 1
    with pytest.raises(ValueError, match="fewer --folds or more prompts"):
        fit_on_features(train, y, ProbeConfig(folds=5))
    with pytest.raises(ValueError, match="labels"):
        fit_on_features(train, y[:10])
    y[:8] = 1  # 8 positives, 2 folds: 4 per training fold, fewer than 5 inner folds
    with pytest.raises(ValueError, match="give a fixed --c"):
        fit_on_features(train, y, ProbeConfig(folds=2, inner_folds=5))


def test_nested_cv_chooses_c_inside_each_fold():
    train, y = planted(n=48, n_layers=4, width=8)
    cfg = ProbeConfig(folds=3, c=None, cs=(0.01, 1.0), inner_folds=3, n_controls=1)
    res = fit_on_features(train, y, cfg)
    assert res.best_layer == PLANTED
    assert all(row.c in (0.01, 1.0) for row in res.layers)
    assert res.summary()["config"]["c"] == "auto (inner CV)"
    assert ProbeConfig().c is None  # the default


# ---- the artifact ---------------------------------------------------------------------------------
def test_probe_scores_match_sklearn_and_survive_a_round_trip(synthetic, tmp_path):
    train, y, test, _, res = synthetic
    probe = res.probe
    x = train.layer(PLANTED)
    pipe = make_probe(ProbeConfig(c=1.0)).fit(x, y)  # the same pipeline the final probe used
    ours = probe.predict_proba(test.layer(PLANTED), layer=PLANTED).numpy()
    np.testing.assert_allclose(ours, pipe.predict_proba(test.layer(PLANTED))[:, 1], rtol=1e-9, atol=1e-12)
    all_layers = probe.predict_proba(test.x)  # [n, n_layers]
    np.testing.assert_allclose(all_layers[:, PLANTED].numpy(), ours, rtol=1e-6)
    w = probe.direction(PLANTED)
    assert abs(float(w.norm()) - 1) < 1e-5 and abs(float(w[0])) > 0.8  # the planted dimension
    # original-space weights give the same logits as the standardised pipeline
    w_raw, b_raw = probe.original_space()
    z = torch.as_tensor(test.layer(PLANTED)) @ w_raw[PLANTED] + b_raw[PLANTED]
    np.testing.assert_allclose(z.numpy(), probe.decision_function(test.layer(PLANTED), PLANTED).numpy(), rtol=1e-9, atol=1e-9)

    probe.save(tmp_path / "p")
    loaded = load_artifact(tmp_path / "p")
    assert isinstance(loaded, Probe) and Probe.load(tmp_path / "p").layers == probe.layers
    assert (loaded.site, loaded.position, loaded.label, loaded.best_layer) == ("resid_post", "last", "harmful", PLANTED)
    assert loaded.metrics == probe.metrics
    assert torch.equal(loaded.predict_proba(test.x), probe.predict_proba(test.x))
    assert torch.equal(loaded.dom, probe.dom)
    with pytest.raises(ArtifactError, match="no layer 9"):
        loaded.direction(9)
    with pytest.raises(ArtifactError, match="for all probe layers"):
        loaded.predict_proba(test.layer(0))


# ---- a tiny model, end to end ---------------------------------------------------------------------
def _words(chars: str, n: int, k: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [f"tell me about {''.join(rng.choice(chars) for _ in range(k))}" for _ in range(n)]


POS = _words("qxzjkvw", 24, 6, 0)
NEG = _words("aeioulnrst", 24, 6, 1)


@pytest.fixture(scope="module")
def lm():
    return tiny_model("llama")


def test_tiny_model_probe_finds_the_only_layer_whose_mlp_writes(tmp_path):
    """Zero the MLP output weights of layers 0 and 2: only layer 1's mlp.out carries the prompt content."""
    lm = tiny_model("llama")
    for layer in (0, 2):
        lm.module(lm.table.mlp_out_proj.replace("{block}", lm.table.block_path(layer))).weight.zero_()
    feats = collect_features(lm, POS + NEG, "mlp.out", "mean", batch_size=5)
    assert feats.x.shape == (48, 3, lm.dims.d_model) and feats.x.dtype == np.float32
    res = fit_on_features(feats, [1] * 24 + [0] * 24, ProbeConfig(folds=4, c=1.0, n_controls=2))
    assert res.best_layer == 1
    by_layer = {r.layer: r for r in res.layers}
    assert by_layer[1].accuracy >= 0.8 and abs(by_layer[1].control_accuracy - 0.5) < 0.15
    assert by_layer[0].accuracy <= 0.6 and by_layer[2].accuracy <= 0.6

    # spilled to a memory-mapped .npy: identical to the in-memory features, and reloadable
    spilled = collect_features(lm, POS + NEG, "mlp.out", "mean", batch_size=16, spill=tmp_path / "f.npy")
    assert isinstance(spilled.x, np.memmap) and np.array_equal(np.asarray(spilled.x), feats.x)
    again = load_features(tmp_path / "f.npy", [0, 1, 2], "mlp.out", "mean", 48)
    assert again is not None and np.array_equal(np.asarray(again.x), feats.x)
    assert load_features(tmp_path / "f.npy", [0, 1, 2], "mlp.out", "mean", 47) is None  # stale: other prompts
    assert not list(tmp_path.glob(".*tmp"))


def test_features_equal_direct_capture_in_prompt_order(lm):
    prompts = POS[:5] + NEG[:4]
    feats = collect_features(lm, prompts, "attn.out", "last", layers="0,2", batch_size=4)
    assert feats.layers == [0, 2]
    for i, p in enumerate(prompts):
        (_, alone), = list(run_capture(lm, [p], ["blocks.0.attn.out", "blocks.2.attn.out"], "last", batch_size=1))
        torch.testing.assert_close(torch.from_numpy(feats.x[i, 1]), alone[Site("attn.out", 2)][0, 0], rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="block sites"):
        collect_features(lm, prompts, "final")


def test_monitor_records_probe_scores_and_never_changes_the_model(lm, hook_count):
    feats = collect_features(lm, POS + NEG, "resid_post", "last")
    probe = fit_on_features(feats, [1] * 24 + [0] * 24, ProbeConfig(folds=3, c=1.0, n_controls=1)).probe
    prompts = POS[:3] + NEG[:3]
    batch = tokenize_prompts(lm.tokenizer, prompts)
    n_hooks = hook_count(lm)
    with torch.no_grad():
        before = forward(lm, batch)
        with probe.apply(lm) as mon:
            during = forward(lm, batch)
        after = forward(lm, batch)
    assert torch.equal(before, during) and torch.equal(before, after)  # read-only
    assert hook_count(lm) == n_hooks
    expected = probe.predict_proba(np.concatenate([feats.x[:3], feats.x[24:27]]))  # [6, n_layers]
    torch.testing.assert_close(mon.latest().double(), expected, rtol=1e-4, atol=1e-5)

    with probe.monitor(lm, layers=[probe.best_layer]) as mon:  # generation: prefill, then one entry per new token
        generate_batch(lm, batch, max_new_tokens=3)
    steps = mon.scores[probe.best_layer]
    assert 1 <= len(steps) <= 3 and all(s.shape == (6,) for s in steps)
    torch.testing.assert_close(steps[0].double(), expected[:, probe.index(probe.best_layer)], rtol=1e-4, atol=1e-5)
    assert mon.trajectory(probe.best_layer).shape == (6, len(steps))
    assert hook_count(lm) == n_hooks


def test_refusal_labels_from_a_custom_judge(lm):
    prompts = POS[:3] + NEG[:3]
    flags, scores = refusal_labels(lm, prompts, lambda p, r: "q" in p, max_new_tokens=2)
    assert flags.tolist() == ["q" in p for p in prompts] and scores == [float(f) for f in flags]
    flags, scores = refusal_labels(lm, prompts, "score")
    assert flags.tolist() == [s > 0 for s in scores]


# ---- CLI ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, lm):
    path = tmp_path_factory.mktemp("tiny-llama")
    lm.model.save_pretrained(path)
    lm.tokenizer.save_pretrained(path)
    return path


def _cli(*args: str):
    from typer.testing import CliRunner

    from safetyscope.cli.main import app

    return CliRunner().invoke(app, list(args))


def test_cli_probe_with_held_out_set_and_cached_rerun(tiny_dir, tmp_path, png):
    files = {}
    for name, rows in (("h", POS[:14]), ("s", NEG[:14]), ("th", POS[14:]), ("ts", NEG[14:])):
        files[name] = tmp_path / f"{name}.txt"
        files[name].write_text("\n".join(rows) + "\n")
    args = ["probe", str(tiny_dir), "--harmful", str(files["h"]), "--harmless", str(files["s"]),
            "--test-harmful", str(files["th"]), "--test-harmless", str(files["ts"]), "--n-test", "8",
            "--folds", "3", "--controls", "1", "--random-directions", "1", "--out", str(tmp_path / "run"), "--json"]
    first = _cli(*args)
    assert first.exit_code == 0, first.output
    result = json.loads(first.stdout)
    assert len(result["layers"]) == 3 and result["n_test"] == 16 and result["test"]["n_harmful"] == 8
    assert all(r["test_accuracy"] is not None and r["random_auroc"] is not None for r in result["layers"])
    out = tmp_path / "run" / "probe"
    assert json.loads((out / "summary.json").read_text())["layers"] == result["layers"]
    png(out / "probe_layers.png")
    assert load_artifact(out / "artifact").layers == [0, 1, 2]
    cached = sorted(out.glob("cache/features-*.npy"))
    mtimes = [p.stat().st_mtime_ns for p in cached]
    assert len(cached) == 2
    second = _cli(*args)  # reruns reuse the captured features
    assert second.exit_code == 0 and json.loads(second.stdout)["layers"] == result["layers"]
    assert [p.stat().st_mtime_ns for p in cached] == mtimes


@pytest.mark.parametrize(
    "extra,needle",
    [
        (["--label", "toxicity"], "unknown --label"),
        (["--test-harmful", "x.txt"], "give both --test-harmful and --test-harmless"),
        (["--c", "-1"], "--c must be"),
        (["--site", "final"], "block sites"),
    ],
)
def test_cli_bad_options_give_one_line_errors(tiny_dir, tmp_path, extra, needle):
    h, s = tmp_path / "h.txt", tmp_path / "s.txt"
    h.write_text("\n".join(POS[:6]))
    s.write_text("\n".join(NEG[:6]))
    res = _cli("probe", str(tiny_dir), "--harmful", str(h), "--harmless", str(s), "--folds", "2",
               "--out", str(tmp_path / "run"), *extra)
    assert res.exit_code == 2, res.output
    assert needle in res.output


@pytest.mark.slow
def test_cli_probe_on_the_default_model(tmp_path):
    from safetyscope.prompts import builtin_prompts

    th, ts = tmp_path / "th.txt", tmp_path / "ts.txt"
    th.write_text("\n".join(builtin_prompts("harmful", "test").sample(4, seed=0).texts) + "\n")
    ts.write_text("\n".join(builtin_prompts("harmless", "test").sample(4, seed=0).texts) + "\n")
    res = _cli("probe", "default", "--n-prompts", "8", "--folds", "2", "--controls", "1", "--c", "1.0",
               "--test-harmful", str(th), "--test-harmless", str(ts), "--out", str(tmp_path), "--json")
    assert res.exit_code == 0, res.output
    result = json.loads(res.stdout)
    assert result["model"]["n_layers"] == 24 and result["n_positive"] == result["n_negative"] == 8
    best = result["best"]
    assert best["accuracy"] >= 0.8 and best["accuracy"] > best["control_accuracy"]
    assert best["test_accuracy"] is not None


def _threshold_in_a_gap(scores: list[float]) -> float:
    """A refusal-score threshold in the widest gap of the middle half of ``scores`` (both classes non-empty,
    and far from every score compared with float32 noise between batchings)."""
    s = sorted(scores)
    lo, hi = len(s) // 4, 3 * len(s) // 4
    i = max(range(lo, hi), key=lambda j: s[j + 1] - s[j])
    return (s[i] + s[i + 1]) / 2


def test_cli_probe_label_refusal_uses_the_refusal_judgement(tiny_dir, lm, tmp_path, png):
    from safetyscope.measure.generation import refusal_scores

    train_h, train_s, test_h, test_s = POS[:10], NEG[:10], POS[18:], NEG[18:]
    files = {}
    for name, rows in (("h", train_h), ("s", train_s), ("th", test_h), ("ts", test_s)):
        files[name] = tmp_path / f"{name}.txt"
        files[name].write_text("\n".join(rows) + "\n")
    train = train_h + train_s
    scores = refusal_scores(lm, train, batch_size=8).tolist()
    thr = _threshold_in_a_gap(scores)
    refused = [v > thr for v in scores]
    t_refused = [v > thr for v in refusal_scores(lm, test_h + test_s, batch_size=8).tolist()]
    assert 3 <= sum(refused) <= len(train) - 3 and 0 < sum(t_refused) < len(t_refused)  # both classes present

    res = _cli("probe", str(tiny_dir), "--harmful", str(files["h"]), "--harmless", str(files["s"]),
               "--test-harmful", str(files["th"]), "--test-harmless", str(files["ts"]), "--label", "refusal",
               "--refusal-judge", "score", "--refusal-threshold", repr(thr), "--folds", "2", "--c", "1.0",
               "--controls", "1", "--out", str(tmp_path / "run"), "--json")
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["label"] == "refused"
    assert (out["n_positive"], out["n_negative"]) == (sum(refused), len(train) - sum(refused))
    n_h = len(train_h)
    assert out["train"]["refusal"] == {
        "refused_harmful": sum(refused[:n_h]), "n_harmful": n_h,
        "refused_harmless": sum(refused[n_h:]), "n_harmless": len(train_s),
        "label_agreement": pytest.approx(sum(r == (i < n_h) for i, r in enumerate(refused)) / len(train)),
    }
    assert out["test"]["refusal"]["refused_harmful"] == sum(t_refused[: len(test_h)])
    assert out["test"]["refusal"]["refused_harmless"] == sum(t_refused[len(test_h):])
    assert all(r["test_accuracy"] is not None for r in out["layers"])
    cached = {len(json.loads(p.read_text())["refused"]): json.loads(p.read_text())
              for p in (tmp_path / "run/probe/cache").glob("refusal-*.json")}
    assert cached[len(train)]["refused"] == refused and cached[len(train)]["judge"] == "score"
    png(tmp_path / "run/probe/probe_layers.png")

    text = _cli("probe", str(tiny_dir), "--harmful", str(files["h"]), "--harmless", str(files["s"]),
                "--label", "refusal", "--refusal-threshold", repr(thr), "--folds", "2", "--c", "1.0", "--controls", "1",
                "--out", str(tmp_path / "run"))  # the table view, from the cached labels
    assert text.exit_code == 0, text.output
    flat = " ".join(text.output.split())
    assert "refused vs answered" in flat
    assert f"refused: {sum(refused[:n_h])}/{n_h} harmful, {sum(refused[n_h:])}/{len(train_s)} harmless" in flat


def test_cli_probe_label_refusal_with_one_class_is_a_clear_error(tiny_dir, tmp_path):
    h, s = tmp_path / "h.txt", tmp_path / "s.txt"
    h.write_text("\n".join(POS[:6]))
    s.write_text("\n".join(NEG[:6]))
    res = _cli("probe", str(tiny_dir), "--harmful", str(h), "--harmless", str(s), "--label", "refusal",
               "--refusal-threshold", "100", "--folds", "2", "--out", str(tmp_path / "run"))
    assert res.exit_code == 2, res.output
    assert "the score judge found all 12 training prompts answered" in " ".join(res.output.split())
