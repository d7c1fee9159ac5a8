"""Load prompt sets from JSONL, CSV or plain-text files, with one-line errors that name the fix."""

from __future__ import annotations

import csv
import io
import json
import warnings
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

from ..errors import SafetyscopeWarning
from .types import Prompt, PromptError, PromptSet, normalize_label

Format = Literal["jsonl", "csv", "txt"]

FORMATS: tuple[str, ...] = ("jsonl", "csv", "txt")
JSON_PROMPT_KEYS: tuple[str, ...] = ("prompt", "text", "instruction")
CSV_PROMPT_COLUMNS: tuple[str, ...] = ("prompt", "goal", "instruction")
_SUFFIX_FORMATS: dict[str, str] = {
    ".jsonl": "jsonl",
    ".json": "jsonl",
    ".ndjson": "jsonl",
    ".csv": "csv",
    ".txt": "txt",
    ".text": "txt",
}


def load_prompts(path: str | Path, *, label: str | None = None, fmt: str | None = None) -> PromptSet:
    """Load prompts from ``path`` (JSONL, CSV or text; format from the suffix or ``fmt``).

    ``label`` (a label or a synonym such as ``"unsafe"``) sets the label of every prompt,
    overriding any label column; rows whose own label says otherwise are counted in a
    :class:`~safetyscope.errors.SafetyscopeWarning`. The set is named after the file stem.
    """
    p = Path(path)
    forced = None if label is None else normalize_label(label, where="label=")
    check_path(p)
    kind = _resolve_format(p, fmt)
    text = read_text(p)
    if not text.strip():
        raise PromptError(f"{p} is empty: add one prompt per line (or per JSONL object / CSV row)")
    parser = {"jsonl": parse_jsonl, "csv": parse_csv, "txt": parse_txt}[kind]
    items = _with_label(parser, text, p, forced) if forced is not None else parser(text, origin=str(p), name=p.stem)
    return PromptSet(name=p.stem, items=tuple(items)).require_nonempty(f"{p} (no prompts after parsing)")


def _with_label(parser: Any, text: str, p: Path, label: str) -> list[Prompt]:
    """Parse with every prompt labelled ``label``; warn when the file's own labels say otherwise."""
    try:
        own = parser(text, origin=str(p), label=None, name=p.stem)
    except PromptError:  # e.g. label values this loader does not know: they are overridden anyway
        return list(parser(text, origin=str(p), label=label, name=p.stem))
    other = [q for q in own if q.label is not None and q.label != label]
    if other:
        warnings.warn(
            f"{p}: {len(other)} of {len(own)} prompts are labelled {other[0].label!r} in the file, but it is passed "
            f"as the {label} prompts, so they count as {label}; check the file, or pass it with --prompts "
            "(which routes by label) where the command has that option",
            SafetyscopeWarning, stacklevel=3,
        )
    return [replace(q, label=label) for q in own]


def _resolve_format(p: Path, fmt: str | None) -> str:
    if fmt is not None:
        f = fmt.lower().lstrip(".")
        f = {"json": "jsonl", "ndjson": "jsonl", "text": "txt"}.get(f, f)
        if f not in FORMATS:
            raise PromptError(f"unknown prompt format {fmt!r}; use fmt='jsonl', 'csv' or 'txt'")
        return f
    f2 = _SUFFIX_FORMATS.get(p.suffix.lower())
    if f2 is None:
        raise PromptError(
            f"cannot tell the format of {p} from its suffix {p.suffix!r}; "
            "rename it to .jsonl/.csv/.txt or pass fmt='jsonl'|'csv'|'txt'"
        )
    return f2


def check_path(p: Path) -> None:
    """Raise :class:`PromptError` unless ``p`` is an existing file."""
    if not p.exists():
        raise PromptError(f"prompt file not found: {p}; check the path (relative paths are from {Path.cwd()})")
    if p.is_dir():
        raise PromptError(f"{p} is a directory; pass a .jsonl, .csv or .txt prompt file inside it")


def read_text(p: Path) -> str:
    """Read ``p`` as UTF-8 (a BOM is allowed), raising :class:`PromptError` on any problem."""
    check_path(p)
    try:
        data = p.read_bytes()
    except OSError as e:
        raise PromptError(f"cannot read {p}: {e.strerror or e}; check the file permissions") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise PromptError(
            f"{p} is not valid UTF-8 (bad byte 0x{data[e.start]:02x} at byte offset {e.start}); "
            "re-save the file as UTF-8"
        ) from None


def _clean_text(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise PromptError(f"{where}: prompt is {type(value).__name__}, not a string; make it a non-empty string")
    if not value.strip():
        raise PromptError(f"{where}: empty prompt string; remove the row or fill in the prompt")
    return value.strip()


def _opt_str(value: Any) -> str | None:
    if value is None:
        return None
    s = str(value).strip()
    return s or None


def _make_prompt(
    text: Any, raw_label: Any, category: Any, pid: Any, *, where: str, label: str | None, name: str, n: int
) -> Prompt:
    t = _clean_text(text, where)
    if label is not None:
        lab: str | None = label
    elif raw_label is None or (isinstance(raw_label, str) and not raw_label.strip()):
        lab = None
    else:
        lab = normalize_label(raw_label, where=where)
    return Prompt(
        text=t, label=lab, category=_opt_str(category), source=name, id=_opt_str(pid) or f"{name}-{n:04d}"
    )


def parse_jsonl(text: str, *, origin: str = "<string>", label: str | None = None, name: str = "user") -> list[Prompt]:
    """Parse JSON Lines (a JSON array of objects is also accepted) into prompts."""
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            rows = json.loads(stripped)
        except json.JSONDecodeError as e:
            raise PromptError(
                f"{origin}: malformed JSON array at line {e.lineno} ({e.msg}); fix it or write one object per line"
            ) from None
        if not isinstance(rows, list):  # pragma: no cover - a '[' always parses to a list
            rows = [rows]
        numbered: Iterable[tuple[int, Any]] = ((i + 1, r) for i, r in enumerate(rows))
        unit = "item"
    else:
        numbered = _json_lines(text, origin)
        unit = "line"
    out: list[Prompt] = []
    for lineno, row in numbered:
        where = f"{origin} {unit} {lineno}"
        if isinstance(row, str):
            row = {"prompt": row}
        if not isinstance(row, dict):
            raise PromptError(f"{where}: expected a JSON object like {{\"prompt\": \"...\"}}, got {type(row).__name__}")
        key = next((k for k in JSON_PROMPT_KEYS if k in row), None)
        if key is None:
            raise PromptError(
                f"{where}: no prompt field (keys found: {', '.join(map(str, row)) or 'none'}); "
                f"add one of: {', '.join(JSON_PROMPT_KEYS)}"
            )
        out.append(
            _make_prompt(
                row[key], row.get("label"), row.get("category"), row.get("id"),
                where=where, label=label, name=name, n=len(out),
            )
        )
    return out


def _json_lines(text: str, origin: str) -> Iterable[tuple[int, Any]]:
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield lineno, json.loads(line)
        except json.JSONDecodeError as e:
            raise PromptError(
                f"{origin} line {lineno}: malformed JSON ({e.msg} at column {e.colno}); "
                "each line must be one JSON object"
            ) from None


def parse_csv(text: str, *, origin: str = "<string>", label: str | None = None, name: str = "user") -> list[Prompt]:
    """Parse CSV with a header row containing a ``prompt``, ``goal`` or ``instruction`` column."""
    reader = csv.reader(io.StringIO(text))
    try:
        header = next(reader, None)
        if header is None:
            raise PromptError(f"{origin} is empty: add a header row with a 'prompt' column and one row per prompt")
        cols = {h.strip().lower(): i for i, h in enumerate(header)}
        pcol = next((cols[c] for c in CSV_PROMPT_COLUMNS if c in cols), None)
        if pcol is None:
            raise PromptError(
                f"{origin}: CSV header has no prompt column (found: {', '.join(header) or 'none'}); "
                f"name one column {', '.join(CSV_PROMPT_COLUMNS)}"
            )
        out: list[Prompt] = []
        for row in reader:
            if not any(cell.strip() for cell in row):
                continue
            where = f"{origin} line {reader.line_num}"

            def cell(col: str, row: list[str] = row) -> str | None:
                i = cols.get(col)
                return row[i] if i is not None and i < len(row) else None

            text_value = row[pcol] if pcol < len(row) else ""
            out.append(
                _make_prompt(
                    text_value, cell("label"), cell("category"), cell("id"),
                    where=where, label=label, name=name, n=len(out),
                )
            )
    except csv.Error as e:
        raise PromptError(f"{origin} line {reader.line_num}: malformed CSV ({e}); check the quoting") from None
    return out


def parse_txt(text: str, *, origin: str = "<string>", label: str | None = None, name: str = "user") -> list[Prompt]:
    """One prompt per line; blank lines and lines starting with ``#`` are skipped."""
    out: list[Prompt] = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        s = line.strip()
        if not s or s.startswith("#"):
            continue
        out.append(_make_prompt(s, None, None, None, where=f"{origin} line {lineno}", label=label, name=name, n=len(out)))
    return out
