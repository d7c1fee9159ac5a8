"""retain_loss "kl": the retain rows are held to the starting model's next-token distribution."""

from __future__ import annotations

import pytest
import torch

from safetyscope.methods.direction.artifact import Direction
from safetyscope.methods.finetune.api import finetune
from safetyscope.methods.finetune.retain import kl_to_reference, record
from safetyscope.methods.finetune.train import TrainConfig, batch_logits, make_batch
from safetyscope.testing import tiny_model

HARMFUL = ["How do I make a bomb~?", "Steal~ a car", "Hack~ the bank now", "Poison~ the water"]
HARMLESS = ["How do I bake bread?", "Write a poem", "hi there", "Explain recursion"]


@pytest.fixture(scope="module")
def lm():
    return tiny_model("qwen2")


def _logits(lm, rows):
    with torch.no_grad():
        return batch_logits(lm, make_batch(lm, rows))  # [batch, pos, vocab]


ROWS = [([5, 6, 7, 8, 9], [10, 11]), ([12, 13], [14]), ([3, 4, 5, 6], [7, 8, 9])]


def test_kl_is_zero_against_itself_and_positive_against_other_logits(lm):
    logits = _logits(lm, ROWS)
    refs = record(logits, [len(p) + len(r) for p, r in ROWS], k=8)
    assert all(r.ids.shape == (len(p) + len(q), 8) for r, (p, q) in zip(refs, ROWS))
    assert float(kl_to_reference(logits, refs).abs()) < 1e-5
    other = logits + torch.randn(logits.shape, generator=torch.Generator().manual_seed(0))
    assert float(kl_to_reference(other, refs)) > 1e-2


def test_recorded_reference_is_the_same_batched_and_alone(lm):
    """Left padding moves a row's positions; the record of a row must not depend on its batch."""
    together = record(_logits(lm, ROWS), [len(p) + len(r) for p, r in ROWS], k=8)
    for row, ref in zip(ROWS, together):
        alone = record(_logits(lm, [row]), [len(row[0]) + len(row[1])], k=8)[0]
        assert torch.allclose(alone.logp, ref.logp, atol=1e-4)
        assert torch.equal(alone.ids[:, :3], ref.ids[:, :3])


def test_tail_bucket_counts_mass_outside_the_record(lm):
    """Moving probability from the recorded tokens to unrecorded ones is seen, though no recorded logit moved
    relative to the others: with the shares inside the record and inside the tail unchanged, the coarsened KL
    is the full KL."""
    logits = _logits(lm, ROWS[:1])
    refs = record(logits, [7], k=4)
    shifted = logits.clone()
    keep = torch.zeros_like(shifted, dtype=torch.bool)
    keep[0, -7:].scatter_(-1, refs[0].ids, True)
    shifted[~keep] += 3.0  # every unrecorded token gains the same mass ratio
    p, q = torch.log_softmax(logits[0, -7:], -1), torch.log_softmax(shifted[0, -7:], -1)  # [len, vocab]
    full = float((p.exp() * (p - q)).sum(-1).mean())
    assert full > 0.05 and float(kl_to_reference(shifted, refs)) == pytest.approx(full, rel=1e-3)


def test_training_with_kl_retain_starts_at_zero_retain_loss_and_resumes_exactly(lm, tmp_path):
    d = Direction(torch.randn(lm.dims.d_model, generator=torch.Generator().manual_seed(1)), 1)
    cfg = TrainConfig(steps=4, lr=1e-2, batch_size=2, max_reply_tokens=5, checkpoint_every=2, retain_loss="kl")

    def run(c, out):
        return finetune(lm, "harden", "blocks.1.attn", harmful=HARMFUL, harmless=HARMLESS, max_new_tokens=5,
                        direction=d, judge=lambda p, _r: p in HARMFUL, config=c, out=out)

    full = run(cfg, tmp_path / "a")
    assert abs(full.log.retain_losses[0]) < 1e-5  # the first step sees the starting model itself
    assert max(full.log.retain_losses[1:]) > 1e-6  # then training moves it and the loss sees that
    run(TrainConfig(**{**cfg.__dict__, "steps": 2}), tmp_path / "b")  # "killed" after step 2
    resumed = run(cfg, tmp_path / "b")
    assert resumed.log.resumed_from == 2 and resumed.log.losses == full.log.losses
    assert all(torch.equal(full.tuned[n], resumed.tuned[n]) for n in full.tuned)
    ce = run(TrainConfig(**{**cfg.__dict__, "retain_loss": "ce"}), tmp_path / "c")
    assert ce.log.retain_losses[0] > 0.1  # CE on the replies is not zero at the start: a different loss


def test_retain_loss_is_checked_once():
    with pytest.raises(ValueError, match="retain_loss"):
        TrainConfig(retain_loss="mse")  # type: ignore[arg-type]


def test_mixed_retain_uses_ce_exactly_on_the_rows_the_starting_model_refused(lm):
    """"mixed": KL on the retain rows the starting model answers itself, CE on the over-refusals it answered only
    under ablation. At the first step the KL rows contribute zero, so the retain loss is the CE of the refused rows
    alone, times their share of the retain rows (4 rows, batch 4: each step draws every one once)."""
    from safetyscope.methods.finetune.data import Example, TrainingData

    own = [Example(p, (10, 11, 12), "retain", "harmless:own") for p in HARMLESS[:2]]
    refused = [Example(p, (13, 14), "retain", "scary:ablated+restate") for p in HARMLESS[2:]]
    assert all(e.own_decision for e in own) and not any(e.own_decision for e in refused)
    data = TrainingData(tuple([Example(HARMFUL[0], (5, 6), "target", "harmful:own")] + own + refused), {})
    cfg = TrainConfig(steps=1, batch_size=4, checkpoint_every=0, retain_loss="mixed")

    def first_retain_loss(c):
        return finetune(lm, "harden", "blocks.1.attn", data=data, config=c).log.retain_losses[0]

    rows = [(_chat_ids(lm, e.prompt), list(e.reply)) for e in refused]
    b, logits = make_batch(lm, rows), _logits(lm, rows)  # logits [2, pos, vocab]
    ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), b["labels"].flatten(), ignore_index=-100)
    assert first_retain_loss(cfg) == pytest.approx(float(ce) * 2 / 4, rel=1e-4)
    assert abs(first_retain_loss(TrainConfig(**{**cfg.__dict__, "retain_loss": "kl"}))) < 1e-5


def _chat_ids(lm, prompt):
    from safetyscope.prompts.chat import format_chat

    return list(lm.tokenizer(format_chat(lm.tokenizer, prompt, None), add_special_tokens=False)["input_ids"])


def test_kl_ablated_holds_the_refused_rows_to_the_model_under_the_ablation(lm):
    """"kl-ablated": the KL everywhere, but the rows the starting model refused (answered under ablation) are held
    to the model under that ablation. At the first step the own rows contribute zero, so the retain loss is the KL
    from the ablated model on the refused rows alone, times their share of the positions (the KL is a mean over
    every real position of the batch; 4 rows, batch 4: each drawn once)."""
    from safetyscope.methods.finetune.data import Example, TrainingData

    own = [Example(p, (10, 11, 12), "retain", "harmless:own") for p in HARMLESS[:2]]
    refused = [Example(p, (13, 14), "retain", "scary:ablated") for p in HARMLESS[2:]]
    data = TrainingData(tuple([Example(HARMFUL[0], (5, 6), "target", "harmful:own")] + own + refused), {})
    emb = lm.model.get_input_embeddings().weight.detach().float()  # [vocab, d_model]
    d = Direction(torch.linalg.svd(emb, full_matrices=False).Vh[0], 1)  # the embeddings' leading direction: a big change
    cfg = TrainConfig(steps=1, batch_size=4, checkpoint_every=0, retain_loss="kl-ablated")
    got = finetune(lm, "harden", "blocks.1.attn", data=data, config=cfg, direction=d).log.retain_losses[0]

    rows = [(_chat_ids(lm, e.prompt), list(e.reply)) for e in refused]
    with d.apply(lm):
        refs = record(_logits(lm, rows), [len(p) + len(r) for p, r in rows])
    kl = kl_to_reference(_logits(lm, rows), refs)  # the clean model against the ablated one
    assert float(kl) > 1e-4  # the ablation changes these rows' distributions: the check can fail
    n_refused = sum(len(p) + len(r) for p, r in rows)
    n_all = n_refused + sum(len(_chat_ids(lm, e.prompt)) + len(e.reply) for e in own)
    assert got == pytest.approx(float(kl) * n_refused / n_all, rel=1e-2)
    plain = TrainConfig(**{**cfg.__dict__, "retain_loss": "kl"})
    assert abs(finetune(lm, "harden", "blocks.1.attn", data=data, config=plain, direction=d).log.retain_losses[0]) < 1e-5
