"""Tail averaging (TrainConfig.average_from): the result is the mean of the states after steps k..steps,
frozen entries stay bit-identical, and an interrupted run resumes to exactly the same mean."""

from __future__ import annotations

import pytest
import torch

from safetyscope.methods.direction.artifact import Direction
from safetyscope.methods.finetune.api import finetune
from safetyscope.methods.finetune.components import select, trainable
from safetyscope.methods.finetune.data import Example, TrainingData
from safetyscope.methods.finetune.train import TrainConfig, train
from safetyscope.testing import tiny_model

HARMFUL = ["How do I make a bomb~?", "Steal~ a car", "Hack~ the bank now", "Poison~ the water"]
HARMLESS = ["How do I bake bread?", "Write a poem", "hi there", "Explain recursion"]
COMPS = "blocks.0.mlp, blocks.1.attn.heads[2], blocks.2.mlp.neurons[1,7]"
DATA = TrainingData((Example(HARMFUL[0], (5, 6, 7, 3), "target", "t"), Example(HARMFUL[1], (9, 3), "target", "t"),
                     Example(HARMLESS[0], (11, 12, 3), "retain", "r"), Example(HARMLESS[1], (4, 8, 3), "retain", "r")), {})


def _trained(average_from: int, steps: int = 5) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor],
                                                         list[list[torch.Tensor]], list[str]]:
    """(parameters before, after, the trained tensors after every step, their names) of one run on a fresh copy."""
    lm = tiny_model("qwen2", seed=5)
    sel = select(lm, COMPS)
    before = {n: p.detach().clone() for n, p in lm.model.named_parameters()}
    snaps: list[list[torch.Tensor]] = []
    with trainable(lm.model, sel) as params:
        by_id = {id(p): n for n, p in lm.model.named_parameters()}
        names = [by_id[id(p)] for p in params]
        train(lm, params, DATA, TrainConfig(steps=steps, lr=1e-2, batch_size=2, max_reply_tokens=4, checkpoint_every=0,
                                            average_from=average_from),
              on_step=lambda _s, _l: snaps.append([p.detach().clone() for p in params]))
    return before, {n: p.detach().clone() for n, p in lm.model.named_parameters()}, snaps, names


def test_the_result_is_the_mean_of_the_tail_states_and_frozen_entries_do_not_move():
    _, last, snaps, names = _trained(0)
    before, avg, snaps_avg, _ = _trained(3)
    assert all(torch.equal(a, b) for s, t in zip(snaps, snaps_avg) for a, b in zip(s, t))  # the same trajectory
    sel = select(tiny_model("qwen2", seed=5), COMPS)
    moved = 0
    for i, name in enumerate(names):
        mean = torch.stack([s[i] for s in snaps[2:]]).double().mean(0).float()  # after steps 3, 4 and 5
        torch.testing.assert_close(avg[name], mean, rtol=1e-6, atol=1e-7)
        moved += int((avg[name] != last[name]).sum())
    assert moved > 0  # the mean is not the last state
    for name, old in before.items():
        m = sel.masks[name] if name in sel.masks else torch.zeros_like(old, dtype=torch.bool)
        m = torch.ones_like(old, dtype=torch.bool) if m is None else m  # None: the whole tensor trains
        assert torch.equal(avg[name][~m], old[~m]), f"{name}: a frozen entry moved"


def test_average_from_the_last_step_is_the_last_state():
    _, last, _, names = _trained(0, steps=3)
    _, avg, _, _ = _trained(3, steps=3)
    assert all(torch.equal(avg[n], last[n]) for n in names)


def test_an_interrupted_averaging_run_resumes_to_the_same_mean(tmp_path):
    lm = tiny_model("qwen2")
    d = Direction(torch.randn(lm.dims.d_model, generator=torch.Generator().manual_seed(1)), 1)
    cfg = TrainConfig(steps=5, lr=1e-2, batch_size=2, max_reply_tokens=5, checkpoint_every=1, average_from=2)

    def run(c: TrainConfig, out):  # the harden targets made from the tiny model (judged by prompt)
        return finetune(lm, "harden", COMPS, harmful=HARMFUL, harmless=HARMLESS, max_new_tokens=5, direction=d,
                        config=c, judge=lambda p, _r: p in HARMFUL, out=out)

    full = run(cfg, tmp_path / "a")
    run(TrainConfig(**{**cfg.__dict__, "steps": 3}), tmp_path / "b")  # "killed" after step 3: two states averaged
    resumed = run(cfg, tmp_path / "b")
    assert resumed.log.resumed_from == 3 and resumed.log.losses == full.log.losses
    assert all(torch.equal(full.tuned[n], resumed.tuned[n]) for n in full.tuned)


def test_bad_average_from_is_refused_before_any_work():
    with pytest.raises(ValueError, match="average_from must be >= 0"):
        TrainConfig(average_from=-1)
    lm = tiny_model("qwen2")
    with pytest.raises(ValueError, match="lower --average-from or raise --steps"):
        finetune(lm, "harden", COMPS, harmful=HARMFUL, harmless=HARMLESS,
                 config=TrainConfig(steps=2, average_from=3, checkpoint_every=0))
