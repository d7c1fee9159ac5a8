"""Checks of a command's settings that need no model (run before anything loads), the layer checks that
need only the model's config (run before the weights load), and the lock on the output directory.

The checks read the settings fields generically, by name and type, so every command gets them:
``site`` and ``*components`` (site kinds), ``positions`` (a position spec), ``layers`` (a layer spec) and
``layer`` (one block), integer counts, and ``<x>harmful`` / ``<x>harmless`` file pairs.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import fields
from pathlib import Path
from typing import Any

from ..errors import SettingsError
from ..models.arch import Dims
from ..positions import parse_positions
from ..sites import BLOCK_KINDS, SiteError, parse_sites

# Counts that make no sense below these values. Every other integer setting whose default is not
# negative must be >= 0; NEGATIVE_OK lists those that take a negative value on purpose.
MINIMUM: dict[str, int] = {
    "batch_size": 1, "gen_batch_size": 1, "top_k": 1, "keep": 1, "batch": 1, "eval_every": 1, "pairs": 1,
    "noise_samples": 1, "verify_tokens": 1, "utility_tokens": 1, "trials": 1, "folds": 2, "ppl_max_tokens": 2,
}
NEGATIVE_OK: frozenset[str] = frozenset({"n_jobs"})  # joblib: -1 = every core
LOCK_NAME = ".safetyscope.lock"


def flag_name(f: Any) -> str:
    return str(f.metadata.get("flag") or "--" + f.name.replace("_", "-")).split("/")[0]


def check_counts(s: Any) -> None:
    for f in fields(s):
        value = getattr(s, f.name)
        if not isinstance(value, int) or isinstance(value, bool):
            continue
        low = MINIMUM.get(f.name, 0 if isinstance(f.default, int) and f.default >= 0 else None)
        if f.name in NEGATIVE_OK or low is None or value >= low:
            continue
        what = "a positive number" if low == 1 else f"at least {low}"
        raise SettingsError(f"{flag_name(f)} must be {what}, not {value}; give e.g. {flag_name(f)} {max(low, f.default) if isinstance(f.default, int) else low}")


def _comma(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def check_specs(s: Any) -> None:
    """Syntax of the site, position and layer settings (no model needed)."""
    for f in fields(s):
        value = getattr(s, f.name)
        if not isinstance(value, str):
            continue
        kinds = [value] if f.name == "site" else _comma(value) if f.name.endswith("components") else []
        bad = [k for k in kinds if k not in BLOCK_KINDS]
        if bad:
            raise SettingsError(f"{flag_name(f)}: unknown site kind {bad[0]!r}; use one of the block sites: "
                                  f"{', '.join(BLOCK_KINDS)}")
        if f.name == "positions":
            parse_positions(value)  # PositionError names the accepted values
        elif f.name == "layers":
            layer_list(value, None, flag_name(f))


def layer_list(spec: str, n_layers: int | None, flag: str = "--layers") -> list[int] | None:
    """The blocks a layer spec names (None for ``*`` or empty, i.e. all); one-line errors naming ``flag``."""
    spec = spec.strip()
    if spec in ("", "*"):
        return None if n_layers is None else list(range(n_layers))
    try:
        if "." in spec:
            raise SiteError(f"x: bad layer {spec!r}")
        return [int(site.layer) for site in parse_sites(f"blocks.{spec}.resid_post", n_layers) if site.layer is not None]
    except SiteError as exc:
        reason = str(exc).split(": ", 1)[-1].split("; use 'embed'")[0]
        fix = "" if "out of range" in reason else "; use *, a range like 8-14, a list like 3,7,9 (negative indices count from the end)"
        raise SettingsError(f"{flag} {spec!r}: {reason}{fix}") from None


def check_layers(s: Any, dims: Dims) -> None:
    """Layer settings against the model's block count (called once the config is read, before the weights)."""
    for f in fields(s):
        value = getattr(s, f.name)
        if f.name == "layers" and isinstance(value, str):
            layer_list(value, dims.n_layers, flag_name(f))
        elif f.name == "layer" and isinstance(value, int) and not -1 <= value < dims.n_layers:
            raise SettingsError(f"{flag_name(f)} {value} is out of range; this model has blocks 0-{dims.n_layers - 1} "
                                    "(-1 = the default)")


def check_file_pairs(s: Any) -> None:
    """The same file passed as both the harmful and the harmless prompts is an error."""
    names = {f.name: f for f in fields(s)}
    for name, f in names.items():
        other = name.replace("harmful", "harmless")
        if "harmful" not in name or other not in names:
            continue
        a, b = getattr(s, name), getattr(s, other)
        if isinstance(a, str) and isinstance(b, str) and a and b and _same_file(Path(a), Path(b)):
            raise SettingsError(f"{flag_name(f)} and {flag_name(names[other])} are the same file ({a}); the two groups "
                                f"must differ: give a harmless prompt file, or leave {flag_name(names[other])} out "
                                "for the built-in set")


def _same_file(a: Path, b: Path) -> bool:
    if not (a.is_file() and b.is_file()):
        return False  # a missing file is reported by the loader
    if os.path.samefile(a, b):
        return True
    return a.stat().st_size == b.stat().st_size and a.read_bytes() == b.read_bytes()


def check_out_dir(out: Path) -> None:
    """``out`` must be a directory (or creatable as one) that this process can write into."""
    if out.exists() and not out.is_dir():
        raise SettingsError(f"--out {out} is a file; give a directory (it is created when missing)")
    probe = out
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise SettingsError(f"--out {out}: {probe} is a file, so the directory cannot be created; give another --out")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise SettingsError(f"--out {out}: {probe} is not writable (permission denied); give a directory you can write to")


@contextmanager
def out_lock(out: Path) -> Iterator[None]:
    """Hold ``OUT/.safetyscope.lock`` (with this pid) while a command writes into ``out``.

    Another live run holding it is an error naming its pid; a lock left by a dead run (killed, crashed) is
    taken over, because the lock is an OS file lock that dies with its process. A directory this call
    created is removed again when the command left nothing in it.
    """
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd = _acquire(out / LOCK_NAME, out)
    except OSError as exc:
        raise SettingsError(f"cannot write into --out {out} ({exc.strerror or exc}); give a directory you can "
                            "write to") from None
    try:
        yield
    finally:
        try:
            (out / LOCK_NAME).unlink(missing_ok=True)
        finally:
            os.close(fd)
        if created:
            with suppress(OSError):
                out.rmdir()  # only succeeds when empty: an early error leaves no stray directory


def _acquire(lock: Path, out: Path) -> int:
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX: no lock
        return os.open(os.devnull, os.O_RDONLY)
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = os.read(fd, 64).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise SettingsError(f"another safetyscope run (pid {pid}) is writing into {out}; wait for it to finish "
                                "or give a different --out") from None
        if os.path.exists(lock) and os.stat(lock).st_ino == os.fstat(fd).st_ino:
            break  # still the file at that path (not one a finishing run just removed)
        os.close(fd)
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd
