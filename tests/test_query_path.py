"""The cold query path: what a `clipsearch query` process must not pay for."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import checkpoint_lookups, make_library, python_output

from clipsearch import Index, clip
from clipsearch.clip.model import CLIP, ModelConfig

SMALL = ModelConfig(
    embed_dim=32,
    image_resolution=32,
    vision_layers=1,
    vision_width=64,
    vision_patch_size=16,
    vision_heads=1,
    context_length=16,
    vocab_size=600,
    text_width=64,
    text_heads=1,
    text_layers=2,
)


def test_build_model_does_not_import_dynamo():
    # A meta-device build that draws random values imports torch._dynamo: 1.5 s of start-up.
    code = (
        "import sys\n"
        "from clipsearch.clip.model import CLIP, build_model\n"
        f"from clipsearch.clip.model import ModelConfig\n"
        f"config = ModelConfig(**{SMALL.to_dict()!r})\n"
        "state_dict = CLIP(config).state_dict()\n"
        "assert 'torch._dynamo' not in sys.modules\n"
        "for towers in ('text', 'image', 'both'):\n"
        "    build_model(state_dict, towers=towers)\n"
        "print('torch._dynamo' in sys.modules)\n"
    )
    assert python_output(code).strip() == "False"


def test_model_from_scratch_is_initialised():
    torch.manual_seed(0)
    model = CLIP(SMALL)
    width = SMALL.vision_width
    for parameter in (model.visual.class_embedding, model.visual.positional_embedding, model.visual.proj):
        assert abs(parameter.std().item() - width**-0.5) < 0.3 * width**-0.5
    assert abs(model.token_embedding.weight.std().item() - 0.02) < 0.002
    assert abs(model.positional_embedding.std().item() - 0.01) < 0.002
    assert model.logit_scale.item() == torch.tensor(1 / 0.07).log().item()


def modules_after(code: str) -> set[str]:
    """The heavy modules a fresh interpreter has imported after running ``code``."""
    code += "\nimport sys; print(' '.join(sorted({'torch', 'sqlalchemy', 'alembic'} & set(sys.modules))))"
    return set(python_output(code).split())


def test_a_rerun_with_nothing_to_do_imports_neither_sqlalchemy_nor_torch(tmp_path, tiny_model):
    make_library(tmp_path / "lib", 4)
    with Index.open(tmp_path / "home", model=tiny_model, device="cpu") as index:
        assert index.add([tmp_path / "lib"], workers=0).new == 4
    rerun = (
        "from clipsearch import Index\n"
        f"with Index.open({str(tmp_path / 'home')!r}) as index:\n"
        f"    assert index.add([{str(tmp_path / 'lib')!r}]).unchanged == 4\n"
        "    assert index.status().counts['indexed'] == 4\n"
    )
    assert modules_after(rerun) == set()


# --- the text tower in NumPy ------------------------------------------------------------------

VIT_B32_TEXT = ModelConfig(
    embed_dim=512,
    image_resolution=224,
    vision_layers=12,
    vision_width=768,
    vision_patch_size=32,
    vision_heads=12,
    context_length=77,
    vocab_size=49408,
    text_width=512,
    text_heads=8,
    text_layers=12,
)


def token_rows(config: ModelConfig, lengths: list[int], seed: int = 1) -> torch.Tensor:
    """[SOT, random ids..., EOT, 0...] rows, as the tokenizer makes them (EOT is the largest id)."""
    generator = torch.Generator().manual_seed(seed)
    rows = torch.zeros(len(lengths), config.context_length, dtype=torch.long)
    for row, length in enumerate(lengths):
        rows[row, 0] = config.vocab_size - 2
        rows[row, 1 : length + 1] = torch.randint(1, config.vocab_size - 2, (length,), generator=generator)
        rows[row, length + 1] = config.vocab_size - 1
    return rows


def assert_text_parity(model: CLIP, tokens: torch.Tensor) -> None:
    from clipsearch.clip.numpy_text import TextTower

    with torch.no_grad():
        expected = model.encode_text(tokens).numpy()
    got = TextTower.from_model(model, "unused-vocab").encode_text(tokens.numpy())
    assert got.dtype == np.float32
    assert np.abs(got - expected).max() <= 1e-5, np.abs(got - expected).max()


@pytest.mark.parametrize("quick_gelu", [True, False])
def test_numpy_text_tower_matches_torch(quick_gelu):
    config = ModelConfig(**{**SMALL.to_dict(), "quick_gelu": quick_gelu, "text_width": 128, "text_heads": 2})
    torch.manual_seed(0)
    model = CLIP(config, towers="text").eval()
    with torch.no_grad():  # large weights: peaked attention and big activations test more than init does
        for parameter in model.parameters():
            parameter.normal_(0, 0.1)
    assert_text_parity(model, token_rows(config, [3, 7, 14, 0]))


def test_numpy_text_tower_matches_torch_at_vit_b32_size():
    torch.manual_seed(0)
    model = CLIP(VIT_B32_TEXT, towers="text").eval()
    assert_text_parity(model, token_rows(VIT_B32_TEXT, [1, 8, 30, 75]))


def test_tokenizer_ids_are_the_tensor_rows_as_numpy(tiny_model):
    from clipsearch.clip.tokenizer import Tokenizer

    tokenizer = Tokenizer(os.path.join(tiny_model, "vocab.txt.gz"))
    texts = ["a dog", "x" * 40]
    ids = tokenizer.ids(texts, context_length=16, truncate=True)
    assert ids.dtype == np.int64 and ids.shape == (2, 16)
    np.testing.assert_array_equal(ids, tokenizer(texts, context_length=16, truncate=True).numpy())


def test_a_repeated_text_is_looked_up_not_encoded_again(tiny_model, monkeypatch):
    from clipsearch.encoder import TextEncoder

    encoder = TextEncoder(tiny_model)
    calls = []
    encode = encoder.tower.encode_text
    monkeypatch.setattr(encoder.tower, "encode_text", lambda ids: calls.append(len(ids)) or encode(ids))
    first = encoder.encode_texts(["a dog", "a cat"])
    again = encoder.encode_texts(["a cat", "a bird", "a dog", "a bird"])
    assert calls == [2, 1]  # only "a bird" was new, encoded once though asked for twice
    np.testing.assert_array_equal(again[[2, 0]], first)
    np.testing.assert_array_equal(again[1], again[3])
    np.testing.assert_array_equal(again[1:2], TextEncoder(tiny_model).encode_texts(["a bird"]))


def test_the_text_memory_forgets_the_least_recently_used():
    from clipsearch.encoder import TextMemory

    memory, encoded = TextMemory(), []
    memory.size = 2

    def encode(texts):
        encoded.extend(texts)
        return np.array([[float(len(text))] for text in texts])

    memory.encode(["a", "bb"], encode)
    memory.encode(["a"], encode)  # "a" is now the most recent
    memory.encode(["ccc"], encode)  # forgets "bb"
    assert memory.encode(["a", "bb", "ccc"], encode).tolist() == [[1.0], [2.0], [3.0]]
    assert encoded == ["a", "bb", "ccc", "bb"]


def test_the_cached_tower_is_used_until_the_checkpoint_changes(tiny_model, tmp_path):
    from clipsearch.clip import numpy_text
    from clipsearch.encoder import Encoder, TextEncoder

    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model, model_dir)
    texts = ["a red circle", "two blue squares on grass"]
    expected = Encoder(str(model_dir), device="cpu", precision="fp32", towers="text").encode_texts(texts)

    assert numpy_text.load_cached(str(model_dir)) is None
    first = TextEncoder(str(model_dir))  # loads with torch, exports
    np.testing.assert_allclose(first.encode_texts(texts), expected, atol=1e-6)
    cached = numpy_text.load_cached(str(model_dir))
    assert isinstance(cached.weights["token_embedding.weight"], np.memmap)
    np.testing.assert_array_equal(TextEncoder(str(model_dir)).encode_texts(texts), first.encode_texts(texts))

    weights = model_dir / "model.safetensors"
    st = weights.stat()
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 1))
    assert numpy_text.load_cached(str(model_dir)) is None  # stale: the next TextEncoder re-exports
    TextEncoder(str(model_dir))
    assert numpy_text.load_cached(str(model_dir)) is not None

    cache = numpy_text.cache_file(str(model_dir))
    cache.write_bytes(cache.read_bytes()[: cache.stat().st_size // 2])
    assert numpy_text.load_cached(str(model_dir)) is None  # damaged: ignored, never trusted


def test_a_first_run_lets_its_image_encoder_go_before_exporting_the_text_tower(tmp_path, tiny_model, monkeypatch):
    """The float32 text tower beside the image encoder was a model's first run's peak of memory.
    It is exported once, so later runs keep their encoder for the next."""
    from clipsearch.clip import numpy_text

    held_while_exporting = []
    export = numpy_text.export

    def watched(model_ref: str):
        held_while_exporting.append(index._encoder)
        return export(model_ref)

    monkeypatch.setattr(numpy_text, "export", watched)
    make_library(tmp_path / "lib", 3)
    with Index.open(tmp_path / "home", model=tiny_model, device="cpu") as index:
        assert index.add([tmp_path / "lib"], workers=0).new == 3
        assert held_while_exporting == [None] and numpy_text.load_cached(tiny_model) is not None
        make_library(tmp_path / "more", 2, start_seed=10)
        assert index.add([tmp_path / "more"], workers=0).new == 2
        assert held_while_exporting == [None] and index._encoder is not None
        assert len(index.search("a red circle", k=5)) == 5


def test_a_registry_model_not_downloaded_has_no_cached_tower():
    from clipsearch.clip import numpy_text

    assert numpy_text.load_cached("ViT-B/32") is None


def test_a_text_query_after_the_first_imports_no_torch(tmp_path, tiny_model):
    make_library(tmp_path / "lib", 6)
    with Index.open(tmp_path / "home", model=tiny_model, device="cpu") as index:
        index.add([tmp_path / "lib"], workers=0)
    with Index.open(tmp_path / "home", readonly=True) as reader:
        first = reader.search("a red circle", k=3)  # loads the model with torch, exports the tower
    query = (
        "import json, sys\n"
        "from clipsearch import Index\n"
        f"with Index.open({str(tmp_path / 'home')!r}, readonly=True) as index:\n"
        "    hits = [(str(h.path), h.score) for h in index.search('a red circle', k=3)]\n"
        "print(json.dumps({'hits': hits, 'torch': 'torch' in sys.modules}))\n"
    )
    later = json.loads(python_output(query))
    assert later["torch"] is False
    assert [path for path, _ in later["hits"]] == [str(hit.path) for hit in first]
    np.testing.assert_allclose([score for _, score in later["hits"]], [hit.score for hit in first], atol=1e-6)


def test_a_search_runs_faiss_on_one_thread_and_restores_the_count(tmp_path, tiny_model, monkeypatch):
    import faiss

    from clipsearch.vectors import VectorIndex

    make_library(tmp_path / "lib", 4)
    threads_seen = []
    real_search = VectorIndex.search

    def search(self, *args):
        threads_seen.append(faiss.omp_get_max_threads())
        return real_search(self, *args)

    monkeypatch.setattr(VectorIndex, "search", search)
    with Index.open(tmp_path / "home", model=tiny_model, device="cpu") as index:
        index.add([tmp_path / "lib"], workers=0)
        before = faiss.omp_get_max_threads()
        faiss.omp_set_num_threads(3)
        try:
            assert len(index.search("a red circle", k=2)) == 2
            assert threads_seen and set(threads_seen) == {1}
            assert faiss.omp_get_max_threads() == 3
        finally:
            faiss.omp_set_num_threads(before)


def test_the_exported_tower_holds_linear_weights_in_by_out(tiny_model):
    """Format 2: ``x @ W`` weights, the layout OpenBLAS runs fastest at a few tokens; a file of
    another format is exported again rather than read with the wrong layout."""
    from clipsearch.clip import numpy_text

    tower = numpy_text.export(tiny_model)
    assert all(isinstance(value, np.memmap) for value in tower.weights.values())  # mapped back, never copied
    width = tower.width
    block = "transformer.resblocks.0."
    assert tower.weights[block + "attn.in_proj_weight"].shape == (width, 3 * width)
    assert tower.weights[block + "mlp.c_fc.weight"].shape == (width, 4 * width)
    assert tower.weights[block + "mlp.c_fc.weight"].flags.c_contiguous
    cached = numpy_text.load_cached(tiny_model)
    assert cached is not None and cached.weights[block + "mlp.c_proj.weight"].shape == (4 * width, width)
    path = numpy_text.cache_file(tiny_model)
    data = bytearray(path.read_bytes())
    data[data.index(b'"format": 2') : data.index(b'"format": 2') + 11] = b'"format": 1'
    path.write_bytes(bytes(data))
    assert numpy_text.load_cached(tiny_model) is None


def test_the_text_tower_is_written_from_the_checkpoint_without_a_torch_model(model_dir, monkeypatch):
    """`numpy_text.export` builds no model: it reads each text-tower tensor of the checkpoint
    once, in the order the file holds them (none of the image tower's), and writes what
    `cached_from` writes from a loaded model; where the cache cannot be written, the same
    arrays stay in memory."""
    from clipsearch import clip
    from clipsearch.clip import numpy_text, tower_file

    model, _ = clip.load(model_dir, device="cpu", towers="text")
    expected = numpy_text.TextTower.from_model(model, model.tokenizer.bpe_path)
    looked_up = checkpoint_lookups(monkeypatch)
    monkeypatch.setattr(clip, "load", lambda *args, **kwargs: pytest.fail("a torch model was built"))
    written = numpy_text.export(model_dir)
    assert looked_up == ["logit_scale", *expected.weights]  # each once, the text tower's alone
    monkeypatch.setattr(tower_file, "store", lambda path, write: False)  # a cache that cannot be written
    in_memory = numpy_text.export(model_dir)
    for tower in (written, in_memory):
        assert tower.weights.keys() == expected.weights.keys()
        for key, value in tower.weights.items():
            assert value.flags.c_contiguous and np.array_equal(value, expected.weights[key]), key
        assert (tower.quick_gelu, tower.logit_scale) == (expected.quick_gelu, expected.logit_scale)
        assert tower.vocab_path == expected.vocab_path
    assert all(isinstance(value, np.memmap) for value in written.weights.values())
    assert not any(isinstance(value, np.memmap) for value in in_memory.weights.values())


def test_a_text_tower_whose_weights_do_not_fit_is_refused_with_the_loaders_error(model_dir):
    from safetensors.torch import load_file, save_file

    from clipsearch.clip import numpy_text
    from clipsearch.errors import CheckpointError

    weights_file = os.path.join(model_dir, "model.safetensors")
    weights = load_file(weights_file)
    del weights["transformer.resblocks.0.ln_2.bias"]
    save_file(weights, weights_file)
    with pytest.raises(CheckpointError, match="do not fit a clip model"):
        numpy_text.export(model_dir)
    assert numpy_text.load_cached(model_dir) is None


def test_a_bare_weights_file_of_a_model_with_its_own_vocabulary_is_refused_in_one_line(tmp_path, monkeypatch):
    """The demo's weights copied without their vocabulary are read with CLIP's, whose ids the
    demo has no embedding for: the NumPy tower had failed with an IndexError ("a bug")."""
    from clipsearch.clip import CheckpointError
    from clipsearch.encoder import TextEncoder

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    bare = tmp_path / "model.safetensors"
    shutil.copy(Path(clip.__file__).parent / "weights" / "demo" / "model.safetensors", bare)
    with pytest.raises(CheckpointError, match="has 49408 tokens but the model embeds only 669"):
        TextEncoder(str(bare)).encode_texts(["a red circle"])
