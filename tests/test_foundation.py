"""Site grammar, running statistics, positions, architecture tables and loader errors."""

from __future__ import annotations

import pytest
import torch

from safetyscope.hooks import NaNActivationError, capture, forward, hooks
from safetyscope.models import ArchitectureError, ModelLoadError, load_model, load_tables, table_for
from safetyscope.positions import PositionError, parse_positions, select_positions
from safetyscope.prompts.chat import ChatTemplateError, PromptTooLongError, tokenize_prompts
from safetyscope.runner import batched, run_capture
from safetyscope.sites import Site, SiteError, parse_site, parse_sites
from safetyscope.stats import GroupMoments, Moments, effect_size
from safetyscope.testing import tiny_model, tiny_tokenizer


# ---- sites ---------------------------------------------------------------------------------------
def test_site_grammar_expands_patterns():
    names = [s.name for s in parse_sites(["blocks.*.resid_post", "embed"], n_layers=3)]
    assert names == ["blocks.0.resid_post", "blocks.1.resid_post", "blocks.2.resid_post", "embed"]
    assert [s.layer for s in parse_sites("blocks.0-1,3.mlp.neurons", 5)] == [0, 1, 3]
    assert parse_site("blocks.-1.attn.heads", 4) == Site("attn.heads", 3)
    assert parse_site("final").layer is None


@pytest.mark.parametrize(
    "bad,match",
    [("blocks.0.mlp.nurons", "unknown site kind"), ("resid_post", "unknown site"), ("blocks.x.resid_post", "bad layer"),
     ("blocks.9.resid_post", "out of range"), ("blocks.3-1.resid_post", "empty layer range")],
)
def test_site_grammar_errors_name_the_fix(bad, match):
    with pytest.raises(SiteError, match=match) as info:
        parse_sites(bad, n_layers=4)
    assert "\n" not in str(info.value)


def test_wildcard_needs_layer_count():
    with pytest.raises(SiteError, match="layer count"):
        parse_sites("blocks.*.resid_post")


# ---- stats ---------------------------------------------------------------------------------------
def test_moments_match_numpy_and_merge_exactly():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(101, 7, generator=g, dtype=torch.float64) * 3 + 1
    whole = Moments().update(x)
    parts = [Moments().update(x[:10]), Moments().update(x[10:55]), Moments().update(x[55:])]
    merged = parts[0].merge(parts[1]).merge(parts[2])
    torch.testing.assert_close(whole.mean, x.mean(0))
    torch.testing.assert_close(whole.var(), x.var(0))
    torch.testing.assert_close(merged.mean, whole.mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(merged.m2, whole.m2, rtol=1e-10, atol=1e-10)
    assert merged.n == 101


def test_moments_accumulate_in_float64_from_float32_batches():
    x = (torch.randn(1000, 3) + 1e4).float()
    m = Moments()
    for chunk in x.split(7):
        m.update(chunk)
    assert m.mean.dtype == torch.float64
    torch.testing.assert_close(m.mean, x.double().mean(0))


def test_group_moments_state_round_trip_and_effect_size():
    gm = GroupMoments()
    gm.update("a", "blocks.0.x", torch.tensor([[1.0], [2.0], [3.0]]))
    gm.update("b", "blocks.0.x", torch.tensor([[0.0], [1.0], [2.0]]))
    back = GroupMoments.from_state(gm.state())
    torch.testing.assert_close(back.get("a", "blocks.0.x").mean, torch.tensor([2.0], dtype=torch.float64))
    assert float(effect_size(back.get("a", "blocks.0.x"), back.get("b", "blocks.0.x"))) == pytest.approx(1.0, rel=1e-6)
    with pytest.raises(KeyError):
        back.get("c", "blocks.0.x")


# ---- positions -----------------------------------------------------------------------------------
def test_positions_select_inside_the_mask():
    tok = tiny_tokenizer()
    b = tokenize_prompts(tok, ["abc", "a much longer prompt"])
    x = torch.arange(b.seq_len, dtype=torch.float32).view(1, -1, 1).repeat(2, 1, 1)  # value = position
    assert select_positions(x, "last", b)[:, 0, 0].tolist() == [b.seq_len - 1] * 2
    post = select_positions(x, "post_instruction", b)
    assert post.shape[1] == b.n_post
    mean = select_positions(x, "mean", b)[:, 0, 0]
    n_real = b.attention_mask.sum(1)
    expect = (b.seq_len - 1) - (n_real - 1) / 2  # mean of the last n_real positions
    torch.testing.assert_close(mean, expect.float())
    assert parse_positions("-1,-2") == (-1, -2)
    with pytest.raises(PositionError):
        parse_positions("middle")
    with pytest.raises(PositionError):
        parse_positions([1])


def test_post_instruction_tokens_are_the_template_suffix():
    tok = tiny_tokenizer()
    b = tokenize_prompts(tok, ["hello"])
    expected = tok("<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    assert b.input_ids[0, -b.n_post :].tolist() == expected


# ---- chat formatting and bad input ------------------------------------------------------------
def test_missing_chat_template_is_a_clear_error():
    tok = tiny_tokenizer(chat_template=None)
    with pytest.raises(ChatTemplateError, match="--chat-template"):
        tokenize_prompts(tok, ["hi"])


def test_prompt_longer_than_context_is_refused():
    tok = tiny_tokenizer()
    with pytest.raises(PromptTooLongError, match="over the model's context"):
        tokenize_prompts(tok, ["x" * 100], max_length=50)


def test_nan_activations_are_reported():
    lm = tiny_model("llama")
    b = tokenize_prompts(lm.tokenizer, ["hi"])
    with torch.no_grad(), hooks(lm, {Site("resid_post", 0): lambda x, _b: x * float("nan")}):
        with pytest.raises(NaNActivationError, match="float32"):
            list(run_capture(lm, ["hi"], "blocks.1.resid_post"))
    with torch.no_grad(), capture(lm, "blocks.1.resid_post") as cap:
        forward(lm, b)
    cap.check_finite()


def test_out_of_memory_backs_off_the_batch_size():
    lm = tiny_model("llama")
    sizes = []

    def fn(batch):
        sizes.append(len(batch))
        if len(batch) > 2:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2 GiB")
        return len(batch)

    results = list(batched(lm, [f"prompt {i}" for i in range(7)], fn, batch_size=8))
    assert sum(r for _, r in results) == 7
    assert sizes[:3] == [7, 4, 2]  # 8 (only 7 prompts) -> 4 -> 2, which fits
    assert max(sizes[3:]) <= 2  # the reduced size is kept for the rest of the run
    with pytest.raises(ValueError, match="empty prompt set"):
        list(batched(lm, [], fn))


def test_text_scoring_uses_the_same_out_of_memory_back_off(monkeypatch):
    import safetyscope.measure.capability as capability
    from safetyscope.runner import OutOfMemory

    lm = tiny_model("llama")
    rows = [[5, 6, 7, 8][: 2 + i % 3] for i in range(7)]
    whole = capability.cross_entropy(lm, rows, batch_size=8)
    real, sizes = capability._batch_ce, []

    def small_only(lm_, batch):
        sizes.append(len(batch))
        if len(batch) > 2:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2 GiB")
        return real(lm_, batch)

    monkeypatch.setattr(capability, "_batch_ce", small_only)
    backed_off = capability.cross_entropy(lm, rows, batch_size=8)
    assert sizes[:3] == [7, 4, 2] and max(sizes[3:]) <= 2 and sum(sizes[2:]) == 7
    assert backed_off.n_tokens == whole.n_tokens and backed_off.ce == pytest.approx(whole.ce, rel=1e-5)
    monkeypatch.setattr(capability, "_batch_ce", lambda *_a: (_ for _ in ()).throw(RuntimeError("out of memory")))
    with pytest.raises(OutOfMemory, match="batch of one text row; use shorter windows"):
        capability.cross_entropy(lm, rows, batch_size=1)


def test_pad_token_id_falls_back_to_eos_then_zero():
    from types import SimpleNamespace

    from safetyscope.prompts.chat import pad_token_id

    assert pad_token_id(tiny_tokenizer()) == tiny_tokenizer().pad_token_id == 0
    assert pad_token_id(SimpleNamespace(pad_token_id=None, eos_token_id=3)) == 3
    assert pad_token_id(SimpleNamespace(pad_token_id=None, eos_token_id=None)) == 0
    b = tokenize_prompts(tiny_tokenizer(), ["hi", "a longer prompt"])
    assert int(b.input_ids[0, 0]) == 0 and int(b.attention_mask[0, 0]) == 0  # the short row is left padded


def test_nan_logits_stop_the_forward_with_the_dtype_fix():
    lm = tiny_model("llama")
    b = tokenize_prompts(lm.tokenizer, ["hi", "hello there"])
    with torch.no_grad(), hooks(lm, {Site("resid_post", 2): lambda x, _b: x * float("inf")}):
        with pytest.raises(NaNActivationError, match="--dtype float32"):
            forward(lm, b)
        from safetyscope.measure.generation import generate_scored

        with pytest.raises(NaNActivationError, match="--dtype float32"):  # the scores read from a generation too
            generate_scored(lm, ["hi", "hello there"], max_new_tokens=2)
    masked = torch.zeros(2, 3, 5)
    masked[:, :, 0] = float("-inf")  # a masked token is not an overflow
    from safetyscope.hooks import check_logits

    check_logits(masked)


def test_grad_capture_gives_gradients_at_every_site():
    lm = tiny_model("qwen2")
    b = tokenize_prompts(lm.tokenizer, ["hello", "hi there"])
    with torch.enable_grad(), capture(lm, ["blocks.*.resid_post", "blocks.0.mlp.neurons"], "last", grad=True) as cap:
        logits = forward(lm, b)
        logits[:, -1, 5].sum().backward()
    assert set(cap.grads) == set(cap.values)
    assert all(g.abs().sum() > 0 for g in cap.grads.values())
    assert all(not p.requires_grad for p in lm.model.parameters())


# ---- architecture tables and loading -----------------------------------------------------------
def test_unknown_architecture_names_the_override(tmp_path):
    with pytest.raises(ArchitectureError, match="--arch-table"):
        table_for("mamba")
    extra = tmp_path / "arch.toml"
    extra.write_text('[mamba]\ninherit = "llama"\nmodel_types = ["mamba"]\n')
    assert table_for("mamba", extra).family == "mamba"
    assert "llama" in load_tables()
    bad = tmp_path / "bad.toml"
    bad.write_text("[x\n")
    with pytest.raises(ArchitectureError, match="not valid TOML"):
        load_tables(bad)


@pytest.mark.parametrize(
    "spec,match",
    [("./does/not/exist", "not found"), ("/tmp", "no config.json"), ("missing.gguf", "not found"),
     ("not a model!", "not found")],
)
def test_load_model_errors_are_clear(spec, match):
    with pytest.raises(ModelLoadError, match=match):
        load_model(spec, log=lambda _m: None)


def test_pickled_weights_are_refused_by_default(tmp_path):
    lm = tiny_model("llama")
    lm.model.save_pretrained(tmp_path)
    for f in tmp_path.glob("*.safetensors"):
        f.unlink()
    torch.save(lm.model.state_dict(), tmp_path / "pytorch_model.bin")  # a pickled checkpoint
    with pytest.raises(ModelLoadError, match="--allow-pickle"):
        load_model(str(tmp_path), log=lambda _m: None)


def test_local_directory_round_trip(tmp_path):
    lm = tiny_model("gpt2")
    lm.model.save_pretrained(tmp_path)
    lm.tokenizer.save_pretrained(tmp_path)
    again = load_model(str(tmp_path), device="cpu", log=lambda _m: None)
    b = tokenize_prompts(lm.tokenizer, ["hello"])
    with torch.no_grad():
        torch.testing.assert_close(forward(again, b), forward(lm, b))
    assert again.describe()["family"] == "gpt2"


def test_hub_id_fails_fast_without_network(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="hub"):
        load_model("some-org/some-model-that-is-not-cached", log=lambda _m: None)


# ---- top-level package -------------------------------------------------------------------------
def test_import_is_light_and_load_model_is_exported_lazily():
    """`import safetyscope` pulls in neither torch nor transformers; the top-level names resolve on use."""
    import subprocess
    import sys

    code = (
        "import sys, safetyscope\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'safetyscope.models') if m in sys.modules)\n"
        "assert not heavy, heavy\n"
        "assert 'load_model' in dir(safetyscope) and 'load_model' in safetyscope.__all__\n"
        "from safetyscope.models.loading import load_model\n"
        "assert safetyscope.load_model is load_model\n"
        "try:\n    safetyscope.no_such_name\nexcept AttributeError as e:\n    assert 'no_such_name' in str(e)\n"
        "else:\n    raise SystemExit('no AttributeError')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_version_matches_the_installed_metadata():
    from importlib.metadata import version

    import safetyscope

    assert safetyscope.__version__ == version("safetyscope")
    assert safetyscope.__version__[0].isdigit()
    assert set(safetyscope.__all__) == {"__version__", *safetyscope._LAZY}  # every lazy name is public


def test_top_level_load_model_loads_a_local_directory(tmp_path):
    import safetyscope

    lm = tiny_model("qwen2")
    lm.model.save_pretrained(tmp_path)
    lm.tokenizer.save_pretrained(tmp_path)
    again = safetyscope.load_model(str(tmp_path), device="cpu", log=lambda _m: None)
    assert isinstance(again, safetyscope.LoadedModel)
    assert (again.n_layers, again.dims.d_model) == (3, 32)
    b = tokenize_prompts(lm.tokenizer, ["hello"])
    with torch.no_grad():
        torch.testing.assert_close(forward(again, b), forward(lm, b))
    with pytest.raises(safetyscope.ModelLoadError, match="not found"):
        safetyscope.load_model("./does/not/exist", log=lambda _m: None)


# ---- embedded models: the assembled file is verified before anything parses it -------------------
def _fake_embedded(tmp_path, monkeypatch, sha256: str | None = None):
    """Two fake part packages on sys.path and an EMBEDDED entry that points at them."""
    import hashlib

    from safetyscope.models import embedded

    chunks = [b"GGUF fake part one " * 100, b"and fake part two" * 50]
    for i, data in enumerate(chunks, 1):
        pkg = tmp_path / "site" / f"fake_model_part{i}"
        (pkg / "data").mkdir(parents=True)
        (pkg / "__init__.py").write_text("")
        (pkg / "data" / f"part{i:02d}.bin").write_bytes(data)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    entry = embedded.EmbeddedModel(
        alias="default",
        title="fake",
        parts=tuple((f"fake_model_part{i}", f"data/part{i:02d}.bin") for i in (1, 2)),
        sha256=sha256 or hashlib.sha256(b"".join(chunks)).hexdigest(),
        install="pip install fake-model-part1==1.0 fake-model-part2==1.0",
    )
    monkeypatch.setitem(embedded.EMBEDDED, "default", entry)
    monkeypatch.setenv("SAFETYSCOPE_CACHE", str(tmp_path / "cache"))
    return entry, b"".join(chunks)


def test_embedded_parts_assemble_in_order_when_the_hash_matches(tmp_path, monkeypatch):
    from safetyscope.models.embedded import assemble

    entry, whole = _fake_embedded(tmp_path, monkeypatch)
    out = assemble(entry, tmp_path / "model.gguf")
    assert out.read_bytes() == whole


def test_embedded_sha256_mismatch_is_refused_and_nothing_is_cached(tmp_path, monkeypatch):
    from safetyscope.models import embedded

    entry, _ = _fake_embedded(tmp_path, monkeypatch, sha256="0" * 64)

    def must_not_convert(*_a, **_k):
        raise AssertionError("an unverified file reached the GGUF parser")

    monkeypatch.setattr(embedded, "convert_gguf", must_not_convert)
    with pytest.raises(embedded.EmbeddedModelError, match="sha256") as info:
        embedded.ensure_embedded("default", log=lambda _m: None)
    msg = str(info.value)
    assert "expected " + "0" * 64 in msg and "reinstall with: " + entry.install in msg
    # through the public loader: the same one-line error as a ModelLoadError
    with pytest.raises(ModelLoadError, match="sha256.*reinstall with: pip install fake-model-part1"):
        load_model("default", log=lambda _m: None)
    cache = tmp_path / "cache"
    leftovers = [p for p in cache.rglob("*") if p.is_file()] if cache.exists() else []
    assert leftovers == []  # no assembled .gguf, no .partial, no converted model
    assert not (cache / "models" / entry.cache_name).exists()
