"""The `clipsearch serve` command: open the index, bind the socket, print the URL, run uvicorn.

Kept out of `cli.py` (which only registers it) so that the web server's packages are imported
when the command runs, and a missing extra is one line naming it.
"""

from __future__ import annotations

import logging
import secrets
import socket
import sys

import typer

from clipsearch.cli_settings import settings

DEFAULT_PORT = 8765
GRACE_S = 5


def serve(
    port: int = typer.Option(DEFAULT_PORT, "--port", "-p", min=0, max=65535, help="Port (0: any free one)."),
    host: str = typer.Option(
        "127.0.0.1",
        "--host",
        help="Address to listen on. Anything but this machine's loopback needs an access token.",
    ),
    token: str | None = typer.Option(
        None,
        "--token",
        envvar="CLIPSEARCH_TOKEN",
        help="Access token the page's URL must carry (default: none on 127.0.0.1, else a generated one).",
        show_default=False,
    ),
    open_browser: bool = typer.Option(False, "--open", help="Open the page in the default browser."),
    model: str | None = typer.Option(
        None,
        "--model",
        "-m",
        help="Model to search with, kept while serving (default: the index's default model, followed as it changes).",
    ),
) -> None:
    """Search the index from a web page with thumbnails (needs `pip install 'clipsearch[serve]'`).

    Prints the page's URL. The server only reads the index: run `clipsearch index` beside it and
    new images appear in its results. Ctrl-C stops it.
    """
    from clipsearch.serve import require_extra

    require_extra()
    import uvicorn

    from clipsearch.errors import ClipsearchError
    from clipsearch.paths import default_home
    from clipsearch.serve.app import create_app, is_loopback
    from clipsearch.serve.service import Service

    if token is None and not is_loopback(host):
        token = secrets.token_urlsafe(16)
    listener = _listen(host, port)
    try:
        service = Service.open(settings.home or default_home(), settings.device, model)
    except ClipsearchError:
        listener.close()
        raise
    try:
        shown_host = f"[{host}]" if ":" in host else host
        url = f"http://{shown_host}:{listener.getsockname()[1]}/" + (f"?token={token}" if token else "")
        if not settings.quiet:
            status = service.index.status()
            typer.echo(
                f"Serving {status.counts.get('indexed', 0)} images from {status.home} ({status.model}); Ctrl-C stops.",
                err=True,
            )
        typer.echo(url)
        sys.stdout.flush()
        if open_browser:
            import webbrowser

            webbrowser.open(url)
        config = uvicorn.Config(
            create_app(service, token),
            log_level="info" if settings.verbose else "warning",
            access_log=settings.verbose,
            lifespan="off",
            server_header=False,
            # Requests still running this long after Ctrl-C or SIGTERM are cancelled: an upload
            # stalled on a phone's network had held the process open for ever.
            timeout_graceful_shutdown=GRACE_S,
        )
        logging.getLogger("uvicorn.error").addFilter(_quiet_cancellations)
        uvicorn.Server(config).run(sockets=[listener])
    finally:
        listener.close()
        service.close()


def _quiet_cancellations(record: logging.LogRecord) -> bool:
    """Keeps uvicorn from printing the traceback of each request it cancels on shutdown (after
    its own one line saying how many it cancelled): a stop asked for, not a failure."""
    import asyncio

    return not (record.exc_info and isinstance(record.exc_info[1], asyncio.CancelledError))


def _listen(host: str, port: int) -> socket.socket:
    """A listening socket, so that a port in use is one clear error before the model loads, and
    connections made as soon as the URL is printed wait in the backlog instead of failing."""
    from clipsearch.errors import ClipsearchError

    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        listener = socket.socket(family, socket.SOCK_STREAM)
    except OSError as e:
        raise ClipsearchError(f"Cannot listen on {host}: {e.strerror or e}; pass another --host.") from None
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # Inherited by every connection: without it, the response's second write waits for the
        # client's delayed ACK, 40 ms on each request after a connection's first.
        listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        listener.bind((host, port))
        listener.listen(2048)
    except OSError as e:
        listener.close()
        raise ClipsearchError(f"Cannot listen on {host}:{port} ({e.strerror}); pass another --port.") from None
    return listener
