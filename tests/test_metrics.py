"""Tests of safetyscope.measure.metrics and refusal_tokens (tiny fake tensors, offline tokenizers)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from safetyscope.measure import (
    DEFAULT_REFUSAL_OPENINGS,
    agreement,
    auroc,
    kl_divergence,
    mean_kl,
    perplexity,
    rate_with_ci,
    refusal_score,
    refusal_token_ids,
    refusal_tokens,
    token_cross_entropy,
    wilson_interval,
)

# ---------------------------------------------------------------- refusal score


def test_refusal_score_matches_log_odds() -> None:
    torch.manual_seed(0)
    logits = torch.randn(4, 50)
    ids = [3, 7, 7, 11]
    p = logits.double().softmax(-1)[:, [3, 7, 11]].sum(-1)
    expected = torch.log(p + 1e-8) - torch.log(1 - p + 1e-8)
    score = refusal_score(logits, ids)
    assert score.shape == (4,) and score.dtype == torch.float32
    torch.testing.assert_close(score, expected.float(), rtol=1e-5, atol=1e-5)
    assert refusal_score(logits[0], ids).shape == ()


def test_refusal_score_higher_when_logits_favour_refusal_tokens() -> None:
    logits = torch.zeros(2, 10)
    logits[1, [2, 5]] = 6.0  # row 1 favours the refusal tokens
    score = refusal_score(logits, [2, 5])
    assert score[1] > 0 > score[0]
    assert score[0].item() == pytest.approx(math.log(2 / 8), abs=1e-6)  # uniform: p = 2/10


def test_refusal_score_monotone_in_refusal_logit() -> None:
    logits = torch.zeros(41, 16)
    logits[:, 4] = torch.linspace(-30, 30, 41)
    score = refusal_score(logits, [4])
    assert torch.all(score[1:] > score[:-1])
    assert torch.isfinite(score).all() and score.abs().max() < 19


def test_refusal_score_stable_in_low_precision_and_extremes() -> None:
    logits = torch.full((2, 8), -1e4)
    logits[0, 1] = 1e4  # all mass on the refusal token: 1 - p underflows
    logits[1, 0] = 1e4  # no mass on it
    score = refusal_score(logits.to(torch.bfloat16), [1])
    assert torch.isfinite(score).all()
    assert score[0] == pytest.approx(math.log(1 / 1e-8), rel=1e-4)
    assert score[1] == pytest.approx(-math.log(1 / 1e-8), rel=1e-4)


def test_refusal_score_validates() -> None:
    with pytest.raises(ValueError):
        refusal_score(torch.zeros(2, 5), [])
    with pytest.raises(ValueError):
        refusal_score(torch.zeros(2, 5), [5])
    with pytest.raises(ValueError):
        refusal_score(torch.zeros(2, 3, 5), [1])


# ---------------------------------------------------------------- refusal tokens


def _bpe_tokenizer() -> PreTrainedTokenizerFast:
    corpus = [
        "I'm sorry, but I cannot help with that.", "As an AI, I can't do that.",
        "I apologize, I am unable to assist.", "Unfortunately I must decline.",
        "Sure, here is the answer.", "The capital of France is Paris.",
    ] * 3
    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["[UNK]", "<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="<eos>")


def _word_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"[UNK]": 0, "I": 1, "As": 2, "sorry": 3, "'": 4, "m": 5, "cannot": 6, "Sorry": 7, "an": 8}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")


def test_refusal_token_ids_bpe() -> None:
    hf = _bpe_tokenizer()
    ids = refusal_token_ids(hf)
    assert ids == sorted(set(ids))
    first = {hf.encode(o, add_special_tokens=False)[0] for o in ("I", "As", "I'm sorry", "Sorry")}
    assert first <= set(ids)
    assert hf.convert_tokens_to_ids("I") in ids and hf.convert_tokens_to_ids("As") in ids
    assert hf.encode(" I", add_special_tokens=False)[0] in ids  # leading-space variant
    assert hf.unk_token_id not in ids and hf.eos_token_id not in ids
    pieces = refusal_tokens(hf, ids)
    assert all(p.strip() for p in pieces)
    assert all(any(o.startswith(p.strip()) for o in DEFAULT_REFUSAL_OPENINGS) for p in pieces)


def test_refusal_token_ids_wordlevel_skips_unknown() -> None:
    hf = _word_tokenizer()
    assert refusal_token_ids(hf) == [1, 2, 7]  # "I", "As", "Sorry"; "Unfortunately" etc. are [UNK]
    assert refusal_token_ids(hf, ["Sorry"]) == [7]
    assert refusal_token_ids(hf, "As an AI", space_variants=False) == [2]
    with pytest.raises(ValueError, match="ids="):
        refusal_token_ids(hf, ["Unfortunately"])


def test_refusal_token_ids_explicit_ids() -> None:
    hf = _word_tokenizer()
    assert refusal_token_ids(hf, ids=[2, 1, 2]) == [1, 2]
    with pytest.raises(ValueError, match="bad ids"):
        refusal_token_ids(hf, ids=[1, 99])


# ---------------------------------------------------------------- KL divergence


def test_kl_zero_against_itself_and_positive_under_perturbation() -> None:
    torch.manual_seed(1)
    logits = torch.randn(2, 5, 30)
    assert torch.allclose(kl_divergence(logits, logits), torch.zeros(2, 5), atol=1e-6)
    kl = kl_divergence(logits, logits + 0.5 * torch.randn_like(logits))
    assert kl.shape == (2, 5) and (kl > 0).all()
    assert kl_divergence(logits[:, 0], logits[:, 0] + 1.0).abs().max() < 1e-5  # shift invariance


def test_kl_matches_explicit_numpy() -> None:
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(3, 4, 12)), rng.normal(size=(3, 4, 12))
    p = np.exp(a) / np.exp(a).sum(-1, keepdims=True)
    q = np.exp(b) / np.exp(b).sum(-1, keepdims=True)
    expected = (p * (np.log(p) - np.log(q))).sum(-1)
    got = kl_divergence(torch.tensor(a), torch.tensor(b))  # float64 in, float32 computation
    assert got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-4, atol=1e-6)
    low = kl_divergence(torch.tensor(a).bfloat16(), torch.tensor(b).bfloat16())
    np.testing.assert_allclose(low.numpy(), expected, rtol=0.1, atol=1e-2)  # bf16 logits are upcast


def test_kl_handles_zero_probabilities() -> None:
    ref = torch.tensor([[0.0, -math.inf, 1.0]])
    new = torch.tensor([[1.0, 0.0, 0.0]])
    assert torch.isfinite(kl_divergence(ref, new)).all()


def test_kl_mask_and_mean() -> None:
    torch.manual_seed(2)
    a, b = torch.randn(2, 3, 8), torch.randn(2, 3, 8)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    kl = kl_divergence(a, b)
    masked = kl_divergence(a, b, mask)
    assert masked[0, 2] == 0 and masked[1, 1] == 0 and masked[0, 0] == kl[0, 0]
    expected = (kl[0, 0] + kl[0, 1] + kl[1, 0]) / 3
    torch.testing.assert_close(mean_kl(a, b, mask.bool()), expected)
    torch.testing.assert_close(mean_kl(a, b), kl.mean())
    with pytest.raises(ValueError, match="no position"):
        mean_kl(a, b, torch.zeros(2, 3))
    with pytest.raises(ValueError, match="differ"):
        kl_divergence(a, b[:, :2])
    with pytest.raises(ValueError, match="mask shape"):
        kl_divergence(a, b, torch.ones(2))


# ---------------------------------------------------------------- cross entropy


def test_token_cross_entropy_matches_torch() -> None:
    torch.manual_seed(3)
    logits, ids = torch.randn(2, 6, 11), torch.randint(0, 11, (2, 6))
    total, n = token_cross_entropy(logits, ids)
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, 11), ids[:, 1:].reshape(-1), reduction="sum")
    assert n == 10 and total == pytest.approx(expected.item(), rel=1e-5)
    assert perplexity(total, n) == pytest.approx(math.exp(expected.item() / 10), rel=1e-5)


def test_token_cross_entropy_padding() -> None:
    torch.manual_seed(4)
    logits, ids = torch.randn(2, 5, 7), torch.randint(0, 7, (2, 5))
    mask = torch.tensor([[1, 1, 1, 1, 0], [0, 0, 1, 1, 1]])  # right- and left-padded
    total, n = token_cross_entropy(logits, ids, mask)
    rows = [(0, range(0, 3)), (1, range(2, 4))]  # (row, predicting positions t -> t+1)
    expected = sum(F.cross_entropy(logits[r, t], ids[r, t + 1]).item() for r, ts in rows for t in ts)
    assert n == 5 and total == pytest.approx(expected, rel=1e-5)
    assert token_cross_entropy(logits, ids, torch.zeros_like(ids)) == (0.0, 0)


def test_perplexity_edge_cases() -> None:
    assert perplexity(0.0, 3) == 1.0
    assert perplexity(1e6, 1) == math.inf
    with pytest.raises(ValueError):
        perplexity(1.0, 0)


# ---------------------------------------------------------------- AUROC, agreement, rates


def test_auroc() -> None:
    assert auroc([0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1]) == 1.0
    assert auroc(torch.tensor([0.9, 0.8, 0.2, 0.1]), [False, False, True, True]) == 0.0
    assert auroc(np.array([0.5, 0.5]), [0, 1]) == 0.5
    with pytest.raises(ValueError, match="both positive and negative"):
        auroc([0.1, 0.2], [1, 1])
    with pytest.raises(ValueError, match="labels"):
        auroc([0.1, 0.2, 0.3], [0, 1])


def test_agreement() -> None:
    a = [True, True, False, False, True, False]
    b = [True, False, False, False, True, True]
    out = agreement(a, b)
    assert out["n"] == 6 and out["accuracy"] == pytest.approx(4 / 6)
    from sklearn.metrics import cohen_kappa_score

    assert out["kappa"] == pytest.approx(cohen_kappa_score(a, b))
    assert (out["both"], out["a_only"], out["b_only"], out["neither"]) == (2, 1, 1, 2)
    assert agreement(a, a)["kappa"] == pytest.approx(1.0)
    assert math.isnan(agreement([True, True], [True, True])["kappa"])
    with pytest.raises(ValueError):
        agreement([True], [True, False])
    with pytest.raises(ValueError):
        agreement([], [])


def test_wilson_interval_sanity() -> None:
    r = rate_with_ci([True] * 30 + [False] * 70)
    assert (r["rate"], r["n"], r["k"]) == (0.3, 100, 30)
    assert r["lo"] < 0.3 < r["hi"]
    assert r["lo"] == pytest.approx(0.2189, abs=1e-3) and r["hi"] == pytest.approx(0.3958, abs=1e-3)
    all_true = rate_with_ci(torch.ones(20, dtype=torch.bool))
    assert all_true["rate"] == 1.0 and all_true["hi"] == 1.0 and 0.8 < all_true["lo"] < 1.0
    assert rate_with_ci([False] * 5)["lo"] == 0.0
    narrow, wide = wilson_interval(300, 1000), wilson_interval(3, 10)
    assert narrow[1] - narrow[0] < wide[1] - wide[0]
    empty = rate_with_ci([])
    assert math.isnan(empty["rate"]) and (empty["lo"], empty["hi"], empty["n"]) == (0.0, 1.0, 0)
    with pytest.raises(ValueError):
        wilson_interval(5, 3)


def test_fast_refusal_score_agrees_with_the_float64_path():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 5000, generator=g) * 4
    logits[1, :5] += 30  # p close to 1: the eps keeps both finite
    logits[2, :5] -= 30  # p close to 0
    ids = [0, 1, 2, 3, 4]
    exact = refusal_score(logits, ids, dtype=torch.float64)
    fast = refusal_score(logits, ids, dtype=torch.float64, fast=True)
    assert torch.isfinite(fast).all() and torch.allclose(fast, exact, atol=1e-4, rtol=0)
    assert refusal_score(logits.half(), ids, fast=True).dtype == torch.float32
    assert refusal_score(logits[0], ids, fast=True).shape == ()
    with pytest.raises(ValueError):
        refusal_score(logits, [5000], fast=True)
