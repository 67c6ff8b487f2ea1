"""The SQLite catalog: one row per image file, its float16 vector, and index-wide settings.

The catalog is the index's source of truth: the FAISS file is derived from it and can always be
rebuilt, so everything here favours never losing or corrupting a row over raw speed.

- Paths are stored as bytes (`os.fsencode`), so names that are not valid UTF-8 round-trip.
- Every write is one `BEGIN IMMEDIATE` transaction, fsynced (synchronous=FULL: one fsync per
  indexer batch is cheap, and a power cut then loses at most the batch in flight). WAL mode lets
  queries read while an indexer writes.
- A file SQLite cannot read is reported with its path and never recreated or emptied.
- The schema is owned by the Alembic revisions in `migrations/`; opening an older catalog
  upgrades it (`clipsearch.migrate`), a newer one is refused.

A `Catalog` holds one SQLite connection: use it from one thread at a time.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import secrets
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import numpy as np
import numpy.typing as npt

from clipsearch.errors import IndexStateError
from clipsearch.fingerprint import identifies
from clipsearch.migrate import ensure_schema
from clipsearch.records import (
    METADATA_COLUMNS,
    METADATA_VERSION,
    STATUS_FAILED,
    STATUS_INDEXED,
    STATUS_MISSING,
    STATUSES,
    Changes,
    FailedFile,
    FileState,
    ImageRow,
    IndexedFile,
    PhotoMeta,
    StoredModel,
    extension_of,
)
from clipsearch.sqlite_errors import SQLITE_BUSY, error_code, sqlite_errors

if TYPE_CHECKING:
    from sqlalchemy import Connection

    from clipsearch.filters import Filters


log = logging.getLogger(__name__)

CATALOG_FILE = "catalog.db"
LOCK_FILE = "index.lock"

_BUSY_TIMEOUT_MS = 10_000
_LOCK_POLL_S = 0.1
_CHUNK = 10_000  # vectors per fetch when reading them all
_WAL_HEADER_BYTES = 32  # a write-ahead log no longer than this holds no commit


class Catalog:
    """An open `catalog.db`; see `Catalog.open`.

    Reads are plain SQL on the sqlite3 connection. Writes go through SQLAlchemy and the typed
    models in `clipsearch.schema`, on the same connection, imported by the first write: a query
    or a re-run with nothing to write never pays for importing them.
    """

    def __init__(self, home: Path, db: sqlite3.Connection, readonly: bool) -> None:
        self.home = home
        self.path = home / CATALOG_FILE
        self.readonly = readonly
        self._db = db
        self._sqlalchemy: Connection | None = None
        self._closed = False

    @classmethod
    def open(cls, home: str | os.PathLike[str], *, create: bool = False, readonly: bool = False) -> Catalog:
        """Open (and upgrade, or with `create` make) the catalog in `home`.

        Raises IndexStateError when there is no index and `create` is false, when the file is not
        a readable SQLite catalog, when its schema is newer than this clipsearch, or when it needs
        an upgrade but `readonly` is set.
        """
        home = Path(home)
        db = home / CATALOG_FILE
        if not db.exists():
            if not create or readonly or _file_in_the_way(home) is not None:
                raise _no_index(home)
            try:
                home.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise IndexStateError(
                    f"Cannot create the index folder {home} ({e.strerror}); choose another --home."
                ) from e
        elif not readonly and not os.access(home, os.W_OK):  # also false on a read-only filesystem
            raise IndexStateError(
                f"The index folder {home} cannot be written; queries still work, but to change the "
                "index fix its permissions or use another --home."
            )
        with sqlite_errors(db):
            catalog = cls(home, _connect(db, readonly=readonly, create=create), readonly)
        try:
            ensure_schema(catalog, create=create)
        except BaseException:
            catalog.close()
            raise
        return catalog

    def close(self) -> None:
        self._closed = True
        if self._sqlalchemy is not None:
            self._sqlalchemy.close()
            self._sqlalchemy.engine.dispose()  # closes the sqlite3 connection it was lent
        self._db.close()

    def __enter__(self) -> Catalog:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # --- settings -------------------------------------------------------------------------

    def get_meta(self, key: str) -> str | None:
        with self.read() as db:
            return _get_meta(db, key)

    def set_meta(self, key: str, value: str) -> None:
        with self.transaction() as conn:
            _set_meta(conn, key, value)

    @property
    def catalog_id(self) -> str:
        """Minted with the catalog, never changed: a FAISS file names the catalog it came from."""
        return self.get_meta("catalog_id") or ""

    @property
    def default_model(self) -> str | None:
        """The model queries use when none is named: the first one that encoded anything, or
        the one a user chose (`set_default_model`)."""
        return self.get_meta("default_model")

    def models(self) -> list[StoredModel]:
        """Every model that has encoded images into this catalog, oldest first."""
        query = (
            "SELECT m.id, m.name, m.dim, (SELECT count(*) FROM vectors AS v WHERE v.model_id = m.id), m.weights "
            "FROM models AS m ORDER BY m.id"
        )
        with self.read() as db:
            return [StoredModel(*row) for row in db.execute(query)]

    def model(self, name: str) -> StoredModel | None:
        return next((m for m in self.models() if m.name == name), None)

    def set_default_model(self, name: str) -> None:
        if self.model(name) is None:
            raise IndexStateError(f"The index in {self.home} holds no vectors by {name}; index with it first.")
        self.set_meta("default_model", name)

    def model_weights(self, name: str) -> str | None:
        """The fingerprint of the weights that made the model's vectors; None when unknown or
        the model has none. One indexed lookup: a search checks it every time."""
        with self.read() as db:
            row = db.execute("SELECT weights FROM models WHERE name = ?", (name,)).fetchone()
        return row[0] if row is not None else None

    def adopt_model_weights(self, name: str, weights: str | None) -> None:
        """Record ``weights`` as what made the model's vectors where that is unknown (NULL).
        Looked for first in plain SQL: a run that changes nothing imports no SQLAlchemy."""
        if (
            weights is None
            or self._db.execute("SELECT 1 FROM models WHERE name = ? AND weights IS NULL", (name,)).fetchone() is None
        ):
            return
        from sqlalchemy import update

        from clipsearch.schema import Model

        with self.transaction() as conn:
            conn.execute(update(Model).where(Model.name == name, Model.weights.is_(None)).values(weights=weights))

    def drop_model(self, name: str, *, keep_default: bool = False) -> bool:
        """Forget a model's vectors (the files stay indexed for the others); False if it had none.
        The default passes to the oldest model left, unless ``keep_default`` (the model is about
        to encode again)."""
        from sqlalchemy import delete

        from clipsearch.schema import Model

        with self.transaction() as conn:
            if not conn.execute(delete(Model).where(Model.name == name)).rowcount:
                return False
            _bump_generation(conn)
            if not keep_default and _get_meta(self._db, "default_model") == name:
                left = self._db.execute("SELECT name FROM models ORDER BY id LIMIT 1").fetchone()
                if left is None:
                    conn.exec_driver_sql("DELETE FROM meta WHERE key = 'default_model'")
                else:
                    _set_meta(conn, "default_model", left[0])
        return True

    @property
    def generation(self) -> int:
        """Bumped by every write to the images; the FAISS file records the one it was built from."""
        return int(self.get_meta("generation") or 0)

    @property
    def generation_id(self) -> str:
        """Random, new with every generation: tells this catalog's generation N from another
        history's (a backup of it restored, then written to again)."""
        return self.get_meta("generation_id") or ""

    # --- reads ----------------------------------------------------------------------------

    def file_states(self, model: str | None = None) -> dict[bytes, FileState]:
        """Every row, keyed by path, in one query: the indexer's diff runs against this.
        ``encoded`` says whether ``model`` has a vector for the row."""
        query = (
            "SELECT path, images.id, size, mtime_ns, status, fingerprint, v.image_id IS NOT NULL FROM images "
            "LEFT JOIN vectors AS v ON v.image_id = images.id "
            "AND v.model_id = (SELECT id FROM models WHERE name = ?)"
        )
        with self.read() as db:
            rows = db.execute(query, (model,)).fetchall()
        return {row[0]: FileState._make(row[1:]) for row in rows}

    def copies_by_fingerprint(
        self, model: str, fingerprints: Iterable[bytes]
    ) -> dict[bytes, tuple[np.ndarray, list[ImageRow]]]:
        """``model``'s vector and every row of each of these fingerprints, so that moved or
        copied files skip encoding and take the size and metadata their bytes gave when decoded
        (a header alone can miss them: a PNG's EXIF after its pixels), and a move finds every
        path its content left."""
        # One indexed lookup each: SQLite has no array parameter for blobs, and these are the
        # few files about to be decoded anyway.
        columns = ", ".join(f"images.{column}" for column in _ROW_COLUMNS.split(", "))
        query = (
            f"SELECT v.vector, {columns} FROM images JOIN vectors AS v ON v.image_id = images.id "
            "JOIN models AS m ON m.id = v.model_id WHERE images.fingerprint = ? AND m.name = ? ORDER BY images.id"
        )
        found: dict[bytes, tuple[np.ndarray, list[ImageRow]]] = {}
        with self.read() as db:
            for fingerprint in set(fingerprints):
                rows = db.execute(query, (fingerprint, model)).fetchall()
                if rows:
                    vector = np.frombuffer(rows[0][0], dtype="<f2").astype(np.float32)
                    found[fingerprint] = vector, [_image_row(row[1:]) for row in rows]
        return found

    def stored_vector(
        self, model: str, *, image_id: int | None = None, path: bytes | None = None
    ) -> tuple[int, np.ndarray, int, int] | None:
        """(id, vector float32 [dim], size, mtime_ns) of the indexed row with this id or path,
        if ``model`` has a vector for it: "more like this" without decoding anything."""
        key, value = ("images.id", image_id) if path is None else ("images.path", path)
        query = (
            "SELECT images.id, v.vector, size, mtime_ns FROM images JOIN vectors AS v ON v.image_id = images.id "
            f"JOIN models AS m ON m.id = v.model_id WHERE {key} = ? AND m.name = ? AND status = ?"
        )
        with self.read() as db:
            row = db.execute(query, (value, model, STATUS_INDEXED)).fetchone()
        if row is None:
            return None
        return row[0], _vectors_of([row[1]])[0].astype(np.float32), row[2], row[3]

    def all_vectors(
        self,
        model: StoredModel,
        dtype: npt.DTypeLike = np.float32,
        into: Callable[[int], np.ndarray] | None = None,
        among: Sequence[int] | np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """(ids int64 [n], vectors [n, dim]) of ``model``'s vectors, ordered by image id: float32,
        or float16 as stored (half the memory: 10 GB rather than 20 at 10M vectors of 512).
        ``into(n)``: the array [n, model.dim] to read them into, instead of a new one (a refined
        index's own float16 storage, `Reranked.float16_rows`). ``among``: only these ids' (a
        folder's), not the whole catalog's read and then thrown away."""
        count_sql, rows_sql = _READ_VECTORS[among is not None]
        values = list[int | str]([model.id])
        if among is not None:
            values.append(json.dumps([int(i) for i in among]))
        with self.read() as db:
            n = db.execute(count_sql, values).fetchone()[0]
            ids = np.empty(n, dtype=np.int64)
            vectors = into(n) if into is not None else np.empty((n, model.dim), dtype=dtype)
            start = 0
            # Chunks go straight into the result: peak memory stays near its own size.
            cursor = db.execute(rows_sql, values)
            while rows := cursor.fetchmany(_CHUNK):
                row_ids, blobs = zip(*rows)
                ids[start : start + len(rows)] = row_ids
                vectors[start : start + len(rows)] = _vectors_of(blobs)
                start += len(rows)
        return ids, vectors

    def vector_writes(self, model: StoredModel) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(ids int64, vector generations int64, indexed_at float64) of the rows with a vector by
        ``model``, ordered by id: when each vector was last written (-1 and 0 where unknown)."""
        query = (
            "SELECT v.image_id, COALESCE(i.vector_generation, -1), COALESCE(i.indexed_at, 0.0) FROM vectors AS v "
            "JOIN images AS i ON i.id = v.image_id WHERE v.model_id = ? ORDER BY v.image_id"
        )
        with self.read() as db:
            rows = db.execute(query, (model.id,)).fetchall()
        ids, generations, times = (np.array(column) for column in zip(*rows)) if rows else ([], [], [])
        return np.asarray(ids, np.int64), np.asarray(generations, np.int64), np.asarray(times, np.float64)

    def changes_since(self, generation: int, model: StoredModel) -> Changes | None:
        """What ``model``'s FAISS file of catalog ``generation`` must take in to match the catalog
        as it is, read in one snapshot; None where the record of changes does not reach back that
        far (or ``generation`` is ahead of the catalog)."""
        with self.read() as db:
            now = int(_get_meta(db, "generation") or 0)
            since = _get_meta(db, "changes_logged_since")
            if since is None or not int(since) <= generation <= now:
                return None
            # Rows whose vectors changed, by any model: those without one by this model now come
            # back with None (a few may never have had one; dropping them is a no-op).
            rows = db.execute(
                "SELECT i.id, v.vector FROM images AS i "
                "LEFT JOIN vectors AS v ON v.image_id = i.id AND v.model_id = ? "
                "WHERE i.vector_generation > ? ORDER BY i.id",
                (model.id, generation),
            ).fetchall()
            query = "SELECT image_id FROM vectors WHERE model_id = ? ORDER BY image_id"
            held = db.execute(query, (model.id,)).fetchall()
        kept = [row for row in rows if row[1] is not None]
        return Changes(
            generation=now,
            outdated=np.array([row[0] for row in rows], dtype=np.int64),
            ids=np.array([row[0] for row in kept], dtype=np.int64),
            vectors=_vectors_of([row[1] for row in kept], model.dim).astype(np.float32),
            held=np.array([row[0] for row in held], dtype=np.int64),
        )

    def rows(self, ids: Sequence[int]) -> dict[int, ImageRow]:
        """Indexed rows by id; ids of rows that are gone or no longer indexed are left out."""
        # The ids travel as one JSON array parameter: no SQL is built from their number.
        query = f"SELECT {_ROW_COLUMNS} FROM images WHERE id IN (SELECT value FROM json_each(?)) AND status = ?"
        with self.read() as db:
            rows = db.execute(query, (json.dumps([int(i) for i in ids]), STATUS_INDEXED)).fetchall()
        return {row[0]: _image_row(row) for row in rows}

    def matching_ids(self, filters: Filters, under: bytes | None = None) -> np.ndarray:
        """Ids (int64, ascending) of the indexed rows that pass ``filters`` and lie ``under`` a
        folder: what a filtered search may return.

        A date range, else a place, first narrows the rows by its index (unless it passes a
        fifth of them or more, when one pass over the table is cheaper); every condition is
        then checked on those rows only. The statements are fixed: an unset filter's values are
        NULL, and the distance from ``near`` is finished in NumPy.
        """
        values = filters.sql_values() | _folder_values(under) | {"status": STATUS_INDEXED}
        with self.read() as db:
            candidates = None
            if values["taken_from"] is not None or values["taken_until"] is not None:
                bounds = {"taken_from": values["taken_from"] or "", "taken_until": values["taken_until"] or "~"}
                candidates = [row[0] for row in db.execute(_TAKEN_BETWEEN, bounds)]
            elif values["south"] is not None:
                candidates = [row[0] for row in db.execute(_LATITUDE_BETWEEN, values)]
            narrowed = candidates is not None and len(candidates) < (db.execute(_LAST_ID).fetchone()[0] or 0) / 5
            rows = db.execute(
                _FILTERED[filters.radius is not None, narrowed], values | {"among": json.dumps(candidates)}
            )
            if filters.radius is None:
                return np.sort(np.fromiter((row[0] for row in rows), dtype=np.int64))
            found = np.array(rows.fetchall(), dtype=np.float64).reshape(-1, 3)
        return np.sort(found[filters.within_radius(found[:, 1], found[:, 2]), 0].astype(np.int64))

    def ids_under(self, folder: bytes, most: int) -> np.ndarray | None:
        """Ids (int64, ascending) of the rows at or under ``folder``, whatever their status, to
        narrow a vector search (which holds indexed rows only); None where there are more than
        ``most``: listing them all would cost more than searching everything and keeping what
        lies under the folder, which finds a large folder's best as well."""
        with self.read() as db:
            ids = np.fromiter(
                (row[0] for row in db.execute(_IN_FOLDER, _folder_values(folder) | {"most": most + 1})), dtype=np.int64
            )
        return np.sort(ids) if len(ids) <= most else None

    def listed(self, ids: Sequence[int], order: str, limit: int, offset: int = 0) -> list[ImageRow]:
        """The indexed rows among ``ids`` in ``order`` ("date", "-date" or "path"; rows without
        a date last), a page at a time."""
        values = {"ids": json.dumps([int(i) for i in ids]), "status": STATUS_INDEXED, "limit": limit, "offset": offset}
        with self.read() as db:
            return [_image_row(row) for row in db.execute(_LISTED[order], values)]

    def fingerprints(self, under: bytes | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(ids int64, fingerprints object: bytes or None) of the indexed rows under a folder,
        by id: which files are byte-identical copies of each other (None where a fingerprint
        cannot tell: `fingerprint.identifies`)."""
        with self.read() as db:
            rows = db.execute(_FINGERPRINTS, _folder_values(under) | {"status": STATUS_INDEXED}).fetchall()
        fingerprints = np.empty(len(rows), dtype=object)
        fingerprints[:] = [print_ if identifies(path, size) else None for _, print_, path, size in rows]
        return np.array([row[0] for row in rows], dtype=np.int64), fingerprints

    def without_metadata(self) -> list[bytes]:
        """Paths of indexed rows whose metadata no reader of `METADATA_VERSION` has read yet."""
        query = "SELECT path FROM images WHERE status = ? AND (metadata_version IS NULL OR metadata_version < ?)"
        with self.read() as db:
            return [row[0] for row in db.execute(query, (STATUS_INDEXED, METADATA_VERSION))]

    def fingerprint(self, image_id: int) -> bytes | None:
        """The content fingerprint of an indexed row, None when there is no such row: the web
        page's thumbnails are cached by it."""
        query = "SELECT fingerprint FROM images WHERE id = ? AND status = ?"
        with self.read() as db:
            row = db.execute(query, (image_id, STATUS_INDEXED)).fetchone()
        return row[0] if row else None

    def counts(self) -> dict[str, int]:
        """Rows by status, every status present (zero when none)."""
        with self.read() as db:
            found = dict(db.execute("SELECT status, count(*) FROM images GROUP BY status").fetchall())
        return {status: found.get(status, 0) for status in STATUSES}

    def failures(self) -> list[tuple[bytes, str]]:
        query = "SELECT path, error FROM images WHERE status = ? ORDER BY path"
        with self.read() as db:
            return [(path, error or "") for path, error in db.execute(query, (STATUS_FAILED,))]

    def missing(self) -> list[bytes]:
        """Files indexed once and gone from disk since (kept until `forget_missing`)."""
        with self.read() as db:
            return [
                row[0]
                for row in db.execute("SELECT path FROM images WHERE status = ? ORDER BY path", (STATUS_MISSING,))
            ]

    def forget_missing(self) -> int:
        """Delete the rows of files that are gone; returns how many."""
        from sqlalchemy import delete

        from clipsearch.schema import Image

        with self.transaction() as conn:
            forgotten = conn.execute(delete(Image).where(Image.status == STATUS_MISSING)).rowcount
            if forgotten:
                _bump_generation(conn)
        return forgotten

    # --- writes ---------------------------------------------------------------------------

    def commit_batch(
        self,
        model: str | None = None,
        indexed: Sequence[IndexedFile] = (),
        failed: Sequence[FailedFile] = (),
        missing: Sequence[bytes] = (),
        weights: str | None = None,
    ) -> None:
        """Record one indexer batch in one transaction: a crash keeps all of it or none of it.

        ``indexed`` files carry ``model``'s vectors; the first batch that does records the model
        with the fingerprint of its ``weights`` (and makes it the default if there is none). A file
        whose content changed keeps no other model's vector: those models re-encode it when next used,
        unless another row holds the same content (`fingerprint.identifies`) with a vector by them,
        which the file then takes: a moved or copied file keeps every model's vector.
        """
        if not (indexed or failed or missing):
            return
        if indexed and model is None:
            raise ValueError("indexed files need the model that encoded them")
        from sqlalchemy import bindparam, delete, select, update
        from sqlalchemy.dialects.sqlite import insert as sqlite_insert

        from clipsearch.schema import Image, Vector

        now = time.time()
        # The vectors table is keyed by image id, which the upsert below decides: look it up by path.
        id_of = select(Image.id).where(Image.path == bindparam("image_path")).scalar_subquery()
        with self.transaction() as conn:
            generation = _bump_generation(conn)
            model_id = self._record_model(conn, model, len(indexed[0].vector), weights) if indexed else None
            if indexed:
                conn.exec_driver_sql(
                    "DELETE FROM vectors WHERE model_id != ? AND image_id IN "
                    "(SELECT id FROM images WHERE path = ? AND fingerprint IS NOT ?)",
                    [(model_id, f.path, f.fingerprint) for f in indexed],
                )

            def stat(f: IndexedFile | FailedFile) -> dict:
                return dict(
                    path=f.path,
                    extension=extension_of(f.path),
                    size=f.size,
                    mtime_ns=f.mtime_ns,
                    fingerprint=f.fingerprint,
                    indexed_at=now,
                    vector_generation=generation,
                )

            rows = [
                stat(f)
                | dict(width=f.width, height=f.height, status=STATUS_INDEXED, error=None)
                | _metadata_columns(f.metadata)
                for f in indexed
            ] + [
                stat(f) | dict(width=None, height=None, status=STATUS_FAILED, error=f.error) | _metadata_columns(None)
                for f in failed
            ]
            if rows:
                upsert = sqlite_insert(Image)
                changed = {name: upsert.excluded[name] for name in rows[0] if name != "path"}
                conn.execute(upsert.on_conflict_do_update(index_elements=[Image.path], set_=changed), rows)
            if missing:
                conn.execute(
                    update(Image)
                    .where(Image.path == bindparam("image_path"))
                    .values(status=STATUS_MISSING, vector_generation=generation),
                    [{"image_path": path} for path in missing],
                )
            if indexed:
                upsert = sqlite_insert(Vector).values(image_id=id_of, model_id=model_id, vector=bindparam("blob"))
                conn.execute(
                    upsert.on_conflict_do_update(
                        index_elements=[Vector.image_id, Vector.model_id], set_={"vector": upsert.excluded.vector}
                    ),
                    [{"image_path": f.path, "blob": _vector_blob(f.vector)} for f in indexed],
                )
                # The same content at another path (a file moved, copied, or indexed there by other
                # models only) lends its other models' vectors: a move indexed by one model must not
                # cost the others theirs, and none of them encodes these bytes again.
                # One vector a model for each content, read once a batch: a row each for the batch's
                # files had joined every copy of theirs, a square of the copies (6,000 copies of
                # one photo: a second model's run went from 80 s to over 200).
                same: dict[bytes, list[bytes]] = {}
                for f in indexed:
                    if f.fingerprint is not None and identifies(f.path, f.size):
                        same.setdefault(f.fingerprint, []).append(f.path)
                for print_, paths in same.items():
                    carried = conn.exec_driver_sql(_CONTENT_VECTORS, (print_,)).fetchall()
                    if carried:
                        given = [(model, vector, path) for model, vector in carried for path in paths]
                        conn.exec_driver_sql(_CARRY_VECTOR, given)
            if failed or missing:
                conn.execute(
                    delete(Vector).where(Vector.image_id == id_of),
                    [{"image_path": path} for path in [f.path for f in failed] + list(missing)],
                )

    def set_mtimes(self, items: Sequence[tuple[bytes, int]]) -> None:
        """Record new mtimes (ns) of files whose content is as indexed (touched, copied without
        keeping times, shifted an hour on a FAT drive); like metadata, no vector changes."""
        if items:
            with self.transaction() as conn:
                conn.exec_driver_sql("UPDATE images SET mtime_ns = ? WHERE path = ?", [(m, p) for p, m in items])

    def set_metadata(self, items: Sequence[tuple[bytes, PhotoMeta]]) -> None:
        """Fill in rows' metadata, read from their files' headers. Vectors are untouched, so
        the generation stays: no FAISS file has anything to catch up with."""
        if not items:
            return
        from sqlalchemy import bindparam, update

        from clipsearch.schema import Image

        values: dict[str, Any] = {name: bindparam(f"new_{name}") for name in (*METADATA_COLUMNS, "metadata_version")}
        statement = update(Image).where(Image.path == bindparam("image_path")).values(values)
        with self.transaction() as conn:
            conn.execute(
                statement,
                [
                    {"image_path": path} | {f"new_{k}": v for k, v in _metadata_columns(meta).items()}
                    for path, meta in items
                ],
            )

    def _record_model(self, conn: Connection, name: str | None, dim: int, weights: str | None) -> int:
        """The id of model ``name``, recorded now if this is its first vector."""
        row = self._db.execute("SELECT id, dim FROM models WHERE name = ?", (name,)).fetchone()
        if row is not None:
            if row[1] != dim:
                raise IndexStateError(
                    f"The index in {self.home} holds {row[1]}-dimensional vectors by {name}, which now makes "
                    f"{dim}-dimensional ones; the weights at that path changed: drop the old vectors with "
                    f"`clipsearch models drop {name}`, then index again."
                )
            return int(row[0])
        from sqlalchemy.dialects.sqlite import insert as sqlite_insert

        from clipsearch.schema import Model

        inserted = conn.execute(
            sqlite_insert(Model).values(name=name, dim=dim, created_at=time.time(), weights=weights)
        )
        if _get_meta(self._db, "default_model") is None and name is not None:
            _set_meta(conn, "default_model", name)
        return int(inserted.inserted_primary_key[0])  # type: ignore[index]  # always set by an INSERT

    def remove(self, prefixes: Sequence[bytes]) -> int:
        """Delete the rows at or below these paths; returns how many went.

        Removing b"/a/b" removes b"/a/b" and b"/a/b/..." but not b"/a/bc": the range
        [prefix + b"/", prefix + b"0") holds exactly the paths below the folder, since "0" follows
        "/" in byte order, and it is served by the unique index on path.
        """
        from sqlalchemy import delete

        from clipsearch.schema import Image

        removed = 0
        with self.transaction() as conn:
            for prefix in prefixes:
                folder = prefix.rstrip(b"/")
                below = (Image.path >= folder + b"/") & (Image.path < folder + b"0")
                removed += conn.execute(delete(Image).where((Image.path == folder) | below)).rowcount
            if removed:
                _bump_generation(conn)
        return removed

    @contextmanager
    def writer_lock(self, wait: float = 0.0) -> Iterator[None]:
        """Hold home/index.lock so that only one process indexes this home at a time.

        Waits up to `wait` seconds for another holder. flock is released by the kernel when the
        holder dies, so a killed indexer never leaves a stale lock behind.
        """
        self._require_writable()
        try:
            fd = os.open(self.home / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise IndexStateError(
                f"Cannot write to {self.home} ({e.strerror}); fix its permissions or choose another --home."
            ) from e
        try:
            deadline = time.monotonic() + wait
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        raise IndexStateError(
                            f"Another clipsearch process is indexing {self.home}; "
                            "wait for it to finish, then run this again."
                        ) from None
                    time.sleep(_LOCK_POLL_S)
            yield
        finally:
            os.close(fd)

    # --- internals ------------------------------------------------------------------------

    def _require_writable(self) -> None:
        if self.readonly:
            raise IndexStateError(f"The index in {self.home} was opened read-only; it cannot be changed.")

    @property
    def _conn(self) -> Connection:
        """SQLAlchemy on the catalog's own sqlite3 connection (never a second one: a second
        connection would not see this one's transaction), made on first use."""
        if self._sqlalchemy is None:
            from sqlalchemy import create_engine
            from sqlalchemy.pool import StaticPool

            engine = create_engine(
                "sqlite://",
                creator=lambda: self._db,
                poolclass=StaticPool,
                isolation_level="AUTOCOMMIT",  # transactions are ours: see Catalog._begin
            )
            with sqlite_errors(self.path):
                self._sqlalchemy = engine.connect()
        return self._sqlalchemy

    @contextmanager
    def read(self) -> Iterator[sqlite3.Connection]:
        """A read transaction on the sqlite3 connection: one snapshot, never waiting for a writer."""
        with self._begin(self._db.execute, write=False):
            yield self._db

    @contextmanager
    def transaction(self) -> Iterator[Connection]:
        """A write transaction for SQLAlchemy statements, begun through SQLAlchemy so that it (and
        Alembic) knows one is open and neither begins nor commits one of its own."""
        self._require_writable()
        conn = self._conn
        with self._begin(conn.exec_driver_sql, write=True):
            yield conn

    def set_meta_in(self, conn: Connection, values: dict[str, str]) -> None:
        """Settings written inside a transaction already open (`transaction()`)."""
        for key, value in values.items():
            _set_meta(conn, key, value)

    def no_index(self) -> IndexStateError:
        return _no_index(self.home)

    @contextmanager
    def _begin(self, execute: Callable[[str], object], write: bool) -> Iterator[None]:
        """One SQLite transaction, with errors turned into IndexStateError.

        Writes start with BEGIN IMMEDIATE: the write lock is taken (waiting up to busy_timeout)
        before anything is read, so a write never fails half-way on a lock upgrade. Reads use a
        deferred BEGIN, which in WAL mode never waits for a writer and sees one snapshot.
        """
        if self._closed:
            raise IndexStateError(f"The index in {self.home} has been closed; open it again to use it.")
        with sqlite_errors(self.path):
            execute("BEGIN IMMEDIATE" if write else "BEGIN")
            try:
                yield
                execute("COMMIT")
            except BaseException:
                # SQLite may already have rolled back by itself (disk full, I/O error).
                if self._db.in_transaction:
                    execute("ROLLBACK")
                raise


def _casefold(text: str | None) -> str | None:
    return text.casefold() if isinstance(text, str) else None


def _connect(db: Path, *, readonly: bool, create: bool) -> sqlite3.Connection:
    """A DB-API connection with the pragmas every catalog connection needs.

    The URI's mode keeps SQLite from creating a file we did not mean to create. A read-only
    connection to a WAL database needs the -wal and -shm files, which cannot be made in a
    read-only folder: when the folder is not writable and no -wal file exists, nobody can be
    writing, and `immutable=1` reads the fully checkpointed file directly.
    """
    mode = "ro" if readonly else "rwc" if create else "rw"
    uri = f"file:{quote(os.fsencode(db))}?mode={mode}"
    if readonly and not os.access(db.parent, os.W_OK) and not _wal_readable(db):
        uri += "&immutable=1"
    # check_same_thread off: a Catalog may be handed to another thread, as long as two
    # threads never use it at the same time.
    conn = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False)
    try:
        conn.execute(f"PRAGMA busy_timeout = {_BUSY_TIMEOUT_MS}")
        if not readonly:
            _use_wal(conn)
            conn.execute("PRAGMA synchronous = FULL")
        conn.execute("PRAGMA foreign_keys = ON")
        # SQLite's LIKE ignores the case of ASCII letters only: "ZÉ" must find a "Zé" camera too
        # (`Filters.sql_values` asks for it only then: a call a row costs 6x LIKE's time).
        conn.create_function("casefold", 1, _casefold, deterministic=True)
    except BaseException:
        conn.close()
        raise
    return conn


def _wal_readable(db: Path) -> bool:
    """Whether SQLite can read the -wal file of a catalog in a read-only folder: not without its
    -shm file, which it would have to create there. Commits in an unreadable log (its -shm file
    deleted, or left behind by a copy) are then not seen, and the catalog is read as before them."""
    wal, shm = db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")
    if not wal.exists():
        return False
    if shm.exists():
        return True
    if wal.stat().st_size > _WAL_HEADER_BYTES:
        log.warning(
            "%s holds changes that cannot be read while %s is read-only (SQLite needs to create %s for that); "
            "answering from the catalog as it was before them.",
            wal,
            db.parent,
            shm.name,
        )
    return False


def _use_wal(conn: sqlite3.Connection) -> None:
    """Switch the file to WAL (a no-op once it is). Two processes opening a new catalog at the
    same moment both try the switch, and SQLite answers the loser "database is locked" at once:
    its busy handler does not run for a lock upgrade that could deadlock. So the switch is
    retried for as long as the busy timeout allows."""
    deadline = time.monotonic() + _BUSY_TIMEOUT_MS / 1000
    while True:
        try:
            conn.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as e:
            if error_code(e) != SQLITE_BUSY or time.monotonic() >= deadline:
                raise
            time.sleep(_LOCK_POLL_S)


# `Catalog.all_vectors`'s statements (count, rows): a model's vectors, or only those of the ids
# in one JSON array parameter (any number of them, where a list of ?s stops at SQLite's limit).
_OF_MODEL = "FROM vectors WHERE model_id = ?"
_READ_VECTORS = {
    among: (f"SELECT count(*) {where}", f"SELECT image_id, vector {where} ORDER BY image_id")
    for among, where in ((False, _OF_MODEL), (True, f"{_OF_MODEL} AND image_id IN (SELECT value FROM json_each(?))"))
}
_ROW_COLUMNS = "id, path, size, mtime_ns, width, height, " + ", ".join(METADATA_COLUMNS)
# The vectors that rows of the same content (fingerprint) hold, given to the row at a path for the
# models it lacks (`Catalog.commit_batch`); the fingerprint holds the size, so the copies are of it.
_CONTENT_VECTORS = (  # a vector of each model among the rows of a content (SQLite: any row's)
    "SELECT v.model_id, v.vector FROM images AS src JOIN vectors AS v ON v.image_id = src.id "
    "WHERE src.fingerprint = ? GROUP BY v.model_id"
)
_CARRY_VECTOR = "INSERT OR IGNORE INTO vectors (image_id, model_id, vector) SELECT id, ?, ? FROM images WHERE path = ?"

# Reads by filters (`Catalog.matching_ids`). Each condition holds when its value is NULL (that
# filter is unset). "+status": almost every row is indexed, and SQLite must not walk that index.
_UNDER = "(:folder IS NULL OR path = :folder OR (path >= :below_from AND path < :below_until))"
_FILTERS = (
    "+status = :status AND (:taken_from IS NULL OR taken >= :taken_from) "
    "AND (:taken_until IS NULL OR taken < :taken_until) "
    "AND (:camera IS NULL OR (CASE WHEN :camera_fold THEN casefold(coalesce(camera_make, '') || ' ' || "
    "coalesce(camera_model, '')) ELSE coalesce(camera_make, '') || ' ' || coalesce(camera_model, '') END) "
    "LIKE :camera "
    "ESCAPE '\\') "
    "AND (:min_width IS NULL OR width >= :min_width) "
    "AND (:extensions IS NULL OR extension IN (SELECT value FROM json_each(:extensions))) "
    "AND (:south IS NULL OR (latitude BETWEEN :south AND :north AND (:west IS NULL OR CASE WHEN :west <= :east "
    "THEN longitude BETWEEN :west AND :east ELSE longitude >= :west OR longitude <= :east END))) "
    f"AND {_UNDER}"
)
_AMONG = " AND id IN (SELECT value FROM json_each(:among))"
# `_UNDER` as one range of the path index, read alone: [folder, folder + "0") holds the folder,
# the paths below it ("folder/...") and its siblings between ("folder-2"), which the last
# condition leaves out.
_IN_FOLDER = (
    "SELECT id FROM images WHERE path >= :folder AND path < :below_until "
    "AND (path = :folder OR path >= :below_from) LIMIT :most"
)
# By (with the position, to finish the distance test; among candidates an index found):
_FILTERED = {
    (False, False): f"SELECT id FROM images WHERE {_FILTERS}",
    (False, True): f"SELECT id FROM images WHERE {_FILTERS}{_AMONG}",
    (True, False): f"SELECT id, latitude, longitude FROM images WHERE {_FILTERS}",
    (True, True): f"SELECT id, latitude, longitude FROM images WHERE {_FILTERS}{_AMONG}",
}
_TAKEN_BETWEEN = "SELECT id FROM images WHERE taken >= :taken_from AND taken < :taken_until"
_LATITUDE_BETWEEN = "SELECT id FROM images WHERE latitude BETWEEN :south AND :north"
_LAST_ID = "SELECT max(id) FROM images"
_FINGERPRINTS = f"SELECT id, fingerprint, path, size FROM images WHERE +status = :status AND {_UNDER} ORDER BY id"
_LISTED_ROWS = f"SELECT {_ROW_COLUMNS} FROM images WHERE id IN (SELECT value FROM json_each(:ids)) AND status = :status"
_LISTED = {
    "date": _LISTED_ROWS + " ORDER BY taken IS NULL, taken, path LIMIT :limit OFFSET :offset",
    "-date": _LISTED_ROWS + " ORDER BY taken IS NULL, taken DESC, path LIMIT :limit OFFSET :offset",
    "path": _LISTED_ROWS + " ORDER BY path LIMIT :limit OFFSET :offset",
}


def _folder_values(under: bytes | None) -> dict[str, bytes | None]:
    """The folder itself, or the byte range of paths below it (see `Catalog.remove`)."""
    folder = under.rstrip(b"/") if under is not None else None
    return {
        "folder": folder,
        "below_from": folder + b"/" if folder is not None else None,
        "below_until": folder + b"0" if folder is not None else None,
    }


def _image_row(row: Sequence) -> ImageRow:
    """An `ImageRow` from the columns `_ROW_COLUMNS` names, in that order."""
    id_, path, size, mtime_ns, width, height = row[:6]
    return ImageRow(id_, path, size, mtime_ns, width, height, PhotoMeta(*row[6:]))


def _metadata_columns(metadata: PhotoMeta | None) -> dict[str, object]:
    """The metadata columns of a row; all NULL, and to be read again, for None."""
    if metadata is None:
        return dict.fromkeys(METADATA_COLUMNS) | {"metadata_version": None}
    return {name: getattr(metadata, name) for name in METADATA_COLUMNS} | {"metadata_version": METADATA_VERSION}


def _file_in_the_way(home: Path) -> Path | None:
    """The file that is the home, or where a folder above it would be made; None if none is."""
    there = next((p for p in (home, *home.parents) if p.exists()), None)
    return there if there is not None and not there.is_dir() else None


def _no_index(home: Path) -> IndexStateError:
    if (file := _file_in_the_way(home)) is not None:
        return IndexStateError(f"{file} is a file, not an index folder; choose another --home.")
    return IndexStateError(f"There is no index in {home}; create one with `clipsearch index PATH`.")


def _get_meta(db: sqlite3.Connection, key: str) -> str | None:
    row = db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
    return row[0] if row else None


def _set_meta(conn: Connection, key: str, value: str) -> None:
    from sqlalchemy.dialects.sqlite import insert as sqlite_insert

    from clipsearch.schema import Meta

    upsert = sqlite_insert(Meta).values(key=key, value=value)
    changed = dict(value=upsert.excluded.value)
    conn.execute(upsert.on_conflict_do_update(index_elements=[Meta.key], set_=changed))


def _bump_generation(conn: Connection) -> int:
    """Count one more write; returns the new generation."""
    from sqlalchemy import Integer, Text, cast, select
    from sqlalchemy.dialects.sqlite import insert as sqlite_insert

    from clipsearch.schema import Meta

    upsert = sqlite_insert(Meta).values(key="generation", value="1")
    next_value = cast(cast(Meta.value, Integer) + 1, Text)
    conn.execute(upsert.on_conflict_do_update(index_elements=[Meta.key], set_=dict(value=next_value)))
    _set_meta(conn, "generation_id", secrets.token_hex(8))
    return int(conn.execute(select(Meta.value).where(Meta.key == "generation")).scalar_one())


def _vectors_of(blobs: Sequence[bytes], dim: int = -1) -> np.ndarray:
    """Stored vectors, as `_vector_blob` wrote them, as one float16 array [len(blobs), dim]
    (``dim`` is needed only when there are none)."""
    return np.frombuffer(b"".join(blobs), dtype="<f2").reshape(len(blobs), dim if not blobs else -1)


def _vector_blob(vector: np.ndarray) -> bytes:
    vector = np.asarray(vector)
    if vector.ndim != 1:
        raise ValueError(f"expected one vector of shape [dim], got shape {vector.shape}")
    return vector.astype("<f2").tobytes()
