"""SQLite failures a person can act on, as one-sentence `IndexStateError`s naming the file.

Everything else SQLite raises is a bug and stays an exception with its traceback.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from clipsearch.errors import IndexStateError

# SQLite's primary result codes for errors a person can act on; Python < 3.11 exposes only the
# message, so the messages map to the same codes.
SQLITE_ERROR, SQLITE_BUSY, SQLITE_READONLY, SQLITE_IOERR, SQLITE_CORRUPT = 1, 5, 8, 10, 11
SQLITE_FULL, SQLITE_CANTOPEN, SQLITE_NOTADB = 13, 14, 26
_CODES_BY_MESSAGE = {
    "database is locked": SQLITE_BUSY,
    "readonly database": SQLITE_READONLY,
    "disk i/o error": SQLITE_IOERR,
    "malformed": SQLITE_CORRUPT,
    "database or disk is full": SQLITE_FULL,
    "unable to open database file": SQLITE_CANTOPEN,
    "file is not a database": SQLITE_NOTADB,
}


def restore_advice(db: Path) -> str:
    """What to do about a damaged catalog. SQLite's journal beside it would be played into a
    backup copied over it, and undo the restore."""
    return (
        f"restore it from a backup and delete {db.name}-wal and {db.name}-shm beside it (they belong to "
        "the damaged file), or move all three away and index again."
    )


def error_code(error: sqlite3.Error) -> int | None:
    code = getattr(error, "sqlite_errorcode", None)
    if code is not None:
        return code & 0xFF
    message = str(error).lower()
    return next((code for text, code in _CODES_BY_MESSAGE.items() if text in message), None)


@contextmanager
def sqlite_errors(db: Path) -> Iterator[None]:
    """Turn SQLite failures a person can act on into IndexStateError naming the file.

    SQLAlchemy wraps the sqlite3 error of a statement it ran in ``orig``.
    """
    try:
        yield
    except Exception as e:
        error = getattr(e, "orig", e)
        if not isinstance(error, sqlite3.Error):
            raise
        code = error_code(error)
        if code in (SQLITE_CORRUPT, SQLITE_NOTADB):
            message = f"{db} is damaged ({error}); it was left untouched: {restore_advice(db)}"
        elif code == SQLITE_FULL:
            message = (
                f"The disk holding {db} is full; free some space and run the command again "
                "(everything committed before is kept)."
            )
        elif code == SQLITE_READONLY:
            message = f"{db} cannot be written ({error}); fix its folder's permissions or use another --home."
        elif code == SQLITE_CANTOPEN:
            message = f"{db} cannot be opened ({error}); check that {db.parent} and the file are readable."
        elif code == SQLITE_BUSY:
            message = f"{db} stayed locked by another process; wait for it to finish, then run this again."
        elif code == SQLITE_IOERR:
            message = f"Reading or writing {db} failed ({error}); check the disk, then run the command again."
        else:
            raise
        raise IndexStateError(message) from e
