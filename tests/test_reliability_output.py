"""What reaches the terminal (issue 18 item 7): control bytes in file names are escaped in human
output (a name holding ``ESC]0;…BEL ESC[2J`` would retitle and clear the terminal, a newline
would break one-failure-a-line), while `--json`, `--paths-only --null` stay exact."""

from __future__ import annotations

import json
import os

import pytest
from helpers import make_image
from typer.testing import CliRunner

from clipsearch.cli import app

HOSTILE = b"\x1b]0;pwned\x07\x1b[2J"  # retitles the terminal, then clears it
RAW_CONTROLS = (b"\x1b", b"\x07", b"\x9b")


@pytest.fixture
def cli(tmp_path, tiny_model):
    runner = CliRunner()

    def run(*args):
        args = [os.fsdecode(a) for a in args]
        if args[0] == "index":
            args += ["--model", tiny_model, "--precision", "fp32", "--workers", "0"]
        return runner.invoke(app, ["--home", str(tmp_path / "home"), *args])

    return run


@pytest.fixture
def hostile_library(tmp_path) -> dict[str, bytes]:
    """Two good images and two broken ones, named with terminal escapes and a newline."""
    lib = os.fsencode(tmp_path / "lib")
    os.makedirs(lib)
    names = {
        "good": os.path.join(lib, b"good" + HOSTILE + b".png"),
        "good-newline": os.path.join(lib, b"two\nlines.png"),
        "bad": os.path.join(lib, b"bad" + HOSTILE + b".jpg"),
        "bad-newline": os.path.join(lib, b"bad\nname\xc2\x9b31m.jpg"),  # a newline and a C1 CSI
    }
    make_image(names["good"], 1)
    make_image(names["good-newline"], 2)
    for key in ("bad", "bad-newline"):
        with open(names[key], "wb") as f:
            f.write(b"not an image\n")
    return names


def assert_escaped(output: bytes) -> None:
    for raw in RAW_CONTROLS:
        assert raw not in output, output
    assert b"\xc2\x9b" not in output, output  # the C1 CSI as UTF-8


def test_status_failed_prints_one_escaped_line_per_failure(cli, tmp_path, hostile_library):
    cli("index", tmp_path / "lib")
    result = cli("status", "--failed")
    assert result.exit_code == 0
    assert_escaped(result.stdout_bytes)
    lines = result.stdout_bytes.splitlines()
    assert len(lines) == 2, lines
    assert any(line.startswith(os.fsencode(tmp_path / "lib") + rb"/bad\x1b]0;pwned\x07\x1b[2J.jpg: ") for line in lines)
    assert any(line.startswith(os.fsencode(tmp_path / "lib") + rb"/bad\nname\x9b31m.jpg: ") for line in lines)


def test_query_escapes_names_for_people_and_keeps_them_exact_for_programs(cli, tmp_path, hostile_library):
    cli("index", tmp_path / "lib")
    good = hostile_library["good"]
    listing = cli("query", os.fsdecode(good), "-k", "2")
    assert listing.exit_code == 0
    assert_escaped(listing.stdout_bytes)
    assert len(listing.stdout_bytes.splitlines()) == 2
    assert rb"good\x1b]0;pwned\x07\x1b[2J.png" in listing.stdout_bytes.splitlines()[0]
    exact = cli("query", os.fsdecode(good), "-k", "1", "--paths-only", "--null")
    assert exact.stdout_bytes == good + b"\0"
    as_json = json.loads(cli("query", os.fsdecode(good), "-k", "2", "--json").stdout_bytes)
    assert sorted(os.fsencode(hit["path"]) for hit in as_json) == sorted(
        [hostile_library["good"], hostile_library["good-newline"]]
    )


def test_index_messages_escape_names(cli, tmp_path):
    missing = os.fsencode(tmp_path) + b"/gone" + HOSTILE
    result = cli("index", missing)
    assert result.exit_code == 1
    assert_escaped(result.stderr_bytes)
    assert result.stderr_bytes.count(b"\n") == 1 and rb"gone\x1b]0;pwned" in result.stderr_bytes


def test_log_messages_escape_names(cli, tmp_path, monkeypatch):
    """A warning about a folder that cannot be listed names it, escaped."""
    folder = os.fsencode(tmp_path / "lib") + b"/sub" + HOSTILE
    os.makedirs(folder)
    make_image(os.path.join(folder, b"a.png"), 3)
    real_scandir = os.scandir

    def refusing(path):
        if path == folder:
            raise PermissionError(13, "Permission denied", path)
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", refusing)
    result = cli("index", tmp_path / "lib")
    assert result.exit_code == 3, result.stderr  # finished, a folder not read
    assert_escaped(result.stderr_bytes)
    assert rb"warning: cannot list " in result.stderr_bytes and rb"sub\x1b]0;pwned" in result.stderr_bytes


def test_status_failed_says_a_non_utf8_name_once(cli, tmp_path):
    """The reason of a file whose name is not UTF-8 had kept its name (escaped otherwise than the
    path before it), so the line said it twice."""
    lib = os.fsencode(tmp_path / "lib")
    os.makedirs(lib)
    with open(os.path.join(lib, b"bad\xff.jpg"), "wb") as f:
        f.write(b"not an image\n")
    cli("index", tmp_path / "lib")
    (failure,) = json.loads(cli("status", "--failed", "--json").stdout)["failed"]
    assert os.fsencode(failure["path"]) == os.path.join(lib, b"bad\xff.jpg")
    assert failure["reason"].startswith("cannot be decoded as an image"), failure
    (line,) = cli("status", "--failed").stdout_bytes.splitlines()
    assert line.startswith(os.path.join(lib, rb"bad\xff.jpg: cannot be decoded as an image")), line
