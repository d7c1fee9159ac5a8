"""One typed settings object per command, feeding both CLI flags and TOML config files.

Each field's ``help`` metadata is its CLI help text. Precedence: explicit CLI flag > config file
(``[common]`` < ``[<group>]`` < ``[<command>]`` < ``[<group>.<command>]``, see :mod:`.config`) > the
dataclass default. The whole config file is type-checked, and the settings checked (:mod:`.checks`),
before a command does any work.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import sys
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext, redirect_stdout
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar, get_type_hints

import typer

from ..errors import SafetyscopeWarning, SettingsError
from ..models.adapter import LoadedModel
from ..models.arch import Dims
from ..parallel import is_writer
from ..progress import verbosity
from .checks import check_counts, check_file_pairs, check_layers, check_out_dir, check_specs, out_lock
from .config import CommandTable, config_values
from .failures import user_errors


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
    max_memory: str = opt("", "With --device-map: memory per device, e.g. 0=20GiB,1=20GiB,cpu=60GiB (the rest is offloaded).")
    offload_folder: str = opt("", "With --device-map: a directory for the weights that fit on no device (disk offload).")
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

    def load_model(self) -> LoadedModel:
        """The model, after the layer settings were checked against its config (before the weights load)."""
        from ..models import load_model

        log = (lambda _m: None) if self.quiet or self.json or not is_writer() else (lambda m: print(m, file=sys.stderr))
        if self.gen_batch_size < 1:
            raise SettingsError(f"--gen-batch-size must be a positive number, not {self.gen_batch_size}")
        lm = load_model(
            self.model,
            device=self.device,
            dtype=self.dtype,
            device_map=self.device_map or None,
            max_memory=self.max_memory or None,
            offload_folder=self.offload_folder or None,
            trust_remote_code=self.trust_remote_code,
            allow_pickle=self.allow_pickle,
            arch_table=self.arch_table or None,
            chat_template=self.chat_template or None,
            log=log,
            check_dims=self.check_dims,
        )
        lm.meta["gen_batch_size"] = int(self.gen_batch_size)
        return lm

    def validate(self) -> None:
        """Everything that can be checked without the model (the CLI runs this before any work).

        Model path, device and dtype, chat template, architecture table, counts, site / position / layer
        syntax, harmful and harmless files that are one file. Raises a one-line SafetyscopeError.
        """
        from ..models import check_model_spec, load_chat_template, load_tables, pick_device, pick_dtype
        from ..models.loading import placement_kwargs

        check_model_spec(self.model, self.allow_pickle)
        pick_dtype(self.dtype, pick_device(self.device))
        placement_kwargs(self.device_map or None, self.max_memory or None, self.offload_folder or None)
        if self.chat_template:
            load_chat_template(self.chat_template)
        if self.arch_table:
            load_tables(self.arch_table)
        check_counts(self)
        check_specs(self)
        check_file_pairs(self)

    def check_dims(self, dims: Dims) -> None:
        """Layer settings against the model's block count (from its config, before the weights load)."""
        check_layers(self, dims)

    @property
    def system(self) -> str | None:
        return self.system_prompt or None


S = TypeVar("S", bound=Settings)


def _flag(f: dataclasses.Field) -> list[str]:
    name = f.metadata.get("flag") or "--" + f.name.replace("_", "-")
    return [name] + ([f.metadata["short"]] if f.metadata.get("short") else [])


def command_table(ctx: typer.Context, name: str, settings_cls: type[Settings]) -> tuple[tuple[str, ...], CommandTable]:
    """(this command's path, e.g. ("direction", "find"); every registered command's settings class)."""
    names: list[str] = []
    c: Any = ctx
    while c is not None and c.parent is not None:
        names.append(str(c.info_name))
        c = c.parent
    path = tuple(reversed(names)) or (name,)
    table: dict[tuple[str, ...], type] = {}

    def walk(cmd: Any, prefix: tuple[str, ...]) -> None:
        if isinstance(getattr(cmd, "commands", None), dict):  # a group (typer ships its own click)
            for sub_name, sub in cmd.commands.items():
                walk(sub, (*prefix, sub_name))
        elif prefix and getattr(cmd.callback, "settings_cls", None) is not None:
            table[prefix] = cmd.callback.settings_cls

    walk(ctx.find_root().command, ())
    table[path] = settings_cls
    return path, table


def _show_warning(message: Any, category: type[Warning], filename: str, lineno: int, file: Any = None,
                  line: str | None = None) -> None:
    """Warnings of safetyscope as one ``warning:`` line on stderr; others as Python prints them."""
    if issubclass(category, SafetyscopeWarning):
        print(f"warning: {message}", file=sys.stderr)
    else:
        print(warnings.formatwarning(message, category, filename, lineno, line), file=sys.stderr, end="")


@contextmanager
def silenced() -> Iterator[None]:
    """No stdout and no warnings (a rank other than 0 under torchrun prints only errors)."""
    with open(os.devnull, "w") as null, redirect_stdout(null), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def build_settings(ctx: typer.Context, name: str, settings_cls: type[S], config: Path | None, kwargs: dict[str, Any]) -> S:
    """Settings from the dataclass defaults, the config file (checked as a whole) and the flags given."""
    values: dict[str, Any] = {f.name: f.default for f in fields(settings_cls)}
    path, table = command_table(ctx, name, settings_cls)
    values.update(config_values(config, path, table))
    for key, value in kwargs.items():
        source = ctx.get_parameter_source(key)
        if source is not None and source.name not in ("DEFAULT", "DEFAULT_MAP"):
            values[key] = value
    hints = get_type_hints(settings_cls)
    for f in fields(settings_cls):
        if hints[f.name] is Path and not isinstance(values[f.name], Path):
            values[f.name] = Path(values[f.name])
    return settings_cls(**values)


def command(
    app: typer.Typer, name: str, settings_cls: type[S], help: str, *, writes: bool = True
) -> Callable[[Callable[[S], Any]], Callable[[S], Any]]:
    """Register ``fn(settings)`` as a CLI command whose flags are the settings fields.

    Before ``fn`` runs: the config file is checked as a whole and the settings with ``Settings.validate``
    (one-line errors, nothing loaded yet); a command that ``writes`` into ``--out`` also gets the directory
    checked and holds its lock (``OUT/.safetyscope.lock``) while it runs. ``--quiet`` / ``--json`` turn the
    progress bars off for the run.
    """
    def deco(fn: Callable[[S], Any]) -> Callable[[S], Any]:
        hints = get_type_hints(settings_cls)
        params = [
            inspect.Parameter("ctx", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=typer.Context),
            inspect.Parameter(
                "config",
                inspect.Parameter.KEYWORD_ONLY,
                default=typer.Option(None, "--config", help="TOML config file (\\[common], \\[<command>] and \\[<group>.<command>] sections)."),
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
            with user_errors(), warnings.catch_warnings():
                warnings.showwarning = _show_warning
                s = build_settings(ctx, name, settings_cls, config, kwargs)
                s.validate()
                if writes:
                    check_out_dir(s.out)
                writer = is_writer()  # under torchrun only rank 0 locks, writes and prints (see parallel.py)
                with (out_lock(s.out) if writes and writer else nullcontext(),
                      verbosity(False) if s.quiet or s.json or not writer else nullcontext(),
                      nullcontext() if writer else silenced()):
                    return fn(s)

        wrapper.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
        wrapper.__doc__ = help
        wrapper.__name__ = fn.__name__
        wrapper.settings_cls = settings_cls  # type: ignore[attr-defined]  # read by command_table
        app.command(name, help=help)(wrapper)
        return fn

    return deco
