"""The models clipsearch can fetch by name, and the BPE vocabulary they share (shipped in the package).

Three kinds of download: an `Asset` is a file at a URL (OpenAI's archives, whose URLs carry
the file's SHA-256, so they are pinned; OpenAI's own `clip` keeps the same files in
`~/.cache/clip`, which `cached_by="openai"` says); a `HubFile` is one file of a Hugging Face hub
repository and a `HubDir` several files of one used as a model folder, both fetched through
`huggingface_hub` into its shared cache. The OpenCLIP weights are hub files whose hashes we
could not check when this table was written: unpinned (`sha256=None`), they are held to the
SHA-256 the hub publishes for them (`download` and `hub` do the checking). `hf-hub:ORG/NAME`
names any OpenCLIP repository on the hub, as open_clip accepts.

This module is plain data and must stay importable without torch.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from clipsearch.errors import CheckpointError


@dataclass(frozen=True)
class Asset:
    """A file on the internet and what it must hash to."""

    url: str
    filename: str  # name in the cache directory; unique across the registry
    sha256: str | None  # None: unpinned, trusted on first download
    size: int | None = None
    bundled: Path | None = None  # a copy shipped inside the package, used instead of downloading
    cached_by: str | None = None  # another tool that keeps this very file: "openai" (~/.cache/clip)


@dataclass(frozen=True)
class HubFile:
    """One file of a model repository on the Hugging Face hub."""

    repo: str  # "org/name"
    filename: str  # path inside the repository
    revision: str = "main"  # a branch, tag or (immutable) commit hash
    sha256: str | None = None  # None: held to the SHA-256 the hub publishes for it
    saved_as: str | None = None  # name of a copy placed by hand in clipsearch's cache; unique across the registry


@dataclass(frozen=True)
class HubDir:
    """Files of one hub repository used together as a model folder (their snapshot folder in
    the hub cache, which `checkpoints.read_checkpoint` reads): every one of `files`, and the
    first of `weights` the repository has, in the order the folder's reader prefers them."""

    repo: str
    revision: str = "main"
    files: tuple[str, ...] = ("open_clip_config.json",)
    weights: tuple[str, ...] = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")


@dataclass(frozen=True)
class ModelEntry:
    name: str
    description: str
    asset: Asset | HubFile | HubDir | None = None  # None for a model shipped inside the package
    bundled: Path | None = None
    quick_gelu: bool | None = None  # None: the checkpoint says which activation it uses
    aliases: tuple[str, ...] = field(default=())


# CLIP's vocabulary ships with the package (OpenAI's file, MIT), so tokenizing works offline;
# the URL says where the copy came from.
VOCAB = Asset(
    url="https://github.com/openai/CLIP/raw/main/clip/bpe_simple_vocab_16e6.txt.gz",
    filename="bpe_simple_vocab_16e6.txt.gz",
    sha256="924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a",
    size=1_356_917,
    bundled=Path(__file__).parent / "vocab" / "bpe_simple_vocab_16e6.txt.gz",
)

_OPENAI_ROOT = "https://openaipublic.azureedge.net/clip/models"
HF_HUB_PREFIX = "hf-hub:"
_HUB_REPO = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")


def _openai(name: str, digest: str, filename: str, aliases: tuple[str, ...]) -> ModelEntry:
    # open_clip users spell these "ViT-B-32" with the pretrained tag "openai".
    tagged = tuple(f"{alias}{sep}openai" for alias in (name, *aliases) for sep in ("/", ":"))
    return ModelEntry(
        name=name,
        description=f"OpenAI CLIP {name} (TorchScript archive)",
        asset=Asset(f"{_OPENAI_ROOT}/{digest}/{filename}", filename, digest, cached_by="openai"),
        quick_gelu=True,
        aliases=aliases + tagged,
    )


def _openclip(arch: str, tag: str, hub_repo: str, description: str, quick_gelu: bool) -> ModelEntry:
    return ModelEntry(
        name=f"{arch}/{tag}",
        description=description,
        asset=HubFile(hub_repo, "open_clip_pytorch_model.bin", saved_as=f"{arch}-{tag}.bin"),
        quick_gelu=quick_gelu,
        aliases=(f"{arch}:{tag}", hub_repo),
    )


MODELS: tuple[ModelEntry, ...] = (
    _openai("RN50", "afeb0e10f9e5a86da6080e35cf09123aca3b358a0c3e3b6c78a7b63bc04b6762", "RN50.pt", ()),
    _openai("RN101", "8fa8567bab74a42d41c5915025a8e4538c3bdbe8804a470a72f30b0d94fab599", "RN101.pt", ()),
    _openai("RN50x4", "7e526bd135e493cef0776de27d5f42653e6b4c8bf9e0f653bb11773263205fdd", "RN50x4.pt", ()),
    _openai("RN50x16", "52378b407f34354e150460fe41077663dd5b39c54cd0bfd2b27167a4a06ec9aa", "RN50x16.pt", ()),
    _openai("RN50x64", "be1cfb55d75a9666199fb2206c106743da0f6468c9d327f3e0d0a543a9919d9c", "RN50x64.pt", ()),
    _openai(
        "ViT-B/32",
        "40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af",
        "ViT-B-32.pt",
        ("ViT-B-32",),
    ),
    _openai(
        "ViT-B/16",
        "5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f",
        "ViT-B-16.pt",
        ("ViT-B-16",),
    ),
    _openai(
        "ViT-L/14",
        "b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836",
        "ViT-L-14.pt",
        ("ViT-L-14",),
    ),
    _openai(
        "ViT-L/14@336px",
        "3035c92b350959924f9f00213499208652fc7ea050643e8b385c2dac08641f02",
        "ViT-L-14-336px.pt",
        ("ViT-L-14-336", "ViT-L-14@336px", "ViT-L/14-336"),
    ),
    _openclip(
        "ViT-B-32",
        "laion2b_s34b_b79k",
        "laion/CLIP-ViT-B-32-laion2B-s34B-b79K",
        "OpenCLIP ViT-B/32 trained on LAION-2B (34B samples seen)",
        quick_gelu=False,
    ),
    _openclip(
        "ViT-B-32",
        "datacomp_xl_s13b_b90k",
        "laion/CLIP-ViT-B-32-DataComp.XL-s13B-b90K",
        "OpenCLIP ViT-B/32 trained on DataComp-1B (13B samples seen)",
        quick_gelu=False,
    ),
    _openclip(
        "ViT-B-32",
        "laion400m_e32",
        "timm/vit_base_patch32_clip_224.laion400m_e32",
        "OpenCLIP ViT-B/32 trained on LAION-400M, 32 epochs (QuickGELU)",
        quick_gelu=True,
    ),
    _openclip(
        "ViT-B-32-256",
        "datacomp_s34b_b86k",
        "laion/CLIP-ViT-B-32-256x256-DataComp-s34B-b86K",
        "OpenCLIP ViT-B/32 at 256x256 trained on DataComp-1B (34B samples seen)",
        quick_gelu=False,
    ),
    ModelEntry(
        name="demo",
        description="Small CLIP trained on clipsearch's synthetic scenes; ships with the package",
        bundled=Path(__file__).parent / "weights" / "demo",
    ),
)

_BY_KEY = {key.lower(): entry for entry in MODELS for key in (entry.name, *entry.aliases)}


def available_models() -> list[str]:
    """Canonical names accepted by `clip.load`, in the order of the table above."""
    return [entry.name for entry in MODELS]


def find(name: str) -> ModelEntry | None:
    """The entry a user means by `name` (any alias, any letter case, or `hf-hub:ORG/NAME`), or None."""
    key = name.strip()
    if key[: len(HF_HUB_PREFIX)].lower() == HF_HUB_PREFIX:
        return _hub_model(key[len(HF_HUB_PREFIX) :])
    return _BY_KEY.get(key.lower())


def _hub_model(repo: str) -> ModelEntry | None:
    """An OpenCLIP repository on the hub, as open_clip reads `hf-hub:` names; one the table
    knows is its entry, with the table's settings and name."""
    if not _HUB_REPO.fullmatch(repo):
        return None
    return _BY_KEY.get(repo.lower()) or ModelEntry(
        name=f"{HF_HUB_PREFIX}{repo}",
        description=f"OpenCLIP model from the Hugging Face hub repository {repo}",
        asset=HubDir(repo),
    )


def get(name: str) -> ModelEntry:
    entry = find(name)
    if entry is None and name.strip()[: len(HF_HUB_PREFIX)].lower() == HF_HUB_PREFIX:
        raise CheckpointError(f"{name.strip()!r} does not name a hub repository: write hf-hub:ORG/NAME.")
    if entry is None:
        raise CheckpointError(
            f"Unknown model {name!r}: use one of {', '.join(available_models())}, "
            "or the path of a checkpoint file or directory."
        )
    return entry
