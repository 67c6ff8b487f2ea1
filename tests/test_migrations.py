import logging
import re
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from helpers import TEST_MODEL
from sqlalchemy import create_engine

import clipsearch.migrate
from clipsearch.catalog import Catalog
from clipsearch.errors import IndexStateError
from clipsearch.migrate import HEAD_REVISION, alembic_config
from clipsearch.records import STATUS_INDEXED, IndexedFile
from clipsearch.schema import Base

BASE_REVISION = "0001"


def migrate(db: Path, revision: str, direction=command.upgrade) -> None:
    engine = create_engine(f"sqlite:///{db}")
    with engine.begin() as conn:
        config = alembic_config()
        config.attributes["connection"] = conn
        direction(config, revision)
    engine.dispose()


def stored_revision(db: Path) -> str:
    return sqlite3.connect(db).execute("SELECT version_num FROM alembic_version").fetchone()[0]


def test_head_constant_matches_the_migration_scripts():
    script = ScriptDirectory.from_config(alembic_config())
    assert script.get_heads() == [HEAD_REVISION]
    assert script.get_base() == BASE_REVISION


def test_migrations_build_exactly_the_models_schema(tmp_path):
    with Catalog.open(tmp_path, create=True) as c, c.transaction() as conn:
        assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []


def schema_of(db: Path) -> dict:
    """Everything SQLite knows of a file's layout, in a form that does not depend on how the
    statements were spelt: per table its columns, indexes (with their columns), foreign keys and
    CHECK constraints, plus the other objects' names."""
    conn = sqlite3.connect(db)
    layout: dict = {}
    for kind, name, sql in conn.execute("SELECT type, name, sql FROM sqlite_master ORDER BY name"):
        if kind != "table":
            layout[(kind, name)] = None  # indexes: compared with their table below
            continue
        indexes = {
            row[1]: (row[2:], conn.execute(f"PRAGMA index_xinfo('{row[1]}')").fetchall())
            for row in conn.execute(f"PRAGMA index_list('{name}')")
        }
        layout[(kind, name)] = {
            "columns": conn.execute(f"PRAGMA table_xinfo('{name}')").fetchall(),
            "indexes": indexes,
            "foreign keys": conn.execute(f"PRAGMA foreign_key_list('{name}')").fetchall(),
            "checks": sorted(re.findall(r"CONSTRAINT (\w+) CHECK \((.*?)\)\s*[,)]", sql or "")),
            "autoincrement": "AUTOINCREMENT" in (sql or ""),
        }
    conn.close()
    return layout


def test_a_new_catalog_has_exactly_the_schema_the_migrations_build(tmp_path):
    """A new catalog is made from the models and stamped, not by replaying the revisions: the
    two must never drift apart."""
    with Catalog.open(tmp_path / "new", create=True) as c:
        settings = {key for (key,) in c._db.execute("SELECT key FROM meta")}
    (tmp_path / "migrated").mkdir()
    migrated = tmp_path / "migrated" / "catalog.db"
    migrate(migrated, "head")

    made = schema_of(tmp_path / "new" / "catalog.db")
    assert made == schema_of(migrated)
    assert ("table", "images") in made and made[("table", "images")]["checks"]  # the comparison saw them
    assert stored_revision(tmp_path / "new" / "catalog.db") == HEAD_REVISION
    # The revisions' data steps' settings, plus those every new catalog gets.
    written = {key for (key,) in sqlite3.connect(migrated).execute("SELECT key FROM meta")}
    assert settings == written | {"created_at", "clipsearch_version", "generation"}


def test_a_new_catalog_is_made_without_alembic(tmp_path):
    code = (
        "import sys; from clipsearch.catalog import Catalog; "
        f"Catalog.open({str(tmp_path / 'home')!r}, create=True).close(); "
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'alembic'))"
    )
    found = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert found.stdout.strip() == "[]"
    assert stored_revision(tmp_path / "home" / "catalog.db") == HEAD_REVISION


def make_base_catalog(home: Path) -> Path:
    """A catalog as the first released schema wrote it: two indexed files, one failed."""
    home.mkdir()
    db = home / "catalog.db"
    migrate(db, BASE_REVISION)
    vector = np.arange(8, dtype=np.float16).tobytes()
    with sqlite3.connect(db) as conn:
        conn.executemany(
            "INSERT INTO images (id, path, size, mtime_ns, fingerprint, width, height, status, error)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [
                (1, b"/p/a.jpg", 10, 11, b"fa", 4, 3, "indexed", None),
                (2, b"/p/\xff.jpg", 20, 21, b"fb", 5, 6, "indexed", None),
                (3, b"/p/bad.jpg", 30, 31, None, None, None, "failed", "truncated"),
            ],
        )
        conn.executemany("INSERT INTO vectors (image_id, vector) VALUES (?, ?)", [(1, vector), (2, vector)])
        conn.executemany("INSERT INTO meta VALUES (?, ?)", [("generation", "7"), ("model", "ViT-B/32")])
    return db


def test_opening_a_base_schema_catalog_upgrades_it_and_keeps_its_data(
    tmp_path, caplog, clipsearch_logging, monkeypatch
):
    db = make_base_catalog(tmp_path / "home")
    monkeypatch.setattr(clipsearch.migrate, "ANNOUNCED_BYTES", db.stat().st_size)  # as large as it takes
    with caplog.at_level(logging.INFO, logger="clipsearch"), Catalog.open(tmp_path / "home") as c:
        # said before the seconds it takes on a large catalog, which had passed in silence
        (said,) = [r for r in caplog.records if "Upgrading" in r.getMessage()]
        assert getattr(said, "notice", False) and str(tmp_path / "home") in said.getMessage()
        assert stored_revision(db) == HEAD_REVISION
        assert c.generation == 7 and c.default_model == "ViT-B/32"
        assert c.counts() == {"indexed": 2, "failed": 1, "missing": 0}
        assert c.failures() == [(b"/p/bad.jpg", "truncated")]
        ids, vectors = c.all_vectors(c.model("ViT-B/32"))
        assert ids.tolist() == [1, 2]
        np.testing.assert_array_equal(vectors, np.tile(np.arange(8, dtype=np.float32), (2, 1)))
        # The new column is there, unknown (NULL) for old rows, filled for new ones.
        c.commit_batch(TEST_MODEL, [IndexedFile(b"/p/new.jpg", 1, 2, b"fn", 1, 1, np.ones(8, np.float32))])
        assert c.file_states()[b"/p/new.jpg"].status == STATUS_INDEXED
    times = dict(sqlite3.connect(db).execute("SELECT path, indexed_at FROM images").fetchall())
    assert times[b"/p/a.jpg"] is None and times[b"/p/new.jpg"] > 0


def test_downgrade_to_base_then_reopen_upgrades_again(tmp_path):
    home = tmp_path / "home"
    with Catalog.open(home, create=True) as c:
        c.commit_batch(TEST_MODEL, [IndexedFile(b"/p/a.jpg", 1, 2, b"f", 1, 1, np.ones(8, np.float32))])
    migrate(home / "catalog.db", BASE_REVISION, command.downgrade)
    assert stored_revision(home / "catalog.db") == BASE_REVISION
    with Catalog.open(home) as c:
        assert list(c.file_states()) == [b"/p/a.jpg"]
    assert stored_revision(home / "catalog.db") == HEAD_REVISION


def test_newer_schema_is_refused_and_left_alone(tmp_path):
    home = tmp_path / "home"
    Catalog.open(home, create=True).close()
    with sqlite3.connect(home / "catalog.db") as conn:
        conn.execute("UPDATE alembic_version SET version_num = 'f00d'")
    before = (home / "catalog.db").read_bytes()
    for readonly in (False, True):
        with pytest.raises(IndexStateError, match=r"newer clipsearch .*f00d.*upgrade clipsearch"):
            Catalog.open(home, readonly=readonly)
    assert (home / "catalog.db").read_bytes() == before


def test_read_only_open_of_an_old_schema_asks_for_write_access(tmp_path):
    db = make_base_catalog(tmp_path / "home")
    with pytest.raises(IndexStateError, match="needs a schema upgrade, which needs write access"):
        Catalog.open(tmp_path / "home", readonly=True)
    assert stored_revision(db) == BASE_REVISION
