"""Reading a running model with a :class:`~.artifact.Monitor`: no extra forward pass, hooks removed on exit.

``with monitor.watch(lm) as w: lm.model.generate(...)`` (or ``hooks.forward(lm, batch)``): read-only
hooks on ``blocks.{l}.resid_pre`` of the monitor's blocks and on the model's output read

* in the **prefill** pass (the whole prompt; the first call of a generation, or a plain forward): the
  harm readers at the instruction's last token / the post-instruction tokens, the refusal-direction
  projection and the logit refusal score of the first reply token -> one :class:`Verdict` per row;
* in every **decoding step** (KV cache, one new token): the same readers on the new token, the
  projection and the logit refusal score of the next token -> per-token trajectories.

Which residual is read: ``resid_pre`` (a block's input). The harm readers are orthogonal to the
monitor's refusal subspace (``protect``), so an ablation of a direction in that subspace (hooks at the
same site, in whichever order they run, or an orthogonalised checkpoint) does not change a reading
directly; only its downstream effects can. The refusal projection is read after such edits when the
intervention was entered first (so it shows the ablation) and the logit refusal score always is.

Positions come from the running :class:`~..positions.Batch` when one is published (``hooks.forward``,
``measure.generation``) and otherwise from the call itself: rows must be left padded (their last
token real) and chat formatted with the monitor's system prompt (``n_post`` template tokens at the end).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from torch import nn

from ...errors import SafetyscopeError
from ...hooks import EditFn, current_batch, hooks
from ...measure.metrics import refusal_score
from ...positions import Batch
from ...prompts.chat import post_instruction_length
from ...sites import Site
from .tamper import UNCHECKED, PrefixCheck, TamperReading

if TYPE_CHECKING:
    from ...models.adapter import LoadedModel
    from .artifact import Monitor

VerdictKind = Literal["harmful_refused", "alert", "over_refusal", "answered"]
VERDICTS: tuple[VerdictKind, ...] = ("harmful_refused", "alert", "over_refusal", "answered")
AlertFn = Callable[[int, "Verdict"], "bool | None"]


class WatchError(SafetyscopeError, ValueError):
    """The monitor cannot read this model call."""


def verdict_kind(harmful: bool, refused: bool) -> VerdictKind:
    """harmful & refused / harmful & complied (alert) / harmless & refused (over-refusal) / harmless & answered."""
    if harmful:
        return "harmful_refused" if refused else "alert"
    return "over_refusal" if refused else "answered"


@dataclass(frozen=True)
class Verdict:
    """What the monitor read for one prompt (one row of one prefill pass) and the tokens generated after it."""

    kind: VerdictKind
    harm: float  # harm score (standardised; flagged above the monitor's threshold)
    refusal: float  # logit refusal score of the first reply token
    projection: float  # refusal-direction projection at the last prompt token
    call: int  # which prefill pass (0, 1, ...) inside the watch
    row: int  # row of that pass
    harm_trajectory: tuple[float, ...] = ()  # per generated token
    refusal_trajectory: tuple[float, ...] = ()  # logit refusal score of each next token
    projection_trajectory: tuple[float, ...] = ()
    token_ids: tuple[int, ...] = ()  # the generated token each trajectory entry was read on
    drift: int | None = None  # first generated token whose harm exceeded the drift threshold (None: never)
    tampered: bool = False  # the watch's prefix check found refusal removed from the model (see .tamper)

    @property
    def harmful(self) -> bool:
        return self.kind in ("harmful_refused", "alert")

    @property
    def refused(self) -> bool:
        return self.kind in ("harmful_refused", "over_refusal")

    @property
    def alert(self) -> bool:
        return self.kind == "alert" or self.tampered or (self.drift is not None and not self.refused)


@dataclass
class _Group:
    """The rows of one prefill pass and their running trajectories (numpy, on the CPU)."""

    harm: np.ndarray  # [batch]
    refusal: np.ndarray  # [batch]
    projection: np.ndarray  # [batch]
    steps: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = field(default_factory=list)  # (harm, refusal, proj)
    tokens: list[np.ndarray] = field(default_factory=list)  # [batch] token id fed at each decoding step
    drift: dict[int, int] = field(default_factory=dict)
    stop: np.ndarray | None = None  # [batch] rows whose generation should stop


def _is_prefill(kwargs: dict, n_pos: int) -> bool:
    """A call over the whole prompt (no cached tokens before it), from its KV cache, cache position or mask."""
    cache_pos = kwargs.get("cache_position")
    if isinstance(cache_pos, torch.Tensor) and cache_pos.numel():
        return int(cache_pos.reshape(-1)[0]) == 0
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    if cache is not None and hasattr(cache, "get_seq_length"):
        return int(cache.get_seq_length()) == 0
    mask = kwargs.get("attention_mask")
    if isinstance(mask, torch.Tensor) and mask.dim() == 2:
        return int(mask.shape[1]) <= n_pos
    return cache is None


class Watch:
    """The context manager returned by :meth:`Monitor.watch`; ``verdicts`` after (or during) the calls."""

    def __init__(self, monitor: Monitor, lm: LoadedModel, *, on_alert: AlertFn | None = None,
                 stop_on_alert: bool = False, drift_threshold: float | None = None):
        self.monitor, self.lm = monitor, lm
        self.on_alert, self.stop_on_alert, self.drift_threshold = on_alert, stop_on_alert, drift_threshold
        self.groups: list[_Group] = []
        self.n_calls = 0  # forward calls of the model seen (prefill + decoding steps)
        self._stack: ExitStack | None = None
        self._phase: str = "prefill"
        self._n_post = monitor.n_post
        self._raw: torch.Tensor | None = None  # [batch, n_readers] of the running call
        self._proj: torch.Tensor | None = None  # [batch]
        w, b, _, _ = monitor.reader_matrix()
        # float64, as at fitting time: a prompt scores the same in the watch as in the calibration
        self._w = torch.from_numpy(w)  # [n_readers, d_model]
        self._b = torch.from_numpy(b)
        self._r = torch.from_numpy(monitor.refusal_direction)  # [d_model]
        self._device: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self._check = PrefixCheck(monitor.prefix) if monitor.prefix is not None else None
        self._pstart: int | None = None  # where the stored prefix starts in row 0 of the running prefill

    # ---- context manager -------------------------------------------------------------------------
    def __enter__(self) -> Watch:
        self._n_post = post_instruction_length(self.lm.tokenizer, self.monitor.system or None)
        stack = ExitStack()
        try:
            pairs = [(Site("resid_pre", layer), self._reader(layer)) for layer in self.monitor.layers]
            stack.enter_context(hooks(self.lm, pairs))
            stack.callback(self.lm.model.register_forward_pre_hook(self._before, with_kwargs=True).remove)
            stack.callback(self.lm.model.register_forward_hook(self._after).remove)
        except BaseException:
            stack.close()
            raise
        self._stack = stack
        return self

    def __exit__(self, *exc: Any) -> None:
        stack, self._stack = self._stack, None
        if stack is not None:
            stack.close()

    # ---- results ---------------------------------------------------------------------------------
    @property
    def tamper(self) -> TamperReading:
        """What the shared prefix of the prefill passes so far says about the model (:mod:`.tamper`)."""
        return self._check.result() if self._check is not None else UNCHECKED

    @property
    def verdicts(self) -> list[Verdict]:
        """One verdict per prompt row, in the order of the prefill passes."""
        out: list[Verdict] = []
        harmful_at = self.monitor.threshold
        tampered = self.tamper.kind == "refusal_tampering"
        for g_i, g in enumerate(self.groups):
            for row in range(g.harm.shape[0]):
                kind = verdict_kind(bool(g.harm[row] > harmful_at), bool(g.refusal[row] > self.monitor.refusal_threshold))
                out.append(Verdict(
                    kind, float(g.harm[row]), float(g.refusal[row]), float(g.projection[row]), g_i, row,
                    tuple(float(s[0][row]) for s in g.steps), tuple(float(s[1][row]) for s in g.steps),
                    tuple(float(s[2][row]) for s in g.steps), tuple(int(t[row]) for t in g.tokens), g.drift.get(row),
                    tampered))
        return out

    def stopping_criteria(self) -> Any:
        """A transformers ``StoppingCriteriaList`` stopping the rows whose alert asked to stop."""
        from transformers import StoppingCriteria, StoppingCriteriaList

        watch = self

        class StopOnAlert(StoppingCriteria):
            def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
                n = input_ids.shape[0]
                g = watch.groups[-1] if watch.groups else None
                flags = g.stop if g is not None and g.stop is not None and g.stop.shape[0] == n else np.zeros(n, bool)
                return torch.as_tensor(flags, dtype=torch.bool, device=input_ids.device)

        return StoppingCriteriaList([StopOnAlert()])

    # ---- hooks -----------------------------------------------------------------------------------
    def _on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        key = str(device)
        if key not in self._device:
            self._device[key] = (self._w.to(device), self._b.to(device), self._r.to(device))
        return self._device[key]

    def _before(self, _m: nn.Module, args: tuple, kwargs: dict) -> None:
        self.n_calls += 1
        ids = kwargs.get("input_ids", args[0] if args else None)
        ref = ids if ids is not None else kwargs.get("inputs_embeds")
        if not isinstance(ref, torch.Tensor):
            raise WatchError("the monitor found neither input_ids nor inputs_embeds in the model call; pass them as "
                             "keyword arguments")
        prefill = _is_prefill(kwargs, int(ref.shape[1]))
        self._phase = "prefill" if prefill else "decode"
        batch: Batch | None = current_batch()
        self._n_post = batch.n_post if batch is not None else self._n_post
        if prefill:
            mask = kwargs.get("attention_mask")
            if isinstance(mask, torch.Tensor) and mask.dim() == 2 and not bool(mask[:, -1].all()):
                raise WatchError("the monitor needs left-padded prompts (every row's last token real): set "
                                 "lm.tokenizer.padding_side = 'left'")
            if self._check is not None and ids is not None:
                self._pstart = self._check.row_start(ids, mask)
            if ref.shape[1] < self._n_post + 1:
                raise WatchError(f"the prompt is {ref.shape[1]} tokens, shorter than the chat template's "
                                 f"{self._n_post} post-instruction tokens; chat-format the prompts first")
        if not prefill and ids is not None and self.groups:
            self.groups[-1].tokens.append(ids[:, -1].detach().cpu().numpy())
        self._raw = torch.zeros(ref.shape[0], len(self.monitor.readers), device=ref.device, dtype=torch.float64)
        self._proj = torch.zeros(ref.shape[0], device=ref.device, dtype=torch.float64)  # [batch]

    def _reader(self, layer: int) -> EditFn:
        idx = [i for i, r in enumerate(self.monitor.readers) if r.layer == layer]
        inst = torch.tensor([self.monitor.readers[i].position == "inst" for i in idx])
        is_refusal = layer == self.monitor.refusal_layer
        pp = self.monitor.prefix
        j_prefix = pp.blocks.index(layer) if pp is not None and layer in pp.blocks else None

        def read(x: torch.Tensor, _batch: Batch | None) -> None:  # x: [batch, pos, d_model]
            if self._raw is None or self._proj is None:
                return None
            if j_prefix is not None and self._phase == "prefill" and self._pstart is not None and pp is not None:
                assert self._check is not None
                self._check.read(j_prefix, x[0, self._pstart:self._pstart + pp.ids.size])  # [p, d_model]
            if not idx and not is_refusal:
                return None  # a block read only for the prefix check
            w, b, r = self._on(x.device)
            n = self._n_post if self._phase == "prefill" else 0
            xf = x.detach()[:, -(n + 1):].double()  # [batch, n + 1, d_model]: only the positions read
            last = xf[:, -1]  # [batch, d_model]
            if idx:
                if self._phase == "prefill":
                    a = xf[:, 0] @ w[idx].T  # [batch, k]: the instruction's last token
                    p = xf[:, 1:].mean(1) @ w[idx].T  # [batch, k]: mean over the post-instruction tokens
                    raw = torch.where(inst.to(x.device), a, p)
                else:
                    raw = last @ w[idx].T  # [batch, k]: the new token
                self._raw[:, idx] = raw.to(self._raw.device) + b[idx].to(self._raw.device)
            if is_refusal:
                self._proj.copy_((last @ r).to(self._proj.device))
            return None

        return read

    def _after(self, _m: nn.Module, _args: Any, output: Any) -> None:
        logits = getattr(output, "logits", None)
        if logits is None:
            logits = output[0] if isinstance(output, (tuple, list)) else output
        if self._raw is None or self._proj is None:
            return
        # the prefill's score meets the calibrated refusal threshold: float64 as at fitting time; the decoding
        # steps' (trajectories only) take the float32 path, ~4x cheaper per step over the vocabulary
        ref = refusal_score(logits[:, -1].detach(), self.monitor.refusal_token_ids, dtype=torch.float64,
                            fast=self._phase != "prefill")  # [batch]
        harm = self.monitor.harm_from_raw(self._raw.double().cpu().numpy())  # [batch]
        proj, refusal = self._proj.double().cpu().numpy(), ref.cpu().numpy()
        self._raw = self._proj = None
        if self._phase == "prefill":
            if self._check is not None and self._pstart is not None:
                self._check.n_reads += 1
            self._pstart = None
            self.groups.append(_Group(harm, refusal, proj, stop=np.zeros(harm.shape[0], dtype=bool)))
            self._alerts(self.groups[-1], len(self.groups) - 1)
        elif self.groups:
            g = self.groups[-1]
            g.steps.append((harm, refusal, proj))
            if self.drift_threshold is not None:
                for row in np.flatnonzero(harm > self.drift_threshold):
                    if int(row) not in g.drift:
                        g.drift[int(row)] = len(g.steps) - 1
                        self._alert_row(g, len(self.groups) - 1, int(row))

    def _alerts(self, g: _Group, g_i: int) -> None:
        tampered = self.tamper.kind == "refusal_tampering"
        for row in range(g.harm.shape[0]):
            if tampered or verdict_kind(bool(g.harm[row] > self.monitor.threshold),
                                        bool(g.refusal[row] > self.monitor.refusal_threshold)) == "alert":
                self._alert_row(g, g_i, row)

    def _alert_row(self, g: _Group, g_i: int, row: int) -> None:
        if self.on_alert is None and not self.stop_on_alert:
            return
        verdict = next(v for v in self.verdicts if v.call == g_i and v.row == row)
        if not verdict.alert:
            return
        stop = self.on_alert(row, verdict) if self.on_alert is not None else None
        if (stop or self.stop_on_alert) and g.stop is not None:
            g.stop[row] = True
