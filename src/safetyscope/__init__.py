"""safetyscope: find, measure and manipulate the components of a chat LLM that carry its refusal behaviour.

``import safetyscope`` stays light (no torch, no transformers): the public names below are resolved on
first use through a module-level ``__getattr__``.

>>> import safetyscope
>>> lm = safetyscope.load_model("default")  # doctest: +SKIP
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

try:
    from importlib.metadata import PackageNotFoundError, version

    __version__: str = version("safetyscope")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"

# public name -> submodule that defines it (imported only when the name is first used)
_LAZY: dict[str, str] = {
    "load_model": ".models.loading",
    "ModelLoadError": ".models.loading",
    "LoadedModel": ".models.adapter",
}

__all__ = ["LoadedModel", "ModelLoadError", "__version__", "load_model"]

if TYPE_CHECKING:
    from .models.adapter import LoadedModel
    from .models.loading import ModelLoadError, load_model


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value  # later look-ups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
