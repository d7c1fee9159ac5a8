"""`load_model(spec)`: aliases, local HF directories, GGUF files and hub ids, loaded safely."""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .adapter import LoadedModel
from .arch import table_for
from .embedded import EMBEDDED, convert_gguf, ensure_embedded, gguf_cache_dir


class ModelLoadError(RuntimeError):
    """A model spec that cannot be loaded; the message names the fix."""


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ModelLoadError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("CUDA was asked for but is not available; use --device cpu or auto")
    return dev


def pick_dtype(dtype: str | torch.dtype = "auto", device: torch.device | None = None) -> torch.dtype:
    """float32 on CPU (bf16 is several times slower there); bf16 on GPUs that support it, else fp16."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        if device is not None and device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    table = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
             "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float64": torch.float64}
    if dtype not in table:
        raise ModelLoadError(f"unknown dtype {dtype!r}; use auto, float32, float16 or bfloat16")
    return table[dtype]


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _resolve_source(spec: str, allow_pickle: bool, log: Callable[[str], None]) -> tuple[str, dict[str, Any]]:
    """Turn a spec into (path or hub id, extra from_pretrained kwargs)."""
    if spec in EMBEDDED:
        try:
            return str(ensure_embedded(spec, log)), {}
        except Exception as exc:  # missing packages, bad checksum: already one line
            raise ModelLoadError(str(exc)) from None
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"GGUF file {path} not found; check the path")
        cache = gguf_cache_dir(path)
        if not (cache / "config.json").is_file():
            convert_gguf(path, cache, log)
        return str(cache), {}
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{path} has no config.json; point at a Hugging Face model directory")
        has_st = any(path.glob("*.safetensors"))
        has_bin = any(path.glob("*.bin")) or any(path.glob("*.pt"))
        if not has_st and has_bin and not allow_pickle:
            raise ModelLoadError(
                f"{path} holds only pickled weights (.bin), which can run code when loaded; "
                "convert them to safetensors or pass --allow-pickle if you trust the source"
            )
        return str(path), {"use_safetensors": has_st or not allow_pickle}
    if path.exists():
        raise ModelLoadError(f"{path} is neither a model directory nor a .gguf file")
    if spec.startswith((".", "/", "~")) or not _HUB_ID.match(spec):
        raise ModelLoadError(
            f"model {spec!r} not found: use an alias ({', '.join(EMBEDDED)}), a local directory, a .gguf file or a hub id"
        )
    return spec, {"use_safetensors": None if allow_pickle else True}


def load_model(
    spec: str = "default",
    *,
    device: str = "auto",
    dtype: str | torch.dtype = "auto",
    device_map: str | dict[str, Any] | None = None,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    arch_table: str | Path | None = None,
    chat_template: str | None = None,
    log: Callable[[str], None] = print,
) -> LoadedModel:
    """Load a causal LM for analysis (eval mode, gradients off on parameters).

    ``spec``: an alias (``default``, ``small``, ``large``), a local HF directory, a ``.gguf`` file, or a hub id
    (needs network; fails fast and clearly without it). ``device_map`` goes to accelerate for several GPUs.
    ``chat_template``: a Jinja template string or a path to one, for tokenizers that lack a template.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    dev = pick_device(device)
    torch_dtype = pick_dtype(dtype, dev)
    source, extra = _resolve_source(spec, allow_pickle, log)
    is_hub = not Path(source).exists()
    if is_hub:
        # Never hang on a closed network: short timeouts, and a clear message on failure.
        os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", "10")
        os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", "10")
    common = {"trust_remote_code": trust_remote_code}
    try:
        config = AutoConfig.from_pretrained(source, **common)
        table = table_for(config.model_type, arch_table)  # fail before loading weights
        tokenizer = AutoTokenizer.from_pretrained(source, **common)
        model: Any = AutoModelForCausalLM.from_pretrained(
            source, dtype=torch_dtype, device_map=device_map, **common, **{k: v for k, v in extra.items() if v is not None}
        )
    except (OSError, ValueError) as exc:
        if is_hub:
            raise ModelLoadError(
                f"could not fetch {spec!r} from the Hugging Face hub ({type(exc).__name__}); without network, "
                "download it elsewhere and pass the local directory"
            ) from None
        if "trust_remote_code" in str(exc):
            raise ModelLoadError(f"{spec!r} needs custom code; pass --trust-remote-code if you trust it") from None
        raise
    if device_map is None:
        model.to(dev)
    model.eval()
    model.requires_grad_(False)
    if chat_template is not None:
        p = Path(chat_template)
        tokenizer.chat_template = p.read_text("utf-8") if p.is_file() else chat_template
    lm = LoadedModel.wrap(model, tokenizer, name=spec, arch_table=arch_table)
    assert lm.table.family == table.family
    lm.meta.update({"source": source, "device_map": device_map})
    lm.meta["param_hash"] = param_hash(model)  # what `audit_runtime` compares against (changed since load)
    return lm


def param_hash(model: Any) -> dict[str, float]:
    """{parameter name: float64 sum of all its entries}: a cheap running hash (one read, no copy)."""
    with torch.no_grad():
        return {name: float(p.detach().sum(dtype=torch.float64)) for name, p in model.named_parameters()}
