"""``finetune``: weaken or harden refusal by training only chosen components (or a baseline).

>>> import safetyscope as ss                                               # doctest: +SKIP
>>> lm = ss.load_model("small")                                           # doctest: +SKIP
>>> r = ss.finetune(lm, "harden", "blocks.14.attn, blocks.20.mlp.neurons[5,9]", robust=True)  # doctest: +SKIP
>>> with r.apply(lm):                                                     # doctest: +SKIP
...     ...                                   # the tuned weights, swapped in; the original ones back on exit
>>> r.export(lm, "runs/hardened")                                         # doctest: +SKIP  (a normal HF checkpoint)

The caller's model is trained in place and put back exactly afterwards (the trained tensors are kept in the
result, ``tuned``: parameter name -> tensor), so no second copy of the model is needed; ``apply`` swaps the
tuned tensors in and out, ``tuned_copy`` makes a separate model, ``export`` writes a checkpoint.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from ...artifacts.checkpoint import stored_checkpoint
from ...io import atomic_dir, fingerprint, write_json
from ...models.adapter import LoadedModel
from ...prompts.builtin import builtin_prompts
from ...prompts.sets import PromptsLike, as_prompt_set
from ...sites import Component, SiteError, parse_sites
from ..direction.artifact import Direction
from .components import Selection, frozen, random_like, select, select_all, trainable
from .data import (
    DATA_VERSION,
    MODES,
    REFUSAL_STYLES,
    Mode,
    RefusalStyle,
    TrainingData,
    extend_refusals,
    make_data,
)
from .export import write_over_stored
from .lora import lora
from .train import TrainConfig, TrainLog, peak_memory, train

Method = Literal["components", "full", "lora", "random"]
METHODS: tuple[Method, ...] = ("components", "full", "lora", "random")


@dataclass(frozen=True)
class FinetuneResult:
    """What a fine-tuning run did, and the tuned tensors (parameter name -> tensor)."""

    model: str
    mode: Mode
    method: Method
    components: tuple[str, ...]
    n_trainable: int
    n_total: int
    log: TrainLog
    peak_mib: float
    data_counts: dict[str, int]
    tuned: dict[str, torch.Tensor]
    direction: Direction | None  # the direction used for the targets / robust training (found or given)

    @property
    def fraction(self) -> float:
        return self.n_trainable / max(1, self.n_total)

    def summary(self) -> dict[str, Any]:
        lg = self.log
        return {"model": self.model, "mode": self.mode, "method": self.method, "components": list(self.components),
                "n_trainable": self.n_trainable, "n_total": self.n_total, "fraction": self.fraction,
                "steps": len(lg.losses), "resumed_from": lg.resumed_from, "first_loss": lg.losses[0] if lg.losses else None,
                "last_loss": lg.losses[-1] if lg.losses else None, "seconds": lg.seconds, "peak_mib": self.peak_mib,
                "data": self.data_counts, "tensors": len(self.tuned),
                "found_at": [list(v) for v in lg.found_at]}  # robust search_every: [step, block, position]

    def apply(self, lm: LoadedModel) -> Any:
        """The tuned tensors swapped into ``lm`` for the block (the original values restored on exit)."""
        return _swapped(lm.model, self.tuned)

    def tuned_copy(self, lm: LoadedModel) -> LoadedModel:
        """A separate LoadedModel (deep copy, same tokenizer) carrying the tuned tensors."""
        model = copy.deepcopy(lm.model)
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, t in self.tuned.items():
                params[name].copy_(t.to(params[name].device, params[name].dtype))
        return dataclasses.replace(lm, model=model, name=f"{lm.name}+{self.mode}", meta=dict(lm.meta))

    def export(self, lm: LoadedModel, out_dir: str | Path) -> Path:
        """A normal Hugging Face checkpoint of ``lm`` with the tuned tensors (plus the tokenizer). When ``lm`` was
        loaded from a local safetensors checkpoint that its frozen tensors still equal, the stored files are
        copied with only the tuned tensors replaced (never rounded to a coarser stored dtype), so a run in bfloat16 of a
        float32 checkpoint leaves every other tensor byte-identical (:mod:`.export`); else the live model is saved."""
        source = stored_checkpoint(lm.meta)
        with atomic_dir(out_dir) as tmp:
            if source is None or not write_over_stored(source, lm.model.state_dict(), self.tuned, tmp):
                with self.apply(lm):
                    kwargs: dict[str, Any] = {}
                    if "safe_serialization" in inspect.signature(lm.model.save_pretrained).parameters:
                        kwargs["safe_serialization"] = True
                    lm.model.save_pretrained(tmp, **kwargs)
            if lm.tokenizer is not None:
                lm.tokenizer.save_pretrained(tmp)
            write_json(tmp / "safetyscope_finetune.json", {"source_model": lm.name, **self.summary()})
        return Path(out_dir)


@contextmanager
def _swapped(model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> Iterator[None]:
    params = dict(model.named_parameters())
    missing = [n for n in tensors if n not in params]
    if missing:
        raise ValueError(f"the model has no parameter {missing[0]}; apply the result to the model it was tuned on")
    saved = {n: params[n].detach().clone() for n in tensors}
    try:
        with torch.no_grad():
            for n, t in tensors.items():
                params[n].copy_(t.to(params[n].device, params[n].dtype))
        yield
    finally:
        with torch.no_grad():
            for n, t in saved.items():
                params[n].copy_(t)


def map_components(out: str | Path) -> list[str]:
    """Component names from a map's stages (``OUT/map/stages/report.json``): attention / MLP outputs and
    neurons; residual-stream sites hold no parameters and are skipped."""
    from ...io import read_json

    path = Path(out) / "map" / "stages" / "report.json"
    if not path.is_file():
        raise ValueError(f"no map stages at {path}; run `safetyscope map MODEL --out {out}` first or give --components")
    names: list[str] = []
    for stage in read_json(path)["result"].get("stages", []):
        for name in stage.get("components", []):
            try:
                if all(s.is_residual for s in parse_sites(name)):
                    continue
            except SiteError:
                pass  # not an activation site: a neuron name such as L22.N2106
            if name not in names:
                names.append(name)
    if not names:
        raise ValueError(f"the map at {out} names no attention, MLP or neuron components; give --components")
    return names


def _prompts(given: PromptsLike | None, kind: str, seed: int) -> list[str]:
    if given is None:
        return builtin_prompts(kind, "train", seed=seed).texts
    return as_prompt_set(given, None, what=f"{kind} prompts").texts


def _selection(lm: LoadedModel, method: Method, components: Any, neuron_set: Any, kv: bool, seed: int) -> Selection:
    if method == "full":
        return select_all(lm)
    if components is None:
        raise ValueError("give the components to train (e.g. 'blocks.14.attn, blocks.20.mlp.neurons[5,9]') or "
                         "method='full' / 'lora'")
    sel = select(lm, components, neuron_set=neuron_set, kv=kv)
    if method == "random":
        rnd = select(lm, random_like(lm, components, neuron_set=neuron_set, seed=seed + 1), kv=kv)
        if rnd.n_trainable != sel.n_trainable:
            note = f"the random components own {rnd.n_trainable:,} parameters, the selection {sel.n_trainable:,}"
            rnd = dataclasses.replace(rnd, notes=(*rnd.notes, note))
        return rnd
    return sel


def _direction(lm: LoadedModel, given: Direction | None, needed: bool, harmful: list[str], harmless: list[str],
               batch_size: int, system: str | None) -> Direction | None:
    if given is not None or not needed:
        return given
    from ..direction.api import DirectionConfig, find_direction

    return find_direction(lm, harmful, harmless, config=DirectionConfig(screen=8, keep=4, induce="lazy"),
                          batch_size=batch_size, system=system)


def _data(lm: LoadedModel, mode: Mode, prompts: tuple[list[str], list[str], list[str]], d: Direction | None,
          judge: Callable[[str, str], bool] | None, max_new_tokens: int, batch_size: int, system: str | None,
          cache: Path | None, style: RefusalStyle = "own", cut: int | None = None,
          restate_changed: bool = True) -> TrainingData:
    from ...measure.judges import PhraseJudge

    key = fingerprint(DATA_VERSION, lm.name, mode, prompts, None if d is None else d.direction.tolist(), max_new_tokens, system,
                      getattr(judge, "__qualname__", repr(judge)), *((style, cut) if style != "own" else ()),
                      *(() if restate_changed else ("plain changed",)))
    path = None if cache is None else cache / f"data-{key}.jsonl"
    if path is not None and path.is_file():
        return TrainingData.load(path)
    ablate = None if d is None else (lambda: d.apply(lm))
    add = None if d is None else (lambda: d.add(lm))
    data = make_data(lm, mode, *prompts, ablate=ablate, add=add, judge=judge or PhraseJudge(),
                     max_new_tokens=max_new_tokens, batch_size=batch_size, system=system)
    if style != "own" and mode == "harden":
        data = extend_refusals(lm, data, judge=judge or PhraseJudge(), style=style, batch_size=batch_size,
                               system=system, max_reply_tokens=cut, restate_changed=restate_changed)
    if path is not None:
        data.save(path)
    return data


def finetune(lm: LoadedModel, mode: Mode, components: str | Sequence[str | Component] | None = None, *,
             method: Method = "components", harmful: PromptsLike | None = None, harmless: PromptsLike | None = None,
             scary: PromptsLike | None = None, data: TrainingData | None = None, neuron_set: Any = None,
             direction: Direction | None = None, config: TrainConfig | None = None, robust: bool | None = None,
             judge: Callable[[str, str], bool] | None = None, max_new_tokens: int = 32,
             refusal_style: RefusalStyle = "own", kv: bool = True,
             lora_rank: int = 8, batch_size: int = 8, system: str | None = None, out: str | Path | None = None,
             log: Callable[[str], None] | None = None) -> FinetuneResult:
    """Weaken or harden refusal of ``lm`` by training ``components`` only (or a baseline ``method``).

    Prompts default to the built-in train splits (harden also uses ``scary_harmless``); targets are
    made from the model (see :mod:`.data`) unless ``data`` is given. ``direction``: the refusal
    direction (found on the prompts when weakening or robust hardening needs one and none is given).
    ``method``: components (the selection), full (every parameter), lora (rank ``lora_rank`` on every
    projection) or random (components of the same kinds and sizes at random places, disjoint from the
    selection: :func:`.components.random_like`). ``out``: keep the targets and the resumable training
    state there. ``lm`` is left exactly as it was; the result holds the tuned tensors.
    """
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; use weaken or harden")
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; use {', '.join(METHODS)}")
    if refusal_style not in REFUSAL_STYLES:
        raise ValueError(f"unknown refusal style {refusal_style!r}; use {' or '.join(REFUSAL_STYLES)}")
    cfg = config or TrainConfig()
    if robust is not None:
        cfg = dataclasses.replace(cfg, robust=robust)
    bad = [v for v in cfg.search_layers or () if not 0 <= v < lm.n_layers]
    if bad:
        raise ValueError(f"search layer {bad[0]} is outside {lm.name}'s blocks 0-{lm.n_layers - 1}; "
                         "pass --search-layers within them")
    say = log or (lambda _m: None)
    seed = cfg.seed
    harm, safe = _prompts(harmful, "harmful", seed), _prompts(harmless, "harmless", seed)
    bait = (_prompts(scary, "scary_harmless", seed) if (scary is not None or harmless is None) and mode == "harden"
            else [])
    d = _direction(lm, direction, mode == "weaken" or cfg.robust or cfg.retain_loss == "kl-ablated", harm, safe, batch_size,
                   system)
    cache = None if out is None else Path(out)
    td = data or _data(lm, mode, (harm, safe, bait), d, judge, max_new_tokens, batch_size, system, cache,
                       refusal_style, cfg.max_reply_tokens, restate_changed=cfg.retain_loss != "mixed")
    say(f"targets: {td.counts}")
    sel = None if method == "lora" else _selection(lm, method, components, neuron_set, kv, seed)
    key = fingerprint(lm.name, mode, method, None if sel is None else sorted(sel.components),
                      _settings_key(cfg),
                      [(e.prompt, e.reply, e.kind) for e in td.examples], lora_rank, kv)
    state = None if cache is None else cache / f"state-{method}"
    run = _Trainer(lm, cfg, td, d, system, state, key)
    if sel is None:
        tuned, n_train, names, lg, peak = run.lora(lora_rank)
        n_total = sum(p.numel() for p in lm.model.parameters())
    else:
        say(f"trainable parameters: {sel.n_trainable:,} of {sel.n_total:,} ({sel.fraction:.3%})")
        for note in sel.notes:
            say(note)
        tuned, lg, peak = run.selection(sel)
        n_train, n_total, names = sel.n_trainable, sel.n_total, sel.components
    return FinetuneResult(lm.name, mode, method, tuple(names), n_train, n_total, lg, peak, dict(td.counts), tuned, d)


def _settings_key(cfg: TrainConfig) -> list[tuple[str, Any]]:
    """The settings a resumable state belongs to: those not at their defaults, ``steps`` left out (more steps
    continue a run at a constant rate; a decaying rate depends on it, so it stays in), so a setting added later
    leaves the states written before it valid."""
    return [(f.name, getattr(cfg, f.name)) for f in dataclasses.fields(cfg)
            if (f.name != "steps" or cfg.decay_from) and getattr(cfg, f.name) != f.default]


@dataclass
class _Trainer:
    lm: LoadedModel
    cfg: TrainConfig
    data: TrainingData
    direction: Direction | None
    system: str | None
    state: Path | None
    key: str

    def _train(self, params: Sequence[torch.Tensor]) -> TrainLog:
        d = self.direction
        return train(self.lm, params, self.data, self.cfg, direction=None if d is None else d.direction,
                     direction_layer=0 if d is None else d.layer, direction_position=-1 if d is None else d.position,
                     system=self.system, teacher=None if d is None else (lambda: d.apply(self.lm)),
                     state_dir=self.state, key=self.key)

    def selection(self, sel: Selection) -> tuple[dict[str, torch.Tensor], TrainLog, float]:
        params = dict(self.lm.model.named_parameters())
        saved = {n: params[n].detach().clone() for n in sel.masks}
        try:
            with peak_memory() as mem, trainable(self.lm.model, sel) as ps:
                lg = self._train(ps)
            return {n: params[n].detach().clone() for n in sel.masks}, lg, mem["peak_mib"]
        finally:
            with torch.no_grad():
                for n, t in saved.items():
                    params[n].copy_(t)

    def lora(self, rank: int) -> tuple[dict[str, torch.Tensor], int, tuple[str, ...], TrainLog, float]:
        with peak_memory() as mem, frozen(self.lm.model), lora(self.lm, rank, seed=self.cfg.seed) as lo:
            lg = self._train(lo.params)
            merged = lo.merged()
            n = lo.n_trainable
        return merged, n, (f"lora(rank={rank}) on {len(lo.modules)} projections",), lg, mem["peak_mib"]


__all__ = ["METHODS", "FinetuneResult", "Method", "TrainConfig", "TrainingData", "finetune", "map_components"]
