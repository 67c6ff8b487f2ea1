"""Security: weights are never unpickled as arbitrary objects, SQL only ever carries values as
bound parameters, and file paths from the catalog are opened, never handed to a shell.

The runtime tests feed hostile inputs end to end through the CLI; the static tests read the
package's syntax tree, so a future `shell=True` or f-string SQL fails here before review."""

from __future__ import annotations

import ast
import os
import pickle
import re
import subprocess
import zipfile
from pathlib import Path

import pytest
import torch
from helpers import make_image, make_library
from reliability_helpers import assert_no_traceback, catalog_rows
from typer.testing import CliRunner

import clipsearch
from clipsearch.cli import app
from clipsearch.clip import cpu
from clipsearch.clip.checkpoints import read_checkpoint
from clipsearch.errors import CheckpointError

PACKAGE = Path(clipsearch.__file__).parent
MIGRATIONS = PACKAGE.parent / "migrations"


# --- hostile weights --------------------------------------------------------------------------


class Payload:
    """Unpickling this runs code: it writes ``marker``. A refusal means the file never appears."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('payload ran')",)


def _torchscript_archive(path: Path, payload: Payload) -> Path:
    """A zip laid out like OpenAI's TorchScript checkpoints, its data.pkl the payload."""
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("model/version", "3\n")
        archive.writestr("model/constants.pkl", pickle.dumps((), protocol=2))
        archive.writestr("model/data.pkl", pickle.dumps(payload, protocol=2))
    return path


HOSTILE_FORMATS = {
    "torch.save zip": lambda path, p: torch.save({"state_dict": p}, path),
    "torch.save legacy": lambda path, p: torch.save({"visual.proj": p}, path, _use_new_zipfile_serialization=False),
    "plain pickle": lambda path, p: path.write_bytes(pickle.dumps({"state_dict": p})),
    "TorchScript archive": _torchscript_archive,
}


@pytest.mark.parametrize("suffix", [".pt", ".bin"])
@pytest.mark.parametrize("fmt", sorted(HOSTILE_FORMATS))
def test_hostile_checkpoint_is_refused_and_its_payload_never_runs(tmp_path, fmt, suffix):
    marker = tmp_path / "payload-ran"
    checkpoint = tmp_path / f"evil{suffix}"
    HOSTILE_FORMATS[fmt](checkpoint, Payload(marker))
    with pytest.raises(CheckpointError) as error:
        read_checkpoint(checkpoint)
    assert str(checkpoint) in str(error.value)
    assert not marker.exists()


def test_hostile_checkpoint_through_the_cli(tmp_path):
    marker = tmp_path / "payload-ran"
    checkpoint = tmp_path / "evil.pt"
    torch.save({"state_dict": Payload(marker)}, checkpoint)
    make_library(tmp_path / "lib", 2)
    result = CliRunner().invoke(
        app,
        [
            "--home",
            str(tmp_path / "home"),
            "index",
            str(tmp_path / "lib"),
            "--model",
            str(checkpoint),
            "--workers",
            "0",
        ],
    )
    assert result.exit_code == 1
    assert str(checkpoint) in result.stderr and "never unpickles" in result.stderr, result.stderr
    assert_no_traceback(result.stdout, result.stderr)
    assert not marker.exists()


# --- file names that look like shell or SQL ---------------------------------------------------

SHELL_NAMES = [
    "$(touch PWNED1).png",
    "`touch PWNED2`.png",
    "; touch PWNED3 ;.png",
    "a | touch PWNED4.png",
    "-rf --no-preserve-root.png",
    "&& touch PWNED5 &&.png",
]


def test_paths_are_opened_never_given_to_a_shell(tmp_path, tiny_model, monkeypatch):
    """Names full of shell syntax are indexed and queried, with every way of starting a program
    booby-trapped: none is used, and no command hidden in a name runs."""
    lib = tmp_path / "lib"
    for seed, name in enumerate(SHELL_NAMES):
        make_image(lib / name, seed, fmt="PNG")
    # A model's first run times what importing torch and onnxruntime costs a new process by
    # starting Python (a fixed command, no shell, no name in it): measured before the traps, as
    # an earlier test in the same process would have, so that this test holds on its own.
    cpu.measure(tiny_model, "image")
    started = []

    def trap(*args, **kwargs):
        started.append(args)
        raise AssertionError(f"a program was started: {args}")

    for module, name in [
        (subprocess, "Popen"),
        (os, "system"),
        (os, "popen"),
        (os, "execv"),
        (os, "execvp"),
        (os, "posix_spawn"),
        (os, "posix_spawnp"),
        (os, "spawnv"),
    ]:
        monkeypatch.setattr(module, name, trap)
    monkeypatch.chdir(lib)  # where `touch PWNED` would land
    runner = CliRunner()

    def cli(*args):
        return runner.invoke(app, ["--home", str(tmp_path / "home"), *args])

    result = cli("index", str(lib), "--model", tiny_model, "--workers", "0")
    assert result.exit_code == 0, result.output
    for name in SHELL_NAMES:
        query = cli("query", str(lib / name), "-k", "1", "--paths-only")
        assert query.stdout_bytes == os.fsencode(lib / name) + b"\n", query.output
    assert cli("remove", str(lib / SHELL_NAMES[0])).exit_code == 0
    assert started == []
    assert sorted(os.listdir(lib)) == sorted(SHELL_NAMES)  # no PWNED file appeared
    assert len(catalog_rows(tmp_path / "home")) == len(SHELL_NAMES) - 1


# --- static checks over the package source ----------------------------------------------------


def _sources() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py")) + sorted(MIGRATIONS.rglob("*.py"))


def _calls(path: Path):
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Call):
            yield node


def _dotted(node: ast.AST) -> str:
    """``os.system`` for ``os.system(...)``'s func; ``<expr>.eval`` for ``f(x).eval()``."""
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return node.id if isinstance(node, ast.Name) else "<expr>"


def _where(path: Path, node: ast.AST) -> str:
    shown = path.relative_to(PACKAGE.parent) if path.is_relative_to(PACKAGE.parent) else path
    return f"{shown}:{node.lineno}"


def shell_uses(sources: list[Path]) -> list[str]:
    forbidden = re.compile(r"(^|\.)(system|popen|getoutput|getstatusoutput|spawn[lv]p?e?|exec[lv]p?e?|posix_spawnp?)$")
    found = []
    for path in sources:
        for call in _calls(path):
            name = _dotted(call.func)
            if forbidden.search(name) and name.split(".")[0] in ("os", "subprocess", "pty", "commands"):
                found.append(f"{_where(path, call)} {name}")
            for keyword in call.keywords:
                if keyword.arg == "shell" and not (
                    isinstance(keyword.value, ast.Constant) and keyword.value.value is False
                ):
                    found.append(f"{_where(path, call)} {name}(shell=...)")
            if name in ("eval", "exec"):
                found.append(f"{_where(path, call)} {name}")
    return found


def unsafe_unpickling(sources: list[Path]) -> list[str]:
    """torch.load without weights_only=True, torch.jit.load, pickle.load(s), marshal, numpy
    allow_pickle, or a pickle.Unpickler subclass that does not restrict find_class."""
    found = []
    for path in sources:
        tree = ast.parse(path.read_text())
        for call in _calls(path):
            name = _dotted(call.func)
            keywords = {k.arg: k.value for k in call.keywords}
            if name.endswith("torch.load") or (name == "load" and "weights_only" in keywords):
                value = keywords.get("weights_only")
                if not (isinstance(value, ast.Constant) and value.value is True):
                    found.append(f"{_where(path, call)} {name} without weights_only=True")
            if name in (
                "pickle.load",
                "pickle.loads",
                "torch.jit.load",
                "marshal.loads",
                "marshal.load",
                "dill.load",
                "dill.loads",
                "joblib.load",
            ):
                found.append(f"{_where(path, call)} {name}")
            allow = keywords.get("allow_pickle")
            if allow is not None and not (isinstance(allow, ast.Constant) and allow.value is False):
                found.append(f"{_where(path, call)} {name}(allow_pickle=...)")
        for cls in (n for n in ast.walk(tree) if isinstance(n, ast.ClassDef)):
            if any(_dotted(base).endswith("Unpickler") for base in cls.bases):
                methods = {f.name for f in cls.body if isinstance(f, ast.FunctionDef)}
                if "find_class" not in methods:
                    found.append(f"{_where(path, cls)} {cls.name} does not restrict find_class")
    return found


_CONSTANT = re.compile(r"^_*[A-Z][A-Z0-9_]*$")
_SQL_CALLS = ("execute", "executemany", "executescript", "exec_driver_sql", "text")


def sql_built_from_values(sources: list[Path]) -> list[str]:
    """SQL strings assembled from values: an f-string may only splice module constants
    (``PRAGMA busy_timeout = {_BUSY_TIMEOUT_MS}``); ``%`` and ``.format`` are not allowed at all."""
    found = []
    for path in sources:
        for call in _calls(path):
            if _dotted(call.func).split(".")[-1] not in _SQL_CALLS or not call.args:
                continue
            sql = call.args[0]
            if isinstance(sql, ast.JoinedStr):
                spliced = [v.value for v in sql.values if isinstance(v, ast.FormattedValue)]
                if not all(isinstance(v, ast.Name) and _CONSTANT.match(v.id) for v in spliced):
                    found.append(f"{_where(path, call)} f-string SQL splices {[ast.unparse(v) for v in spliced]}")
            elif isinstance(sql, ast.BinOp) or (isinstance(sql, ast.Call) and _dotted(sql.func).endswith("format")):
                found.append(f"{_where(path, call)} SQL built with {ast.unparse(sql)[:60]}")
    return found


def test_static_the_package_never_uses_a_shell():
    assert shell_uses(_sources()) == []


def test_static_weights_are_never_unpickled_as_arbitrary_objects():
    assert unsafe_unpickling(_sources()) == []


def test_static_sql_carries_values_only_as_bound_parameters():
    assert sql_built_from_values(_sources()) == []


def test_static_checks_would_catch_what_they_look_for(tmp_path):
    """The scanners are not vacuous: planted offences are each reported."""
    bad = tmp_path / "bad.py"
    bad.write_text(
        "import os, pickle, subprocess, torch\n"
        "def f(conn, path, model):\n"
        "    subprocess.run(['ls', path], shell=True)\n"
        "    os.system('ls ' + path)\n"
        "    torch.load(path)\n"
        "    pickle.loads(b'')\n"
        "    conn.execute(f\"SELECT * FROM images WHERE path = '{path}'\")\n"
        "    conn.execute('SELECT * FROM images WHERE path = %s' % path)\n"
        "    conn.execute(f'PRAGMA busy_timeout = {TIMEOUT_MS}')\n"
        "    model.eval()\n"
    )

    def lines(found: list[str]) -> list[int]:
        return [int(item.split(" ")[0].rsplit(":", 1)[1]) for item in found]

    assert lines(shell_uses([bad])) == [3, 4]
    assert lines(unsafe_unpickling([bad])) == [5, 6]
    assert lines(sql_built_from_values([bad])) == [7, 8]  # line 9 splices a constant: allowed
