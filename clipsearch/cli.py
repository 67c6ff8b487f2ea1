"""The `clipsearch` command: the only module that prints or exits.

Start-up time is part of the product (a query is a new process each time), so nothing heavy is
imported here at module level: torch, FAISS and SQLAlchemy come in with the command that needs
them.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import functools
import json
import logging
import os
import re
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TextIO

import typer

from clipsearch import __version__
from clipsearch.cli_settings import settings

if TYPE_CHECKING:
    from clipsearch.index import Index, Status
    from clipsearch.indexer import AddReport
    from clipsearch.manifest import Manifest
    from clipsearch.records import StoredModel

app = typer.Typer(
    name="clipsearch",
    help="Find your photos by describing them: index folders once, then search them with text or an example image.",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",  # docstring paragraphs are re-flowed, not printed line by line
    context_settings={"help_option_names": ["-h", "--help"]},
)
models_app = typer.Typer(help="List the models clipsearch knows, or download one ahead of time.", no_args_is_help=False)
app.add_typer(models_app, name="models")

EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE: what `cmd | head` leaves for a Unix tool cut off by its reader
EXIT_SOME_FAILED = 3  # the run finished, but some files or folders could not be read (index, classify)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"clipsearch {__version__}")
        raise typer.Exit()


def _check_device(value: str) -> str:
    """A device that cannot exist here is a usage error, found before any model loads."""
    import re

    if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", value):
        raise typer.BadParameter(f"{value!r} is not a device; use auto, cpu, cuda, cuda:N or mps")
    if value.startswith("cuda"):
        import torch

        index = int(value.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            found = torch.cuda.device_count()
            raise typer.BadParameter(f"{value} asked for, but this machine has {found or 'no'} CUDA GPU(s)")
    elif value == "mps":
        import torch

        if not torch.backends.mps.is_available():
            raise typer.BadParameter("mps asked for, but this machine has no Apple GPU")
    return value


PRECISIONS = ("auto", "fp32", "bf16", "fp16", "int8")


def _check_precision(value: str) -> str:
    if value not in PRECISIONS:
        raise typer.BadParameter(f"{value!r} is not one of {', '.join(PRECISIONS)}")
    return value


def _check_home(value: str | None) -> str | None:
    if value is not None and not value.strip():  # Path("") is ".": the index would land wherever the shell is
        raise typer.BadParameter("is empty; give the index folder's path, or leave --home out")
    return value


@app.callback()
def _global_options(
    home: str | None = typer.Option(
        None,
        "--home",
        callback=_check_home,
        help="Index folder (default: $CLIPSEARCH_HOME, else ~/.local/share/clipsearch).",
        show_default=False,
    ),
    device: str = typer.Option(
        "auto", "--device", callback=_check_device, help="Where the model runs: auto, cpu, cuda, cuda:1, mps."
    ),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Say more; show a traceback on errors."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Print nothing but results and errors."),
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Show the version and exit."
    ),
) -> None:
    settings.home = None if home is None else Path(home)
    settings.device, settings.verbose, settings.quiet = device, verbose, quiet
    _check_megapixels(os.environ.get("CLIPSEARCH_MAX_MEGAPIXELS", ""))
    handler = _StderrHandler()
    handler.setFormatter(_LowercaseLevel("%(levelname)s: %(message)s"))
    if not verbose:
        handler.addFilter(_warnings_and_notices)
    root = logging.getLogger("clipsearch")
    root.handlers[:] = [handler]
    root.setLevel(logging.ERROR if quiet else logging.INFO)
    root.propagate = False
    if quiet:  # no bars either, a model's download included (tqdm's own switch, which the library reads),
        os.environ["TQDM_DISABLE"] = "1"
        # nor huggingface_hub's lines as it retries a download (its switch, read as it is imported)
        os.environ["HF_HUB_VERBOSITY"] = "error"
        logging.getLogger("huggingface_hub").setLevel(logging.ERROR)  # where it was imported before


def _check_megapixels(setting: str) -> None:
    """The decode budget the error for a huge image tells users to raise: a value that is no
    budget had been ignored ("abc"), had lifted the limit ("nan") or failed every file ("0")."""
    if not setting.strip():
        return
    from clipsearch.clip.preprocess import megapixel_budget  # with Pillow: only when it is set

    if megapixel_budget(setting) is None:
        message = f"{setting!r} is not a number of megapixels above 0"
        raise typer.BadParameter(message, param_hint="CLIPSEARCH_MAX_MEGAPIXELS")


def _warnings_and_notices(record: logging.LogRecord) -> bool:
    """Without --verbose, warnings and errors, and the few info records the library marks
    ``extra={"notice": True}``: a wait of many seconds that the user would otherwise watch in
    silence (a model's first run or start measuring this CPU), said before it begins."""
    return record.levelno > logging.INFO or getattr(record, "notice", False)


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is when a record comes: a caller that swaps stderr
    around a command (tests, an embedding app) must not leave the logger holding a closed file."""

    @property
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, value: object) -> None:
        pass

    def emit(self, record: logging.LogRecord) -> None:
        """Above an index run's progress bar, not through it: tqdm clears the bar, writes the
        line and draws the bar again (with no bar, it is a plain line)."""
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:
            self.handleError(record)


class _LowercaseLevel(logging.Formatter):
    """``warning: ...``, like other command-line tools, rather than logging's ``WARNING:``."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        if getattr(record, "notice", False):
            return _shown(record.getMessage())  # a plain line, like the summaries commands print
        return _shown(super().formatMessage(record).replace(record.levelname, record.levelname.lower(), 1))


_NO_ROOM = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def _handle_errors(command: Callable) -> Callable:
    """User errors become one line on stderr and exit 1; Ctrl-C exits 130; anything else is a
    bug, summarised on one line unless --verbose asks for the traceback."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from clipsearch.errors import ClipsearchError

        try:
            return command(*args, **kwargs)
        except ClipsearchError as err:
            if settings.verbose:
                raise
            _error(str(err))
        except KeyboardInterrupt as err:
            typer.echo("Interrupted.", err=True)
            raise typer.Exit(128 + err.signum if isinstance(err, _Stopped) else EXIT_INTERRUPTED) from None
        except BrokenPipeError as err:  # the reader went away (`| head`): stop quietly
            raise typer.Exit(_output_failed(err)) from None
        except (typer.TyperException, typer.Exit, typer.Abort):
            raise  # usage errors (exit 2) and deliberate exits
        except Exception as err:
            if isinstance(err, OSError) and err.errno in _NO_ROOM:  # the disk's, not a bug to report
                _error(f"{err.strerror}" + (f" ({_shown(err.filename)})" if err.filename else ""))
            if settings.verbose:
                raise
            _error(f"{type(err).__name__}: {err} (this is a bug; run again with --verbose for the traceback)")

    return wrapper


def _error(message: str) -> None:
    typer.echo(f"Error: {_shown(message)}", err=True)
    raise typer.Exit(1)


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\udc80-\udcff]")  # C0, DEL, C1; bytes that are not UTF-8


def _shown(text: str | os.PathLike[str]) -> str:
    """A name or message as human output shows it: control characters escaped (``\\n``,
    ``\\x1b``), like bytes that are not UTF-8 (``\\xff``), so that a file name can neither drive
    the terminal nor break a line in two. Output for programs (--json, --paths-only) stays exact."""
    return _CONTROL.sub(_escape, os.fspath(text))


def _escape(match: re.Match[str]) -> str:
    char = ord(match.group())
    return {0x0A: "\\n", 0x09: "\\t", 0x0D: "\\r"}.get(char, f"\\x{char & 0xFF:02x}")


def _without_name(path: Path, reason: str) -> str:
    """A failure's reason without the file's name it often starts with (as the decoder stores
    it: bytes that are not UTF-8 escaped), so that a listing says it once, as the path."""
    return reason.removeprefix(f"{str(path).encode('utf-8', 'backslashreplace').decode()} ")


def _print(line: str) -> None:
    _write(_shown(line).encode() + b"\n")


def _print_json(value: object) -> None:
    """``--json`` output: indented, ASCII (a path that is not UTF-8 keeps its bytes as escapes)."""
    _write((json.dumps(value, indent=2) + "\n").encode())


def _write(data: bytes) -> None:
    """All of ``data`` to stdout. A write larger than the buffer can go out in part (the pipe's
    reader gone midway): the rest is written again, so that the error comes, not a silent cut."""
    view = memoryview(data)
    while view:
        view = view[sys.stdout.buffer.write(view) :]


def _open(model: str | None = None, precision: str = "auto", *, create: bool = False, reading: bool = False) -> Index:
    """The index in --home, with ``model`` (default: the index's own). Only ``create`` makes
    one where there is none. For ``reading``, a read-only home is fine (a writable one still
    gets a repaired FAISS file saved)."""
    from clipsearch.index import Index
    from clipsearch.paths import default_home

    home = settings.home or default_home()
    return Index.open(
        home,
        model,
        device=settings.device,
        precision=precision,
        create=create,
        readonly=reading and not os.access(home, os.W_OK),
    )


def _model_option(action: str) -> Any:
    return typer.Option(
        None,
        "--model",
        "-m",
        help=f"Model name (see `clipsearch models`) or checkpoint path to {action} (default: the index's "
        "default model, the first it was built with).",
    )


# --- index -----------------------------------------------------------------------------------


@app.command("index")
@_handle_errors
def index_command(
    paths: list[Path] = typer.Argument(None, help="Folders (or single images) to index.", show_default=False),
    exclude: list[str] = typer.Option(
        [],
        "--exclude",
        "-x",
        metavar="GLOB",
        help="Skip files and folders whose name or full path matches GLOB (repeatable), e.g. `*.png` or `*/exports/*`; "
        "those indexed before stay (`clipsearch remove` forgets them).",
    ),
    follow_symlinks: bool = typer.Option(False, "--follow-symlinks", help="Descend into symlinked folders."),
    retry_failed: bool = typer.Option(
        False, "--retry-failed", help="Try again files that failed before, even unchanged."
    ),
    verify: bool = typer.Option(
        False,
        "--verify",
        help="Fingerprint files whose size and mtime are unchanged too, and re-encode those whose content "
        "changed (slower: reads up to 1 MiB of every file).",
    ),
    batch_size: int | None = typer.Option(None, "--batch-size", min=1, help="Images per model batch (default: 32)."),
    workers: int | None = typer.Option(
        None,
        "--workers",
        min=0,
        help="Decoding processes; 0 decodes in the main process (default: chosen after the first batch, "
        "from what decoding and encoding an image cost).",
    ),
    model: str | None = typer.Option(
        None,
        "--model",
        "-m",
        help="Model name (see `clipsearch models`) or checkpoint path. An index holds vectors by each model "
        "it was run with (files already indexed by another model are only encoded), and the model named "
        "here becomes the one queries use (default: the index's default model, else ViT-B-32-256/datacomp_s34b_b86k).",
    ),
    precision: str = typer.Option(
        "auto",
        "--precision",
        callback=_check_precision,
        help="auto, fp32, bf16, fp16 or int8; auto picks the fastest that keeps embeddings within cosine 0.999 "
        "of fp32.",
    ),
    from_list: Path | None = typer.Option(
        None,
        "--from-list",
        metavar="FILE",
        help="Index the files FILE lists (one path a line, or a Parquet file's `path` column; - reads the lines "
        "from stdin) instead of walking folders; a listed file that no longer exists is marked missing.",
    ),
    ray: str | None = typer.Option(
        None,
        "--ray",
        metavar="ADDRESS",
        callback=lambda value: _checked(value, "check_address", "clipsearch.ray_index"),
        help="Decode and encode on a Ray cluster (`pip install 'clipsearch[ray]'`): auto (the cluster in "
        "RAY_ADDRESS or started here, else a local one), local, or an address such as head:6379. Every node "
        "must see the files at the same paths.",
    ),
    as_json: bool = typer.Option(
        False, "--json", help="Print the run's counts and timings as a JSON object instead of the summary line."
    ),
) -> None:
    """Index the images under PATH... (a re-run does only what changed).

    New and changed files are encoded, moved or copied files reuse their vectors, deleted ones
    drop out of results, unreadable ones are listed by `clipsearch status --failed`.

    Exit status: 0 done; 3 done, but some files could not be read (see `status --failed`);
    130 stopped by Ctrl-C, 143 by SIGTERM (what was finished is kept); 1 error.
    """
    if bool(paths) == (from_list is not None):
        raise typer.BadParameter("name folders to index, or list files with --from-list (not both)", param_hint="PATHS")
    if ray is not None:
        from clipsearch.ray_index import require_ray

        if workers == 0:
            message = "0 decodes in this process; a Ray run decodes on the cluster"
            raise typer.BadParameter(message, param_hint="--workers")
        require_ray()
    stop = threading.Event()
    with (
        _open(model, precision, create=True) as index,
        _progress_bar() as progress,
        _stop_on_signals(stop, lambda: progress.begun) as stopped,
    ):
        report = index.add(
            _file_list(from_list) if from_list is not None else paths,
            exclude=exclude,
            follow_symlinks=follow_symlinks,
            retry_failed=retry_failed,
            verify=verify,
            batch_size=batch_size,
            workers=workers,
            progress=progress,
            should_stop=stop.is_set,
            ray=ray,
            verify_progress=progress.verify,
        )
        # The model a person names for a run is the one they mean to search next.
        switched = model is not None and index.make_default_if_encoded()
    if as_json:
        from dataclasses import asdict

        _print_json(
            asdict(report) | {"images_per_s": report.images_per_s, "home": str(index.home), "model": index.model}
        )
    elif not settings.quiet:
        typer.echo(_summary(report, index.home, index.model))
    if switched and not settings.quiet:
        typer.echo(f"Queries now use {index.model} by default (`clipsearch models default` to change).", err=True)
    if report.interrupted:
        typer.echo("Interrupted: everything finished so far is saved; run the same command again to go on.", err=True)
        raise typer.Exit(128 + stopped.signum)
    if report.failed or report.unreadable:
        raise typer.Exit(EXIT_SOME_FAILED)


def _file_list(path: Path) -> Manifest:
    from clipsearch.manifest import Manifest

    return Manifest("/dev/stdin" if str(path) == "-" else path)


def _summary(report: AddReport, home: Path, model: str) -> str:
    load = f", model loaded in {report.model_load_s:.1f} s" if report.model_load_s else ""
    line = (
        f"new {report.new}, changed {report.changed}, moved {report.moved}, copied {report.copied}, "
        f"removed {report.removed}, "
        f"failed {report.failed}, unchanged {report.unchanged} in {report.elapsed:.1f} s "
        f"({report.images_per_s:.1f} images/s{load}); index: {_shown(home)}"
    )
    if report.failed:
        line += "; see the failures with `clipsearch status --failed`"
    if report.failed_before:
        line += f"; {report.failed_before} unchanged file(s) failed before (`--retry-failed` to try them again)"
    if report.unreadable:
        line += f"; {report.unreadable} folder(s) could not be read"
    if report.verified:
        line += f"; {report.verified} unchanged-looking file(s) verified"
    if report.metadata:
        line += f"; metadata read for {report.metadata} file(s) indexed before"
    if report.stale:
        line += f"; re-encoded {report.stale} images: the weights of {_shown(model)} changed"
    return line


class _progress_bar:
    """tqdm bars on stderr, each created once the run knows how many files it has: one for the
    files `--verify` fingerprints (`verify`), then one for the images encoded (calling it). None
    with --quiet, when stderr is not a terminal, or when there is nothing to do."""

    def __enter__(self) -> _progress_bar:
        self.bar: Any = None  # a tqdm bar, made on the first update that needs one
        self.stage = ""
        self.begun = False  # whether any file is done: before that, a stop has nothing to wait for
        return self

    def __call__(self, done: int, total: int) -> None:
        self._show("", "img", done, total)

    def verify(self, done: int, total: int) -> None:
        self._show("verifying", "file", done, total)

    def _show(self, stage: str, unit: str, done: int, total: int) -> None:
        self.begun = self.begun or done > 0
        if self.bar is not None and stage != self.stage:
            self.bar.close()
            self.bar = None
        if self.bar is None:
            if settings.quiet or not total or not sys.stderr.isatty():
                return
            from tqdm import tqdm

            self.stage = stage
            self.bar = tqdm(
                total=total, desc=stage or None, unit=unit, file=sys.stderr, dynamic_ncols=True, smoothing=0.1
            )
        self.bar.update(done - self.bar.n)

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.close()


class _Stopped(KeyboardInterrupt):
    """A run stopped at once by signal ``signum``: it exits 128 + signum."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


class _stop_on_signals:
    """The first Ctrl-C or SIGTERM (`kill PID`, a service manager) asks the run to stop after
    committing what is finished; a second one interrupts at once (the open transaction rolls
    back, nothing committed is lost). Before ``begun()``, while nothing is finished yet (the
    walk, a model's first download), the first one interrupts at once: there is nothing to
    wait for, and a 600 MB download had gone on to its end after "Stopping after the current
    batch"."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, stop: threading.Event, begun: Callable[[], bool] = lambda: True):
        self.stop = stop
        self.begun = begun
        self.signum: int = signal.SIGINT

    def __enter__(self) -> _stop_on_signals:
        self.previous = {signum: signal.signal(signum, self._handler) for signum in self.SIGNALS}
        return self

    def _handler(self, signum: int, frame: object) -> None:
        if self.stop.is_set():
            raise KeyboardInterrupt
        if not self.begun():
            raise _Stopped(signum)
        self.stop.set()
        self.signum = signum
        again = "Ctrl-C again" if signum == signal.SIGINT else "a second SIGTERM"
        typer.echo(f"\nStopping after the current batch ({again} to stop at once)...", err=True)

    def __exit__(self, *exc: object) -> None:
        # Once stopping, the command is only reporting and exiting: a second signal that lands
        # now (the batch finished first) has nothing left to cut short, and raised during
        # interpreter shutdown it would kill the process by signal instead of exiting 128 + N.
        for signum, previous in self.previous.items():
            signal.signal(signum, signal.SIG_IGN if self.stop.is_set() else previous)


# --- query -----------------------------------------------------------------------------------


@app.command("query")
@_handle_errors
def query_command(
    text: str | None = typer.Argument(
        None,
        help="What to look for, or the path of an image to find similar ones (optional with --like or a filter).",
        show_default=False,
    ),
    top: int = typer.Option(10, "--top", "-k", min=1, help="How many results."),
    under: Path | None = typer.Option(None, "--under", help="Only results inside this folder."),
    min_score: float | None = typer.Option(
        None, "--min-score", min=-1.0, max=1.0, help="Only results at least this similar (cosine, -1 to 1)."
    ),
    add: list[str] = typer.Option(
        [],
        "--add",
        metavar="[WEIGHT:]TEXT_OR_IMAGE",
        help="Also look for this (repeatable), e.g. --add 'at night' or --add 0.5:ref.jpg.",
    ),
    subtract: list[str] = typer.Option(
        [], "--subtract", metavar="[WEIGHT:]TEXT_OR_IMAGE", help="Steer away from this (repeatable)."
    ),
    like: Path | None = typer.Option(
        None,
        "--like",
        metavar="IMAGE",
        help="More like this image: its stored vector when it is indexed (nothing decoded), else it is encoded. "
        "It is left out of its own results.",
    ),
    include_self: bool = typer.Option(False, "--include-self", help="With --like: the image itself may be a result."),
    after: str | None = typer.Option(
        None,
        "--after",
        metavar="DATE",
        callback=lambda value: _checked(value, "start_of"),
        help="Only photos taken from the start of DATE on: 2019, 2019-06, 2019-06-01 or 2019-06-01T10:30 "
        "(local time; photos without a date taken are left out).",
    ),
    before: str | None = typer.Option(
        None,
        "--before",
        metavar="DATE",
        callback=lambda value: _checked(value, "start_of"),
        help="Only photos taken before the start of DATE (--after 2019-06 --before 2019-09: June to August).",
    ),
    camera: str | None = typer.Option(
        None, "--camera", help="Only photos whose camera make or model contains this, any case (e.g. pixel)."
    ),
    near: str | None = typer.Option(
        None,
        "--near",
        metavar="LAT,LON[,KM]",
        callback=lambda value: _checked(value, "parse_near"),
        help="Only photos taken within KM (default 10) of this place, by their GPS position.",
    ),
    ext: str | None = typer.Option(
        None,
        "--ext",
        metavar="EXT,...",
        callback=lambda value: _checked(value, "parse_extensions"),
        help="Only files with these extensions, e.g. jpg,heic (jpg finds .jpeg too).",
    ),
    min_width: int | None = typer.Option(
        None, "--min-width", min=1, help="Only images at least this many pixels wide (as shown)."
    ),
    sort: str = typer.Option(
        "score",
        "--sort",
        callback=lambda value: _checked(value, "check_sort"),
        help="Order: score (best first), date (oldest first), -date (newest first) or path; of the -k best "
        "when there is something to match, else of all that the filters pass (default then: -date).",
    ),
    model: str | None = _model_option("search with"),
    as_json: bool = typer.Option(
        False, "--json", help="Print a JSON array of hits: path, score, size, date taken, camera, place, ..."
    ),
    paths_only: bool = typer.Option(False, "--paths-only", help="Print only paths, one a line (for xargs, fzf)."),
    null: bool = typer.Option(False, "--null", "-0", help="With --paths-only: end each path with NUL (for xargs -0)."),
    preview: bool = typer.Option(
        False, "--preview", help="Show thumbnails inline in kitty, iTerm2 and sixel terminals (elsewhere: paths)."
    ),
) -> None:
    """Search the index with text, an example image, or a weighted mix of both; narrow it by
    when, where and with what the photos were taken; or list what the filters pass, by date.

    - `clipsearch query "a beach" --after 2019-06 --before 2019-09 --camera pixel --sort date`
    - `clipsearch query --like holiday.jpg`
    - `clipsearch query --after 2024 --sort date`
    """
    from clipsearch.filters import Filters
    from clipsearch.search import as_term, parse_term

    _check_output(as_json, paths_only, null)
    try:  # the callbacks checked and converted each option (near and ext are tuples by now)...
        filters = Filters(after, before, camera, near, ext or (), min_width)  # type: ignore[arg-type]
    except ValueError as e:  # ...and this checks them together
        raise typer.BadParameter(str(e)) from None
    terms = [(1.0, as_term(text))] if text is not None else []
    terms += [parse_term(t) for t in add] + [(-w, t) for w, t in map(parse_term, subtract)]
    if not terms and like is None and not filters and under is None:
        raise typer.BadParameter("give TEXT, --like IMAGE, or a filter such as --after", param_hint="TEXT")
    with _open(model, reading=True) as index:
        exclude: tuple[int, ...] = ()
        if like is not None:
            term, own = index.example(like)
            terms.append((1.0, term))
            exclude = () if include_self or own is None else (own,)
        _check_under(index, under)
        hits = index.search(terms, top, under, min_score, filters, sort, exclude)
    out = sys.stdout.buffer
    if as_json:
        _print_json([h.to_json() for h in hits])
    elif paths_only:
        end = b"\0" if null else b"\n"
        out.writelines(os.fsencode(h.path) + end for h in hits)
    elif hits:
        from clipsearch import preview as inline  # the standard library only, until an image is shown

        protocol = inline.detect(tty=sys.stdout.isatty()) if preview else None
        for h in hits:
            if protocol:
                out.write(inline.inline_image(h.path, protocol))
            # Listed by filters alone, a hit has no score: its date taken stands in that column.
            out.write(_shown(f"{_first_column(h)}  {h.path}").encode() + b"\n")
    elif not settings.quiet:
        typer.echo("No matches.", err=True)
    out.flush()


def _first_column(hit: Any) -> str:
    return f"{hit.score:.4f}" if hit.score is not None else (hit.metadata.taken or "(no date)")


def _checked(value: str | None, parser: str, module: str = "clipsearch.filters") -> Any:
    """An option's ``value`` through ``module``'s ``parser``, imported only then; its ValueError
    becomes the option's usage error (exit 2)."""
    if value is None:
        return None
    import importlib

    try:
        return getattr(importlib.import_module(module), parser)(value)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None


# --- duplicates ------------------------------------------------------------------------------


@app.command("duplicates")
@_handle_errors
def duplicates_command(
    threshold: float | None = typer.Option(
        None,
        "--threshold",
        "-t",
        min=-1.0,
        max=1.0,
        help="Cosine similarity at which two images are the same picture (default: measured for the model; "
        "lower it to group burst shots too).",
    ),
    under: Path | None = typer.Option(None, "--under", help="Only images inside this folder."),
    model: str | None = _model_option("compare with"),
    as_json: bool = typer.Option(
        False, "--json", help="Print a JSON array of groups: {keeper, duplicates: [... similarity as score, exact]}."
    ),
    paths_only: bool = typer.Option(
        False, "--paths-only", help="Print only the duplicates that are not the suggested keepers, one a line."
    ),
    null: bool = typer.Option(False, "--null", "-0", help="With --paths-only: end each path with NUL (for xargs -0)."),
) -> None:
    """Groups of images that are the same picture: byte-identical copies, and near-duplicates
    (re-encoded, resized, cropped a little, retouched) by their stored vectors, nothing
    re-encoded. Each group suggests a keeper (largest pixel count, then most metadata, then
    oldest file). Nothing is deleted: `clipsearch duplicates --paths-only -0 | xargs -0 rm`
    removes all but the keepers (review the groups first).
    """
    _check_output(as_json, paths_only, null)
    with _open(model, reading=True) as index:
        _check_under(index, under)
        groups = index.duplicates(threshold, under)
    out = sys.stdout.buffer
    if as_json:
        _print_json([g.to_json() for g in groups])
    elif paths_only:
        end = b"\0" if null else b"\n"
        out.writelines(os.fsencode(d.hit.path) + end for g in groups for d in g.duplicates)
    else:
        for number, group in enumerate(groups):
            out.write(("\n" if number else "").encode() + _described("keep", group.keeper))
            for duplicate in group.duplicates:
                score = duplicate.hit.score
                similarity = "exact" if duplicate.exact else "-" if score is None else f"{score:.3f}"
                out.write(_described(f"  {similarity}", duplicate.hit))
    out.flush()
    if not settings.quiet:
        extra = sum(len(g.duplicates) for g in groups)
        typer.echo(f"{len(groups)} group(s), {extra} image(s) besides the keepers.", err=True)


def _check_under(index: Index, under: Path | None) -> None:
    """A folder that is not there and holds nothing indexed is a mistyped one: it had printed
    "No matches." and exit 0. (An unmounted drive's folder is not there but holds its files.)"""
    from clipsearch.search import unknown_folder

    if under is not None and unknown_folder(index.catalog, under):
        raise typer.BadParameter(f"{under} does not exist, and nothing indexed lies under it", param_hint="--under")


def _check_output(as_json: bool, paths_only: bool, null: bool) -> None:
    """One output at a time: -0 without --paths-only had printed the human lines, which
    `xargs -0` takes for one garbage argument, and --json had silently won over --paths-only."""
    if null and not paths_only:
        raise typer.BadParameter("it ends each path of --paths-only with NUL; add --paths-only", param_hint="-0")
    if as_json and paths_only:
        raise typer.BadParameter("print JSON or paths, not both", param_hint="--json, --paths-only")


def _described(label: str, hit: Any) -> bytes:
    """One line of a group: a label in 8 columns, the path as human output shows it, the size."""
    return _shown(f"{label:<7} {hit.path}  {hit.width}x{hit.height}").encode() + b"\n"


# --- classify --------------------------------------------------------------------------------


def _one_slot(template: str) -> bool:
    """Whether ``template`` puts a label in one place, as `str.format` reads it."""
    try:
        return template.format("\0").count("\0") == 1
    except (IndexError, KeyError, ValueError, AttributeError):
        return False


@app.command("classify")
@_handle_errors
def classify_command(
    images: list[Path] = typer.Argument(..., help="Images to classify.", show_default=False),
    labels: str = typer.Option(
        ..., "--labels", "-l", help="Comma-separated labels, e.g. 'dog,cat,diagram'.", show_default=False
    ),
    template: str = typer.Option("a photo of a {}", "--template", help="Prompt each label is put into."),
    model: str | None = typer.Option(
        None,
        "--model",
        "-m",
        help="Model name or checkpoint path (default: the index's model, else ViT-B-32-256/datacomp_s34b_b86k).",
    ),
    as_json: bool = typer.Option(
        False, "--json", help='Print a JSON array: {"path", "labels": {label: probability}} per image read.'
    ),
) -> None:
    """Zero-shot classification: how likely each label is for each image (no index needed)."""
    from clipsearch.encoder import Encoder
    from clipsearch.errors import ImageError
    from clipsearch.search import zero_shot

    names = [label.strip() for label in labels.split(",") if label.strip()]
    if not names:
        raise typer.BadParameter("give the labels, separated by commas", param_hint="--labels")
    if len(set(names)) < len(names):  # one label twice splits its probability, and --json kept one half
        twice = next(name for name in names if names.count(name) > 1)
        raise typer.BadParameter(f"{twice!r} is given twice; give each label once", param_hint="--labels")
    if not _one_slot(template):  # every prompt the same, or a format error reported as a bug
        raise typer.BadParameter(
            f"{template!r} must hold {{}} once, where each label goes, e.g. 'a photo of a {{}}'",
            param_hint="--template",
        )
    encoder = Encoder(model or _index_model(), settings.device, towers="both")
    if len(names) < 2 and encoder.logit_bias is None:  # a softmax over one label is 1 whatever the image
        raise typer.BadParameter(
            "give at least two labels, separated by commas (only a SigLIP model scores one label alone)",
            param_hint="--labels",
        )
    width = max(len(name) for name in names)
    failed, classified = 0, []
    for image in images:
        try:
            probabilities = zero_shot(encoder, image, names, template)
        except ImageError as err:  # one unreadable image, said; the others are still classified
            failed += 1
            typer.echo(f"error: {_shown(str(err))}", err=True)
            continue
        if as_json:
            classified.append({"path": str(image), "labels": dict(zip(names, map(float, probabilities)))})
            continue
        _print(str(image))
        for name, p in zip(names, probabilities):
            typer.echo(f"  {name:<{width}}  {p:.4f}")
    if as_json:
        _print_json(classified)
    if failed:
        raise typer.Exit(EXIT_SOME_FAILED)


def _index_model() -> str:
    """The model of the index in --home when there is one, so classify agrees with query."""
    from clipsearch.errors import IndexStateError
    from clipsearch.index import DEFAULT_MODEL

    try:
        with _open(reading=True) as index:
            return index.model
    except IndexStateError:
        return DEFAULT_MODEL


# --- status, remove, rebuild -----------------------------------------------------------------


@app.command("status")
@_handle_errors
def status_command(
    failed: bool = typer.Option(False, "--failed", help="List the files that could not be indexed, with the reason."),
    missing: bool = typer.Option(
        False,
        "--missing",
        help="List the files gone from disk since they were indexed (forget them with `clipsearch remove --missing`).",
    ),
    check: bool = typer.Option(
        False, "--check", help="Also compare each model's vector file with the catalog, row by row (exit 1 if not)."
    ),
    model: str | None = _model_option("describe"),
    as_json: bool = typer.Option(
        False, "--json", help="Print a JSON object: the figures above, or the --failed and --missing lists."
    ),
) -> None:
    """Where the index is, its models and their coverage, how many images it holds, and whether
    the vector file is consistent with the catalog."""
    if check and (failed or missing):
        raise typer.BadParameter(
            "it compares the vector files; list --failed or --missing without it", param_hint="--check"
        )
    with _open(model, reading=True) as index:
        if failed or missing:
            failures = [(p, _without_name(p, r)) for p, r in index.failures()] if failed else []
            gone = index.missing() if missing else []
            if as_json:
                lists: dict[str, Any] = (
                    {"failed": [{"path": str(p), "reason": r} for p, r in failures]} if failed else {}
                )
                _print_json(lists | ({"missing": [str(p) for p in gone]} if missing else {}))
                return
            for path, reason in failures:
                _print(f"{path}: {reason}")
            for path in gone:
                _print(str(path))
            return
        from clipsearch.errors import IndexStateError
        from clipsearch.locks import indexing

        # While an index run writes, the vector file lags the catalog by design: not a damage
        # to report (it had said "NOT consistent, run `clipsearch rebuild`", which the run's lock
        # refuses), nor one that a row-by-row check can tell from one.
        running = indexing(index.home)
        if check and running:
            raise IndexStateError(
                f"An index run is writing {index.home}; check it once the run has ended (its vector files "
                "catch up with the catalog as it ends)."
            )
        checks = []
        if check:  # before `status`, whose load of the vector file would repair what it finds damaged
            from clipsearch.consistency import check as check_vectors

            checks = check_vectors(index.home, index.catalog)
        status = index.status()
        # The file `status` read can pass its cheap comparison (counts, the catalog's generation)
        # and still be damaged row by row: the check's finding is the one to say.
        damaged = any(c.problems for c in checks if c.model == status.model)
        if not as_json:
            typer.echo(_describe(status, bool(running), damaged))
        if as_json:
            from dataclasses import asdict

            found = status.to_json() | {"indexing": running} | ({"consistent": False} if damaged else {})
            _print_json(found | ({"checks": [asdict(c) for c in checks]} if check else {}))
        else:
            for c in checks:
                said = "; ".join(c.problems) or f"its vector file matches the catalog's {c.vectors} vectors row by row"
                _print(f"Check:    {c.model}: {said}")
        if any(c.problems for c in checks):
            raise typer.Exit(1)


def _describe(status: Status, indexing: bool = False, damaged: bool = False) -> str:
    from clipsearch.records import STATUS_FAILED, STATUS_INDEXED, STATUSES

    counts = status.counts
    images = ", ".join(f"{counts.get(s, 0)} {s}" for s in STATUSES)
    if counts.get(STATUS_FAILED):
        images += " (see `clipsearch status --failed`)"
    models = [
        f"{_shown(m.name)} ({m.dim}-d): {m.vectors} of {counts[STATUS_INDEXED]} images"
        + (", default" if m.default else "")
        for m in status.models
    ]
    vectors = _vector_index(status, indexing, damaged)
    if status.weights_changed:
        from clipsearch.index import stale_weights_message

        default = any(m.default for m in status.models if m.name == status.model)
        vectors += f"; {stale_weights_message(_shown(status.model or ''), default)}"
    return "\n".join(
        [
            f"Index:    {_shown(status.home)}",
            f"Images:   {images}",
            "Models:   " + ("\n          ".join(models) if models else "none yet (run `clipsearch index PATH`)"),
            f"Vectors:  {_shown(status.model or '')}: {vectors}",
            f"On disk:  catalog {_mb(status.catalog_bytes)}, vectors {_mb(status.vectors_bytes)}",
        ]
    )


def _vector_index(status: Status, indexing: bool = False, damaged: bool = False) -> str:
    if status.dim is None:  # the model has no vectors here: none yet, or dropped
        return "none yet"
    recall = "" if status.recall_at_10 is None else f", recall@10 {status.recall_at_10:.3f}"
    held = f"{status.vectors_in_index} in the index ({status.index_type}{recall})"
    if damaged:
        return f"{held}, NOT consistent with the catalog (see the check below)"
    if status.consistent:
        return f"{held}, consistent with the catalog"
    if indexing:
        return f"{held}, catching up with an index run going on now"
    return f"{held}, NOT consistent with the catalog (run `clipsearch rebuild`)"


def _mb(size: int) -> str:
    return f"{size / 1e6:.1f} MB"


@app.command("remove")
@_handle_errors
def remove_command(
    paths: list[Path] = typer.Argument(
        None, help="Files or folders to forget (nothing is deleted from disk).", show_default=False
    ),
    missing: bool = typer.Option(
        False, "--missing", help="Also forget every file gone from disk (see `clipsearch status --missing`)."
    ),
) -> None:
    """Drop files, or everything under folders, from the index."""
    if not paths and not missing:
        raise typer.BadParameter("name files or folders to forget, or pass --missing", param_hint="PATHS")
    with _open() as index:
        removed = index.remove(paths) if paths else 0
        removed += index.forget_missing() if missing else 0
    if not settings.quiet:
        typer.echo(f"Removed {removed} file(s) from the index.")


@app.command("rebuild")
@_handle_errors
def rebuild_command(
    index_type: str = typer.Option(
        "auto",
        "--index-type",
        callback=lambda value: _checked(value, "check_index_type", "clipsearch.vectors"),
        help="FAISS index: auto (exact while small, approximate when large), Flat, HNSW32, 'IVF4096,PQ64', ...",
    ),
    model: str | None = _model_option("rebuild the vector index of"),
) -> None:
    """Rebuild a model's vector index from the catalog (no image is re-encoded)."""
    with _open(model) as index:
        status = index.rebuild(index_type)
    if not settings.quiet:
        typer.echo(_describe(status))


# --- models ----------------------------------------------------------------------------------


def _index_models() -> tuple[str, list[StoredModel]]:
    """The model that query and status use without --model: the default of the index in --home
    (`models default` changes it), else the one a new index starts with; and the models the
    index holds vectors by."""
    from clipsearch.errors import ClipsearchError
    from clipsearch.index import DEFAULT_MODEL

    try:
        with _open(reading=True) as index:
            return index.model, index.catalog.models()
    except ClipsearchError:  # no index there yet, or one that status has to explain
        return DEFAULT_MODEL, []


@models_app.callback(invoke_without_command=True)
@_handle_errors
def models_command(
    ctx: typer.Context,
    as_json: bool = typer.Option(
        False, "--json", help="Print a JSON array: each model's name, figures, family, path on this machine, source."
    ),
) -> None:
    """List the models clipsearch knows, with the figures to choose by, and where each is;
    (default) marks the model query and status use here without --model.

    dim: embedding width; px: image size; Mparams: parameters, in millions; IN1k: published
    ImageNet zero-shot top-1 and COCO: text-to-image recall@1, both from open_clip's results
    (- where none is published)."""
    if ctx.invoked_subcommand is not None:
        return
    from dataclasses import asdict, fields

    from clipsearch.clip import registry
    from clipsearch.clip.sources import locate

    default, held = _index_models()
    # Checkpoints the index holds vectors by (`index --model PATH`): listed after the known models.
    checkpoints = [m for m in held if registry.find(m.name) is None]
    if as_json:
        listed, unknown_figures = [], [f.name for f in fields(registry.Figures)]
        for entry in registry.MODELS:
            where = locate(entry)
            listed.append(
                {
                    "name": entry.name,
                    "default": entry.name == default,
                    "family": entry.family,
                    "multilingual": entry.multilingual,
                    **(asdict(entry.figures) if entry.figures else dict.fromkeys(unknown_figures)),
                    "path": str(where.path) if where.path else None,
                    "cache": where.cache,
                    "source": where.origin,
                }
            )
        for stored in checkpoints:
            there = os.path.exists(stored.name)
            figures = dict.fromkeys(unknown_figures) | {"embed_dim": stored.dim}
            listed.append(
                {"name": stored.name, "default": stored.name == default, "family": None, "multilingual": None}
                | figures
                | {"path": stored.name if there else None, "cache": None, "source": "checkpoint"}
            )
        _print_json(listed)
        return

    def figure(value: float | None) -> str:
        return "-" if value is None else f"{value:g}"

    header = ("model", "dim", "px", "Mparams", "IN1k", "COCO", "where", "from")
    rows = [header]
    for entry in registry.MODELS:
        where, numbers = locate(entry), entry.figures
        stats = (
            ("-",) * 5
            if numbers is None
            else (
                str(numbers.embed_dim),
                str(numbers.image_size),
                f"{numbers.params_m:.0f}",
                figure(numbers.imagenet),
                figure(numbers.coco_r1),
            )
        )
        name = entry.name + (" (default)" if entry.name == default else "")
        rows.append((name, *stats, where.describe(), _origin(where.origin)))
    for stored in checkpoints:
        name = _shown(stored.name) + (" (default)" if stored.name == default else "")
        found = "on disk" if os.path.exists(stored.name) else "gone"
        rows.append((name, str(stored.dim), *("-",) * 4, found, "checkpoint"))
    widths = [max(len(row[column]) for row in rows) for column in range(len(header))]
    for row in rows:
        typer.echo("  ".join(f"{cell:<{width}}" for cell, width in zip(row, widths)).rstrip())


def _origin(origin: str) -> str:
    """A download's source in a few words: the host of a URL, hf-hub:REPO as it is."""
    from urllib.parse import urlsplit

    return urlsplit(origin).hostname or origin if "://" in origin else origin


@models_app.command("download")
@_handle_errors
def download_command(
    name: str = typer.Argument(
        ..., help="A model name from `clipsearch models`, or hf-hub:ORG/NAME.", show_default=False
    ),
) -> None:
    """Download a model's weights now (e.g. before going offline), unless a cache already has them.

    NAME is a name from `clipsearch models` or hf-hub:ORG/NAME. Caches of other tools are used in
    place: OpenAI's ~/.cache/clip, the Hugging Face hub cache.
    """
    from clipsearch.clip import download, registry
    from clipsearch.clip.sources import locate

    entry = registry.get(name)
    path = download.model_path(entry.name)
    if entry.bundled is None:
        download.vocab_path()  # downloaded checkpoints use CLIP's own vocabulary
    if not settings.quiet:
        typer.echo(f"{entry.name}: {path} ({locate(entry).describe()})")


@models_app.command("default")
@_handle_errors
def default_model_command(
    name: str = typer.Argument(..., help="A model the index holds vectors by.", show_default=False),
) -> None:
    """Make NAME the model that `query` and `status` use when --model is not given."""
    with _open(name) as index:
        index.set_default_model()
    if not settings.quiet:
        typer.echo(f"Default model of {index.home}: {index.model}")


@models_app.command("drop")
@_handle_errors
def drop_model_command(
    name: str = typer.Argument(..., help="A model the index holds vectors by.", show_default=False),
    yes: bool = typer.Option(False, "--yes", "-y", help="Drop without asking (needed where stdin is no terminal)."),
) -> None:
    """Forget NAME's vectors in the index (the files stay indexed for the other models); it
    asks first, since only encoding every image again brings them back."""
    with _open(name) as index:
        stored = index.catalog.model(index.model)
        if stored is None:
            _error(f"The index in {index.home} holds no vectors by {index.model}.")
        elif not yes:
            if not sys.stdin.isatty():
                message = "drop asks before it forgets vectors; pass it to drop them"
                raise typer.BadParameter(message, param_hint="--yes")
            model = _shown(index.model)
            question = f"Drop the {stored.vectors} vectors by {model}? Only encoding again brings them back"
            try:
                agreed = typer.confirm(question, err=True)
            except typer.Abort as stop:  # Ctrl-C stays an interrupt; end of input (Ctrl-D) is a no
                if not isinstance(stop.__context__, EOFError):
                    raise
                agreed = False
            if not agreed:
                _error("Nothing dropped.")
        index.drop_model()
    if not settings.quiet:
        typer.echo(f"Dropped the vectors by {index.model} from {index.home}.")


def _register_train() -> None:
    from clipsearch.training.command import train  # typer arguments only: torch comes in when it runs

    app.command("train")(_handle_errors(train))


_register_train()


def _register_serve() -> None:
    from clipsearch.serve.command import serve  # typer options only: the web server comes in when it runs

    app.command("serve")(_handle_errors(serve))


_register_serve()


def main() -> None:
    """Entry point of the `clipsearch` script. Usage errors are one line, as other tools print
    them, and exit 2; typer's framed message is for `--help`."""
    # typer vendors click: its exceptions are these, not the click package's.
    from typer._click import exceptions as click

    if sys.stdout is None:  # started with `>&-`: every line it printed would be lost unsaid
        typer.echo("Error: standard output is closed; redirect it to /dev/null to discard it.", err=True)
        exit_now(1)
    signal.signal(signal.SIGTERM, _terminated)
    try:
        code = app(standalone_mode=False)
    except click.UsageError as err:
        hint = f" (see `{err.ctx.command_path} --help`)" if err.ctx is not None else ""
        if err.format_message():  # bare `clipsearch` has printed the help, which says it all
            typer.echo(f"Error: {err.format_message()}{hint}", err=True)
        code = err.exit_code
    except click.ClickException as err:
        typer.echo(f"Error: {err.format_message()}", err=True)
        code = err.exit_code
    except (KeyboardInterrupt, typer.Abort) as err:  # Ctrl-C outside a command (while parsing options)
        typer.echo("Interrupted.", err=True)
        code = 128 + err.signum if isinstance(err, _Stopped) else EXIT_INTERRUPTED
    except OSError as err:  # writing --help or --version
        code = _output_failed(err)
    except SystemExit as err:
        # rich, which writes --help, ends the process with 1 when its reader went away (`| head`)
        if not isinstance(err.__context__, BrokenPipeError):
            raise
        code = _output_failed(err.__context__)
    exit_now(_flushed(code if isinstance(code, int) else 0))


def _terminated(signum: int, frame: object) -> None:
    """`kill PID` ends a command as Ctrl-C does, through its clean-up (a training run's scratch
    folder, an open transaction), exiting 143: Python's default ended the process on the spot."""
    raise _Stopped(signum)


def _flushed(code: int) -> int:
    """The exit status once what is left of the output is written. A large --json goes out in
    part and the rest waits in the buffer: a reader gone by then (`| head`) had been an exit 0
    for output cut short."""
    try:
        sys.stdout.flush()
    except OSError as err:
        return code or _output_failed(err)
    return code


def _output_failed(err: OSError) -> int:
    """The exit status for output that could not be written: 141 when the reader went away, as
    for any Unix tool, else an error said in one line (a full disk, a closed descriptor)."""
    # What stdout still holds would fail again at exit: it goes nowhere instead.
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    if isinstance(err, BrokenPipeError):
        return EXIT_BROKEN_PIPE
    typer.echo(f"Error: cannot write the output: {err.strerror or err}", err=True)
    return 1


def exit_now(code: int) -> NoReturn:
    """End the process with ``code`` once the command is over.

    After torch was imported, the interpreter's teardown frees its objects one by one: 0.5 s and
    125 MiB more peak memory (`python -c "import torch"`: 2.0 s and 632 MiB, 1.5 s and 507 MiB
    without). With everything written and closed by now and no other thread left, the exit
    handlers run (logging, multiprocessing, temporary files) and the process ends without it.
    """
    others = [t for t in threading.enumerate() if t is not threading.main_thread() and not t.daemon]
    if "torch" not in sys.modules or others:
        sys.exit(code)
    for stream in (sys.stdout, sys.stderr):
        # A closed pipe or stream: what it could not take is lost either way.
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    atexit._run_exitfuncs()
    os._exit(code)
