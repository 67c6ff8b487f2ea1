"""The cold query path: what a `clipsearch query` process must not pay for."""

from __future__ import annotations

import subprocess
import sys

import torch
from helpers import make_library, tiny_model  # noqa: F401

from clipsearch import Index
from clipsearch.clip.model import CLIP, ModelConfig

SMALL = ModelConfig(embed_dim=32, image_resolution=32, vision_layers=1, vision_width=64, vision_patch_size=16,
                    vision_heads=1, context_length=16, vocab_size=600, text_width=64, text_heads=1, text_layers=2)


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
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def test_model_from_scratch_is_initialised():
    torch.manual_seed(0)
    model = CLIP(SMALL)
    width = SMALL.vision_width
    for parameter in (model.visual.class_embedding, model.visual.positional_embedding, model.visual.proj):
        assert abs(parameter.std().item() - width ** -0.5) < 0.3 * width ** -0.5
    assert abs(model.token_embedding.weight.std().item() - 0.02) < 0.002
    assert abs(model.positional_embedding.std().item() - 0.01) < 0.002
    assert model.logit_scale.item() == torch.tensor(1 / 0.07).log().item()


def modules_after(code: str) -> set[str]:
    """The heavy modules a fresh interpreter has imported after running ``code``."""
    code += "\nimport sys; print(' '.join(sorted({'torch', 'sqlalchemy', 'alembic'} & set(sys.modules))))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return set(result.stdout.split())


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

