"""One typed settings object per command, feeding both CLI flags and TOML config files.

Each field's ``help`` metadata is its CLI help text. Precedence: explicit CLI flag > config file
section ``[common]`` / ``[<command>]`` > the dataclass default.
"""

from __future__ import annotations

import dataclasses
import inspect
import sys
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar, get_type_hints

import typer

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def opt(default: Any, help: str, *, flag: str | None = None, short: str | None = None) -> Any:
    """A settings field with CLI help text (and optional explicit flag names)."""
    return field(default=default, metadata={"help": help, "flag": flag, "short": short})


@dataclass
class Settings:
    """Options every command shares."""

    model: str = opt("default", "Model: an alias (default, small, large), a local HF directory, a .gguf file or a hub id.")
    device: str = opt("auto", "Device: auto (CUDA when present), cpu, cuda or cuda:N.")
    dtype: str = opt("auto", "Weights dtype: auto (float32 on CPU, bf16/fp16 on GPU), float32, float16, bfloat16.")
    device_map: str = opt("", "accelerate device_map for several GPUs (e.g. auto); empty = one device.")
    batch_size: int = opt(8, "Prompts per forward pass (halved automatically on out-of-memory).")
    gen_batch_size: int = opt(32, "Prompts per batch when generating replies: decoding reads every weight once per token, so a larger batch costs little more than a small one (halved automatically on out-of-memory).")
    out: Path = opt(Path("runs/latest"), "Output directory (results are written atomically; reruns resume).")
    system_prompt: str = opt("", "System prompt for the chat template (empty = the template's default).")
    chat_template: str = opt("", "Jinja chat template (file or string) for tokenizers that lack one.")
    arch_table: str = opt("", "Extra architecture table (TOML) for models safetyscope does not know.")
    trust_remote_code: bool = opt(False, "Allow custom model code from the model directory (off by default).")
    allow_pickle: bool = opt(False, "Allow pickled .bin weights (they can run code; off by default).")
    seed: int = opt(0, "Random seed for splits, sampling and baselines.")
    quiet: bool = opt(False, "No progress bars or tables; only errors and the final result.")
    json: bool = opt(False, "Print the result as JSON on stdout (for scripts).")

    def load_model(self) -> Any:
        from ..models import load_model

        log = (lambda _m: None) if self.quiet or self.json else (lambda m: print(m, file=sys.stderr))
        lm = load_model(
            self.model,
            device=self.device,
            dtype=self.dtype,
            device_map=self.device_map or None,
            trust_remote_code=self.trust_remote_code,
            allow_pickle=self.allow_pickle,
            arch_table=self.arch_table or None,
            chat_template=self.chat_template or None,
            log=log,
        )
        if self.gen_batch_size < 1:
            raise ValueError(f"--gen-batch-size must be at least 1, not {self.gen_batch_size}")
        lm.meta["gen_batch_size"] = int(self.gen_batch_size)
        return lm

    @property
    def system(self) -> str | None:
        return self.system_prompt or None


S = TypeVar("S", bound=Settings)


def _flag(f: dataclasses.Field) -> list[str]:
    name = f.metadata.get("flag") or "--" + f.name.replace("_", "-")
    return [name] + ([f.metadata["short"]] if f.metadata.get("short") else [])


def load_config(path: Path | None, section: str) -> dict[str, Any]:
    if path is None:
        return {}
    if not path.is_file():
        raise typer.BadParameter(f"config file {path} not found; give the path of a TOML file")
    try:
        data = tomllib.loads(path.read_text("utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise typer.BadParameter(f"config file {path} is not valid TOML: {exc}") from None
    merged = {**data.get("common", {}), **data.get(section, {})}
    return {k.replace("-", "_"): v for k, v in merged.items()}


def command(app: typer.Typer, name: str, settings_cls: type[S], help: str) -> Callable[[Callable[[S], Any]], Callable[[S], Any]]:
    """Register ``fn(settings)`` as a CLI command whose flags are the settings fields."""

    def deco(fn: Callable[[S], Any]) -> Callable[[S], Any]:
        hints = get_type_hints(settings_cls)
        params = [
            inspect.Parameter("ctx", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=typer.Context),
            inspect.Parameter(
                "config",
                inspect.Parameter.KEYWORD_ONLY,
                default=typer.Option(None, "--config", help="TOML config file (\\[common] and \\[<command>] sections)."),
                annotation=Path | None,
            ),
        ]
        for f in fields(settings_cls):
            if f.name == "model":  # positional: `safetyscope capture MODEL`
                default: Any = typer.Argument(f.default, help=f.metadata["help"], show_default=True)
            else:
                default = typer.Option(f.default, *_flag(f), help=f.metadata.get("help", ""))
            params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=hints[f.name]))

        def wrapper(ctx: typer.Context, config: Path | None = None, **kwargs: Any) -> Any:
            values: dict[str, Any] = {f.name: f.default for f in fields(settings_cls)}
            from_file = load_config(config, name)
            unknown = set(from_file) - set(values)
            if unknown:
                raise typer.BadParameter(f"unknown setting(s) in {config}: {', '.join(sorted(unknown))}")
            values.update(from_file)
            for key, value in kwargs.items():
                source = ctx.get_parameter_source(key)
                if source is not None and source.name not in ("DEFAULT", "DEFAULT_MAP"):
                    values[key] = value
            for f in fields(settings_cls):
                if hints[f.name] is Path and not isinstance(values[f.name], Path):
                    values[f.name] = Path(values[f.name])
            return fn(settings_cls(**values))

        wrapper.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
        wrapper.__doc__ = help
        wrapper.__name__ = fn.__name__
        app.command(name, help=help)(wrapper)
        return fn

    return deco
