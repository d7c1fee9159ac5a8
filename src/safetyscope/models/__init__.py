"""Model layer: loading (aliases, directories, GGUF, hub ids), architecture tables, site resolution."""

from .adapter import LoadedModel
from .arch import ArchitectureError, ArchTable, Dims, load_tables, table_for
from .embedded import EMBEDDED, EmbeddedModelError, cache_root
from .loading import ModelLoadError, check_model_spec, load_chat_template, load_model, pick_device, pick_dtype

__all__ = [
    "EMBEDDED",
    "ArchTable",
    "ArchitectureError",
    "Dims",
    "EmbeddedModelError",
    "LoadedModel",
    "ModelLoadError",
    "cache_root",
    "check_model_spec",
    "load_chat_template",
    "load_model",
    "load_tables",
    "pick_device",
    "pick_dtype",
    "table_for",
]
