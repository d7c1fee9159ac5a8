"""A decaying learning rate (TrainConfig.decay_from): constant for k steps, then a linear fall; the steps before
k are the constant run's, an interrupted run resumes bit for bit, and a state is not continued by another length."""

from __future__ import annotations

import pytest
import torch

from safetyscope.methods.direction.artifact import Direction
from safetyscope.methods.finetune.api import finetune
from safetyscope.methods.finetune.components import select, trainable
from safetyscope.methods.finetune.data import Example, TrainingData
from safetyscope.methods.finetune.train import TrainConfig, rate, train
from safetyscope.testing import tiny_model

COMPS = "blocks.0.mlp, blocks.1.attn.heads[2]"
DATA = TrainingData((Example("Steal~ a car", (5, 6, 7, 3), "target", "t"), Example("Hack~ it", (9, 3), "target", "t"),
                     Example("Bake bread", (11, 12, 3), "retain", "r"), Example("A poem", (4, 8, 3), "retain", "r")), {})


def test_rate_is_constant_then_falls_linearly_and_never_reaches_zero():
    cfg = TrainConfig(steps=6, lr=0.3, decay_from=2)
    got = [rate(cfg, s) for s in range(6)]
    assert got[:2] == [0.3, 0.3]
    assert got[2:] == pytest.approx([0.3 * 4 / 5, 0.3 * 3 / 5, 0.3 * 2 / 5, 0.3 / 5])
    assert all(b < a for a, b in zip(got[1:], got[2:])) and got[-1] > 0
    assert [rate(TrainConfig(steps=6, lr=0.3), s) for s in range(6)] == [0.3] * 6


def _run(cfg: TrainConfig, state=None, stop_after: int = 0) -> tuple[list[float], dict[str, torch.Tensor], int]:
    """(losses, trained parameters, resumed_from) of one run on a fresh tiny model; ``stop_after`` kills it there."""
    lm = tiny_model("qwen2", seed=3)
    sel = select(lm, COMPS)
    losses: list[float] = []

    def step(s: int, loss: float) -> None:
        losses.append(loss)
        if stop_after and s == stop_after:
            raise KeyboardInterrupt

    with trainable(lm.model, sel) as params:
        try:
            log = train(lm, params, DATA, cfg, state_dir=state, key="k", on_step=step)
        except KeyboardInterrupt:
            return losses, {}, -1
    return list(log.losses), {n: p.detach().clone() for n, p in lm.model.named_parameters()}, log.resumed_from


def test_decay_follows_the_constant_run_until_k_and_then_leaves_it():
    base = dict(steps=6, lr=1e-2, batch_size=2, max_reply_tokens=4, checkpoint_every=0)
    flat, p_flat, _ = _run(TrainConfig(**base))
    dec, p_dec, _ = _run(TrainConfig(**base, decay_from=3))
    assert dec[:4] == flat[:4]  # the loss of step 4 reads the state after step 3: the same until then
    assert dec[4:] != flat[4:]
    assert any(not torch.equal(p_flat[n], p_dec[n]) for n in p_flat)


def test_an_interrupted_decaying_run_resumes_bit_for_bit(tmp_path):
    cfg = TrainConfig(steps=6, lr=1e-2, batch_size=2, max_reply_tokens=4, checkpoint_every=1, decay_from=2)
    full, p_full, _ = _run(cfg)
    _run(cfg, tmp_path, stop_after=4)  # killed in step 4, before its state was written (the decay under way)
    resumed, p_res, start = _run(cfg, tmp_path)
    assert start == 3 and resumed == full
    assert all(torch.equal(p_full[n], p_res[n]) for n in p_full)


def test_a_decaying_state_is_not_continued_by_a_run_of_another_length(tmp_path):
    """More constant steps continue a shorter run; a decaying run's rates depend on its length, so its state
    belongs to that length alone."""
    lm = tiny_model("qwen2")
    d = Direction(torch.randn(lm.dims.d_model, generator=torch.Generator().manual_seed(1)), 1)

    def run(steps: int, decay: int, out):
        cfg = TrainConfig(steps=steps, lr=1e-2, batch_size=2, max_reply_tokens=5, checkpoint_every=1, decay_from=decay)
        return finetune(lm, "harden", COMPS, harmful=["Steal~ a car", "Hack~ it"], harmless=["Bake bread", "A poem"],
                        max_new_tokens=5, direction=d, config=cfg, judge=lambda p, _r: "~" in p, out=out)

    run(3, 0, tmp_path / "flat")
    assert run(4, 0, tmp_path / "flat").log.resumed_from == 3
    run(3, 1, tmp_path / "dec")
    assert run(4, 1, tmp_path / "dec").log.resumed_from == 0
    assert run(4, 1, tmp_path / "dec").log.resumed_from == 4  # the same length: its own state, finished


@pytest.mark.parametrize("k", [-1, 5, 6])
def test_bad_decay_from_is_refused(k):
    with pytest.raises(ValueError, match="lower --decay-from or raise --steps"):
        TrainConfig(steps=5, decay_from=k)
