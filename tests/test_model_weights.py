"""A model's vectors are tied to the weights that made them, not only to its name: vectors by
other weights (a retrained checkpoint at the same path, an updated bundled demo) are encoded
again by the next `index`, and a search refuses to compare across the two spaces."""

import json
import logging
import os
import shutil
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from helpers import make_library, write_tiny_model
from test_migrations import migrate
from typer.testing import CliRunner

from clipsearch.catalog import Catalog
from clipsearch.cli import app
from clipsearch.clip import integrity
from clipsearch.clip.sources import weights_fingerprint
from clipsearch.errors import IndexStateError
from clipsearch.fingerprint import fingerprint
from clipsearch.index import Index
from clipsearch.records import IndexedFile

SAMPLE_IMAGES = Path(__file__).resolve().parent.parent / "sample_images"
LEGACY_DEMO = "sha256:0fcb52190b1412d309266fc574223c318985bc56c5baca040c482f7272d87657"
STALE = (
    "were made by other weights (the model was updated or retrained); "
    "run `clipsearch index PATH` on its folders to re-encode them."
)


@pytest.fixture
def model(tmp_path, tiny_model) -> str:
    """A copy of the tiny model whose weights a test may change in place."""
    return str(shutil.copytree(tiny_model, tmp_path / "model"))


def retrain(model: str) -> None:
    """New random weights, same shapes, same path."""
    write_tiny_model(Path(model), seed=7)


def vectors_by_path(home: Path, model: str) -> dict[bytes, np.ndarray]:
    with Catalog.open(home) as catalog:
        stored = catalog.model(model)
        assert stored is not None
        ids, vectors = catalog.all_vectors(stored)
        rows = catalog.rows(ids.tolist())
    return {rows[int(i)].path: v for i, v in zip(ids, vectors)}


def open_index(home: Path, model: str) -> Index:
    return Index.open(home, model=model, device="cpu", precision="fp32")


def test_changed_weights_are_encoded_again_and_other_models_kept(
    tmp_path, model, other_tiny_model, encoded, clipsearch_logging, caplog
):
    make_library(tmp_path / "lib", 6)
    home = tmp_path / "home"
    with open_index(home, other_tiny_model) as other:
        other.add([tmp_path / "lib"], workers=0)
    with open_index(home, model) as index:
        index.add([tmp_path / "lib"], workers=0)
    before, others_before = vectors_by_path(home, model), vectors_by_path(home, other_tiny_model)

    retrain(model)
    encoded.clear()
    with caplog.at_level(logging.WARNING, logger="clipsearch"), open_index(home, model) as index:
        with pytest.raises(IndexStateError, match="other weights"):
            index.search("a cat")
        assert index.status().weights_changed
        report = index.add([tmp_path / "lib"], workers=0)
        # Re-encoded for the new weights: none of them is a new file, nor a changed one.
        assert (report.stale, report.new, report.changed, report.unchanged, sum(encoded)) == (6, 0, 0, 0, 6)
        assert report.images_per_s > 0
        assert index.search("a cat", k=3)  # the vectors and the weights agree again
        assert not index.status().weights_changed
        assert index.catalog.model_weights(model) == weights_fingerprint(model)
        assert index.catalog.counts()["indexed"] == 6
        assert index.catalog.default_model == other_tiny_model  # as it was: the first model indexed
    assert any("weights of" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)

    after = vectors_by_path(home, model)
    with open_index(tmp_path / "fresh", model) as fresh:
        fresh.add([tmp_path / "lib"], workers=0)
    expected = vectors_by_path(tmp_path / "fresh", model)
    assert after.keys() == expected.keys() == before.keys()
    for path in after:
        np.testing.assert_allclose(after[path], expected[path], atol=1e-3)  # float16 storage
        assert np.abs(after[path] - before[path]).max() > 0.05
    others_after = vectors_by_path(home, other_tiny_model)
    assert others_after.keys() == others_before.keys()
    for path in others_after:
        np.testing.assert_array_equal(others_after[path], others_before[path])


def test_the_cli_refuses_to_search_stale_vectors_in_one_line_then_reindexes(tmp_path, model):
    make_library(tmp_path / "lib", 4)
    runner = CliRunner()
    home = ["--home", str(tmp_path / "home"), "--device", "cpu"]
    assert runner.invoke(app, [*home, "index", str(tmp_path / "lib"), "--model", model]).exit_code == 0
    retrain(model)

    for command in (["query", "a cat"], ["duplicates"], ["duplicates", "--paths-only", "-0"]):
        # duplicates too: the threshold is the current weights', and old vectors had paired
        # different pictures for `duplicates --paths-only -0 | xargs -0 rm` to delete
        refused = runner.invoke(app, [*home, *command])
        assert refused.exit_code == 1 and refused.stdout == ""
        lines = refused.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].endswith(STALE) and "Traceback" not in refused.output
    status = runner.invoke(app, [*home, "status"])
    assert status.exit_code == 0 and STALE in status.output

    again = runner.invoke(app, [*home, "index", str(tmp_path / "lib")])
    assert again.exit_code == 0, again.output
    assert "re-encoded 4 images: the weights of" in again.output
    assert "new 0, changed 0, moved 0, copied 0, removed 0, failed 0, unchanged 0 in" in again.output
    assert runner.invoke(app, [*home, "query", "a cat"]).exit_code == 0
    assert STALE not in runner.invoke(app, [*home, "status"]).output


def test_unchanged_weights_are_hashed_once_and_never_reencoded(tmp_path, model, encoded, monkeypatch):
    hashed: list[Path] = []
    real = integrity.sha256_file
    monkeypatch.setattr(integrity, "sha256_file", lambda path: hashed.append(Path(path)) or real(path))
    make_library(tmp_path / "lib", 3)
    for _ in range(3):
        with open_index(tmp_path / "home", model) as index:
            report = index.add([tmp_path / "lib"], workers=0)
            index.search("a cat")
    weights = Path(model) / "model.safetensors"
    assert hashed.count(weights) == 1  # the stat-keyed record answers every later run and search
    assert (report.stale, report.unchanged, sum(encoded)) == (0, 3, 3)

    # The same bytes written again (a new mtime and ctime): hashed again, still the same weights.
    weights.write_bytes(weights.read_bytes())
    with open_index(tmp_path / "home", model) as index:
        assert index.add([tmp_path / "lib"], workers=0).stale == 0
    assert hashed.count(weights) == 2 and sum(encoded) == 3


def test_vectors_of_unknown_weights_are_taken_to_be_the_current_ones(tmp_path, model, encoded):
    make_library(tmp_path / "lib", 3)
    with open_index(tmp_path / "home", model) as index:
        index.add([tmp_path / "lib"], workers=0)
    with sqlite3.connect(tmp_path / "home" / "catalog.db") as db:
        db.execute("UPDATE models SET weights = NULL")  # as revision 0006 leaves a model other than demo
    retrain(model)
    with open_index(tmp_path / "home", model) as index:
        assert not index.status().weights_changed
        assert index.add([tmp_path / "lib"], workers=0).stale == 0
        assert index.catalog.model_weights(model) == weights_fingerprint(model)
    assert sum(encoded) == 3


def test_revision_0006_records_the_legacy_demo_weights_and_leaves_others_unknown(tmp_path):
    db = tmp_path / "catalog.db"
    migrate(db, "0005")
    with sqlite3.connect(db) as conn:
        conn.executemany(
            "INSERT INTO models (name, dim, created_at) VALUES (?, ?, ?)",
            [("demo", 128, 1.0), ("/models/mine", 32, 2.0)],
        )
    migrate(db, "0006")
    weights = dict(sqlite3.connect(db).execute("SELECT name, weights FROM models").fetchall())
    assert weights == {"demo": LEGACY_DEMO, "/models/mine": None}
    assert weights_fingerprint("demo") != LEGACY_DEMO  # the bundled demo was retrained since


def test_a_catalog_of_the_previous_demo_is_encoded_again_and_searchable(tmp_path):
    """What a user upgrading clipsearch has: sample images indexed by the previous demo model."""
    home = tmp_path / "home"
    images = sorted(p for p in SAMPLE_IMAGES.iterdir() if p.suffix in (".png", ".jpg"))
    rng = np.random.default_rng(0)
    with Catalog.open(home, create=True) as catalog:
        old = []
        for path in images:
            st = path.stat()
            vector = rng.standard_normal(128).astype(np.float32)
            vector /= np.linalg.norm(vector)
            old.append(IndexedFile(os.fsencode(path), st.st_size, st.st_mtime_ns, fingerprint(path), 64, 64, vector))
        catalog.commit_batch("demo", indexed=old, weights=LEGACY_DEMO)
    runner = CliRunner()
    cli = ["--home", str(home), "--device", "cpu"]

    indexed = runner.invoke(app, [*cli, "index", str(SAMPLE_IMAGES), "--model", "demo"])
    assert indexed.exit_code == 0, indexed.output
    assert f"re-encoded {len(images)} images: the weights of demo changed" in indexed.output

    records = [json.loads(line) for line in (SAMPLE_IMAGES / "manifest.jsonl").read_text().splitlines()]
    red_circles = {
        r["path"] for r in records if any(o["shape"] == "circle" and o["colour"] == "red" for o in r["objects"])
    }
    found = runner.invoke(app, [*cli, "query", "a red circle", "--top", "1", "--paths-only"])
    assert found.exit_code == 0, found.output
    assert Path(found.stdout.strip()).name in red_circles


def test_the_advice_for_stale_vectors_of_another_model_names_it(tmp_path, model, other_tiny_model):
    """A plain `index PATH` encodes with the default model only: the advice for another model's
    stale vectors names it (it had looped: the run advised re-encoded nothing)."""
    make_library(tmp_path / "lib", 3)
    runner = CliRunner()
    home = ["--home", str(tmp_path / "home"), "--device", "cpu"]
    for name in (model, other_tiny_model):  # the last one indexed is the default
        assert runner.invoke(app, [*home, "index", str(tmp_path / "lib"), "--model", name]).exit_code == 0
    retrain(model)
    refused = runner.invoke(app, [*home, "query", "a cat", "--model", model])
    advice = f"run `clipsearch index PATH --model {model}` on its folders to re-encode them."
    assert refused.exit_code == 1 and refused.output.strip().endswith(advice)
    followed = runner.invoke(app, [*home, "index", str(tmp_path / "lib"), "--model", model])
    assert followed.exit_code == 0 and "re-encoded 3 images" in followed.output
    assert "new 0, changed 0," in followed.output
    assert runner.invoke(app, [*home, "query", "a cat", "--model", model]).exit_code == 0


def test_vectors_of_a_checkpoint_gone_from_its_path_can_still_be_dropped(tmp_path, model, other_tiny_model):
    """Dropping needs no weights: by the recorded path it works after the checkpoint moved (it
    had said the path was no model, so the vectors could not be forgotten)."""
    make_library(tmp_path / "lib", 3)
    runner = CliRunner()
    home = ["--home", str(tmp_path / "home"), "--device", "cpu"]
    for name in (other_tiny_model, model):  # the moved one is the default
        assert runner.invoke(app, [*home, "index", str(tmp_path / "lib"), "--model", name]).exit_code == 0
    shutil.move(model, tmp_path / "moved")
    refused = runner.invoke(app, [*home, "query", "a cat"])
    assert refused.exit_code == 1
    assert refused.output.strip() == (
        f"Error: The checkpoint {model}, whose vectors this index holds, is gone (moved or deleted): put it "
        f"back, or forget its vectors with `clipsearch models drop {model}`."
    )
    dropped = runner.invoke(app, [*home, "models", "drop", model, "--yes"])
    assert dropped.exit_code == 0, dropped.output
    with Catalog.open(tmp_path / "home") as catalog:
        assert [m.name for m in catalog.models()] == [other_tiny_model]
    assert runner.invoke(app, [*home, "query", "a cat", "--model", other_tiny_model]).exit_code == 0
    unknown = runner.invoke(app, [*home, "models", "drop", str(tmp_path / "never.pt"), "--yes"])
    assert unknown.exit_code == 1 and "is neither a known model nor a checkpoint" in unknown.output


def test_after_new_weights_new_and_changed_files_are_still_told_apart_from_re_encoded_ones(tmp_path, model, encoded):
    """Only the files that had a vector by the earlier weights are counted as re-encoded: a file
    added since is new, one edited since is changed (a re-encode had been reported as 'new')."""
    images = make_library(tmp_path / "lib", 5)
    with open_index(tmp_path / "home", model) as index:
        index.add([tmp_path / "lib"], workers=0)
    retrain(model)
    make_library(tmp_path / "lib", 1, start_seed=50, ext=".jpg")
    make_library(tmp_path / "other", 1, start_seed=60)
    images[0].write_bytes((tmp_path / "other" / "part0" / "img0000.png").read_bytes())  # another size
    encoded.clear()
    with open_index(tmp_path / "home", model) as index:
        report = index.add([tmp_path / "lib"], workers=0)
    assert (report.stale, report.new, report.changed, report.unchanged, sum(encoded)) == (4, 1, 1, 0, 6)
    with open_index(tmp_path / "home", model) as index:
        again = index.add([tmp_path / "lib"], workers=0)
    assert (again.stale, again.new, again.unchanged) == (0, 0, 6)
