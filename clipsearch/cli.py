"""The `clipsearch` command: the only module that prints or exits.

Start-up time is part of the product (a query is a new process each time), so nothing heavy is
imported here at module level: torch, FAISS and SQLAlchemy come in with the command that needs
them.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import typer

from clipsearch import __version__
from clipsearch.cli_settings import settings

if TYPE_CHECKING:
    from clipsearch.index import Index, Status
    from clipsearch.indexer import AddReport
    from clipsearch.manifest import Manifest

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
EXIT_SOME_FAILED = 3  # the run finished, but some files could not be indexed


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


@app.callback()
def _global_options(
    home: Path | None = typer.Option(
        None,
        "--home",
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
    settings.home, settings.device, settings.verbose, settings.quiet = home, device, verbose, quiet
    handler = _StderrHandler()
    handler.setFormatter(_LowercaseLevel("%(levelname)s: %(message)s"))
    root = logging.getLogger("clipsearch")
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO if verbose else logging.ERROR if quiet else logging.WARNING)
    root.propagate = False


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is when a record comes: a caller that swaps stderr
    around a command (tests, an embedding app) must not leave the logger holding a closed file."""

    @property  # type: ignore[override]
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, value: object) -> None:
        pass


class _LowercaseLevel(logging.Formatter):
    """``warning: ...``, like other command-line tools, rather than logging's ``WARNING:``."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        return super().formatMessage(record).replace(record.levelname, record.levelname.lower(), 1)


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
        except KeyboardInterrupt:
            typer.echo("Interrupted.", err=True)
            raise typer.Exit(EXIT_INTERRUPTED) from None
        except BrokenPipeError:
            # The reader went away (`| head`): stop quietly, and keep Python's own flush of
            # stdout at exit from failing again.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            raise typer.Exit(EXIT_BROKEN_PIPE) from None
        except (typer.TyperException, typer.Exit, typer.Abort):
            raise  # usage errors (exit 2) and deliberate exits
        except Exception as err:
            if settings.verbose:
                raise
            _error(f"{type(err).__name__}: {err} (this is a bug; run again with --verbose for the traceback)")

    return wrapper


def _error(message: str) -> None:
    typer.echo(f"Error: {message}", err=True)
    raise typer.Exit(1)


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
        help="Skip files and folders whose name or full path matches GLOB (repeatable), e.g. `*.png` or `*/exports/*`.",
    ),
    follow_symlinks: bool = typer.Option(False, "--follow-symlinks", help="Descend into symlinked folders."),
    retry_failed: bool = typer.Option(
        False, "--retry-failed", help="Try again files that failed before, even unchanged."
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
        "here becomes the one queries use (default: the index's default model, else ViT-B/32).",
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
        help="Index the files FILE lists (one path a line, or a Parquet file's `path` column) instead of "
        "walking folders; a listed file that no longer exists is marked missing.",
    ),
    ray: str | None = typer.Option(
        None,
        "--ray",
        metavar="ADDRESS",
        help="Decode and encode on a Ray cluster (`pip install 'clipsearch[ray]'`): auto (the cluster in "
        "RAY_ADDRESS or started here, else a local one), local, or an address such as head:6379. Every node "
        "must see the files at the same paths.",
    ),
) -> None:
    """Index the images under PATH... (a re-run does only what changed).

    New and changed files are encoded, moved or copied files reuse their vectors, deleted ones
    drop out of results, unreadable ones are listed by `clipsearch status --failed`.

    Exit status: 0 done; 3 done, but some files could not be read (see `status --failed`);
    130 stopped by Ctrl-C (what was finished is kept); 1 error.
    """
    if bool(paths) == (from_list is not None):
        raise typer.BadParameter("name folders to index, or list files with --from-list (not both)", param_hint="PATHS")
    if ray is not None:
        from clipsearch.ray_index import require_ray

        require_ray()
    stop = threading.Event()
    with _open(model, precision, create=True) as index, _progress_bar() as progress, _stop_on_ctrl_c(stop):
        report = index.add(
            _file_list(from_list) if from_list is not None else paths,
            exclude=exclude,
            follow_symlinks=follow_symlinks,
            retry_failed=retry_failed,
            batch_size=batch_size,
            workers=workers,
            progress=progress,
            should_stop=stop.is_set,
            ray=ray,
        )
        # The model a person names for a run is the one they mean to search next.
        switched = model is not None and index.make_default_if_encoded()
    if not settings.quiet:
        typer.echo(_summary(report, index.home))
        if switched:
            typer.echo(f"Queries now use {index.model} by default (`clipsearch models default` to change).", err=True)
    if report.interrupted:
        typer.echo("Interrupted: everything finished so far is saved; run the same command again to go on.", err=True)
        raise typer.Exit(EXIT_INTERRUPTED)
    if report.failed:
        raise typer.Exit(EXIT_SOME_FAILED)


def _file_list(path: Path) -> Manifest:
    from clipsearch.manifest import Manifest

    return Manifest(path)


def _summary(report: AddReport, home: Path) -> str:
    load = f", model loaded in {report.model_load_s:.1f} s" if report.model_load_s else ""
    line = (
        f"new {report.new}, changed {report.changed}, moved {report.moved}, removed {report.removed}, "
        f"failed {report.failed}, unchanged {report.unchanged} in {report.elapsed:.1f} s "
        f"({report.images_per_s:.1f} images/s{load}); index: {home}"
    )
    if report.failed:
        line += "; see the failures with `clipsearch status --failed`"
    if report.unreadable:
        line += f"; {report.unreadable} folder(s) could not be read"
    return line


class _progress_bar:
    """A tqdm bar on stderr, created once the walk knows how many files need work; none with
    --quiet, when stderr is not a terminal, or when there is nothing to do."""

    def __enter__(self) -> Callable[[int, int], None]:
        self.bar = None
        return self.update

    def update(self, done: int, total: int) -> None:
        if self.bar is None:
            if settings.quiet or not total or not sys.stderr.isatty():
                return
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="img", file=sys.stderr, dynamic_ncols=True, smoothing=0.1)
        self.bar.update(done - self.bar.n)

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.close()


class _stop_on_ctrl_c:
    """The first Ctrl-C asks the run to stop after committing what is finished; a second one
    interrupts at once (the open transaction rolls back, nothing committed is lost)."""

    def __init__(self, stop: threading.Event):
        self.stop = stop

    def __enter__(self) -> None:
        self.previous = signal.signal(signal.SIGINT, self._handler)

    def _handler(self, signum: int, frame: object) -> None:
        self.stop.set()
        signal.signal(signal.SIGINT, signal.default_int_handler)
        typer.echo("\nStopping after the current batch (Ctrl-C again to stop at once)...", err=True)

    def __exit__(self, *exc: object) -> None:
        # Once stopping, the command is only reporting and exiting 130: a second Ctrl-C that
        # lands now (the batch finished first) has nothing left to cut short, and raised during
        # interpreter shutdown it would kill the process by signal instead of exiting 130.
        signal.signal(signal.SIGINT, signal.SIG_IGN if self.stop.is_set() else self.previous)


# --- query -----------------------------------------------------------------------------------


@app.command("query")
@_handle_errors
def query_command(
    text: str = typer.Argument(
        ..., help="What to look for, or the path of an image to find similar ones.", show_default=False
    ),
    top: int = typer.Option(10, "--top", "-k", min=1, help="How many results."),
    under: Path | None = typer.Option(None, "--under", help="Only results inside this folder."),
    min_score: float | None = typer.Option(
        None, "--min-score", help="Only results at least this similar (cosine, -1 to 1)."
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
    model: str | None = _model_option("search with"),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON array of {path, score, width, height, mtime}."),
    paths_only: bool = typer.Option(False, "--paths-only", help="Print only paths, one a line (for xargs, fzf)."),
    null: bool = typer.Option(False, "--null", "-0", help="With --paths-only: end each path with NUL (for xargs -0)."),
) -> None:
    """Search the index with text, an example image, or a weighted mix of both."""
    from clipsearch.search import as_term, parse_term

    terms = [(1.0, as_term(text))] + [parse_term(t) for t in add] + [(-w, t) for w, t in map(parse_term, subtract)]
    with _open(model, reading=True) as index:
        hits = index.search(terms, k=top, under=under, min_score=min_score)
    out = sys.stdout.buffer
    if as_json:
        rows = [
            {"path": str(h.path), "score": round(h.score, 6), "width": h.width, "height": h.height, "mtime": h.mtime}
            for h in hits
        ]
        out.write((json.dumps(rows, indent=2) + "\n").encode())
    elif paths_only:
        end = b"\0" if null else b"\n"
        out.writelines(os.fsencode(h.path) + end for h in hits)
    elif hits:
        # Bytes, not text: a name that is not valid UTF-8 prints as it is on disk.
        out.writelines(f"{h.score:.4f}  ".encode() + os.fsencode(h.path) + b"\n" for h in hits)
    elif not settings.quiet:
        typer.echo("No matches.", err=True)
    out.flush()


# --- classify --------------------------------------------------------------------------------


@app.command("classify")
@_handle_errors
def classify_command(
    images: list[Path] = typer.Argument(..., help="Images to classify.", show_default=False),
    labels: str = typer.Option(
        ..., "--labels", "-l", help="Comma-separated labels, e.g. 'dog,cat,diagram'.", show_default=False
    ),
    template: str = typer.Option("a photo of a {}", "--template", help="Prompt each label is put into."),
    model: str | None = typer.Option(
        None, "--model", "-m", help="Model name or checkpoint path (default: the index's model, else ViT-B/32)."
    ),
) -> None:
    """Zero-shot classification: how likely each label is for each image (no index needed)."""
    from clipsearch.encoder import Encoder
    from clipsearch.search import zero_shot

    names = [label.strip() for label in labels.split(",") if label.strip()]
    if len(names) < 2:
        raise typer.BadParameter("give at least two labels, separated by commas", param_hint="--labels")
    encoder = Encoder(model or _index_model(), settings.device, towers="both")
    width = max(len(name) for name in names)
    for image in images:
        probabilities = zero_shot(encoder, image, names, template)
        sys.stdout.buffer.write(os.fsencode(image) + b"\n")
        for name, p in zip(names, probabilities):
            typer.echo(f"  {name:<{width}}  {p:.4f}")


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
    model: str | None = _model_option("describe"),
) -> None:
    """Where the index is, its models and their coverage, how many images it holds, and whether
    the vector file is consistent with the catalog."""
    with _open(model, reading=True) as index:
        if failed or missing:
            out = sys.stdout.buffer
            if failed:
                for path, reason in index.failures():
                    # Reasons often start with the file's name: it is said once, first.
                    reason = reason.removeprefix(f"{path} ")
                    out.write(os.fsencode(path) + f": {reason}\n".encode())
            if missing:
                out.writelines(os.fsencode(path) + b"\n" for path in index.missing())
            out.flush()
            return
        typer.echo(_describe(index.status()))


def _describe(status: Status) -> str:
    from clipsearch.records import STATUS_FAILED, STATUS_INDEXED, STATUSES

    counts = status.counts
    images = ", ".join(f"{counts.get(s, 0)} {s}" for s in STATUSES)
    if counts.get(STATUS_FAILED):
        images += " (see `clipsearch status --failed`)"
    models = [
        f"{m.name} ({m.dim}-d): {m.vectors} of {counts[STATUS_INDEXED]} images" + (", default" if m.default else "")
        for m in status.models
    ]
    vectors = f"{status.vectors_in_index} in a {status.index_type} index"
    if status.recall_at_10 is not None:
        vectors += f" (recall@10 {status.recall_at_10:.3f})"
    vectors += (
        ", consistent with the catalog"
        if status.consistent
        else ", NOT consistent with the catalog (run `clipsearch rebuild`)"
    )
    return "\n".join(
        [
            f"Index:    {status.home}",
            f"Images:   {images}",
            "Models:   " + ("\n          ".join(models) if models else "none yet (run `clipsearch index PATH`)"),
            f"Vectors:  {status.model}: {vectors}",
            f"On disk:  catalog {_mb(status.catalog_bytes)}, vectors {_mb(status.vectors_bytes)}",
        ]
    )


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


@models_app.callback(invoke_without_command=True)
@_handle_errors
def models_command(ctx: typer.Context) -> None:
    """List the models clipsearch knows and whether each is already on this machine."""
    if ctx.invoked_subcommand is not None:
        return
    from clipsearch.clip import registry
    from clipsearch.paths import model_cache_dir

    width = max(len(entry.name) for entry in registry.MODELS)
    for entry in registry.MODELS:
        if entry.bundled is not None:
            where = "bundled"
        elif (model_cache_dir() / entry.asset.filename).exists():
            where = "cached"
        else:
            where = "-"
        typer.echo(f"{entry.name:<{width}}  {where:<7}  {entry.description}")


@models_app.command("download")
@_handle_errors
def download_command(
    name: str = typer.Argument(..., help="A model name from `clipsearch models`.", show_default=False),
) -> None:
    """Download a model's weights into the cache now (e.g. before going offline)."""
    from clipsearch.clip import download, registry

    path = download.model_path(name)
    if registry.get(name).bundled is None:
        download.vocab_path()  # downloaded checkpoints use CLIP's own vocabulary
    if not settings.quiet:
        typer.echo(f"{name}: {path}")


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
) -> None:
    """Forget NAME's vectors in the index (the files stay indexed for the other models)."""
    with _open(name) as index:
        if not index.drop_model():
            _error(f"The index in {index.home} holds no vectors by {index.model}.")
    if not settings.quiet:
        typer.echo(f"Dropped the vectors by {index.model} from {index.home}.")


def _register_train() -> None:
    from clipsearch.training.command import train  # typer arguments only: torch comes in when it runs

    app.command("train")(_handle_errors(train))


_register_train()


def main() -> None:
    """Entry point of the `clipsearch` script. Usage errors are one line, as other tools print
    them, and exit 2; typer's framed message is for `--help`."""
    # typer vendors click: its exceptions are these, not the click package's.
    from typer._click import exceptions as click

    try:
        code = app(standalone_mode=False)
    except click.UsageError as err:
        hint = f" (see `{err.ctx.command_path} --help`)" if err.ctx is not None else ""
        typer.echo(f"Error: {err.format_message()}{hint}", err=True)
        code = err.exit_code
    except click.ClickException as err:
        typer.echo(f"Error: {err.format_message()}", err=True)
        code = err.exit_code
    except (KeyboardInterrupt, typer.Abort):  # Ctrl-C outside a command (while parsing options)
        code = EXIT_INTERRUPTED
    sys.exit(code if isinstance(code, int) else 0)
