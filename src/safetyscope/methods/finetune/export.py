"""Write a fine-tuned checkpoint over the stored one: every tensor that was not tuned stays byte-identical.

A model loaded in another dtype than its files (bfloat16, a GPU's default, of a float32 checkpoint) would,
saved with ``save_pretrained``, round every tensor, frozen ones included. When the model came from a local
safetensors checkpoint and its frozen tensors still equal the stored ones (cast to the load dtype: nothing
else changed them in memory), :func:`write_over_stored` copies the stored files with only the tuned tensors
replaced (each in the more precise of its stored and its trained dtype: loading casts it as it casts the
rest). Otherwise it writes nothing and the caller saves the live model.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from pathlib import Path

import torch

from ...artifacts.checkpoint import weight_files

COPIED = ("config.json", "generation_config.json", "model.safetensors.index.json")  # beside the weight files


def finer(a: torch.dtype, b: torch.dtype) -> torch.dtype:
    """The more precise of two floating dtypes (a tuned tensor is never rounded by its export)."""
    return a if torch.finfo(a).eps < torch.finfo(b).eps else b


def write_over_stored(source: Path, live: Mapping[str, torch.Tensor], tuned: Mapping[str, torch.Tensor],
                      dest: Path) -> bool:
    """Copy ``source``'s weight files (and COPIED) to ``dest`` with ``tuned`` replaced (:func:`finer` dtype); False,
    writing nothing,
    when a tuned tensor is not stored under its name or a stored tensor differs from ``live`` (the model's
    state dict) beyond the cast to the live dtype."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    files = weight_files(source)
    stored: dict[str, Path] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as handle:
            stored.update({name: f for name in handle.keys()})  # noqa: SIM118 (a safetensors handle)
    if any(name not in stored for name in tuned) or any(name not in live for name in stored):
        return False
    for f in files:  # first every shard checked (one in memory at a time), then every shard written
        for name, t in load_file(str(f)).items():
            now = live[name].detach()
            if now.device.type == "meta":  # offloaded to disk by accelerate: cannot be compared here
                return False
            if name not in tuned and not torch.equal(t.to(now.dtype), now.to("cpu")):
                return False  # edited in memory after loading: the live model is what to save
    dest.mkdir(parents=True, exist_ok=True)
    for f in files:
        tensors = load_file(str(f))
        with safe_open(str(f), framework="pt") as handle:
            metadata = dict(handle.metadata() or {"format": "pt"})
        for name, t in tuned.items():
            if stored[name] == f:
                tensors[name] = t.detach().to("cpu", finer(t.dtype, tensors[name].dtype)).contiguous()
        save_file(tensors, str(dest / f.name), metadata=metadata)
    for name in COPIED:
        if (source / name).is_file():
            shutil.copy2(source / name, dest / name)
    return True
