"""Tail averaging of the trained tensors (stochastic weight averaging: Izmailov et al. 2018).

At a constant rate Adam does not settle: the trained tensors keep moving from step to step, and behaviour
measured on held-out prompts swings with them (on the default model's robust hardening, held-out harmful
refusal and over-refusal trade places every dozen steps). With ``TrainConfig.average_from`` k > 0 the run
keeps, beside the tensors it trains, the running mean of each of them over the states after steps k, k+1,
..., ``steps`` (k counted in steps done), and returns that mean instead of the last state.

The mean is kept in float32 and updated as ``m += (x - m) / n``, so an entry that never moves (a frozen
row under a gradient mask) stays bit-identical. It is part of the resumable state (:meth:`TailMean.tensors`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch


@dataclass
class TailMean:
    start: int  # the first averaged state is the one after this many steps (0 = no averaging)
    means: list[torch.Tensor] = field(default_factory=list)  # float32, one per trained tensor
    count: int = 0  # states averaged so far

    def update(self, done: int, params: Sequence[torch.Tensor]) -> None:
        """Adds the state after ``done`` steps when it is in the tail."""
        if not self.start or done < self.start:
            return
        with torch.no_grad():
            if not self.means:
                self.means = [p.detach().float().clone() for p in params]
                self.count = 1
                return
            self.count += 1
            for m, p in zip(self.means, params):
                m.add_((p.detach().float() - m) / self.count)

    def apply(self, params: Sequence[torch.Tensor]) -> None:
        """Writes the mean into ``params`` (nothing when no state was averaged)."""
        if not self.means:
            return
        with torch.no_grad():
            for m, p in zip(self.means, params):
                p.copy_(m.to(device=p.device, dtype=p.dtype))

    def tensors(self) -> dict[str, torch.Tensor]:
        """The state to checkpoint: ``avg.{i}`` per tensor and ``avg_count``."""
        if not self.means:
            return {}
        return {"avg_count": torch.tensor([self.count]), **{f"avg.{i}": m for i, m in enumerate(self.means)}}

    def load(self, t: dict[str, torch.Tensor], devices: Sequence[torch.device]) -> None:
        """Restores what :meth:`tensors` saved (nothing when the checkpoint has no mean yet)."""
        if "avg_count" not in t:
            self.means, self.count = [], 0
            return
        self.count = int(t["avg_count"][0])
        self.means = [t[f"avg.{i}"].float().to(dev) for i, dev in enumerate(devices)]
