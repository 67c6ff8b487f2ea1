"""The `clipsearch` command end to end: typer's CliRunner for most, a real process where
signals and exit codes of the script itself matter."""

import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from helpers import faiss_file, make_image, make_library
from reliability_helpers import cli_command, indexed_count, run_cli, start_cli, wait_until
from typer.testing import CliRunner

from clipsearch import __version__, clip
from clipsearch.cli import _stop_on_signals, app

SUMMARY = re.compile(
    r"new (\d+), changed (\d+), moved (\d+), copied (\d+), removed (\d+), failed (\d+), unchanged (\d+)"
    r" in [\d.]+ s \([\d.]+ images/s[^)]*\); index: "
)


@pytest.fixture
def cli(tmp_path):
    runner = CliRunner()
    home = str(tmp_path / "home")

    def run(*args, code=0):
        result = runner.invoke(app, ["--home", home, *map(str, args)])
        assert result.exit_code == code, (result.exit_code, result.output, result.exception)
        return result

    return run


@pytest.fixture
def library(tmp_path, cli, tiny_model):
    images = make_library(tmp_path / "lib", 8)
    (tmp_path / "lib" / "bad.jpg").write_text("not an image at all")
    cli("index", tmp_path / "lib", "--model", tiny_model, "--workers", "0", code=3)
    return images


def summary(result):
    return tuple(int(n) for n in SUMMARY.search(result.stdout).groups())


def test_index_prints_a_summary_and_reruns_do_nothing(tmp_path, cli, tiny_model):
    make_library(tmp_path / "lib", 5)
    (tmp_path / "lib" / "bad.jpg").write_text("nope")
    first = cli("index", tmp_path / "lib", "--model", tiny_model, "--workers", "0", code=3)
    assert summary(first) == (5, 0, 0, 0, 0, 1, 0)
    assert "status --failed" in first.stdout
    assert summary(cli("index", tmp_path / "lib")) == (0, 0, 0, 0, 0, 0, 6)


def test_a_models_first_run_says_before_it_measures_this_cpu(tmp_path, cli, tiny_model):
    from clipsearch.clip.cpu import candidate_precisions

    if len(candidate_precisions("cpu", image_tower=True)) == 1:
        pytest.skip("one candidate precision here: nothing to measure")
    make_library(tmp_path / "lib", 3)
    first = cli("index", tmp_path / "lib", "--model", tiny_model, "--workers", "0")
    notice = f"Measuring which precision runs {tiny_model} fastest on this CPU (once per model and machine"
    assert first.stderr.startswith(notice) and "info:" not in first.stderr
    other_home = CliRunner().invoke(
        app,
        ["--home", str(tmp_path / "other"), "index", str(tmp_path / "lib"), "--model", tiny_model, "--workers", "0"],
    )
    assert other_home.exit_code == 0 and "Measuring" not in other_home.stderr  # remembered on this machine


def test_index_json_says_what_the_summary_says(tmp_path, cli, tiny_model):
    make_library(tmp_path / "lib", 5)
    (tmp_path / "lib" / "bad.jpg").write_text("nope")
    first = json.loads(cli("index", tmp_path / "lib", "--model", tiny_model, "--workers", "0", "--json", code=3).stdout)
    assert {k: first[k] for k in ("new", "changed", "moved", "copied", "removed", "failed", "unchanged")} == dict(
        new=5, changed=0, moved=0, copied=0, removed=0, failed=1, unchanged=0
    )
    assert (first["home"], first["model"], first["interrupted"]) == (str(tmp_path / "home"), tiny_model, False)
    assert first["images_per_s"] > 0 and first["elapsed"] >= first["model_load_s"] > 0
    again = json.loads(cli("index", tmp_path / "lib", "--json").stdout)
    assert (again["unchanged"], again["new"], again["model_load_s"]) == (6, 0, 0)


def test_query_prints_scores_and_paths_best_first(cli, library):
    lines = cli("query", library[2], "-k", "3").stdout.splitlines()
    assert len(lines) == 3
    scores = [float(line.split("  ", 1)[0]) for line in lines]
    assert lines[0].split("  ", 1)[1] == str(library[2]) and scores[0] == pytest.approx(1, abs=2e-3)
    assert scores == sorted(scores, reverse=True)


def test_query_json(cli, library):
    rows = json.loads(cli("query", "a red circle", "--json", "-k", "4").stdout)
    assert len(rows) == 4 and set(rows[0]) == {"id", "path", "score", "width", "height", "mtime", "size"} | {
        "taken",
        "camera_make",
        "camera_model",
        "lens",
        "latitude",
        "longitude",
        "orientation",
        "format",
    }
    assert {r["path"] for r in rows} <= {str(p) for p in library}
    assert (rows[0]["width"], rows[0]["height"]) == (48, 40)
    assert [r["score"] for r in rows] == sorted((r["score"] for r in rows), reverse=True)


def test_query_paths_only_and_null(cli, library):
    paths = cli("query", library[0], "--paths-only", "-k", "8").stdout.splitlines()
    assert paths[0] == str(library[0]) and sorted(paths) == sorted(map(str, library))
    raw = cli("query", library[0], "--paths-only", "--null", "-k", "2").stdout_bytes
    assert raw.endswith(b"\0") and raw.split(b"\0")[0] == os.fsencode(library[0])


def test_query_under_and_min_score(cli, library, tmp_path):
    paths = cli("query", "x", "--paths-only", "--under", tmp_path / "lib" / "part1").stdout.splitlines()
    assert len(paths) == 4 and all("/part1/" in p for p in paths)
    rows = json.loads(cli("query", library[0], "--json", "--min-score", "0.999").stdout)
    assert [r["path"] for r in rows] == [str(library[0])]


def test_combined_query_matches_the_library(cli, library, tmp_path):
    from clipsearch import Index

    terms = ["a dog", "--add", f"0.5:{library[1]}", "--subtract", "people", "--add", "at night"]
    paths = cli("query", *terms, "--paths-only").stdout.splitlines()
    with Index.open(tmp_path / "home", readonly=True) as index:
        expected = index.search([(1, "a dog"), (0.5, library[1]), (-1, "people"), (1, "at night")])
    assert paths == [str(h.path) for h in expected]


def test_odd_file_names_survive_every_output_format(tmp_path, cli, tiny_model):
    folder = os.fsencode(tmp_path / "odd")
    name = os.path.join(folder, b"caf\xe9 one\ntwo.png")
    make_image(name, seed=5)
    make_image(os.path.join(folder, b"plain.png"), seed=6)
    cli("index", tmp_path / "odd", "--model", tiny_model)
    raw = cli("query", os.fsdecode(name), "--paths-only", "-0", "-k", "1").stdout_bytes
    assert raw == name + b"\0"
    (row,) = json.loads(cli("query", os.fsdecode(name), "--json", "-k", "1").stdout)
    assert os.fsencode(row["path"]) == name


def test_status_and_failed(cli, library, tmp_path, tiny_model):
    out = cli("status").stdout
    assert f"Models:   {tiny_model} (32-d): 8 of 8 images, default" in out
    assert "8 indexed, 1 failed, 0 missing" in out and "consistent with the catalog" in out
    failed = cli("status", "--failed").stdout
    assert failed.startswith(f"{tmp_path / 'lib' / 'bad.jpg'}: ") and "cannot be decoded" in failed


def test_status_after_the_last_models_vectors_are_dropped(cli, library, tiny_model):
    result = cli("models", "drop", tiny_model, code=2)  # stdin is no terminal: nobody to ask
    said = " ".join(re.sub("[│╭╮╰╯─]", " ", result.stderr).split())  # as rich boxed and wrapped it
    assert "Invalid value for --yes: drop asks before it forgets vectors; pass it to drop them" in said
    assert f"Models:   {tiny_model} (32-d): 8 of 8 images" in cli("status").stdout  # nothing dropped
    assert cli("models", "drop", tiny_model, "--yes").stdout.startswith(f"Dropped the vectors by {tiny_model}")
    lines = cli("status").stdout.splitlines()
    assert lines[2] == "Models:   none yet (run `clipsearch index PATH`)"
    assert lines[3].startswith("Vectors:  ") and lines[3].endswith(": none yet")  # not "0 in a none index"


def test_status_json_says_what_the_text_says(cli, library, tmp_path, tiny_model):
    library[0].unlink()
    cli("index", tmp_path / "lib")  # bad.jpg is still failed (not tried again), the deleted one missing
    status = json.loads(cli("status", "--json").stdout)
    assert status["counts"] == {"indexed": 7, "failed": 1, "missing": 1} and status["consistent"] is True
    assert status["models"] == [{"name": tiny_model, "dim": 32, "vectors": 7, "default": True}]
    assert (status["home"], status["index_type"], status["vectors_in_index"]) == (str(tmp_path / "home"), "Flat", 7)
    assert "checks" not in status
    checked = json.loads(cli("status", "--json", "--check").stdout)["checks"]
    assert checked == [{"model": tiny_model, "vectors": 7, "problems": []}]
    lists = json.loads(cli("status", "--json", "--failed", "--missing").stdout)
    assert [f["path"] for f in lists["failed"]] == [str(tmp_path / "lib" / "bad.jpg")]
    assert lists["failed"][0]["reason"].startswith("cannot be decoded")  # the path is said once, as the path
    assert lists["missing"] == [str(library[0])]
    assert json.loads(cli("status", "--json", "--missing").stdout) == {"missing": [str(library[0])]}
    cli("status", "--json", "--check", "--failed", code=2)  # it had ignored --check


def test_deleting_files_and_rerunning(cli, library, tmp_path):
    library[0].unlink()
    assert summary(cli("index", tmp_path / "lib"))[4] == 1
    assert "7 indexed, 1 failed, 1 missing" in cli("status").stdout
    assert str(library[0]) not in cli("query", "x", "--paths-only", "-k", "20").stdout


def test_remove_and_rebuild(cli, library, tmp_path):
    assert cli("remove", tmp_path / "lib" / "part0").stdout.strip() == "Removed 4 file(s) from the index."
    out = cli("rebuild", "--index-type", "Flat").stdout
    assert "4 in the index (Flat), consistent" in out
    assert len(cli("query", "x", "--paths-only").stdout.splitlines()) == 4


def test_rebuild_refuses_index_types_it_does_not_search(cli, library, tmp_path):
    """FAISS's factory builds these, and each had gone wrong after it: a crash (HNSW1: signal
    11, nothing said), scores that are no cosine (PCA), no vector kept (SQ0), a failed build
    reported as a bug (IDMap, NSG)."""
    for bad in ("HNSW1", "HNSW0", "PCA64,Flat", "SQ0", "IVF4,SQ0", "IDMap,Flat", "NSG0", "IVF0,Flat"):
        cli("rebuild", "--index-type", bad, code=2)
    result = run_cli("--home", tmp_path / "home", "rebuild", "--index-type", "HNSW1")
    assert result.returncode == 2 and result.stderr.count(b"\n") == 1, result.stderr
    assert b"Invalid value for '--index-type': 'HNSW1' is not an index type clipsearch searches" in result.stderr
    assert "in the index (Flat)" in cli("status").stdout  # nothing remembered, nothing rebuilt
    assert "8 in the index (HNSW2, recall@10 1.000), consistent" in cli("rebuild", "--index-type", "HNSW2").stdout
    scores = [float(line.split()[0]) for line in cli("query", "x", "-k", "3").stdout.splitlines()]
    assert len(scores) == 3 and all(-1 <= s <= 1 for s in scores)


def test_a_rebuild_that_cannot_save_its_file_fails(cli, library, tmp_path):
    """It had warned and exited 0, and status --check then sent the user back to rebuild."""
    (file,) = (tmp_path / "home").glob("vectors-*.faiss")
    file.unlink()
    file.mkdir()  # in the file's place: nothing can replace it
    result = run_cli("--home", tmp_path / "home", "rebuild")
    assert result.returncode == 1 and result.stderr.count(b"\n") == 1, result.stderr
    assert b"Could not save the vector index" in result.stderr and f"move the folder {file}".encode() in result.stderr
    file.rmdir()
    assert "consistent with the catalog" in cli("rebuild").stdout and file.is_file()


def test_a_folder_that_cannot_be_read_makes_the_run_exit_3(cli, tmp_path, tiny_model):
    make_library(tmp_path / "lib", 2)
    (tmp_path / "lib" / "self").symlink_to("self")
    result = cli("index", tmp_path / "lib", "--model", tiny_model, "--workers", "0", "--follow-symlinks", code=3)
    assert summary(result)[0] == 2 and "1 folder(s) could not be read" in result.stdout


def test_an_emptied_root_is_taken_for_an_unmounted_drive(cli, tmp_path, tiny_model):
    """Its files had been marked missing and their vectors dropped, so that mounting the drive
    again re-encoded every one; an emptied subfolder is still a deletion."""
    images = make_library(tmp_path / "drive", 6)
    cli("index", tmp_path / "drive", "--model", tiny_model, "--workers", "0")
    shutil.move(tmp_path / "drive", tmp_path / "unplugged")
    (tmp_path / "drive").mkdir()
    result = cli("index", tmp_path / "drive", code=3)
    assert summary(result) == (0, 0, 0, 0, 0, 0, 0) and "1 folder(s) could not be read" in result.stdout
    assert "is empty, but 6 file(s) under it are indexed; they are kept as they are" in result.stderr
    assert "6 indexed, 0 failed, 0 missing" in cli("status").stdout
    (tmp_path / "drive").rmdir()
    shutil.move(tmp_path / "unplugged", tmp_path / "drive")
    assert summary(cli("index", tmp_path / "drive")) == (0, 0, 0, 0, 0, 0, 6)  # nothing encoded again
    for image in images:  # part0, emptied
        if image.parent.name == "part0":
            image.unlink()
    assert summary(cli("index", tmp_path / "drive")) == (0, 0, 0, 0, 3, 0, 3)


def test_a_query_after_every_models_vectors_were_dropped_says_so(cli, library, tiny_model, tmp_path):
    cli("models", "drop", tiny_model, "-y")
    result = cli("query", "x", code=1)
    assert "holds images but no vectors by any model; index them with one" in result.output
    assert len(cli("query", "--after", "1900", "--paths-only").stdout.splitlines()) == 0  # listing needs none
    assert "8 indexed" in cli("status").stdout


def test_status_during_an_index_run_says_it_is_catching_up(cli, library, tmp_path, monkeypatch):
    """It had said "NOT consistent (run `clipsearch rebuild`)", which the run's lock refuses, and
    --check exited 1 over the lag every run has until it ends."""
    from clipsearch.catalog import Catalog
    from clipsearch.index import Status

    # What a batch committed between status's two reads (the vector file, the counts) shows.
    monkeypatch.setattr(Status, "consistent", property(lambda self: False))
    assert "NOT consistent with the catalog (run `clipsearch rebuild`)" in cli("status").stdout  # no run: damage
    with Catalog.open(tmp_path / "home") as catalog, catalog.writer_lock():
        status = cli("status").stdout
        assert "catching up with an index run going on now" in status and "NOT consistent" not in status
        assert json.loads(cli("status", "--json").stdout)["indexing"] is True
        assert "An index run is writing" in cli("status", "--check", code=1).output
    assert json.loads(cli("status", "--json").stdout)["indexing"] is False


def test_a_deleted_faiss_file_is_rebuilt_with_a_warning(cli, library, tmp_path):
    faiss_file(tmp_path / "home").unlink()
    result = cli("query", library[3], "--paths-only", "-k", "1")
    assert result.stdout.strip() == str(library[3])
    assert "warning: Rebuilding the vector index" in result.stderr


def test_library_logs_after_a_command_reach_the_current_stderr(cli, library, capsys):
    """CliRunner closes the stderr it lent the command; the CLI's log handler must not keep it."""
    assert "Logging error" not in cli("status").stderr
    logging.getLogger("clipsearch.test").warning("after the command")
    assert capsys.readouterr().err == "warning: after the command\n"


def test_errors_are_one_line_with_exit_1(cli, library, tmp_path, other_tiny_model):
    unknown = cli("query", "x", "--model", other_tiny_model, code=1)
    assert unknown.stderr.startswith("Error: The index in") and unknown.stderr.count("\n") == 1
    assert "has no vectors by" in unknown.stderr and "Traceback" not in unknown.output
    missing = cli("index", tmp_path / "nowhere", code=1)
    assert "does not exist" in missing.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["   "], "A text of the query is empty"),
        (["a dog", "--add", ""], "A text of the query is empty"),
        (["a dog", "--add", "nan:a cat"], "A weight of the query is nan"),
        (["a dog", "--subtract", "inf:a cat"], "A weight of the query is -inf"),
    ],
)
def test_a_blank_text_or_a_weight_that_is_no_number_is_an_error_not_a_ranking(cli, library, args, message):
    result = cli("query", *args, code=1)
    assert result.stdout == "" and result.stderr.startswith(f"Error: {message}") and result.stderr.count("\n") == 1


def test_no_index_yet(tmp_path):
    result = CliRunner().invoke(app, ["--home", str(tmp_path / "none"), "query", "x"])
    assert result.exit_code == 1 and result.stderr.startswith("Error: ") and result.stderr.count("\n") == 1


def test_empty_index_says_no_matches(cli, tiny_model, tmp_path):
    (tmp_path / "empty").mkdir()
    cli("index", tmp_path / "empty", "--model", tiny_model)
    result = cli("query", "anything")
    assert result.stdout == "" and "No matches" in result.stderr
    assert json.loads(cli("query", "anything", "--json").stdout) == []


def test_quiet_turns_every_progress_bar_off(cli, library, monkeypatch):
    """A model's download bar too, which the library draws: tqdm's own switch is set for it."""
    monkeypatch.setenv("TQDM_DISABLE", "0")  # put back as it was after the test
    cli("-q", "status")
    assert os.environ["TQDM_DISABLE"] == "1"


def test_usage_errors_exit_2(cli, library):
    assert "give TEXT, --like IMAGE, or a filter" in cli("query", code=2).stderr
    assert "'--min-score'" in cli("query", "x", "--min-score", "2", code=2).stderr  # a cosine is at most 1
    assert "--labels" in cli("classify", library[0], "--labels", "dog", code=2).stderr
    assert "'dog' is given twice" in cli("classify", library[0], "--labels", "dog,cat,dog", code=2).stderr
    for template in ("{} {}", "a {x}", "a {", "shape", "{0.real}", "{{}}"):  # errors "as a bug", or one prompt
        assert (
            "must hold {} once" in cli("classify", library[0], "--labels", "a,b", "--template", template, code=2).stderr
        )
    cli("query", "x", "--top", "0", code=2)


def test_classify_prints_a_probability_per_label(cli, library):
    lines = cli("classify", library[0], library[1], "--labels", "dog, cat,diagram").stdout.splitlines()
    assert lines[0] == str(library[0]) and lines[4] == str(library[1])
    probabilities = [float(line.split()[-1]) for line in lines[1:4]]
    assert [line.split()[0] for line in lines[1:4]] == ["dog", "cat", "diagram"]
    assert sum(probabilities) == pytest.approx(1, abs=1e-3)


def test_classify_json_holds_what_the_text_shows(cli, library, tmp_path):
    text = cli("classify", library[0], "--labels", "dog,cat").stdout.splitlines()
    shown = {line.split()[0]: float(line.split()[1]) for line in text[1:]}
    result = cli("classify", library[0], tmp_path / "gone.jpg", "--labels", "dog,cat", "--json", code=3)
    (found,) = json.loads(result.stdout)
    assert found["path"] == str(library[0]) and list(found["labels"]) == ["dog", "cat"]
    assert {k: round(v, 4) for k, v in found["labels"].items()} == shown
    assert "\nerror: Cannot classify" in "\n" + result.stderr


def test_classify_says_which_images_it_cannot_read_and_classifies_the_others(cli, library, tmp_path):
    missing, bad = tmp_path / "gone.jpg", tmp_path / "lib" / "bad.jpg"
    result = cli("classify", missing, library[0], bad, library[1], "--labels", "dog,cat", code=3)
    assert [line for line in result.stdout.splitlines() if not line.startswith(" ")] == [
        str(library[0]),
        str(library[1]),
    ]
    errors = [line for line in result.stderr.splitlines() if not line.startswith("Measuring ")]  # a first run's notice
    assert [e.split(":")[0] for e in errors] == ["error", "error"]
    assert errors[0].startswith(f"error: Cannot classify {missing}: ") and "No such file" in errors[0]
    assert errors[1].startswith(f"error: Cannot classify {bad}: ") and "cannot be decoded" in errors[1]


def test_version_models_and_help():
    runner = CliRunner()
    assert runner.invoke(app, ["--version"]).stdout.strip() == f"clipsearch {__version__}"
    models = {
        row[0]: row[1:]
        for row in (re.split(r"\s{2,}", line) for line in runner.invoke(app, ["models"]).stdout.splitlines())
    }
    assert models["model"] == ["dim", "px", "Mparams", "IN1k", "COCO", "where", "from"]
    assert models["demo"][-2] == "bundled" and models["ViT-B/32"][-2] == "-"
    assert models["ViT-B-32-256/datacomp_s34b_b86k (default)"][:5] == ["512", "256", "151", "72.81", "39.93"]
    assert models["ViT-B/32"][:5] == ["512", "224", "151", "63.32", "30.44"]
    help_text = runner.invoke(app, ["--help"]).stdout
    for command in ("index", "query", "classify", "status", "remove", "rebuild", "models"):
        assert command in help_text


def test_models_json_lists_what_the_table_does():
    listed = {m["name"]: m for m in json.loads(CliRunner().invoke(app, ["models", "--json"]).stdout)}
    assert list(listed) == clip.available_models()
    assert [name for name, m in listed.items() if m["default"]] == ["ViT-B-32-256/datacomp_s34b_b86k"]
    vit = listed["ViT-B/32"]
    assert (vit["embed_dim"], vit["image_size"], vit["imagenet"], vit["coco_r1"]) == (512, 224, 63.32, 30.44)
    assert vit["path"] is None and vit["source"].startswith("https://openaipublic.azureedge.net/clip/models/")
    demo = listed["demo"]
    assert demo["cache"] == "bundled" and Path(demo["path"]).is_dir() and demo["imagenet"] is None
    assert listed["ViT-B-16-SigLIP2"]["family"] == "siglip"
    assert {len(m) for m in listed.values()} == {len(vit)}  # the same keys for every model


def test_models_marks_the_index_s_own_default(tmp_path):
    from clipsearch.catalog import Catalog

    runner, home = CliRunner(), str(tmp_path / "home")
    with Catalog.open(home, create=True) as catalog:
        catalog.set_meta("default_model", "ViT-B/32")  # as `models default ViT-B/32` leaves it
    table = runner.invoke(app, ["--home", home, "models"]).stdout
    assert re.search(r"^ViT-B/32 \(default\) ", table, re.M) and table.count("(default)") == 1
    listed = json.loads(runner.invoke(app, ["--home", home, "models", "--json"]).stdout)
    assert [m["name"] for m in listed if m["default"]] == ["ViT-B/32"]


def test_models_lists_the_checkpoints_the_index_holds_vectors_by(cli, library, tiny_model):
    """A checkpoint given by path had never been listed, nor marked the default."""
    table = cli("models").stdout.splitlines()
    assert table[-1].split() == [tiny_model, "(default)", "32", "-", "-", "-", "-", "on", "disk", "checkpoint"]
    listed = json.loads(cli("models", "--json").stdout)
    mine = listed[-1]
    assert (mine["name"], mine["default"], mine["embed_dim"], mine["path"]) == (tiny_model, True, 32, tiny_model)
    assert mine["source"] == "checkpoint" and len(mine) == len(listed[0])
    assert [m["name"] for m in listed if m["default"]] == [tiny_model]


def test_a_mistyped_under_is_a_usage_error_but_a_gone_indexed_folder_is_not(cli, library, tmp_path):
    for command in (["query", "x"], ["duplicates"]):
        result = cli(*command, "--under", tmp_path / "lbi", code=2)  # had been "No matches.", exit 0
        said = " ".join(re.sub("[│╭╮╰╯─]", " ", result.stderr).split())
        assert f"--under: {tmp_path / 'lbi'} does not exist, and nothing indexed lies under it" in said
    shutil.move(tmp_path / "lib", tmp_path / "elsewhere")  # as an unmounted drive: its files stay indexed
    found = cli("query", "x", "--under", tmp_path / "lib")
    assert (found.stdout, found.stderr) == ("", "No matches.\n")


def test_an_empty_or_file_home_is_refused_by_every_command(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    result = runner.invoke(app, ["--home", "", "status"])
    assert result.exit_code == 2 and "'--home': is empty" in result.stderr
    (tmp_path / "a file").write_text("not a folder")
    for args in (["status"], ["query", "x"], ["index", str(tmp_path)], ["rebuild"]):
        result = runner.invoke(app, ["--home", str(tmp_path / "a file"), *args])
        assert result.exit_code == 1, (args, result.output)
        assert result.stderr == f"Error: {tmp_path / 'a file'} is a file, not an index folder; choose another --home.\n"
    result = runner.invoke(app, ["--home", str(tmp_path / "a file" / "sub"), "status"])
    assert result.stderr == f"Error: {tmp_path / 'a file'} is a file, not an index folder; choose another --home.\n"
    result = runner.invoke(app, ["status"], env={"CLIPSEARCH_HOME": " ", "XDG_DATA_HOME": str(tmp_path / "data")})
    assert result.stderr.startswith(f"Error: There is no index in {tmp_path / 'data' / 'clipsearch'};")  # unset
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a file"]  # no index in the current folder


def test_cli_import_is_light():
    code = "import sys, clipsearch.cli; print(sorted({'torch', 'faiss', 'sqlalchemy', 'numpy'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# Never needed to index local folders: each costs a first index start-up time (issue 16).
NOT_FOR_INDEXING = {"alembic", "transformers", "huggingface_hub", "pandas", "pyarrow", "ray", "open_clip", "onnx"}


def modules_of_cli_run(*args: str | os.PathLike) -> tuple[set[str], str]:
    """(top-level modules imported, stdout) of one `clipsearch` run in a fresh interpreter."""
    code = (
        "import atexit, sys\n"
        "atexit.register(lambda: print('MODULES', *sorted({m.split('.')[0] for m in sys.modules}), file=sys.stderr))\n"
        f"sys.argv = ['clipsearch', *{[str(arg) for arg in args]!r}]\n"
        "from clipsearch.cli import main\n"
        "main()\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("MODULES ")]
    return set(line.split()[1:]), result.stdout


def test_index_help_imports_nothing_heavy():
    modules, out = modules_of_cli_run("index", "--help")
    assert "--model" in out
    assert not modules & (NOT_FOR_INDEXING | {"torch", "numpy", "sqlalchemy", "faiss", "PIL"})


def test_a_first_index_imports_only_what_it_uses(tmp_path, tiny_model):
    make_library(tmp_path / "lib", 3)
    args = ["--home", tmp_path / "home", "index", tmp_path / "lib", "--model", tiny_model, "--workers", "0"]
    modules, out = modules_of_cli_run(*args, "--precision", "fp32")
    assert "new 3" in out
    assert {"torch", "sqlalchemy", "PIL"} <= modules  # the run did load the model and write the catalog
    assert not modules & NOT_FOR_INDEXING


@pytest.mark.slow
def test_ctrl_c_commits_what_is_done_and_exits_130(tmp_path, tiny_model):
    make_library(tmp_path / "lib", 150)
    home = tmp_path / "home"
    args = ["--home", home, "index", tmp_path / "lib", "--model", tiny_model, "--workers", "0", "--batch-size", "2"]
    # Each batch takes 50 ms, as a real model's would: the signal lands mid-run, not after it.
    process = start_cli(*args, "--precision", "fp32", encode_delay_s=0.05)
    deadline = time.monotonic() + 120
    while indexed_count(home) == 0 and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    stdout, stderr = (out.decode() for out in process.communicate(timeout=60))
    assert process.returncode == 130, stderr
    assert "run the same command again" in stderr
    done = indexed_count(home)
    assert 0 < done < 150 and summary_counts(stdout)[0] == done
    command = cli_command(*args)
    rerun = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0 and summary_counts(rerun.stdout)[:1] == (150 - done,)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_before_anything_is_finished_stops_at_once(tmp_path, tiny_model, signum):
    """Nothing to commit yet (the walk, a model's first download, the first batch): the first
    Ctrl-C had said "Stopping after the current batch" and let a download run to its end."""
    make_library(tmp_path / "lib", 6)
    home = tmp_path / "home"
    args = ["--home", home, "index", tmp_path / "lib", "--model", tiny_model, "--workers", "0"]
    process = start_cli(*args, "--precision", "fp32", load_delay_s=60)
    try:
        assert wait_until(lambda: (home / "catalog.db").exists(), timeout=60, poll=0.05, process=process)
        time.sleep(1.0)  # past opening the index, into loading the model (60 s)
        process.send_signal(signum)
        sent = time.monotonic()
        stderr = process.communicate(timeout=30)[1].decode()
    finally:
        process.kill()
    assert time.monotonic() - sent < 15, stderr  # not the load's 60 s
    assert process.returncode == 128 + signum, stderr
    assert stderr.strip().splitlines()[-1] == "Interrupted." and "Stopping after" not in stderr
    assert indexed_count(home) == 0


def test_a_ctrl_c_after_the_run_stopped_cannot_kill_the_exit():
    """The run can finish its batch before a second Ctrl-C lands; from then on the command only
    reports and exits 130, and a SIGINT raised in interpreter shutdown would end it by signal."""
    stop = threading.Event()
    before, before_term = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    try:
        with _stop_on_signals(stop):
            os.kill(os.getpid(), signal.SIGINT)  # the first Ctrl-C: asks the run to stop
            deadline = time.monotonic() + 5
            while not stop.is_set() and time.monotonic() < deadline:
                time.sleep(0.01)
        assert stop.is_set()
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, before)
        signal.signal(signal.SIGTERM, before_term)
    with _stop_on_signals(threading.Event()):
        pass
    assert signal.getsignal(signal.SIGINT) is before  # a run nobody stopped restores the handler


def summary_counts(text):
    return tuple(int(n) for n in SUMMARY.search(text).groups())


def test_index_progress_shows_a_bar_for_verifying_then_one_for_encoding(monkeypatch):
    import io

    from clipsearch import cli

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    err = Terminal()
    monkeypatch.setattr("sys.stderr", err)
    with cli._progress_bar() as progress:
        progress.verify(256, 300)
        progress.verify(300, 300)
        progress(0, 2)
        progress(2, 2)
    verifying, encoding, after = err.getvalue().split("\n")
    assert "verifying: 100%" in verifying and "300/300" in verifying and "file/s" in verifying
    assert "2/2" in encoding and "img/s" in encoding and "verifying" not in encoding and after == ""


@pytest.mark.parametrize(
    "setup, quick",
    [
        ("import torch", True),  # the interpreter's teardown of torch is skipped
        ("", False),  # nothing to save: a plain exit
        # a thread still running is waited for, as a plain exit would
        ("import torch, threading; threading.Thread(target=LATE_PRINT).start()", False),
    ],
)
def test_exit_after_torch_runs_the_exit_handlers_and_keeps_the_code_and_output(setup, quick):
    import subprocess
    import sys

    script = (
        "import atexit, sys, time\n"
        "LATE_PRINT = lambda: (time.sleep(0.3), print('thread done'))\n"
        f"{setup}\n"
        "from clipsearch.cli import exit_now\n"
        "class Teardown:\n"
        "    def __del__(self): print('torn down')\n"  # runs only in the interpreter's teardown
        "kept = Teardown()\n"
        "atexit.register(lambda: print('handler ran'))\n"
        "sys.stdout.write('unflushed output ')\n"
        "exit_now(3)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert (done.returncode, done.stderr) == (3, "")
    assert done.stdout.startswith("unflushed output") and "handler ran" in done.stdout
    assert ("torn down" in done.stdout) == (not quick)
    assert ("thread done" in done.stdout) == ("threading" in setup)


def test_dropping_a_model_leaves_none_of_its_files(cli, library, tiny_model, tmp_path):
    cli("status", "--check")  # records the vector file as checked
    assert sorted(p.suffix for p in (tmp_path / "home").glob("vectors-*")) == [".checked", ".faiss"]
    cli("models", "drop", tiny_model, "--yes")
    assert list((tmp_path / "home").glob("vectors-*")) == []  # the .checked record had stayed
