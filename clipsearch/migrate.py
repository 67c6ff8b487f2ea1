"""Bringing a catalog's schema to the one this clipsearch writes, with the Alembic revisions in
`migrations/` (installed as `clipsearch.migrations`).

Opening an up-to-date catalog (every `clipsearch query`) compares one stored string with
`HEAD_REVISION` and never imports Alembic; only an older catalog pays for it. A new catalog is
laid out from the models in `clipsearch.schema` and stamped at `HEAD_REVISION` (0.55 s less
than replaying every revision through Alembic, the first thing a first `index` waits for); a
test keeps that layout and the revisions' identical, table by table, so there is one schema.
"""

from __future__ import annotations

import logging
import secrets
import sqlite3
import time
from pathlib import Path
from typing import TYPE_CHECKING

from clipsearch import __version__
from clipsearch.errors import IndexStateError
from clipsearch.sqlite_errors import SQLITE_ERROR, error_code, restore_advice

if TYPE_CHECKING:
    from alembic.config import Config

    from clipsearch.catalog import Catalog

log = logging.getLogger(__name__)

# A catalog this large takes a second or more to upgrade (200k rows from schema 0003, ~250 MB:
# ~10 s, which had passed in silence); a smaller one, milliseconds.
ANNOUNCED_BYTES = 16 * 1024 * 1024

# The newest revision in migrations/versions (a test keeps the two in step).
HEAD_REVISION = "0006"

# Alembic's own bookkeeping table, as `alembic stamp` makes it (the schema test compares).
_VERSION_TABLE = (
    "CREATE TABLE alembic_version (version_num VARCHAR(32) NOT NULL, "
    "CONSTRAINT alembic_version_pkc PRIMARY KEY (version_num))"
)


def ensure_schema(catalog: Catalog, *, create: bool) -> None:
    """Upgrade ``catalog`` to HEAD_REVISION, or with ``create`` lay out a new one.

    Raises IndexStateError for a file that is SQLite but not a catalog, a catalog written by a
    newer clipsearch, or one that needs an upgrade but was opened read-only.
    """
    with catalog.read() as db:
        tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        revision = None
        if "alembic_version" in tables:
            found = db.execute("SELECT version_num FROM alembic_version").fetchone()
            revision = found[0] if found else None
    if revision == HEAD_REVISION:
        return
    if revision is None and tables:
        raise IndexStateError(f"{catalog.path} is an SQLite file but not a clipsearch catalog; choose another --home.")
    if revision is None and not create:
        raise catalog.no_index()
    if revision is not None:
        _upgrade(catalog, revision)
    elif not _create(catalog):
        ensure_schema(catalog, create=False)  # another process made it meanwhile: look again


def _create(catalog: Catalog) -> bool:
    """Lay out a new catalog at head in one transaction: the models' tables, the revision stamp,
    and the settings the revisions' data steps would have written. False if the file was no
    longer empty once the write lock was ours."""
    from clipsearch.schema import Base

    with catalog.transaction() as conn:
        if conn.exec_driver_sql("SELECT 1 FROM sqlite_master").first():
            return False
        Base.metadata.create_all(conn, checkfirst=False)
        conn.exec_driver_sql(_VERSION_TABLE)
        conn.exec_driver_sql("INSERT INTO alembic_version (version_num) VALUES (?)", (HEAD_REVISION,))
        catalog.set_meta_in(
            conn,
            {
                "changes_logged_since": "0",  # revision 0003: every change is logged from the start
                "catalog_id": secrets.token_hex(16),  # revision 0004: what a FAISS file names it by
                "created_at": str(time.time()),
                "clipsearch_version": __version__,
                "generation": "0",
            },
        )
    return True


def _upgrade(catalog: Catalog, revision: str) -> None:
    """Bring an existing catalog's schema to head in one transaction (SQLite has transactional DDL)."""
    from alembic import command
    from alembic.script import ScriptDirectory
    from sqlalchemy.exc import OperationalError

    config = alembic_config()
    known = {script.revision for script in ScriptDirectory.from_config(config).walk_revisions()}
    if revision not in known:
        if not revision.strip():
            raise _damaged(catalog, f"records no schema revision clipsearch knows ({revision!r})")
        raise IndexStateError(
            f"The index in {catalog.home} was written by a newer clipsearch (schema {revision}); "
            "upgrade clipsearch to use it."
        )
    if catalog.readonly:
        raise IndexStateError(
            f"The index in {catalog.home} needs a schema upgrade, which needs write access; "
            "open it once without read-only mode."
        )
    if catalog.path.stat().st_size >= ANNOUNCED_BYTES:  # said before the seconds it takes begin
        log.info("Upgrading the index in %s to this clipsearch's schema (once)", catalog.home, extra={"notice": True})
    try:
        with catalog.transaction() as conn:
            # Inside our transaction Alembic neither begins nor commits: the upgrade is atomic.
            config.attributes["connection"] = conn
            command.upgrade(config, "head")
    except OperationalError as e:
        # SQLite's generic error (a table that exists already, a missing column): the recorded
        # revision is not the one the tables are at. Failures a person can act on otherwise (a
        # full disk, a lock) came out of the transaction as IndexStateError already.
        if not isinstance(e.orig, sqlite3.Error) or error_code(e.orig) != SQLITE_ERROR:
            raise
        reason = str(e.orig).splitlines()[0]
        raise _damaged(catalog, f"records schema {revision}, but its tables do not match it ({reason})") from None


def _damaged(catalog: Catalog, what: str) -> IndexStateError:
    return IndexStateError(f"{catalog.path} {what}; it was left untouched: {restore_advice(catalog.path)}")


def alembic_config() -> Config:
    """Alembic settings for the installed migrations, without an alembic.ini.

    Pass an open SQLAlchemy connection in `config.attributes["connection"]` before running a
    command; migrations/env.py uses it.
    """
    from alembic.config import Config

    import clipsearch.migrations

    config = Config()
    location = str(Path(clipsearch.migrations.__file__).parent)
    config.set_main_option("script_location", location.replace("%", "%%"))  # ConfigParser syntax
    return config
