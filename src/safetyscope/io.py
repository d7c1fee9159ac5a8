"""Atomic file output: results are written to a temporary name and renamed, so an interrupted run
never leaves a half-written file, and a rerun can trust whatever exists."""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from .parallel import barrier, is_writer


def fingerprint(*parts: Any) -> str:
    """A short stable key of JSON-able parts (the cache keys of every command and stage)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def json_safe(obj: Any) -> Any:
    """JSON-safe copy: tensors to lists, NaN/inf to None, paths to str."""
    if isinstance(obj, torch.Tensor):
        return json_safe(obj.detach().cpu().tolist())
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item") and callable(obj.item):  # numpy scalars
        return json_safe(obj.item())
    return obj


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yields a temporary path beside ``path``; renamed onto it only if the block succeeds.

    Under torchrun only rank 0 writes: other ranks get a private temporary path that is deleted. Every
    rank then waits until the file is in place (a barrier), so all ranks see the same files afterwards
    (resume and cache decisions agree); every rank must therefore reach each write, as SPMD code does.
    """
    path = Path(path)
    if not is_writer():
        with tempfile.TemporaryDirectory(prefix="safetyscope-rank-") as scratch:
            yield Path(scratch) / path.name
        barrier()
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    barrier()


def write_json(path: str | Path, obj: Any) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(json_safe(obj), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return Path(path)


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def save_tensors(path: str | Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> Path:
    from safetensors.torch import save_file

    data = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(data, str(tmp), metadata=dict(metadata or {}))
    return Path(path)


def load_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


@contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Build a directory under a temporary name; it replaces ``path`` only when complete (rank 0 only, as
    :func:`atomic_path`)."""
    path = Path(path)
    if not is_writer():
        with tempfile.TemporaryDirectory(prefix="safetyscope-rank-") as scratch:
            (Path(scratch) / path.name).mkdir()
            yield Path(scratch) / path.name
        barrier()
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        yield tmp
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    barrier()
