"""Public entry points: ``audit_checkpoint`` (weights, with or without a reference) and ``audit_runtime``.

>>> report = audit_checkpoint("abliterated/", reference="default")        # doctest: +SKIP
>>> report.verdict, report.evidence                                        # doctest: +SKIP
>>> audit_runtime(lm).clean                                               # doctest: +SKIP
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch

from ...models.adapter import LoadedModel
from ..direction.artifact import Direction
from .fingerprint import Fingerprint, compare_fingerprint, make_fingerprint
from .runtime import audit_runtime
from .signature import SignatureConfig, audit_signature, harm_directions
from .source import AuditInputError, TensorSource
from .types import AuditReport
from .weights import WeightConfig, audit_weights

__all__ = ["audit_checkpoint", "audit_runtime", "make_fingerprint"]

ModelLike = LoadedModel | str | Path


def _quiet(_msg: str) -> None:
    return None


def _source(x: ModelLike, device: str, log: Callable[[str], None]) -> tuple[TensorSource, LoadedModel | None]:
    """A tensor source for a directory (headers only: the model is not loaded) or a loaded / loadable model."""
    if isinstance(x, LoadedModel):
        return TensorSource.from_model(x), x
    if Path(x).expanduser().is_dir() or Path(x).expanduser().exists() or str(x).startswith((".", "/", "~")):
        return TensorSource.from_dir(Path(x).expanduser()), None
    from ...models.loading import load_model  # an alias or hub id: load it

    lm = load_model(str(x), device=device, log=log)
    return TensorSource.from_model(lm), lm


def _load(path: str, device: str, log: Callable[[str], None]) -> LoadedModel:
    from ...models.loading import load_model

    return load_model(path, device=device, log=log)


def _refusal(direction: Direction | torch.Tensor | None, ref: TensorSource, ref_lm: LoadedModel | None,
             find: bool, sig_cfg: SignatureConfig, device: str, log: Callable[[str], None]) -> tuple[torch.Tensor | None, str]:
    """The refusal direction(s) the removed direction is compared with, and where they came from."""
    if direction is not None:
        vec = direction.direction if isinstance(direction, Direction) else direction
        if vec.shape[-1] != ref.dims.d_model:
            raise AuditInputError(f"the refusal direction has {vec.shape[-1]} entries but the model's d_model is "
                                  f"{ref.dims.d_model}; pass a direction found on the reference model")
        return vec.detach().float().reshape(-1, ref.dims.d_model), "the given refusal direction(s)"
    if not find:
        return None, ""
    lm = ref_lm if ref_lm is not None else _load(ref.label, device, log)
    dirs = harm_directions(lm, replace(sig_cfg, harm_layers=0))
    if not dirs:
        return None, ""
    return torch.stack(list(dirs.values())), "the reference's difference-of-means harm directions (every block)"


def audit_checkpoint(
    checkpoint: ModelLike,
    reference: ModelLike | None = None,
    *,
    direction: Direction | torch.Tensor | None = None,
    find_refusal: bool = True,
    behaviour: bool = True,
    device: str = "auto",
    weight_config: WeightConfig | None = None,
    signature_config: SignatureConfig | None = None,
    fingerprint: Fingerprint | str | Path | None = None,
    log: Callable[[str], None] = _quiet,
) -> AuditReport:
    """Was refusal removed from ``checkpoint`` (a safetensors checkpoint directory or a loaded model)?

    With ``reference`` (the model it was derived from: a directory, an alias or a loaded model) every tensor
    is compared (:mod:`.weights`); the removed direction is compared with ``direction`` (a refusal
    ``Direction`` or a [d_model] vector) or, with ``find_refusal``, with the reference's own
    difference-of-means harm directions at every block (runs the reference on built-in prompts).
    Without a reference the checkpoint's weights are tested for the ablation signature (:mod:`.signature`);
    with ``behaviour`` the checkpoint is also loaded and run on built-in prompts (harm direction, canaries).
    With ``fingerprint`` (a trusted model's :class:`~.fingerprint.Fingerprint` or its directory) the writers'
    output along the trusted model's harm directions is also compared, and decides the verdict.
    Checkpoints are read from safetensors only; bad input raises a one-line :class:`AuditInputError`.
    """
    t0 = time.perf_counter()
    sig_cfg = signature_config or SignatureConfig()
    ck, ck_lm = _source(checkpoint, device, log)
    if reference is not None:
        ref, ref_lm = _source(reference, device, log)
        refusal, origin = _refusal(direction, ref, ref_lm, find_refusal, sig_cfg, device, log)
        w = audit_weights(ck, ref, refusal, weight_config)
        notes = (f"removed direction compared with {origin}",) if origin else ()
        return AuditReport(ck.label, w.verdict, w.evidence, weights=w, seconds=time.perf_counter() - t0, notes=notes)
    lm = ck_lm if behaviour else None  # behaviour=False: weights only, even for a model passed loaded
    if behaviour and lm is None:
        lm = _load(ck.label, device, log)
    s = audit_signature(ck, lm, sig_cfg)
    notes = () if behaviour else ("behaviour not checked (behaviour=False): weights only",)
    if fingerprint is None:
        return AuditReport(ck.label, s.verdict, s.evidence, signature=s, seconds=time.perf_counter() - t0, notes=notes)
    fp = fingerprint if isinstance(fingerprint, Fingerprint) else Fingerprint.load(fingerprint)
    f = compare_fingerprint(ck, fp, lm, sig_cfg)
    verdict, evidence = f.verdict, f.evidence + s.evidence
    if s.verdict != "clean" and verdict == "clean":
        verdict = "modified"  # a direction was removed, but not one the trusted model's harm directions know
    return AuditReport(ck.label, verdict, evidence, signature=s, fingerprint=f, seconds=time.perf_counter() - t0,
                       notes=notes)
