"""`clipsearch serve`: the index as a local web page, with thumbnails.

The package is an optional extra (`pip install 'clipsearch[serve]'`): Starlette and uvicorn
are imported only by the modules that speak HTTP, so `require_extra` can say what is missing
in one line before anything else is loaded.

- `command.py`: the typer command (binds the socket, prints the URL, runs uvicorn);
- `app.py`: HTTP only: routes, parameters, status codes, the token gate;
- `service.py`: what each request asks of the library (`Index`, `Catalog`), thread-safe;
- `refine.py`: the search box's syntax, the CLI's (`+at sunset`, `-0.5:people`);
- `upload.py`: an uploaded image, decoded in memory within byte and pixel caps;
- `thumbnails.py`: the on-disk thumbnail cache, keyed by content fingerprint;
- `static/`: the page itself (HTML, CSS, JavaScript; nothing from the network).
"""

from __future__ import annotations

from clipsearch.errors import ClipsearchError

EXTRA_HINT = "pip install 'clipsearch[serve]'"


def require_extra() -> None:
    """Raise a one-line `ClipsearchError` naming the extra when its packages are missing."""
    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise ClipsearchError(
            f"`clipsearch serve` needs the web server packages ({e.name} is missing): {EXTRA_HINT}"
        ) from None
