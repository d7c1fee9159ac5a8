"""The project's code rules that ruff and import-linter do not check (run by ``make lint``, so in CI).

  SS001  a leading-underscore name imported from another module (``from x import _y``); make the name
         public (drop the underscore) or move the code where it is used. ``x._y`` attribute access is
         not checked; dunder names (``__version__``) are fine.
  SS002  a function (or method) longer than MAX_FUNCTION_LINES lines, counted from ``def`` to its last
         line (the guide says about 60): split it into named steps.
  SS003  a module longer than MAX_MODULE_LINES lines: split it by responsibility.

Usage: ``python scripts/lint_rules.py [PATH ...] [--allow FILE]`` (default paths: src tests benchmarks
scripts). Prints ``path:line: CODE message`` for each violation and exits 1 if there is any.

The allow-list (default ``scripts/lint_allow.txt`` when it exists) names known debt, one
``path CODE name`` a line (``name``: the function for SS002, the imported name for SS001, ``-`` for
SS003; ``#`` starts a comment). Allowed violations are printed as such but do not fail; an entry that
no longer matches anything fails, so the list stays exact and shrinks as the debt is paid.
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

MAX_FUNCTION_LINES = 70
MAX_MODULE_LINES = 500
DEFAULT_PATHS = ("src", "tests", "benchmarks", "scripts")
ROOT = Path(__file__).resolve().parent.parent
DEFAULT_ALLOW = ROOT / "scripts" / "lint_allow.txt"


@dataclass(frozen=True)
class Violation:
    path: str  # relative to the repository root
    line: int
    code: str
    name: str  # the key an allow-list entry matches: function name, imported name, or "-"
    message: str

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.path, self.code, self.name)

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.code} {self.message}"


def is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def private_imports(tree: ast.AST, path: str) -> Iterator[Violation]:
    for node in ast.walk(tree):
        if not isinstance(node, ast.ImportFrom):
            continue
        module = "." * node.level + (node.module or "")
        for alias in node.names:
            if is_private(alias.name):
                yield Violation(path, node.lineno, "SS001", alias.name,
                                f"imports the private name {alias.name!r} from {module}; make it public "
                                "(drop the underscore) or keep its use inside its module")


def long_functions(tree: ast.AST, path: str, limit: int) -> Iterator[Violation]:
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            length = (node.end_lineno or node.lineno) - node.lineno + 1
            if length > limit:
                yield Violation(path, node.lineno, "SS002", node.name,
                                f"function {node.name!r} is {length} lines long (limit {limit}); "
                                "split it into named steps")


def check_source(source: str, path: str, *, max_function_lines: int = MAX_FUNCTION_LINES,
                 max_module_lines: int = MAX_MODULE_LINES) -> list[Violation]:
    """Every violation in one module's source text, ordered by line."""
    tree = ast.parse(source, filename=path)
    found = [*private_imports(tree, path), *long_functions(tree, path, max_function_lines)]
    n_lines = len(source.splitlines())
    if n_lines > max_module_lines:
        found.append(Violation(path, 1, "SS003", "-",
                               f"module is {n_lines} lines long (limit {max_module_lines}); split it by responsibility"))
    return sorted(found, key=lambda v: (v.line, v.code))


def python_files(paths: Iterable[str]) -> Iterator[Path]:
    for p in map(Path, paths):
        if p.is_file() and p.suffix == ".py":
            yield p
        elif p.is_dir():
            yield from sorted(f for f in p.rglob("*.py") if not any(part.startswith(".") for part in f.parts))


def display_path(f: Path) -> str:
    """The path relative to the repository root (the allow-list's keys), else as given."""
    try:
        return f.resolve().relative_to(ROOT).as_posix()
    except ValueError:
        return f.as_posix()


def read_allow_list(path: Path) -> set[tuple[str, str, str]]:
    entries = set()
    for n, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) != 3:
            raise SystemExit(f"{path}:{n}: expected 'path CODE name', got {raw!r}")
        entries.add((parts[0], parts[1], parts[2]))
    return entries


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="*", default=list(DEFAULT_PATHS))
    parser.add_argument("--allow", type=Path, default=DEFAULT_ALLOW if DEFAULT_ALLOW.is_file() else None,
                        help="allow-list file of known violations (default: scripts/lint_allow.txt if present)")
    parser.add_argument("--max-function-lines", type=int, default=MAX_FUNCTION_LINES)
    parser.add_argument("--max-module-lines", type=int, default=MAX_MODULE_LINES)
    args = parser.parse_args(argv)

    violations: list[Violation] = []
    scanned: set[str] = set()
    for f in python_files(args.paths):
        name = display_path(f)
        scanned.add(name)
        violations += check_source(f.read_text(), name, max_function_lines=args.max_function_lines,
                                   max_module_lines=args.max_module_lines)
    allowed = read_allow_list(args.allow) if args.allow else set()
    failed = [v for v in violations if v.key not in allowed]
    stale = sorted(e for e in allowed - {v.key for v in violations} if e[0] in scanned)
    for v in violations:
        print(f"{v}{'  (allowed: listed in ' + display_path(args.allow) + ')' if v.key in allowed else ''}")
    for path, code, name in stale:
        print(f"{args.allow}: stale entry '{path} {code} {name}' matches no violation; remove it")
    if failed or stale:
        print(f"lint_rules: {len(failed)} violation(s), {len(stale)} stale allow-list entr(y/ies)")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
