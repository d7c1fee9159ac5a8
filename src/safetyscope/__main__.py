"""``python -m safetyscope``: the same command line as the ``safetyscope`` script, with the same exit codes."""

import atexit
import os
import sys

from .cli.main import app

INTERRUPTED_EXIT = 130


def main() -> None:
    """Run the CLI; a Ctrl-C the CLI handled exits with 130 under ``-m`` too.

    CPython 3.11 under ``-m`` remembers any KeyboardInterrupt that once escaped an ``exec`` of a string
    (dataclasses and other code generators run them) and, after a clean ``sys.exit(130)``, kills the
    process with SIGINT instead. The installed script does not; this makes ``-m`` match it.
    """
    try:
        app()
    except SystemExit as exc:
        if exc.code != INTERRUPTED_EXIT:
            raise
        atexit._run_exitfuncs()  # what a normal exit would run, then leave before the interpreter's check
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(INTERRUPTED_EXIT)


if __name__ == "__main__":
    main()
