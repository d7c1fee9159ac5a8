"""scripts/lint_rules.py flags a written example of each rule, passes clean code, and honours its allow-list."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "lint_rules.py"


@pytest.fixture(scope="module")
def rules():
    spec = importlib.util.spec_from_file_location("lint_rules", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["lint_rules"] = module  # dataclasses look the module up while building the class
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("lint_rules", None)


def function(name: str, n_lines: int) -> str:
    """A function of exactly ``n_lines`` lines, ``def`` line included."""
    return f"def {name}(x):\n" + "".join(f"    x = x + {i}\n" for i in range(n_lines - 2)) + "    return x\n"


CLEAN = (
    "from __future__ import annotations\n"
    "from os import path, __name__ as n\n"
    "import os._wrap_close_not_checked\n"  # module attribute / dotted module: not the rule
    "from . import sibling\n"
    + function("short", 70)  # at the limit: allowed
    + "class A:\n    def _own(self):\n        return os._exit\n"
)


def test_clean_code_passes(rules):
    assert rules.check_source(CLEAN, "clean.py") == []


def test_private_import_is_flagged_with_its_line(rules):
    src = "import os\nfrom .generation import _stop_ids, public\nfrom x.y import (\n    a,\n    _b as b,\n)\n"
    found = rules.check_source(src, "m.py")
    assert [(v.code, v.line, v.name) for v in found] == [("SS001", 2, "_stop_ids"), ("SS001", 3, "_b")]
    assert str(found[0]).startswith("m.py:2: SS001 ")


def test_long_function_is_flagged(rules):
    src = "import os\n\n\n" + function("long_one", 71) + "\n" + function("fine", 10)
    found = rules.check_source(src, "m.py")
    assert [(v.code, v.line, v.name) for v in found] == [("SS002", 4, "long_one")]
    assert "71 lines" in found[0].message


def test_long_method_and_nested_function_are_flagged(rules):
    inner = "".join("    " + line + "\n" for line in function("inner", 80).splitlines())
    src = "class C:\n    def outer(self):\n" + "".join("    " + line + "\n" for line in inner.splitlines())
    names = {v.name for v in rules.check_source(src, "m.py")}
    assert names == {"outer", "inner"}


def test_long_module_is_flagged(rules):
    src = "".join(f"X{i} = {i}\n" for i in range(501))
    found = rules.check_source(src, "m.py")
    assert [(v.code, v.line) for v in found] == [("SS003", 1)]
    assert rules.check_source(src, "m.py", max_module_lines=501) == []


def test_main_fails_lists_file_line_and_honours_an_exact_allow_list(rules, tmp_path, capsys):
    bad = tmp_path / "bad.py"
    bad.write_text("from a import _b\n" + function("f", 75))
    assert rules.main([str(bad)]) == 1
    out = capsys.readouterr().out
    assert f"{bad.as_posix()}:1: SS001" in out and f"{bad.as_posix()}:2: SS002" in out

    allow = tmp_path / "allow.txt"
    allow.write_text(f"# known debt\n{bad.as_posix()} SS001 _b  # comment\n{bad.as_posix()} SS002 f\n")
    assert rules.main([str(bad), "--allow", str(allow)]) == 0
    assert "allowed" in capsys.readouterr().out

    allow.write_text(allow.read_text() + f"{bad.as_posix()} SS002 gone\n")  # stale entry: fails
    assert rules.main([str(bad), "--allow", str(allow)]) == 1
    assert "stale entry" in capsys.readouterr().out

    bad.write_text("X = 1\n")
    allow.write_text("")
    assert rules.main([str(bad), "--allow", str(allow)]) == 0
