"""Inspect a live model for interventions: hooks, adapters, swapped modules and changed parameters.

* forward hooks and pre-hooks (and backward hooks) on any module, named by module path and by the
  hook function's qualified name, plus torch's global module hooks;
* PEFT adapters: modules whose class comes from ``peft``, or a ``peft_config`` attribute;
* ``forward`` replaced on a module instance (other than accelerate's device-dispatch wrapper);
* modules whose class (or whose presence) differs from a fresh model built from the same config on
  the meta device (no memory, no weights);
* parameters changed since load: ``load_model`` records ``lm.meta["param_hash"]`` (a float64 sum of
  every parameter, :func:`safetyscope.models.loading.param_hash`), recomputed and compared here.

Every safetyscope intervention (``Direction.apply``, ``NeuronSet.apply``, ``hooks(...)``: hooks;
``Checkpoint.apply``: swapped parameters) is found; a freshly loaded model reports nothing.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn

from ...models.adapter import LoadedModel
from ...models.loading import param_hash
from .types import RuntimeAudit, RuntimeFinding

_HOOK_DICTS: tuple[tuple[str, str], ...] = (
    ("_forward_hooks", "hook"), ("_forward_pre_hooks", "pre_hook"),
    ("_backward_hooks", "hook"), ("_backward_pre_hooks", "pre_hook"),
)


def _describe(fn: Any) -> str:
    name = getattr(fn, "__qualname__", None) or type(fn).__qualname__
    return f"{getattr(fn, '__module__', '?')}.{name}"


def hook_findings(model: nn.Module) -> list[RuntimeFinding]:
    """Every hook registered on a module of ``model`` and every global module hook."""
    out: list[RuntimeFinding] = []
    for name, module in model.named_modules():
        for attr, kind in _HOOK_DICTS:
            for fn in getattr(module, attr, {}).values():
                what = "backward " if "backward" in attr else ""
                out.append(RuntimeFinding(kind, name or "<root>", f"{what}{kind.replace('_', '-')} {_describe(fn)}"))  # type: ignore[arg-type]
        if "forward" in module.__dict__ and not hasattr(module, "_hf_hook"):
            out.append(RuntimeFinding("hook", name or "<root>", f"forward replaced by {_describe(module.__dict__['forward'])}"))
    import torch.nn.modules.module as torch_module

    for attr, kind in (("_global_forward_hooks", "hook"), ("_global_forward_pre_hooks", "pre_hook")):
        for fn in getattr(torch_module, attr, {}).values():
            out.append(RuntimeFinding(kind, "<global>", f"global {kind.replace('_', '-')} {_describe(fn)}"))  # type: ignore[arg-type]
    return out


def peft_findings(model: nn.Module) -> list[RuntimeFinding]:
    """PEFT adapters: a peft class anywhere in the module tree, or a ``peft_config`` attribute."""
    out: list[RuntimeFinding] = []
    for name, module in model.named_modules():
        cls = type(module)
        if cls.__module__.split(".")[0] == "peft":
            out.append(RuntimeFinding("peft", name or "<root>", f"PEFT module {cls.__module__}.{cls.__qualname__}"))
        elif getattr(module, "peft_config", None):
            out.append(RuntimeFinding("peft", name or "<root>", "has a peft_config (adapters attached)"))
    return out


def class_findings(model: nn.Module) -> list[RuntimeFinding]:
    """Modules whose class differs from (or that are missing in) a fresh model built from the config on meta."""
    from transformers import AutoModelForCausalLM

    config = getattr(model, "config", None)
    if config is None:
        return []
    try:
        with torch.device("meta"):
            fresh = AutoModelForCausalLM.from_config(config)
    except Exception as exc:  # custom code, or a config the auto classes do not build
        return [RuntimeFinding("class", "<root>", f"could not build the model from its config to compare ({type(exc).__name__})")]
    expected = {n: type(m) for n, m in fresh.named_modules()}
    out: list[RuntimeFinding] = []
    for name, module in model.named_modules():
        want = expected.pop(name, None)
        if want is None:
            out.append(RuntimeFinding("class", name, f"extra module {type(module).__qualname__} not built by the config"))
        elif type(module) is not want:
            out.append(RuntimeFinding("class", name, f"{type(module).__qualname__} where the config builds {want.__qualname__}"))
    for name, want in expected.items():
        out.append(RuntimeFinding("class", name, f"missing {want.__qualname__} that the config builds"))
    return out


def param_findings(model: nn.Module, baseline: dict[str, float]) -> list[RuntimeFinding]:
    """Parameters whose hash differs from the one recorded at load (or that appeared / disappeared)."""
    now = param_hash(model)
    out = [RuntimeFinding("param_changed", name, f"sum {baseline[name]:.9g} at load, now {now[name]:.9g}")
           for name in sorted(set(now) & set(baseline)) if now[name] != baseline[name]]
    out += [RuntimeFinding("param_changed", n, "parameter added since load") for n in sorted(set(now) - set(baseline))]
    out += [RuntimeFinding("param_changed", n, "parameter removed since load") for n in sorted(set(baseline) - set(now))]
    return out


def audit_runtime(lm: LoadedModel) -> RuntimeAudit:
    """Everything attached to or changed in the live model since it was loaded; ``clean`` when nothing is."""
    t0 = time.perf_counter()
    model = lm.model
    findings = hook_findings(model) + peft_findings(model)
    if not any(f.kind == "peft" for f in findings):  # a PEFT wrapper renames every module: compare only without it
        findings += class_findings(model)
    notes: tuple[str, ...] = ()
    baseline = lm.meta.get("param_hash")
    if baseline:
        findings += param_findings(model, baseline)
    else:
        notes = ("no parameter hash was recorded at load (model not loaded with load_model): changed parameters "
                 "not checked; record one with lm.meta['param_hash'] = param_hash(lm.model)",)
    return RuntimeAudit(lm.name, tuple(findings), time.perf_counter() - t0, notes)
