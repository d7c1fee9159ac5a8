"""The `safetyscope` command. Each command family lives in its own module and registers here."""

from __future__ import annotations

import importlib

import typer

from ..parallel import session
from ..progress import verbosity
from .failures import user_errors

app = typer.Typer(
    name="safetyscope",
    help="Find, measure and manipulate the parts of a chat LLM that carry its refusal behaviour.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# Modules that define `register(app)`. A module missing here (not written yet) is skipped.
COMMAND_MODULES = ("basic", "eval", "neurons", "probe", "trace", "direction", "map", "monitor", "audit", "finetune", "judge")

for _name in COMMAND_MODULES:
    try:
        _mod = importlib.import_module(f"{__package__}.{_name}")
    except ModuleNotFoundError as _exc:
        if _exc.name != f"{__package__}.{_name}":
            raise
        continue
    _mod.register(app)


@app.callback()
def _main(
    ctx: typer.Context,
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars (also SAFETYSCOPE_QUIET=1)."),
) -> None:
    if quiet:  # for the whole invocation: the context closes after the subcommand has run
        ctx.with_resource(verbosity(False))
    with user_errors():  # under torchrun: join the process group for the whole invocation
        ctx.with_resource(session())


def main() -> None:  # pragma: no cover
    app()
