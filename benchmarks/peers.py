"""The peers, set up where they cannot touch the project: a virtual environment under
``$BENCH_DIR`` (default /tmp/clipsearch-bench) with rclip 3.3.0, open_clip, ONNX Runtime and the
same torch as ours, plus rclip's model files made locally at random weights.

rclip 3.x runs two ONNX files (OpenCLIP ViT-B-32-256's towers) that it would download into
``$RCLIP_DATADIR``. Nothing can be downloaded here, so they are exported from a random-weight
ViT-B-32-256 with the settings of rclip's own conversion script (opset 18, the TorchScript-based
exporter, fp32, dynamic batch; exported with autograd on, since under no_grad PyTorch's fused
attention has no ONNX form), then placed where rclip looks, next to the BPE vocabulary. rclip
is launched through this file, which first swaps its download functions for ones that only
return local paths, so a missing file fails loudly instead of reaching for the network.

    python benchmarks/peers.py setup                # venv + model files (idempotent)
    python benchmarks/peers.py rclip FOLDER QUERY   # one timed rclip run inside FOLDER
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from common import BENCH_DIR

PEER_VENV = BENCH_DIR / "peer-venv"
PEER_PYTHON = PEER_VENV / "bin" / "python"
RCLIP_DATADIR = BENCH_DIR / "rclip-data"
PEER_PACKAGES = [
    "torch==2.14.1",
    "torchvision==0.29.1",
    "open_clip_torch==3.3.0",
    "rclip==3.3.0",
    "onnx",
    "onnxruntime==1.32.0",
]

# Where rclip 3.3 looks for its files (rclip/model_download.py: MODEL_SUBDIR, TOKENIZER_VOCAB).
RCLIP_MODEL_SUBDIR = "ViT-B-32-256-datacomp_s34b_b86k"
RCLIP_VOCAB = Path("tokenizer") / "bpe_simple_vocab_16e6.txt.gz"
RCLIP_ARCH = "ViT-B-32-256"
HERE = Path(__file__).resolve()


def setup() -> None:
    """Create the peer venv and rclip's model files unless they are already there."""
    marker = PEER_VENV / ".complete"
    if not marker.exists():
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(PEER_VENV)], check=True)
        # torch and torchvision come from the machine's local wheel index (pip's configured
        # extra index); the rest from PyPI.
        subprocess.run([str(PEER_PYTHON), "-m", "pip", "install", "-q", *PEER_PACKAGES], check=True)
        marker.write_text("\n".join(PEER_PACKAGES) + "\n")
    model_dir = RCLIP_DATADIR / RCLIP_MODEL_SUBDIR
    if not (model_dir / "textual.onnx").exists():
        subprocess.run([str(PEER_PYTHON), str(HERE), "export", str(RCLIP_DATADIR)], check=True)


def export(datadir: Path) -> None:
    """Runs inside the peer venv: random-weight ViT-B-32-256 → rclip's two ONNX files."""
    import numpy as np
    import onnxruntime
    import open_clip
    import torch

    torch.manual_seed(0)
    model = open_clip.create_model(RCLIP_ARCH, pretrained=None).eval()
    resolution = model.visual.image_size[0]
    model_dir = datadir / RCLIP_MODEL_SUBDIR
    model_dir.mkdir(parents=True, exist_ok=True)

    # The exporter traces a module's own parameters, so each tower is wrapped as a submodule.
    class Visual(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.clip = model

        def forward(self, image: torch.Tensor) -> torch.Tensor:
            return self.clip.visual(image)

    class Textual(Visual):
        def forward(self, tokens: torch.Tensor) -> torch.Tensor:
            return self.clip.encode_text(tokens)

    images = torch.randn(2, 3, resolution, resolution)
    tokens = torch.zeros(2, model.context_length, dtype=torch.long)
    tokens[:, 0], tokens[:, 1], tokens[:, 2] = 49406, 320, 49407  # <start> "a" <end>
    for name, wrapper, example in (("visual.onnx", Visual(), images), ("textual.onnx", Textual(), tokens)):
        path = model_dir / name
        torch.onnx.export(
            wrapper,
            (example[:1],),
            str(path),
            input_names=["input"],
            output_names=["output"],
            dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
            opset_version=18,
            dynamo=False,
        )
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        with torch.no_grad():
            expected = wrapper(example).numpy()
        (got,) = session.run(None, {"input": example.numpy()})
        error = float(np.abs(got - expected).max())
        if error > 1e-4:
            raise SystemExit(f"{name} disagrees with torch by {error:.2e}")
        print(f"{path}: max abs error vs torch {error:.1e}")
    vocab = datadir / RCLIP_VOCAB
    vocab.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(Path(open_clip.__file__).parent / RCLIP_VOCAB.name, vocab)


def run_rclip_offline(argv: list[str]) -> None:
    """Runs inside the peer venv, in the photo folder: rclip's CLI with downloads disabled."""
    from rclip import main as rclip_main
    from rclip import model_download

    datadir = Path(os.environ["RCLIP_DATADIR"])

    def local(path: Path) -> str:
        if not path.is_file():
            raise SystemExit(f"{path} is missing: run `python benchmarks/peers.py setup`")
        return str(path)

    model_download.download_onnx_model = lambda name, tqdm_class=None: local(datadir / RCLIP_MODEL_SUBDIR / name)
    model_download.download_tokenizer_vocab = lambda tqdm_class=None: local(datadir / RCLIP_VOCAB)
    sys.argv = ["rclip", *argv]
    rclip_main.main()


@dataclass
class TimedRun:
    wall_s: float
    max_rss_mib: float
    output: str


def time_command(command: list[str], cwd: Path | None = None, env: dict[str, str] | None = None) -> TimedRun:
    """Run under /usr/bin/time -v: wall clock and peak RSS as the kernel counted them."""
    result = subprocess.run(["/usr/bin/time", "-v", *command], cwd=cwd, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{command[:3]} failed ({result.returncode}):\n{result.stderr[-3000:]}")
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (?:(\d+):)?(\d+):([\d.]+)", result.stderr)
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", result.stderr)
    hours, minutes, seconds = wall.groups()
    return TimedRun(
        int(hours or 0) * 3600 + int(minutes) * 60 + float(seconds), int(rss.group(1)) / 1024, result.stdout
    )


def rclip(
    folder: Path,
    query: str = "a photo of a dog",
    fresh: bool = True,
    datadir: Path = RCLIP_DATADIR,
    extra: Sequence[str] = (),
) -> TimedRun:
    """One ``rclip QUERY`` inside ``folder``; ``fresh`` drops its database first (a full index).
    A ``datadir`` other than the default gets links to the model files."""
    setup()
    for name in (RCLIP_MODEL_SUBDIR, RCLIP_VOCAB.parts[0]):
        if not (datadir / name).exists():
            (datadir / name).symlink_to(RCLIP_DATADIR / name)
    env = {**os.environ, "RCLIP_DATADIR": str(datadir), "HF_HUB_OFFLINE": "1"}
    if fresh:
        for db in datadir.glob("db.sqlite3*"):
            db.unlink()
    return time_command([str(PEER_PYTHON), str(HERE), "rclip-offline", *extra, query], cwd=folder, env=env)


def fill_rclip_db(datadir: Path, root: Path, count: int, folders: int) -> None:
    """rclip's database with ``count`` generated vectors for ``root/FFFF/NNNNNNNN.jpg``, the
    layout of the query benchmark's stand-in files."""
    datadir.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [str(PEER_PYTHON), str(HERE), "fill-db", str(datadir), str(root), str(count), str(folders)], check=True
    )


def _fill_db(datadir: Path, root: Path, count: int, folders: int) -> None:
    """Runs inside the peer venv: rclip's own DB class makes the schema, rows go in in bulk."""
    from common import clustered_vectors, clusters_for
    from rclip import db

    database = db.DB(datadir / "db.sqlite3")
    chunk_size = 100_000
    for chunk, start in enumerate(range(0, count, chunk_size)):
        vectors = clustered_vectors(min(chunk_size, count - start), clusters_for(count), chunk=chunk)
        for i, vector in enumerate(vectors, start):
            path = root / f"{i % folders:04d}" / f"{i:08d}.jpg"
            database.upsert_image(
                db.NewImage(filepath=str(path), modified_at=0.0, size=0, vector=vector.tobytes(), hash=None),
                commit=False,
            )
        database.commit()
    database.close()


def main() -> None:
    if sys.argv[1:2] == ["rclip-offline"]:  # everything after it is rclip's, options included
        run_rclip_offline(sys.argv[2:])
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("setup")
    export_parser = commands.add_parser("export")
    export_parser.add_argument("datadir", type=Path)
    commands.add_parser("rclip-offline", help="rclip's own arguments follow")
    fill = commands.add_parser("fill-db")
    fill.add_argument("datadir", type=Path)
    fill.add_argument("root", type=Path)
    fill.add_argument("count", type=int)
    fill.add_argument("folders", type=int)
    timed = commands.add_parser("rclip")
    timed.add_argument("folder", type=Path)
    timed.add_argument("query")
    timed.add_argument("--keep-db", action="store_true", help="time a re-run instead of a full index")
    args = parser.parse_args()
    if args.command == "setup":
        setup()
    elif args.command == "export":
        export(args.datadir)
    elif args.command == "fill-db":
        _fill_db(args.datadir, args.root, args.count, args.folders)
    else:
        run = rclip(args.folder, args.query, fresh=not args.keep_db)
        print(run.output)
        print(f"wall {run.wall_s:.2f} s, peak RSS {run.max_rss_mib:.0f} MiB")


if __name__ == "__main__":
    main()
