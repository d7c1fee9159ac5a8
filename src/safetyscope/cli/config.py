"""TOML config files, validated as a whole against the commands' settings dataclasses before anything runs.

Sections (all optional):

    [common]            every command, where it has the setting (max_new_tokens does not break capture)
    [<command>]         e.g. [capture], [eval], [map]; [find] is both `direction find` and `neurons find`
    [<group>]           e.g. [direction]: every subcommand of the group, where it has the setting
    [<group>.<command>] e.g. [direction.find]: that subcommand only

Precedence: [common] < [<group>] < [<command>] < [<group>.<command>] < flags given on the command line.
Every value must have its setting's type (``batch_size = 8``, not ``"eight"``); an unknown section or a
setting no command has is an error that names the valid ones.
"""

from __future__ import annotations

import difflib
import sys
import types
from collections.abc import Mapping
from dataclasses import fields
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

from ..errors import SettingsError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

# (group, ..., command) -> its settings dataclass, e.g. ("direction", "find") -> FindSettings
CommandTable = Mapping[tuple[str, ...], type]


def read_toml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise SettingsError(f"config file {path} not found; give the path of a TOML file")
    try:
        return tomllib.loads(path.read_text("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise SettingsError(f"config file {path} is not valid TOML ({str(exc).splitlines()[0]}); fix the file") from None


def config_values(path: Path | None, command: tuple[str, ...], table: CommandTable) -> dict[str, Any]:
    """The settings the config file gives ``command`` (typed), after checking the whole file against ``table``."""
    if path is None:
        return {}
    data = read_toml(path)
    sections = _sections(data, table, path)
    own = table[command]
    kinds = {f.name: f for f in fields(own)}
    hints = get_type_hints(own)
    values: dict[str, Any] = {}
    for name in _applicable(command):
        for key, value in sections.get(name, {}).items():
            if key in kinds:
                values[key] = _coerce(value, hints[key], key, f"{path} [{name}]", command)
    return values


def _applicable(command: tuple[str, ...]) -> list[str]:
    """Section names that apply to ``command``, lowest precedence first."""
    names = ["common", *[".".join(command[:i]) for i in range(1, len(command))], command[-1]]
    if len(command) > 1:
        names.append(".".join(command))
    return names


def _sections(data: dict[str, Any], table: CommandTable, path: Path) -> dict[str, dict[str, Any]]:
    """{section name: {setting: value}}, with every section and value checked against ``table``."""
    out: dict[str, dict[str, Any]] = {}
    groups = {c[:i] for c in table for i in range(1, len(c))}

    def visit(prefix: tuple[str, ...], body: Any) -> None:
        name = ".".join(prefix)
        scope = _scope(prefix, table, groups)
        if not isinstance(body, dict):
            fix = (f"write [{name}] and the settings under it" if scope is not None
                   else "put settings under a section such as [common]")
            raise SettingsError(f"{path}: {name} = {body!r} is not a section; {fix}")
        if scope is None:
            valid = valid_sections(table)
            close = difflib.get_close_matches(name, valid, n=1)
            hint = f" (did you mean [{close[0]}]?)" if close else ""
            raise SettingsError(f"{path}: unknown section [{name}]{hint}; valid sections: {', '.join(valid)}")
        settings = {}
        for key, value in body.items():
            if prefix in groups and isinstance(value, dict):
                visit((*prefix, key), value)
            else:
                settings[key.replace("-", "_")] = value
        for key, value in settings.items():
            _check_known(key, value, scope, f"{path} [{name}]")
        out[name] = settings

    for key, body in data.items():
        visit((key,), body)
    return out


def _scope(prefix: tuple[str, ...], table: CommandTable, groups: set[tuple[str, ...]]) -> list[type] | None:
    """The settings classes a section applies to (None: no such section)."""
    if prefix == ("common",):
        return list(dict.fromkeys(table.values()))
    if prefix in table:
        return [table[prefix]]
    if prefix in groups:
        return [cls for c, cls in table.items() if c[: len(prefix)] == prefix]
    if len(prefix) == 1:  # a subcommand's own name: [find] applies to every `... find`
        found = [cls for c, cls in table.items() if c[-1] == prefix[0]]
        return found or None
    return None


def valid_sections(table: CommandTable) -> list[str]:
    names = {"common"} | {c[-1] for c in table} | {".".join(c) for c in table}
    names |= {".".join(c[:i]) for c in table for i in range(1, len(c))}
    return sorted(names, key=lambda n: (n != "common", n))


def _check_known(key: str, value: Any, scope: list[type], where: str) -> None:
    having = [cls for cls in scope if key in {f.name for f in fields(cls)}]
    if not having:
        known = sorted({f.name for cls in scope for f in fields(cls)})
        close = difflib.get_close_matches(key, known, n=3)
        hint = f"did you mean {', '.join(close)}?" if close else "settings are the flag names with _ for - (e.g. batch_size)"
        raise SettingsError(f"{where}: unknown setting {key!r}; {hint}")
    errors = []
    for cls in having:
        try:
            _coerce(value, get_type_hints(cls)[key], key, where, None)
            return
        except SettingsError as exc:
            errors.append(exc)
    raise errors[0]


def _coerce(value: Any, hint: Any, key: str, where: str, command: tuple[str, ...] | None) -> Any:
    """``value`` as the setting's type, or a one-line error naming the expected type."""
    converted = _convert(value, hint)
    if converted is not _NO:
        return converted
    used = f" for `{' '.join(command)}`" if command else ""
    raise SettingsError(f"{where}: {key} = {value!r} is {_describe_value(value)}, but {key}{used} takes "
                        f"{_describe_type(hint)}; write e.g. {key} = {_example(hint)}")


_NO = object()


def _convert(value: Any, hint: Any) -> Any:
    origin = get_origin(hint)
    if origin in (Union, types.UnionType):
        for arg in get_args(hint):
            if arg is not type(None) and (out := _convert(value, arg)) is not _NO:
                return out
        return _NO
    if origin is list:
        (item,) = get_args(hint) or (str,)
        items = value if isinstance(value, list) else [value]
        out = [_convert(v, item) for v in items]
        return _NO if any(v is _NO for v in out) else out
    if hint is bool:
        return value if isinstance(value, bool) else _NO
    if isinstance(value, (bool, dict, list)):
        return _NO
    if hint is int:
        return value if isinstance(value, int) else _NO
    if hint is float:
        return float(value) if isinstance(value, (int, float)) else _NO
    if hint is Path:
        return Path(value) if isinstance(value, str) else _NO
    if hint is str:  # `layers = 10` or `c = 1.0` mean the text of the number
        return value if isinstance(value, str) else str(value) if isinstance(value, (int, float)) else _NO
    return value


def _describe_value(value: Any) -> str:
    names = {bool: "true/false", int: "an integer", float: "a number", str: "a string", list: "a list", dict: "a table"}
    return names.get(type(value), type(value).__name__)


def _describe_type(hint: Any) -> str:
    if get_origin(hint) in (Union, types.UnionType):
        return " or ".join(_describe_type(a) for a in get_args(hint) if a is not type(None))
    if get_origin(hint) is list:
        return "a list of strings"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string", Path: "a path (string)"}.get(
        hint, str(hint)
    )


def _example(hint: Any) -> str:
    if get_origin(hint) in (Union, types.UnionType):
        return _example(next(a for a in get_args(hint) if a is not type(None)))
    if get_origin(hint) is list:
        return '["a", "b"]'
    return {bool: "true", int: "8", float: "0.5", Path: '"runs/x"'}.get(hint, '"text"')
