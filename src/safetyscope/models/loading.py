"""`load_model(spec)`: aliases, local HF directories, GGUF files and hub ids, loaded safely."""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..errors import SafetyscopeError
from .adapter import LoadedModel
from .arch import Dims, table_for
from .embedded import EMBEDDED, convert_gguf, ensure_embedded, gguf_cache_dir


class ModelLoadError(SafetyscopeError, RuntimeError):
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


WEIGHT_PATTERNS: tuple[str, ...] = ("*.safetensors", "*.bin", "*.pt", "*.pth")


def check_model_spec(spec: str, allow_pickle: bool = False) -> None:
    """Cheap checks of a model spec, without loading anything: a path must exist and hold a model.

    Raises :class:`ModelLoadError` naming what is missing; aliases and hub ids pass.
    """
    if spec in EMBEDDED:
        return
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"GGUF file {path} not found; check the path")
        return
    if path.is_dir():
        _check_model_dir(path, allow_pickle)
        return
    if path.exists():
        raise ModelLoadError(f"{path} is neither a model directory nor a .gguf file")
    if spec.startswith((".", "/", "~")) or not _HUB_ID.match(spec):
        raise ModelLoadError(
            f"model {spec!r} not found: use an alias ({', '.join(EMBEDDED)}), a local directory, a .gguf file or a hub id"
        )


def _check_model_dir(path: Path, allow_pickle: bool) -> None:
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"{path} has no config.json; point at a Hugging Face model directory")
    if not any(f for pattern in WEIGHT_PATTERNS for f in path.glob(pattern)):
        raise ModelLoadError(
            f"{path} has a config.json but no weights (no model*.safetensors); copy the weight files into it "
            "or point at the complete model directory"
        )
    has_st = any(path.glob("*.safetensors"))
    if not has_st and not allow_pickle:
        raise ModelLoadError(
            f"{path} holds only pickled weights (.bin), which can run code when loaded; "
            "convert them to safetensors or pass --allow-pickle if you trust the source"
        )


def _resolve_source(spec: str, allow_pickle: bool, log: Callable[[str], None]) -> tuple[str, dict[str, Any]]:
    """Turn a spec into (path or hub id, extra from_pretrained kwargs)."""
    check_model_spec(spec, allow_pickle)
    if spec in EMBEDDED:
        try:
            return str(ensure_embedded(spec, log)), {}
        except Exception as exc:  # missing packages, bad checksum: already one line
            raise ModelLoadError(str(exc)) from None
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        cache = gguf_cache_dir(path)
        if not (cache / "config.json").is_file():
            convert_gguf(path, cache, log)
        return str(cache), {}
    if path.is_dir():
        has_st = any(path.glob("*.safetensors"))
        return str(path), {"use_safetensors": has_st or not allow_pickle}
    return spec, {"use_safetensors": None if allow_pickle else True}


def looks_like_template(text: str) -> bool:
    """True for Jinja template text (it has ``{{`` or ``{%``), False for what can only be a file name."""
    return "{{" in text or "{%" in text


def load_chat_template(spec: str | Path) -> str:
    """The text of a Jinja chat template given as a file or as the template itself, syntax-checked.

    A value without Jinja markup is taken as a file name and must exist; a syntax error is one line
    naming the file (or the text) and the line of the error.
    """
    text, name = str(spec), "the --chat-template text"
    if isinstance(spec, Path) or not looks_like_template(text):
        path = Path(text).expanduser()
        if not path.is_file():
            what = "is a directory" if path.is_dir() else "not found"
            raise ModelLoadError(f"chat template file {text!r} {what}; give a Jinja file (e.g. template.jinja) "
                                    "or the template text itself")
        try:
            text, name = path.read_text("utf-8"), str(path)
        except (OSError, UnicodeDecodeError) as exc:
            raise ModelLoadError(f"cannot read chat template {path} ({exc}); save it as a UTF-8 text file") from None
    check_template_syntax(text, name)
    return text


def check_template_syntax(text: str, name: str = "the chat template") -> None:
    """Raise :class:`ModelLoadError` (one line, with the line number) on a Jinja syntax error."""
    import jinja2

    try:
        jinja2.Environment(extensions=["jinja2.ext.loopcontrols"]).parse(text)
    except jinja2.TemplateSyntaxError as exc:
        raise ModelLoadError(f"{name}: Jinja syntax error on line {exc.lineno}: {exc.message}; "
                                "fix the template") from None


def load_model(
    spec: str = "default",
    *,
    device: str = "auto",
    dtype: str | torch.dtype = "auto",
    device_map: str | dict[str, Any] | None = None,
    max_memory: str | dict[int | str, int | str] | None = None,
    offload_folder: str | Path | None = None,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    arch_table: str | Path | None = None,
    chat_template: str | Path | None = None,
    log: Callable[[str], None] = print,
    check_dims: Callable[[Dims], None] | None = None,
) -> LoadedModel:
    """Load a causal LM for analysis (eval mode, gradients off on parameters).

    ``spec``: an alias (``default``, ``small``, ``large``), a local HF directory, a ``.gguf`` file, or a hub id
    (needs network; fails fast and clearly without it). ``device_map``, ``max_memory``, ``offload_folder``:
    accelerate's placement over GPUs, CPU and disk (:func:`placement_kwargs`; ``lm.meta["placement"]``).
    ``chat_template``: a Jinja template string or a path to one, for tokenizers that lack a template
    (syntax-checked before anything loads). ``check_dims`` is called with the model's dimensions as soon
    as its config is read, before the weights load (e.g. to check layer ranges).
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    dev = pick_device(device)
    torch_dtype = pick_dtype(dtype, dev)
    template = None if chat_template is None else load_chat_template(chat_template)
    source, extra = _resolve_source(spec, allow_pickle, log)
    is_hub = not Path(source).exists()
    if is_hub:
        # Never hang on a closed network: short timeouts, and a clear message on failure.
        os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", "10")
        os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", "10")
    common = {"trust_remote_code": trust_remote_code}
    placement = placement_kwargs(device_map, max_memory, offload_folder)
    try:
        config = AutoConfig.from_pretrained(source, **common)
        table = table_for(config.model_type, arch_table)  # fail before loading weights
        if check_dims is not None:
            check_dims(Dims.from_config(table, config))
        tokenizer = AutoTokenizer.from_pretrained(source, **common)
        model: Any = AutoModelForCausalLM.from_pretrained(
            source, dtype=torch_dtype, **placement, **common, **{k: v for k, v in extra.items() if v is not None}
        )
    except SafetyscopeError:
        raise
    except (OSError, ValueError) as exc:
        if is_hub:
            raise ModelLoadError(
                f"could not fetch {spec!r} from the Hugging Face hub ({type(exc).__name__}); without network, "
                "download it elsewhere and pass the local directory"
            ) from None
        if "trust_remote_code" in str(exc):
            raise ModelLoadError(f"{spec!r} needs custom code; pass --trust-remote-code if you trust it") from None
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise ModelLoadError(f"cannot load the model in {source} ({first}); check that the directory holds a "
                             "complete Hugging Face model (config.json, tokenizer files, weights)") from None
    if device_map is None:
        model.to(dev)
    model.eval()
    model.requires_grad_(False)
    if template is not None:
        tokenizer.chat_template = template
    lm = LoadedModel.wrap(model, tokenizer, name=spec, arch_table=arch_table)
    assert lm.table.family == table.family
    lm.meta.update({"source": source, "device_map": device_map, "placement": getattr(model, "hf_device_map", None)})
    lm.meta["param_hash"] = param_hash(model)  # what `audit_runtime` compares against (changed since load)
    return lm


def param_hash(model: Any) -> dict[str, float]:
    """{parameter name: float64 sum of all its entries}: a cheap running hash (one read, no copy).

    Parameters offloaded to disk by accelerate (on the ``meta`` device until their block runs) are left out.
    """
    with torch.no_grad():
        return {name: float(p.detach().sum(dtype=torch.float64)) for name, p in model.named_parameters()
                if p.device.type != "meta"}


def parse_max_memory(spec: str | dict[int | str, int | str] | None) -> dict[int | str, int | str] | None:
    """``0=20GiB,1=20GiB,cpu=60GiB`` -> ``{0: "20GiB", 1: "20GiB", "cpu": "60GiB"}`` (a dict passes through)."""
    if spec is None or isinstance(spec, dict):
        return spec
    out: dict[int | str, int | str] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        device, sep, size = part.partition("=")
        device, size = device.strip(), size.strip()
        if not sep or not device or not size:
            raise ModelLoadError(f"--max-memory {spec!r}: {part!r} is not DEVICE=SIZE; write e.g. 0=20GiB,cpu=60GiB")
        out[int(device) if device.isdigit() else device] = int(size) if size.isdigit() else size
    return out or None


def placement_kwargs(device_map: str | dict[str, Any] | None, max_memory: str | dict[int | str, int | str] | None,
                     offload_folder: str | Path | None) -> dict[str, Any]:
    """``from_pretrained`` keyword arguments that place the weights: accelerate's ``device_map`` (``auto``: blocks
    over the GPUs, then the CPU, then ``offload_folder`` on disk) and ``max_memory`` per device
    (``{0: "20GiB", "cpu": "60GiB"}`` or the text ``0=20GiB,cpu=60GiB``). ``lm.meta["placement"]`` then says where
    each module went (a device index, ``"cpu"`` or ``"disk"``; None without a device_map)."""
    memory = parse_max_memory(max_memory)
    if device_map is None:
        if memory is not None or offload_folder:
            raise ModelLoadError("--max-memory and --offload-folder need --device-map (e.g. auto)")
        return {"device_map": None}
    out: dict[str, Any] = {"device_map": device_map}
    if memory is not None:
        out["max_memory"] = memory
    if offload_folder:
        out["offload_folder"] = str(offload_folder)
    return out
