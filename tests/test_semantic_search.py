"""End to end with the bundled demo model: search results must mean what the query says.

The scenes here come from a seed the demo model never trained on, and every assertion is checked
against the generator's ground truth (which objects each image holds), not against the model.
"""

from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from clipsearch.cli import app
from clipsearch.encoder import Encoder
from clipsearch.index import Index
from clipsearch.search import zero_shot
from clipsearch.training.scenes import COLOURS, SHAPES, read_manifest, write_scenes

SAMPLE_IMAGES = Path(__file__).resolve().parent.parent / "sample_images"
UNSEEN_SEED = 4242  # the demo model trained on seed 0 only


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def indexed(tmp_path_factory):
    """240 unseen scenes indexed with the demo model; their manifest records by file name."""
    root = tmp_path_factory.mktemp("semantic")
    manifest = write_scenes(root / "scenes", count=240, seed=UNSEEN_SEED)
    records = {Path(r["path"]).name: r for r in read_manifest(manifest)}
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # `one_torch_thread` is per test; this one runs before it
    with Index.open(root / "home", model="demo", device="cpu") as index:
        report = index.add([root / "scenes"], workers=0)
        assert report.new == 240 and report.failed == 0
        yield index, records
    torch.set_num_threads(before)


def _holds(record: dict, colour: str, shape: str) -> bool:
    return any(o["colour"] == colour and o["shape"] == shape for o in record["objects"])


def test_colour_shape_queries_return_images_holding_that_object(indexed):
    index, records = indexed
    precisions, firsts = [], []
    for colour in COLOURS:
        for shape in SHAPES:
            if sum(_holds(r, colour, shape) for r in records.values()) < 5:
                continue
            hits = index.search(f"a {colour} {shape}", k=5)
            found = [_holds(records[h.path.name], colour, shape) for h in hits]
            precisions.append(sum(found) / 5)
            firsts.append(found[0])
    assert len(precisions) >= 25
    # Chance is the share of scenes holding the pair (a few percent). These floors guard the
    # shipped model's measured quality (precision@5 0.829, first right 0.976 on this seed); the
    # issue's targets are measured and reported by benchmarks/demo_quality.py, not asserted here.
    precision, first = sum(precisions) / len(precisions), sum(firsts) / len(firsts)
    assert precision >= 0.8 and first >= 0.85, f"precision@5 {precision:.3f}, first right {first:.3f}"


def test_a_full_caption_finds_its_own_scene(indexed):
    index, records = indexed
    ranks = []
    for name, record in list(records.items())[:40]:
        hits = [h.path.name for h in index.search(record["caption"], k=5)]
        ranks.append(name in hits)
    assert sum(ranks) / len(ranks) >= 0.8


def test_classify_picks_the_shape_of_one_object_scenes(indexed):
    _, records = indexed
    singles = [r for r in records.values() if len(r["objects"]) == 1][:40]
    encoder = Encoder("demo", "cpu", towers="both")
    right = 0
    for record in singles:
        probabilities = zero_shot(encoder, Path(record["path"]), list(SHAPES))
        right += SHAPES[int(probabilities.argmax())] == record["objects"][0]["shape"]
    assert right / len(singles) >= 0.9


def test_readme_quick_start_on_sample_images(tmp_path):
    records = {Path(r["path"]).name: r for r in read_manifest(SAMPLE_IMAGES / "manifest.jsonl")}
    runner = CliRunner()
    home = ["--home", str(tmp_path / "home"), "--device", "cpu"]
    indexed = runner.invoke(app, [*home, "index", str(SAMPLE_IMAGES), "--model", "demo"])
    assert indexed.exit_code == 0, indexed.output

    def top(query: str, k: int) -> list[str]:
        result = runner.invoke(app, [*home, "query", query, "--top", str(k), "--paths-only"])
        assert result.exit_code == 0, result.output
        return [Path(line).name for line in result.stdout.splitlines()]

    red_circles = [name for name, r in records.items() if _holds(r, "red", "circle")]
    assert set(top("a red circle", len(red_circles))) == set(red_circles)
    three_blue_squares = [
        name
        for name, r in records.items()
        if len(r["objects"]) == 3 and all(o["colour"] == "blue" and o["shape"] == "square" for o in r["objects"])
    ]
    assert top("three blue squares", 1) == three_blue_squares
