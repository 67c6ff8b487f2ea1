"""Everyday use as a new user meets it: pipes, usage mistakes, honest messages (issue 11).

These run the installed `clipsearch` script in a real process where the behaviour is about the
process (exit codes, pipes, one-line errors), and the library where it is about the index.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import make_library

from clipsearch import clip
from clipsearch.clip import numpy_text
from clipsearch.index import Index

SCRIPT = str(Path(sys.executable).parent / "clipsearch")


def run(*args: str, home: Path, env: dict[str, str] | None = None, **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, **(env or {}), "CLIPSEARCH_HOME": str(home)}
    return subprocess.run([SCRIPT, *args], env=env, capture_output=True, text=True, timeout=300, **kwargs)


@pytest.fixture
def home(tmp_path, tiny_model) -> Path:
    make_library(tmp_path / "lib", 40)
    home = tmp_path / "home"
    assert run("index", str(tmp_path / "lib"), "--model", tiny_model, home=home).returncode == 0
    return home


def test_a_closed_pipe_ends_quietly_with_141(home, tmp_path):
    (tmp_path / "lib" / "bad.jpg").write_text("not an image")
    run("index", str(tmp_path / "lib"), home=home)
    # --help is written by rich, which had ended with 1 (`clipsearch --help | head` a failure)
    for command in ("query 'a cat' -k 40 --paths-only", "status --failed", "models", "--help", "query --help"):
        # `true` exits without reading: every write clipsearch makes meets a closed pipe.
        shell = f"{SCRIPT} {command} | true; echo ${{PIPESTATUS[0]}}"
        result = subprocess.run(
            ["bash", "-c", shell], env=dict(os.environ, CLIPSEARCH_HOME=str(home)), capture_output=True, text=True
        )
        assert (result.stdout, result.stderr) == ("141\n", ""), (command, result.stderr)


def test_output_cut_short_by_its_reader_is_never_a_success(home, tmp_path):
    """A --json larger than a pipe holds goes out in part when its reader stops early: the rest
    had been dropped with exit 0, so `set -o pipefail` could not tell a cut answer."""
    for n in range(400):
        (tmp_path / "lib" / f"broken-{n:03d}-{'x' * 120}.jpg").write_text("not an image")
    run("index", str(tmp_path / "lib"), home=home)
    whole = run("status", "--failed", "--json", home=home)
    assert whole.returncode == 0 and len(whole.stdout) > 2 * 65536
    shell = f"{SCRIPT} status --failed --json | head -c 1000 >/dev/null; echo ${{PIPESTATUS[0]}}"
    result = subprocess.run(
        ["bash", "-c", shell], env=dict(os.environ, CLIPSEARCH_HOME=str(home)), capture_output=True, text=True
    )
    assert (result.stdout, result.stderr) == ("141\n", "")


@pytest.mark.parametrize("args", [["status"], ["status", "--json"], ["--version"], ["--help"]])
def test_output_that_cannot_be_written_is_one_line_and_exit_1(home, args):
    env = dict(os.environ, CLIPSEARCH_HOME=str(home))
    with open("/dev/full", "w") as full:
        result = subprocess.run([SCRIPT, *args], env=env, stdout=full, stderr=subprocess.PIPE, text=True, timeout=300)
    assert result.returncode == 1
    assert re.fullmatch(r"Error: (cannot write the output: )?No space left on device\n", result.stderr)
    closed = subprocess.run(["bash", "-c", f"{SCRIPT} {' '.join(args)} >&-"], env=env, capture_output=True, text=True)
    assert closed.returncode == 1
    assert closed.stderr == "Error: standard output is closed; redirect it to /dev/null to discard it.\n"


def test_ctrl_c_while_the_cli_starts_is_one_line_and_130(tmp_path):
    """The CLI's imports take a few hundred ms, and a Ctrl-C in them had printed the traceback
    of whichever import it hit. Here the interrupt comes in typer's import, every time."""
    interrupted_import = (
        "import builtins, sys\n"
        "real = builtins.__import__\n"
        "def stopped(name, *args, **kwargs):\n"
        "    if name == 'typer':\n"
        "        raise KeyboardInterrupt\n"
        "    return real(name, *args, **kwargs)\n"
        "builtins.__import__ = stopped\n"
        "from clipsearch.__main__ import main\n"
        "main()\n"
    )
    result = subprocess.run([sys.executable, "-c", interrupted_import, "status"], capture_output=True, text=True)
    assert (result.returncode, result.stderr) == (130, "Interrupted.\n")


def test_clipsearch_alone_prints_its_help_and_no_empty_error(tmp_path):
    result = run(home=tmp_path / "home")
    assert result.returncode == 2 and "Usage: clipsearch" in result.stdout and result.stderr == ""


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--device", "foo", "status"], "'foo' is not a device"),
        (["--device", "cuda", "status"], "this machine has no CUDA GPU"),
        (["index", "x", "--precision", "fp8"], "'fp8' is not one of auto, fp32, bf16, fp16, int8"),
        (["bogus"], "No such command 'bogus'"),
        (["query", "x", "-0"], "it ends each path of --paths-only with NUL; add --paths-only"),
        (["duplicates", "--json", "--paths-only"], "print JSON or paths, not both"),
    ],
)
def test_usage_mistakes_are_one_line_and_exit_2(tmp_path, args, says):
    if "cuda" in args and torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    result = run(*args, home=tmp_path / "home")
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("Error: ") and says in result.stderr
    assert not (tmp_path / "home").exists()


def test_help_shows_the_glob_and_completion_is_offered(tmp_path):
    assert "*.png" in run("index", "--help", home=tmp_path).stdout
    assert "--install-completion" in run("--help", home=tmp_path).stdout


def test_a_missing_image_path_is_an_error_not_a_text(home):
    result = run("query", "/no/such/holiday.png", home=home)
    assert result.returncode == 1 and "looks like an image path, but there is no such file" in result.stderr
    assert run("query", "a photo of /no/such/holiday.png", home=home).returncode == 0


def test_a_named_file_that_is_not_an_image_is_reported(home, tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("not a photo")
    result = run("index", str(notes), home=home)
    assert f"{notes} is not an image file" in result.stderr


def test_missing_files_can_be_listed_and_forgotten(home, tmp_path):
    gone = sorted((tmp_path / "lib").rglob("*.png"))[:3]
    for path in gone:
        path.unlink()
    assert run("index", str(tmp_path / "lib"), home=home).returncode == 0
    assert sorted(run("status", "--missing", home=home).stdout.split()) == sorted(map(str, gone))
    assert "3 missing" in run("status", home=home).stdout
    assert run("remove", "--missing", home=home).stdout == "Removed 3 file(s) from the index.\n"
    assert run("status", "--missing", home=home).stdout == "" and "0 missing" in run("status", home=home).stdout


def test_the_summary_says_where_the_index_is_and_the_encode_rate_apart(tmp_path, tiny_model):
    make_library(tmp_path / "lib", 3)
    result = run("index", str(tmp_path / "lib"), "--model", tiny_model, home=tmp_path / "home")
    assert f"; index: {tmp_path / 'home'}" in result.stdout
    assert "model loaded in" in result.stdout


def test_read_only_commands_create_nothing(tmp_path):
    for args in (["status"], ["query", "x"], ["remove", "x"], ["rebuild"]):
        result = run(*args, home=tmp_path / "home")
        assert result.returncode == 1 and "There is no index" in result.stderr
    assert not (tmp_path / "home").exists()


def test_a_failed_first_run_fixes_no_model(tmp_path, tiny_model):
    make_library(tmp_path / "lib", 2)
    home = tmp_path / "home"
    assert run("index", str(tmp_path / "lib"), "--model", str(tmp_path / "garbage.pt"), home=home).returncode == 1
    assert run("index", str(tmp_path / "lib"), "--model", tiny_model, home=home).returncode == 0
    with Index.open(home, readonly=True) as index:
        assert index.model == tiny_model and [m.name for m in index.status().models] == [tiny_model]


def test_the_first_run_prepares_the_text_tower_for_queries(tmp_path, tiny_model):
    make_library(tmp_path / "lib", 2)
    assert numpy_text.load_cached(tiny_model) is None
    with Index.open(tmp_path / "home", model=tiny_model) as index:
        index.add([tmp_path / "lib"], workers=0)
    assert numpy_text.load_cached(tiny_model) is not None


def test_token_ids_outside_a_models_vocabulary_are_refused_with_advice(tiny_model):
    model, _ = clip.load(tiny_model, device="cpu")
    with pytest.raises(ValueError, match=r"outside this model's vocabulary of 514.*model\.tokenizer"):
        model.encode_text(clip.tokenize(["a dog"]))
    assert model.encode_text(model.tokenizer(["a dog"])).shape == (1, 32)


def test_a_query_longer_than_the_model_reads_says_its_end_was_ignored(home):
    long = " ".join(["a red circle beside a blue square"] * 12)
    result = run("query", long, "-k", "1", home=home)
    assert result.returncode == 0 and result.stdout.count("\n") == 1
    assert "is longer than the model's" in result.stderr and "the end was ignored" in result.stderr
    short = run("query", "a red circle", "-k", "1", home=home)
    assert short.returncode == 0 and short.stderr == ""


@pytest.mark.parametrize(
    ("keys", "code", "says"),
    [
        (b"n\n", 1, "Error: Nothing dropped."),  # had been exit 1 and not a word
        (b"\x04", 1, "Error: Nothing dropped."),  # Ctrl-D, the end of input: had been 130, Ctrl-C's
        (b"\x03", 130, "Interrupted."),
        (b"y\n", 0, "Dropped the vectors by"),
    ],
)
def test_models_drop_answers_its_question_in_a_terminal(home, tiny_model, keys, code, says):
    import pty

    pid, terminal = pty.fork()
    if pid == 0:  # the child: clipsearch with the pty as its terminal
        os.environ["CLIPSEARCH_HOME"] = str(home)
        os.execv(SCRIPT, [SCRIPT, "models", "drop", tiny_model])
    said = b""
    while b"[y/N]" not in said:
        said += os.read(terminal, 4096)
    os.write(terminal, keys)
    while True:
        try:
            chunk = os.read(terminal, 4096)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        said += chunk
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == code, said
    assert says in said.decode()
    held = json.loads(run("status", "--json", home=home).stdout)["models"]
    assert len(held) == (0 if code == 0 else 1)


@pytest.mark.parametrize("setting", ["abc", "nan", "0", "-1"])
def test_a_decode_budget_that_is_none_is_refused(tmp_path, setting, monkeypatch):
    """ "abc" had been ignored, "nan" had lifted the limit, "0" had failed every file."""
    from clipsearch.clip.preprocess import DEFAULT_MAX_MEGAPIXELS, max_megapixels

    result = run("status", home=tmp_path / "home", env={"CLIPSEARCH_MAX_MEGAPIXELS": setting})
    assert result.returncode == 2
    assert result.stderr.startswith("Error: Invalid value for CLIPSEARCH_MAX_MEGAPIXELS: ")
    assert f"'{setting}' is not a number of megapixels above 0" in result.stderr
    monkeypatch.setenv("CLIPSEARCH_MAX_MEGAPIXELS", setting)
    assert max_megapixels() == DEFAULT_MAX_MEGAPIXELS  # the library's: the default, as when unset


def test_query_help_shows_each_example_on_a_line_of_its_own(tmp_path):
    """They had run together, joined by commas that a pasted example then carried."""
    shown = [line.strip(" •│") for line in run("query", "--help", home=tmp_path).stdout.splitlines()]
    assert "clipsearch query --like holiday.jpg" in shown
    assert "clipsearch query --after 2024 --sort date" in shown
