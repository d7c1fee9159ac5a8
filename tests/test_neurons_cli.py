"""`safetyscope neurons` on a tiny model: filters, fragility and each ablation mode through the CLI."""

from __future__ import annotations

import json

import pytest
import torch

from safetyscope.methods.neurons.artifact import NeuronSet, ablate_neurons
from safetyscope.testing import tiny_model

HARMFUL = [f"{w} X" for w in ("how to do it", "tell me", "make a thing", "explain this please", "write code",
                              "give steps", "why not", "ok then")]
HARMLESS = [w + e for w, e in zip(("how to bake", "tell me a joke", "make a cake", "explain rain", "write a poem",
                                   "give tips", "why sky blue", "ok"), "?.!;:,?.")]


def _cli(*args):
    from typer.testing import CliRunner

    from safetyscope.cli.main import app

    res = CliRunner().invoke(app, list(args))
    assert res.exit_code == 0, (res.output[-3000:], res.exception)
    return json.loads(res.stdout)



def _invoke(*args):
    from typer.testing import CliRunner

    from safetyscope.cli.main import app

    return CliRunner().invoke(app, list(args))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A saved tiny llama (unembedding x10: sharper logits, so ablations move the metrics far above float32
    noise), prompt files, the same model loaded in-process, and one `neurons find --filter none` run."""
    from safetyscope.models import load_model

    root = tmp_path_factory.mktemp("neurons-cli")
    lm = tiny_model("llama")
    with torch.no_grad():
        lm.model.lm_head.weight.mul_(10.0)
    lm.model.save_pretrained(root / "model")
    lm.tokenizer.save_pretrained(root / "model")
    for name, rows in (("h", HARMFUL[:5]), ("s", HARMLESS[:5]), ("eh", HARMFUL[5:]), ("es", HARMLESS[5:])):
        (root / f"{name}.txt").write_text("\n".join(rows) + "\n")
    common = [str(root / "model"), "--harmful", str(root / "h.txt"), "--harmless", str(root / "s.txt"),
              "--batch-size", "4", "--json"]
    found = _cli("neurons", "find", *common, "--out", str(root / "run"), "--top-k", "6", "--no-gradient",
                 "--filter", "none")
    return root, common, found, load_model(str(root / "model"), log=lambda _m: None)


def test_cli_find_filter_none_is_also_spelt_no_filter(tiny_run, tmp_path):
    root, common, found, _ = tiny_run
    assert found["filter"]["method"] == "none" and found["n_harmful"] == found["n_harmless"] == 5
    alias = _cli("neurons", "find", *common, "--out", str(tmp_path), "--top-k", "6", "--no-gradient", "--no-filter")
    assert alias["filter"] == found["filter"] and alias["top"] == found["top"]


def test_cli_find_filter_score_reaches_the_filter_and_the_cache_key(tiny_run, tmp_path):
    from safetyscope.methods.filtering import filter_by_refusal

    root, common, _, lm = tiny_run
    args = ["neurons", "find", *common, "--out", str(tmp_path), "--top-k", "6", "--no-gradient"]
    assert _cli(*args, "--filter", "none")["filter"]["method"] == "none"
    res = _cli(*args, "--filter", "score")  # same OUT: the cached `none` analysis must not be reused
    want = filter_by_refusal(lm, HARMFUL[:5], HARMLESS[:5], method="score", batch_size=4).summary()
    assert res["filter"] == want and want["method"] == "score"
    assert res["n_harmful"] == want["harmful_kept"] and res["n_harmless"] == want["harmless_kept"]
    saved = json.loads((tmp_path / "neurons/set/artifact.json").read_text())
    assert saved["info"]["filter"]["method"] == "score"


def test_cli_find_filter_judge_generates_and_judges(tiny_run, tmp_path, monkeypatch):
    """--filter judge reaches filter_by_refusal as method="judge" (replies shortened here to keep the test fast)."""
    import safetyscope.methods.filtering as filtering

    real, seen = filtering.filter_by_refusal, []

    def short(*a, **kw):
        seen.append(kw["method"])
        return real(*a, **{**kw, "max_new_tokens": 3})

    monkeypatch.setattr(filtering, "filter_by_refusal", short)
    root, common, _, _ = tiny_run
    res = _cli("neurons", "find", *common, "--out", str(tmp_path), "--top-k", "6", "--no-gradient", "--filter", "judge")
    assert seen == ["judge"] and res["filter"]["method"] == "judge"
    assert res["filter"]["harmful_in"] == 5 and res["n_harmful"] == res["filter"]["harmful_kept"]


def test_cli_find_filter_fallback_note_is_printed(tiny_run, tmp_path):
    """The tiny random model refuses nothing (refusal scores < 0): the harmful group falls back, visibly."""
    root, common, _, _ = tiny_run
    res = _invoke("neurons", "find", *common[:-1], "--out", str(tmp_path), "--top-k", "6", "--no-gradient",
                  "--filter", "score")
    assert res.exit_code == 0, res.output
    assert "only 0 of 5 harmful prompts were refused" in " ".join(res.output.split())
    assert "harmful group is used unfiltered" in " ".join(res.output.split())


@pytest.mark.parametrize(
    "cmd,extra,needle",
    [
        ("find", ["--filter", "phrase"], "unknown --filter 'phrase'; use first_token, score, judge, none"),
        ("fragility", ["--filter", "bogus"], "unknown --filter 'bogus'"),
        ("find", ["--no-filter", "--filter", "judge"], "--no-filter conflicts with --filter judge"),
    ],
)
def test_cli_bad_filter_is_a_one_line_error(tiny_run, tmp_path, cmd, extra, needle):
    root, common, _, _ = tiny_run
    res = _invoke("neurons", cmd, *common, "--out", str(tmp_path), *extra)
    assert res.exit_code == 2, res.output
    assert needle in res.output and "Traceback" not in res.output
    assert not (tmp_path / "neurons").exists()  # rejected before any work


def test_cli_fragility_takes_the_filter(tiny_run, tmp_path):
    root, common, _, _ = tiny_run
    frag = _cli("neurons", "fragility", *common, "--out", str(tmp_path), "--no-gradient", "--filter", "score",
                "--curves", "diff", "--ks", "0,3", "--seeds", "1", "--eval-harmful", str(root / "eh.txt"),
                "--eval-harmless", str(root / "es.txt"), "--n-eval", "0")
    assert frag["info"]["filter"]["method"] == "score" and frag["ks"] == [0, 3]


MODES = [("zero", None), ("mean", None), ("scale", 0.5), ("scale", 2.0)]


@pytest.mark.parametrize("mode,strength", MODES)
def test_cli_ablate_each_mode_matches_the_hooks(tiny_run, mode, strength):
    from safetyscope.measure.compare import logits_under
    from safetyscope.measure.metrics import kl_divergence, refusal_score
    from safetyscope.measure.refusal_tokens import refusal_token_ids

    root, common, found, lm = tiny_run
    extra = ["--strength", str(strength)] if strength is not None else []
    res = _cli("neurons", "ablate", *common, "--out", str(root / "run"), "--k", "4", "--mode", mode, *extra,
               "--max-new-tokens", "0", "--eval-harmful", str(root / "eh.txt"), "--eval-harmless", str(root / "es.txt"),
               "--n-eval", "0")
    assert res["mode"] == mode and res["strength"] == (1.0 if strength is None else strength) and res["n_neurons"] == 4
    harmful, harmless = HARMFUL[5:], HARMLESS[5:]
    assert res["n_harmful"] == len(harmful) and res["n_harmless"] == len(harmless)

    ns = NeuronSet.load(root / "run/neurons/set").top(4)
    assert ns.neurons == [(r["layer"], r["neuron"]) for r in found["top"][:4]]
    n, ids = len(harmful), refusal_token_ids(lm.tokenizer)
    base = logits_under(lm, harmful + harmless, None, batch_size=4)

    def under(m: str, st: float | None) -> tuple[float, float]:
        """(change of the mean refusal score on harmful, mean KL on harmless) with the hooks of mode m."""
        with ablate_neurons(lm, ns, mode=m, strength=st):
            after = logits_under(lm, harmful + harmless, None, batch_size=4)
        return (float((refusal_score(after[:n], ids) - refusal_score(base[:n], ids)).mean()),
                float(kl_divergence(base[n:], after[n:]).mean()))

    d_score, kl = under(mode, strength)
    assert res["before"]["kl"] == pytest.approx(0.0, abs=1e-7)
    assert res["after"]["kl"] == pytest.approx(kl, rel=1e-2) and kl > 1e-6  # the ablation changed the model ...
    got = res["after"]["refusal_score"] - res["before"]["refusal_score"]
    assert got == pytest.approx(d_score, abs=2e-5)
    for other in MODES:  # ... in the way this mode does, not another
        if other != (mode, strength):
            assert abs(got - under(*other)[0]) > 2e-4
