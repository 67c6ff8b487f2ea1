"""The `clipsearch` script, and ``python -m clipsearch``.

The CLI's imports take a few hundred milliseconds: a Ctrl-C in them ends the command as one
during it does (exit 130, one line), not with the traceback of whichever import it hit.
"""

from __future__ import annotations

import sys


def main() -> None:
    try:
        from clipsearch.cli import main as run

        run()
    except KeyboardInterrupt:  # in the imports, or between them and the command's own handling
        sys.stderr.write("Interrupted.\n")
        raise SystemExit(130) from None


if __name__ == "__main__":
    main()
