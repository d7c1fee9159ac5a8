"""The training loop: teacher-forced cross-entropy on self-made targets, Adam, resumable.

Each step draws ``batch_size`` target examples and ``batch_size`` retain examples (seeded by the step
number, so a resumed run draws what an uninterrupted one draws) and minimises
``CE(target replies) + retain_weight * CE(retain replies)`` over the reply tokens only (with
``retain_loss`` "kl" the retain term is instead the KL from the starting model's next-token distribution
at every token of the retain rows: :mod:`.retain`; "mixed" uses that KL except on the retain rows whose
decision the starting model does not share, the benign prompts it refused, answered under ablation, where
the KL would hold the row to the refusal: those get the cross-entropy on their answers; "kl-ablated" keeps the
KL on every retain row but records those rows' reference under the directional ablation that made their
answers, so they are held to the model that answers them, at the KL's own scale).

*Robust* training (harden): on the target rows, the refusal direction is projected out of the residual
stream (``blocks.{l}.resid_pre``) at a random subset of blocks and a random subset of token positions,
drawn anew at every step (each block and each position with probability ``robust_p``; with
``robust_scope`` "rows" instead each row, with probability ``robust_p``, at every block and every position,
the condition the attack creates), so the model learns to refuse without that direction; with ``robust_retain`` the retain rows get the same random
ablation (with its own probability ``robust_retain_p`` when given), so it must still answer benign prompts
without the direction. The direction is re-estimated every ``reestimate_every`` steps
as the difference of means of the target and retain prompts at its block and prompt position (the
direction artifact's), on the model as it is then, so training chases the direction the current model uses.
With ``robust_rank`` k > 1 a k-dimensional subspace is ablated instead: the direction plus the top
singular directions of the target - retain differences of means at every block (from 1 on) and every
post-instruction position, estimated at the start and at each re-estimation. A refusal direction found
afresh on the trained model is such a difference of means, so it lies close to that subspace, and the model
has to refuse without any of them; with ``robust_keep_start`` the direction training started from stays in
that subspace at every re-estimation (otherwise only the newly estimated one does). With ``robust_subspan``
each ablated row loses a random sub-span of that subspace instead of all of it (a random rotation of it, cut to
a dimension drawn uniformly from 1 to the rank, per row and step), so the model cannot learn "the whole
subspace is missing, so refuse" and must refuse whichever part of it an attack removes. With ``robust_online``
(scope "rows") the ablated direction is instead drawn at every step from the attack's own candidates, kept
current: the difference of the running means of target and retain rows at a random block (``search_layers``,
else every block from 1 on) and post-instruction position, updated from each batch's rows that were not
ablated (:class:`.robust.Tracker`), so refusal cannot move to a direction the estimate has not yet seen. With ``search_every`` N the attack's own direction search
(:mod:`.adversary`) runs on the model every N steps; each direction it finds is kept in the ablated
subspace for the rest of the run, and re-estimation then follows the block and position it chose.

Adam runs without weight decay: an entry whose gradient is always zero (masked) never moves. With
``average_from`` k the result is the mean of the states after steps k to ``steps`` (:mod:`.average`); with
``decay_from`` k the rate stays ``lr`` for the first k steps and then falls linearly towards 0 (:func:`rate`).
Every ``checkpoint_every`` steps the trainable tensors, Adam's moments, the current direction, the tail's
running mean, the step and the losses are written atomically to ``state_dir``; a rerun with the same key continues there.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from ...hooks import hooks
from ...io import atomic_dir, load_tensors, read_json, save_tensors, write_json
from ...models.adapter import LoadedModel
from ...progress import quiet
from ...prompts.chat import format_chat, pad_token_id
from ...sites import Site
from .adversary import Found, attack_direction
from .average import TailMean
from .data import Example, TrainingData
from .retain import Reference, kl_to_reference, record
from .robust import Tracker, estimate_direction, estimate_subspace, random_ablation, random_subspan

RetainLoss = Literal["ce", "kl", "mixed", "kl-ablated"]
RETAIN_LOSSES: tuple[RetainLoss, ...] = ("ce", "kl", "mixed", "kl-ablated")


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 40
    lr: float = 1e-4
    batch_size: int = 4  # target examples per step (and as many retain examples)
    retain_weight: float = 1.0
    retain_loss: RetainLoss = "ce"  # retain rows: CE on their replies, KL to the starting model (.retain), mixed, kl-ablated
    max_reply_tokens: int = 32  # targets are cut to this many tokens
    robust: bool = False
    robust_p: float = 0.5
    robust_scope: Literal["sites", "rows"] = "sites"  # what robust_p draws: blocks and positions, or whole rows
    robust_retain: bool = False  # robust runs: ablate on the retain rows too (they must still be answered)
    robust_retain_p: float | None = None  # robust_retain: the retain rows' probability (None = robust_p)
    robust_rank: int = 1  # robust runs: ablate a subspace of this many directions (1 = the refusal direction alone)
    reestimate_every: int = 10  # 0 = keep the initial direction
    search_every: int = 0  # robust runs: the attack's own direction search every N steps, its finds kept and ablated (0 = off)
    search_layers: tuple[int, ...] | None = None  # candidate blocks of that search (None = all)
    robust_keep_start: bool = False  # robust_rank > 1: the starting direction stays in the subspace at every re-estimation
    robust_subspan: bool = False  # robust_rank > 1: each ablated row loses a random sub-span of the subspace, not all of it
    robust_online: bool = False  # robust rows: ablate the current candidate of a random block and position, every step
    checkpoint_every: int = 10  # 0 = no resumable state
    average_from: int = 0  # > 0: return the mean of the states after this many steps and every later one (.average)
    decay_from: int = 0  # > 0: the rate falls linearly after this many steps, to lr / (steps - k + 1) at the last (rate)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or self.max_reply_tokens < 1:
            raise ValueError("steps, batch_size and max_reply_tokens must be positive")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, not {self.lr}")
        if not 0.0 < self.robust_p <= 1.0:
            raise ValueError(f"robust_p must be in (0, 1], not {self.robust_p}")
        if self.robust_retain_p is not None and not 0.0 < self.robust_retain_p <= 1.0:
            raise ValueError(f"robust_retain_p must be in (0, 1], not {self.robust_retain_p}")
        if self.retain_loss not in RETAIN_LOSSES:
            raise ValueError(f"retain_loss must be one of {', '.join(RETAIN_LOSSES)}, not {self.retain_loss!r}")
        if self.robust_scope not in ("sites", "rows"):
            raise ValueError(f"robust_scope must be 'sites' or 'rows', not {self.robust_scope!r}")
        if self.robust_rank < 1:
            raise ValueError(f"robust_rank must be at least 1 direction, not {self.robust_rank}")
        if self.robust_keep_start and self.robust_rank < 2:
            raise ValueError("robust_keep_start needs robust_rank >= 2 (at rank 1 the re-estimated direction replaces it)")
        if self.robust_subspan and self.robust_rank < 2:
            raise ValueError("robust_subspan needs robust_rank >= 2 (a sub-span of one direction is the direction)")
        if self.robust_online and self.robust_scope != "rows":
            raise ValueError("robust_online needs robust_scope 'rows' (its running means read the rows not ablated)")
        if min(self.retain_weight, self.reestimate_every, self.checkpoint_every, self.search_every) < 0:
            raise ValueError("retain_weight, reestimate_every, search_every and checkpoint_every must be >= 0")
        if self.average_from < 0:
            raise ValueError(f"average_from must be >= 0 (0 = off), not {self.average_from}")
        if self.decay_from < 0 or self.decay_from >= self.steps:
            raise ValueError(f"decay_from ({self.decay_from}) must be >= 0 (0 = off) and before the last step "
                             f"({self.steps}); lower --decay-from or raise --steps")
        if self.average_from > self.steps:
            raise ValueError(f"average_from ({self.average_from}) is after the last step ({self.steps}); "
                             "lower --average-from or raise --steps")


def rate(cfg: TrainConfig, step: int) -> float:
    """The learning rate of step ``step`` (0-based): ``lr`` before ``decay_from``, then a linear fall that
    reaches ``lr / (steps - decay_from + 1)`` at the last step (never 0, so every step still moves)."""
    if not cfg.decay_from or step < cfg.decay_from:
        return cfg.lr
    return cfg.lr * (cfg.steps - step) / (cfg.steps - cfg.decay_from + 1)


@dataclass(frozen=True)
class TrainLog:
    losses: tuple[float, ...]  # per step: total loss
    target_losses: tuple[float, ...]
    retain_losses: tuple[float, ...]
    resumed_from: int  # step the run continued from (0 = fresh)
    direction: torch.Tensor | None  # the last re-estimated unit direction [d_model], or [rank, d_model] basis (robust runs)
    seconds: float
    found_at: tuple[tuple[int, int, int], ...] = ()  # search_every: (step, block, position) of each direction found


# ---- batches -------------------------------------------------------------------------------------
def _prompt_ids(lm: LoadedModel, prompt: str, system: str | None) -> list[int]:
    return list(lm.tokenizer(format_chat(lm.tokenizer, prompt, system), add_special_tokens=False)["input_ids"])


def make_batch(lm: LoadedModel, rows: Sequence[tuple[Sequence[int], Sequence[int]]]) -> dict[str, torch.Tensor]:
    """Left-padded ``prompt + reply`` rows; labels are the reply tokens (-100 elsewhere), already shifted:
    ``labels[:, t]`` is the token predicted at position ``t``."""
    width = max(len(p) + len(r) for p, r in rows)
    pad = pad_token_id(lm.tokenizer)
    ids = torch.full((len(rows), width), int(pad), dtype=torch.long)     # [batch, pos]
    mask = torch.zeros((len(rows), width), dtype=torch.long)            # [batch, pos]
    labels = torch.full((len(rows), width), -100, dtype=torch.long)     # [batch, pos]
    for i, (p, r) in enumerate(rows):
        seq = list(p) + list(r)
        start = width - len(seq)
        ids[i, start:] = torch.tensor(seq, dtype=torch.long)
        mask[i, start:] = 1
        for j, tok in enumerate(r):  # reply token j sits at start + len(p) + j, predicted one position earlier
            labels[i, start + len(p) + j - 1] = int(tok)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels,
            "position_ids": (mask.cumsum(-1) - 1).clamp(min=0)}


def batch_logits(lm: LoadedModel, b: dict[str, torch.Tensor]) -> torch.Tensor:
    """Logits [batch, pos, vocab] of a :func:`make_batch` batch (no cache; gradients as the caller's context)."""
    dev = lm.input_device
    return lm.model(input_ids=b["input_ids"].to(dev), attention_mask=b["attention_mask"].to(dev),
                    position_ids=b["position_ids"].to(dev), use_cache=False).logits


def _ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over labelled positions; logits [batch, pos, vocab], labels [batch, pos]."""
    return nn.functional.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100)


# ---- memory ---------------------------------------------------------------------------------------
@contextmanager
def peak_memory() -> Iterator[dict[str, float]]:
    """Peak memory of the block above its start, in MiB (CUDA: allocated; CPU: resident set, sampled)."""
    out: dict[str, float] = {"peak_mib": 0.0}
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        yield out
        out["peak_mib"] = (torch.cuda.max_memory_allocated() - base) / 2**20
        return
    page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096

    def rss() -> int:
        try:
            with open("/proc/self/statm") as fh:
                return int(fh.read().split()[1]) * page
        except OSError:
            return 0

    base, peak, stop = rss(), [0], threading.Event()

    def watch() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], rss())
            stop.wait(0.02)

    th = threading.Thread(target=watch, daemon=True)
    th.start()
    try:
        yield out
    finally:
        stop.set()
        th.join()
        out["peak_mib"] = max(0, max(peak[0], rss()) - base) / 2**20


# ---- state -----------------------------------------------------------------------------------------
def _save_state(path: Path, key: str, step: int, params: Sequence[torch.Tensor], opt: torch.optim.Optimizer,
                logs: dict[str, list[float]], r: torch.Tensor | None, adv: _Adversary, avg: TailMean) -> None:
    tensors: dict[str, torch.Tensor] = avg.tensors()
    steps = []
    for i, p in enumerate(params):
        tensors[f"param.{i}"] = p.detach()
        st = opt.state.get(p, {})
        if st:
            tensors[f"m.{i}"], tensors[f"v.{i}"] = st["exp_avg"], st["exp_avg_sq"]
        steps.append(float(st["step"]) if st else 0.0)
    if r is not None:
        tensors["direction"] = r
    if adv.found:
        tensors["found"] = torch.stack(adv.found)
    if adv.tracker is not None:
        tensors["tracker"] = adv.tracker.means
    with atomic_dir(path) as tmp:
        save_tensors(tmp / "tensors.safetensors", tensors)
        write_json(tmp / "state.json", {"key": key, "step": step, "adam_steps": steps, **logs,
                                        "direction_at": [adv.layer, adv.position], "found_at": adv.found_at})


def _load_state(path: Path, key: str, params: Sequence[torch.Tensor], opt: torch.optim.Optimizer,
                adv: _Adversary, avg: TailMean) -> tuple[int, dict[str, list[float]], torch.Tensor | None] | None:
    """Restores the parameters, Adam's moments, ``adv`` and ``avg`` (in place); returns the step, logs and direction."""
    if not (path / "state.json").is_file():
        return None
    meta = read_json(path / "state.json")
    if meta.get("key") != key:
        return None
    t = load_tensors(path / "tensors.safetensors")
    with torch.no_grad():
        for i, p in enumerate(params):
            p.copy_(t[f"param.{i}"].to(device=p.device, dtype=p.dtype))
            if f"m.{i}" in t:
                opt.state[p] = {"step": torch.tensor(meta["adam_steps"][i]),
                                "exp_avg": t[f"m.{i}"].to(p.device), "exp_avg_sq": t[f"v.{i}"].to(p.device)}
    logs = {k: list(meta[k]) for k in ("losses", "target_losses", "retain_losses")}
    avg.load(t, [p.device for p in params])
    adv.found = list(t["found"]) if "found" in t else []
    if adv.tracker is not None and "tracker" in t:
        adv.tracker.means = t["tracker"].double()
    adv.layer, adv.position = (int(v) for v in meta.get("direction_at", [adv.layer, adv.position]))
    adv.found_at = [[int(v) for v in row] for row in meta.get("found_at", [])]
    return int(meta["step"]), logs, t.get("direction")


@dataclass
class _Adversary:
    """Where robust training re-estimates the direction (block, prompt position), and what the attack's
    in-training search found so far ([d_model] unit vectors, oldest first)."""

    layer: int
    position: int
    found: list[torch.Tensor]
    found_at: list[list[int]]  # [step, block, position] per found direction
    tracker: Tracker | None = None  # robust_online: the running means of the attack's candidates


# ---- the loop --------------------------------------------------------------------------------------
@dataclass
class _Run:
    lm: LoadedModel
    cfg: TrainConfig
    target: list[tuple[list[int], list[int]]]
    retain: list[tuple[list[int], list[int]]]
    changed: list[bool] | None = None  # retain_loss "mixed": the retain rows whose reply the starting model refused
    ref: list[Reference] | None = None  # retain_loss "kl"/"mixed"/"kl-ablated": the reference distributions of the retain rows

    @classmethod
    def of(cls, lm: LoadedModel, cfg: TrainConfig, data: TrainingData, system: str | None,
           teacher: Callable[[], AbstractContextManager[Any]] | None = None) -> _Run:
        """The rows of ``data`` as token ids; for a KL retain loss, the reference recorded on ``lm`` as it is now
        (for "kl-ablated", that of the rows the model did not answer itself recorded under ``teacher``)."""
        def pairs(ex: list[Example]) -> list[tuple[list[int], list[int]]]:
            return [(_prompt_ids(lm, e.prompt, system), list(e.reply[:cfg.max_reply_tokens])) for e in ex]

        run = cls(lm, cfg, pairs(data.of("target")), pairs(data.of("retain")))
        changed = [not e.own_decision for e in data.of("retain")]
        if cfg.retain_loss == "mixed":
            run.changed = changed
        if cfg.retain_loss == "ce":
            return run
        if cfg.retain_loss == "kl-ablated" and teacher is None:
            raise ValueError("retain_loss 'kl-ablated' needs the refusal direction whose ablation made the answers "
                             "(direction=...); or use retain_loss 'kl'")
        under = [c and cfg.retain_loss == "kl-ablated" for c in changed]  # rows whose reference the teacher records
        refs: dict[int, Reference] = {}
        for flag, ctx in ((False, nullcontext), (True, teacher or nullcontext)):
            idx = [i for i, u in enumerate(under) if u == flag]
            with ctx():
                refs.update(zip(idx, run.record_reference(idx)))
        run.ref = [refs[i] for i in range(len(run.retain))]
        return run

    def record_reference(self, idx: Sequence[int]) -> list[Reference]:
        """The model's top-k next-token distributions, as it is now, on the retain rows ``idx`` (no gradient)."""
        refs: list[Reference] = []
        k = 2 * self.cfg.batch_size
        with torch.no_grad():
            for i in range(0, len(idx), k):
                rows = [self.retain[j] for j in idx[i:i + k]]
                refs += record(batch_logits(self.lm, make_batch(self.lm, rows)), [len(p) + len(r) for p, r in rows])
        return refs

    def draw(self, pool: list[Any], step: int, salt: int) -> list[Any]:
        g = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + step * 7 + salt)
        order = torch.randperm(len(pool), generator=g).tolist()
        k = self.cfg.batch_size
        return [pool[order[i % len(order)]] for i in range(k)]

    def loss(self, step: int, r: torch.Tensor | None,
             tracker: Tracker | None = None) -> tuple[torch.Tensor, float, float]:
        tgt, idx = self.draw(self.target, step, 1), self.draw(list(range(len(self.retain))), step, 2)
        ret = [self.retain[i] for i in idx]
        b = make_batch(self.lm, tgt + ret)
        edits: list[tuple[Site, Any]] = []
        update = None
        if self.cfg.robust and r is not None:
            g = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + step * 7 + 3)
            rows = len(tgt) + (len(ret) if self.cfg.robust_retain else 0)  # the batch is target rows, then retain
            rp = self.cfg.robust_p if self.cfg.robust_retain_p is None else self.cfg.robust_retain_p
            row_p = torch.tensor([self.cfg.robust_p] * len(tgt) + [rp] * (rows - len(tgt)))  # [rows]
            if tracker is not None:  # the current candidate of a random block and position [d_model]
                r = tracker.draw(self.cfg.search_layers or range(min(1, self.lm.n_layers - 1), self.lm.n_layers), g)[2]
            elif self.cfg.robust_subspan and r.dim() == 2:
                r = random_subspan(r, rows, g)  # [rows, k, d_model]
            drawn: list[bool] = []
            width = b["input_ids"].shape[1]
            edits = random_ablation(self.lm, r, rows, width, self.cfg.robust_p, g, self.cfg.robust_scope, row_p, drawn)
            if tracker is not None:  # read the rows left intact, before any edit at each block
                groups = [None if i < rows and drawn[i] else int(i >= len(tgt)) for i in range(len(tgt) + len(ret))]
                ends = torch.tensor([width - len(reply) - 1 for _p, reply in tgt + ret])  # [batch]
                rec, update = tracker.recorder(self.lm.n_layers, ends, groups)
                edits = rec + edits
        with hooks(self.lm, edits) if edits else nullcontext():
            logits = batch_logits(self.lm, b)
        if update is not None:
            update()
        labels = b["labels"].to(logits.device)
        n = len(tgt)
        lt = _ce(logits[:n], labels[:n])
        lr_ = self.retain_term(logits[n:], labels[n:], idx)
        return lt + self.cfg.retain_weight * lr_, float(lt.detach()), float(lr_.detach())

    def retain_term(self, logits: torch.Tensor, labels: torch.Tensor, idx: list[int]) -> torch.Tensor:
        """The retain loss of the retain rows ``idx`` (logits [rows, pos, vocab], labels [rows, pos])."""
        if self.ref is None:
            return _ce(logits, labels)
        ce = [j for j, i in enumerate(idx) if self.changed is not None and self.changed[i]]
        if not ce:  # every row held to the starting model (no copy of the logits)
            return kl_to_reference(logits, [self.ref[i] for i in idx])
        kl = [j for j in range(len(idx)) if j not in ce]
        loss = _ce(logits[ce], labels[ce]) * (len(ce) / len(idx))  # CE where the answer was not the model's own
        if kl:
            loss = loss + kl_to_reference(logits[kl], [self.ref[idx[j]] for j in kl]) * (len(kl) / len(idx))
        return loss


def train(lm: LoadedModel, params: Sequence[torch.Tensor], data: TrainingData, cfg: TrainConfig, *,
          direction: torch.Tensor | None = None, direction_layer: int = 0, direction_position: int = -1,
          system: str | None = None, teacher: Callable[[], AbstractContextManager[Any]] | None = None,
          state_dir: Path | None = None, key: str = "", on_step: Callable[[int, float], None] | None = None) -> TrainLog:
    """Train ``params`` (already switched on for autograd, gradients masked) on ``data``; see the module docstring.
    ``teacher``: retain_loss "kl-ablated": the directional ablation that made the changed retain rows' answers."""
    start = time.perf_counter()
    run = _Run.of(lm, cfg, data, system, teacher)  # records the retain reference first: it is the starting model
    opt = torch.optim.Adam(list(params), lr=cfg.lr, weight_decay=0.0)
    logs: dict[str, list[float]] = {"losses": [], "target_losses": [], "retain_losses": []}
    r = None if direction is None else direction.detach().float().cpu()
    first = r if cfg.robust_keep_start and r is not None and r.dim() == 1 else None  # [d_model]
    adv = _Adversary(direction_layer, direction_position, [], [])
    avg = TailMean(cfg.average_from)
    step0 = 0
    texts = ([e.prompt for e in data.of("target")][:32], [e.prompt for e in data.of("retain")][:32])
    if cfg.robust and cfg.robust_online and r is not None:
        adv.tracker = Tracker.start(lm, texts[0], texts[1], system)  # a resumed run loads its running means
    if state_dir is not None and cfg.checkpoint_every:
        got = _load_state(state_dir, key, params, opt, adv, avg)
        if got is not None:
            step0, logs, saved_r = got
            r = saved_r if saved_r is not None else r

    def widen(v: torch.Tensor) -> torch.Tensor:  # the direction -> the ablated subspace (robust_rank > 1)
        kept = adv.found + ([first] if first is not None else [])  # estimate_subspace puts the last first
        extra = torch.stack(kept) if kept else None
        return estimate_subspace(lm, texts[0], texts[1], v, cfg.robust_rank, system, extra=extra)

    def due(every: int, step: int) -> bool:
        return bool(cfg.robust and r is not None and every and step and step % every == 0)

    if cfg.robust and r is not None and cfg.robust_rank > 1 and r.dim() == 1:
        r = widen(r)
    with _bar(cfg.steps, step0) as show:
        for step in range(step0, cfg.steps):
            hit = _search(lm, data, cfg, system) if due(cfg.search_every, step) else None
            if hit is not None:
                adv.found.append(hit.direction)
                adv.found_at.append([step, hit.layer, hit.position])
                adv.layer, adv.position = hit.layer, hit.position
            if hit is not None or (due(cfg.reestimate_every, step) and not cfg.robust_online):  # online: the tracker
                r = estimate_direction(lm, texts[0], texts[1], adv.layer, system, position=adv.position)
                r = widen(r) if cfg.robust_rank > 1 else r
            opt.zero_grad(set_to_none=True)
            with torch.enable_grad():
                loss, lt, lr_ = run.loss(step, r, adv.tracker)
                loss.backward()
            for g in opt.param_groups:  # set every step from the step alone, so a resumed run keeps the schedule
                g["lr"] = rate(cfg, step)
            opt.step()
            avg.update(step + 1, params)
            for k, v in zip(logs, (float(loss.detach()), lt, lr_)):
                logs[k].append(v)
            show(step + 1, logs["losses"][-1])
            if on_step is not None:
                on_step(step + 1, logs["losses"][-1])
            if state_dir is not None and cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0:
                _save_state(state_dir, key, step + 1, params, opt, logs, r, adv, avg)
    avg.apply(params)  # average_from: the tail's mean replaces the last state
    return TrainLog(tuple(logs["losses"]), tuple(logs["target_losses"]), tuple(logs["retain_losses"]), step0, r,
                    time.perf_counter() - start, tuple((a, b, c) for a, b, c in adv.found_at))


def _search(lm: LoadedModel, data: TrainingData, cfg: TrainConfig, system: str | None) -> Found | None:
    """The attack's search on the model being trained: harmful target prompts against harmless retain ones."""
    harm = list(dict.fromkeys(e.prompt for e in data.of("target")))[:32]
    retain = data.of("retain")
    safe = [e.prompt for e in retain if e.source.startswith("harmless")] or [e.prompt for e in retain]
    return attack_direction(lm, harm, list(dict.fromkeys(safe))[:32], cfg.search_layers, system)


@contextmanager
def _bar(total: int, done: int) -> Iterator[Callable[[int, float], None]]:
    """A progress bar showing the loss (nothing when quiet)."""
    if quiet():
        yield lambda _s, _l: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(TextColumn("finetune"), BarColumn(), MofNCompleteColumn(), TextColumn("loss {task.fields[loss]}"),
                  TimeRemainingColumn(), transient=True) as bar:
        task = bar.add_task("finetune", total=total, completed=done, loss="-")
        yield lambda s, loss: bar.update(task, completed=s, loss=f"{loss:.3f}")
