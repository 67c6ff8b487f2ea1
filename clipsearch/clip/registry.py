"""The models clipsearch can fetch by name, and the BPE vocabulary they share (shipped in the package).

Three kinds of download: an `Asset` is a file at a URL (OpenAI's archives, whose URLs carry
the file's SHA-256, so they are pinned; OpenAI's own `clip` keeps the same files in
`~/.cache/clip`, which `cached_by="openai"` says); a `HubFile` is one file of a Hugging Face hub
repository and a `HubDir` several files of one used as a model folder, both fetched through
`huggingface_hub` into its shared cache. The OpenCLIP weights are hub files whose hashes we
could not check when this table was written: unpinned (`sha256=None`), they are held to the
SHA-256 the hub publishes for them (`download` and `hub` do the checking). `hf-hub:ORG/NAME`
names any OpenCLIP repository on the hub, as open_clip accepts.

SigLIP and SigLIP 2 models are `HubDir`s: the weights with their ``open_clip_config.json`` and
tokenizer files, read as an OpenCLIP folder. The XLM-RoBERTa CLIPs keep their weights in LAION's
repositories and their tokenizer in XLM-RoBERTa's: `ModelEntry.tokenizer` names that file.

Each entry also carries what a person choosing a model wants to know: embedding width, image
size, parameters, and the published quality figures, ImageNet-1k zero-shot top-1 and MSCOCO
text-to-image retrieval R@1 (both %), from open_clip's published benchmark results
(docs/openclip_results.csv and docs/openclip_retrieval_results.csv in mlfoundations/open_clip).
None where open_clip has published none (SigLIP 2, the bundled demo).

This module is plain data and must stay importable without torch.
"""

from __future__ import annotations

import difflib
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
class Figures:
    """What a model costs and how good it is, for choosing one: the embedding width (the index
    stores one float per dimension per image), the input image size, millions of parameters
    of both towers, and open_clip's published ImageNet-1k zero-shot top-1 and MSCOCO
    text-to-image R@1 (%; None when not published)."""

    embed_dim: int
    image_size: int
    params_m: float
    imagenet: float | None = None
    coco_r1: float | None = None


@dataclass(frozen=True)
class ModelEntry:
    name: str
    description: str
    asset: Asset | HubFile | HubDir | None = None  # None for a model shipped inside the package
    bundled: Path | None = None
    quick_gelu: bool | None = None  # None: the checkpoint says which activation it uses
    aliases: tuple[str, ...] = field(default=())
    # A tokenizer.json kept in another repository than the weights (XLM-RoBERTa's own).
    tokenizer: HubFile | None = None
    family: str = "clip"  # "clip", "siglip" or "xlmr": what a score means (see README)
    multilingual: bool = False
    figures: Figures | None = None

    @property
    def image_size(self) -> int | None:
        return self.figures.image_size if self.figures else None


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


def _openai(name: str, digest: str, filename: str, aliases: tuple[str, ...], figures: Figures) -> ModelEntry:
    # open_clip users spell these "ViT-B-32" with the pretrained tag "openai".
    tagged = tuple(f"{alias}{sep}openai" for alias in (name, *aliases) for sep in ("/", ":"))
    return ModelEntry(
        name=name,
        description=f"OpenAI CLIP {name} (TorchScript archive)",
        asset=Asset(f"{_OPENAI_ROOT}/{digest}/{filename}", filename, digest, cached_by="openai"),
        quick_gelu=True,
        aliases=aliases + tagged,
        figures=figures,
    )


def _openclip(arch: str, tag: str, hub_repo: str, description: str, quick_gelu: bool, figures: Figures) -> ModelEntry:
    return ModelEntry(
        name=f"{arch}/{tag}",
        description=description,
        asset=HubFile(hub_repo, "open_clip_pytorch_model.bin", saved_as=f"{arch}-{tag}.bin"),
        quick_gelu=quick_gelu,
        aliases=(f"{arch}:{tag}", hub_repo),
        figures=figures,
    )


# What transformers reads of a tokenizer, as open_clip's hub repositories hold it.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def _siglip(arch: str, description: str, figures: Figures, multilingual: bool = False) -> ModelEntry:
    """A SigLIP or SigLIP 2 model from timm's OpenCLIP repository ``timm/<arch>`` (pretrained
    tag "webli"): weights, configuration and tokenizer, one hub folder."""
    repo = f"timm/{arch}"
    return ModelEntry(
        name=arch,
        description=description,
        asset=HubDir(repo, files=("open_clip_config.json", *_TOKENIZER_FILES)),
        family="siglip",
        multilingual=multilingual,
        aliases=(f"{arch}/webli", f"{arch}:webli", repo),
        figures=figures,
    )


def _xlm_roberta(arch: str, tag: str, repo: str, tokenizer_repo: str, figures: Figures) -> ModelEntry:
    """An OpenCLIP XLM-RoBERTa CLIP: weights from LAION's repository, the tokenizer from
    XLM-RoBERTa's own (open_clip's configuration names it: ``hf_tokenizer_name``)."""
    return ModelEntry(
        name=f"{arch}/{tag}",
        description=f"OpenCLIP {arch}: multilingual text (XLM-RoBERTa, ~100 languages), trained on LAION-5B",
        asset=HubFile(repo, "open_clip_pytorch_model.bin", saved_as=f"{arch}-{tag}.bin"),
        tokenizer=HubFile(tokenizer_repo, "tokenizer.json"),
        family="xlmr",
        multilingual=True,
        aliases=(arch, f"{arch}:{tag}", repo),
        figures=figures,
    )


MODELS: tuple[ModelEntry, ...] = (
    _openai(
        "RN50",
        "afeb0e10f9e5a86da6080e35cf09123aca3b358a0c3e3b6c78a7b63bc04b6762",
        "RN50.pt",
        (),
        Figures(1024, 224, 102.01, 59.82, 28.54),
    ),
    _openai(
        "RN101",
        "8fa8567bab74a42d41c5915025a8e4538c3bdbe8804a470a72f30b0d94fab599",
        "RN101.pt",
        (),
        Figures(512, 224, 119.69, 62.28, 30.69),
    ),
    _openai(
        "RN50x4",
        "7e526bd135e493cef0776de27d5f42653e6b4c8bf9e0f653bb11773263205fdd",
        "RN50x4.pt",
        (),
        Figures(640, 288, 178.3, 66.27, 33.39),
    ),
    _openai(
        "RN50x16",
        "52378b407f34354e150460fe41077663dd5b39c54cd0bfd2b27167a4a06ec9aa",
        "RN50x16.pt",
        (),
        Figures(768, 384, 290.98, 70.72, 35.41),
    ),
    _openai(
        "RN50x64",
        "be1cfb55d75a9666199fb2206c106743da0f6468c9d327f3e0d0a543a9919d9c",
        "RN50x64.pt",
        (),
        Figures(1024, 448, 623.26, 73.91, 35.24),
    ),
    _openai(
        "ViT-B/32",
        "40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af",
        "ViT-B-32.pt",
        ("ViT-B-32",),
        Figures(512, 224, 151.28, 63.32, 30.44),
    ),
    _openai(
        "ViT-B/16",
        "5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f",
        "ViT-B-16.pt",
        ("ViT-B-16",),
        Figures(512, 224, 149.62, 68.34, 33.09),
    ),
    _openai(
        "ViT-L/14",
        "b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836",
        "ViT-L-14.pt",
        ("ViT-L-14",),
        Figures(768, 224, 427.62, 75.54, 36.51),
    ),
    _openai(
        "ViT-L/14@336px",
        "3035c92b350959924f9f00213499208652fc7ea050643e8b385c2dac08641f02",
        "ViT-L-14-336px.pt",
        ("ViT-L-14-336", "ViT-L-14@336px", "ViT-L/14-336"),
        Figures(768, 336, 427.94, 76.56, 37.09),
    ),
    _openclip(
        "ViT-B-32",
        "laion2b_s34b_b79k",
        "laion/CLIP-ViT-B-32-laion2B-s34B-b79K",
        "OpenCLIP ViT-B/32 trained on LAION-2B (34B samples seen)",
        quick_gelu=False,
        figures=Figures(512, 224, 151.28, 66.56, 39.34),
    ),
    _openclip(
        "ViT-B-32",
        "datacomp_xl_s13b_b90k",
        "laion/CLIP-ViT-B-32-DataComp.XL-s13B-b90K",
        "OpenCLIP ViT-B/32 trained on DataComp-1B (13B samples seen)",
        quick_gelu=False,
        figures=Figures(512, 224, 151.28, 69.17, 37.14),
    ),
    _openclip(
        "ViT-B-32",
        "laion400m_e32",
        "timm/vit_base_patch32_clip_224.laion400m_e32",
        "OpenCLIP ViT-B/32 trained on LAION-400M, 32 epochs (QuickGELU)",
        quick_gelu=True,
        figures=Figures(512, 224, 151.28, 62.93, 35.33),
    ),
    _openclip(
        "ViT-B-32-256",
        "datacomp_s34b_b86k",
        "laion/CLIP-ViT-B-32-256x256-DataComp-s34B-b86K",
        "OpenCLIP ViT-B/32 at 256x256 trained on DataComp-1B (34B samples seen)",
        quick_gelu=False,
        figures=Figures(512, 256, 151.29, 72.81, 39.93),
    ),
    # SigLIP (Zhai et al. 2023), trained on WebLI; English text (T5 vocabulary) unless "i18n".
    _siglip("ViT-B-16-SigLIP", "SigLIP ViT-B/16, 224 px", Figures(768, 224, 203.16, 76.04, 47.78)),
    _siglip("ViT-B-16-SigLIP-256", "SigLIP ViT-B/16, 256 px", Figures(768, 256, 203.2, 76.53, 48.34)),
    _siglip("ViT-B-16-SigLIP-384", "SigLIP ViT-B/16, 384 px", Figures(768, 384, 203.45, 78.49, 49.90)),
    _siglip("ViT-B-16-SigLIP-512", "SigLIP ViT-B/16, 512 px", Figures(768, 512, 203.79, 79.14, 50.55)),
    _siglip(
        "ViT-B-16-SigLIP-i18n-256",
        "SigLIP ViT-B/16, 256 px, multilingual text (mT5 vocabulary)",
        Figures(768, 256, 370.63, 75.13, 44.92),
        multilingual=True,
    ),
    _siglip("ViT-L-16-SigLIP-256", "SigLIP ViT-L/16, 256 px", Figures(1024, 256, 652.15, 80.45, 52.28)),
    _siglip("ViT-L-16-SigLIP-384", "SigLIP ViT-L/16, 384 px", Figures(1024, 384, 652.48, 82.07, 53.91)),
    _siglip("ViT-SO400M-14-SigLIP", "SigLIP SO400M/14, 224 px", Figures(1152, 224, 877.36, 82.03, 51.76)),
    _siglip("ViT-SO400M-14-SigLIP-384", "SigLIP SO400M/14, 384 px", Figures(1152, 384, 877.96, 83.08, 54.21)),
    _siglip(
        "ViT-SO400M-16-SigLIP-i18n-256",
        "SigLIP SO400M/16, 256 px, multilingual text (mT5 vocabulary)",
        Figures(1152, 256, 1127.43),
        multilingual=True,
    ),
    # SigLIP 2 (Tschannen et al. 2025): multilingual Gemma vocabulary. open_clip publishes no figures for them.
    _siglip("ViT-B-16-SigLIP2", "SigLIP 2 ViT-B/16, 224 px", Figures(768, 224, 375.19), multilingual=True),
    _siglip("ViT-B-16-SigLIP2-256", "SigLIP 2 ViT-B/16, 256 px", Figures(768, 256, 375.23), multilingual=True),
    _siglip("ViT-B-16-SigLIP2-384", "SigLIP 2 ViT-B/16, 384 px", Figures(768, 384, 375.48), multilingual=True),
    _siglip("ViT-B-16-SigLIP2-512", "SigLIP 2 ViT-B/16, 512 px", Figures(768, 512, 375.82), multilingual=True),
    _siglip("ViT-B-32-SigLIP2-256", "SigLIP 2 ViT-B/32, 256 px", Figures(768, 256, 376.86), multilingual=True),
    _siglip("ViT-L-16-SigLIP2-256", "SigLIP 2 ViT-L/16, 256 px", Figures(1024, 256, 881.53), multilingual=True),
    _siglip("ViT-L-16-SigLIP2-384", "SigLIP 2 ViT-L/16, 384 px", Figures(1024, 384, 881.85), multilingual=True),
    _siglip("ViT-L-16-SigLIP2-512", "SigLIP 2 ViT-L/16, 512 px", Figures(1024, 512, 882.31), multilingual=True),
    _siglip("ViT-SO400M-14-SigLIP2", "SigLIP 2 SO400M/14, 224 px", Figures(1152, 224, 1135.46), multilingual=True),
    _siglip("ViT-SO400M-14-SigLIP2-378", "SigLIP 2 SO400M/14, 378 px", Figures(1152, 378, 1136.01), multilingual=True),
    _siglip("ViT-SO400M-16-SigLIP2-256", "SigLIP 2 SO400M/16, 256 px", Figures(1152, 256, 1135.67), multilingual=True),
    _siglip("ViT-SO400M-16-SigLIP2-384", "SigLIP 2 SO400M/16, 384 px", Figures(1152, 384, 1136.04), multilingual=True),
    _siglip("ViT-SO400M-16-SigLIP2-512", "SigLIP 2 SO400M/16, 512 px", Figures(1152, 512, 1136.56), multilingual=True),
    _xlm_roberta(
        "xlm-roberta-base-ViT-B-32",
        "laion5b_s13b_b90k",
        "laion/CLIP-ViT-B-32-xlm-roberta-base-laion5B-s13B-b90k",
        "FacebookAI/xlm-roberta-base",
        Figures(512, 224, 366.12, 62.36, 37.78),
    ),
    _xlm_roberta(
        "xlm-roberta-large-ViT-H-14",
        "frozen_laion5b_s13b_b90k",
        "laion/CLIP-ViT-H-14-frozen-xlm-roberta-large-laion5B-s13B-b90k",
        "FacebookAI/xlm-roberta-large",
        Figures(1024, 224, 1193.01, 76.95, 49.21),
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
        raise CheckpointError(unknown(name))
    return entry


def unknown(name: str) -> str:
    """What to say of a ``name`` that is neither a model nor a checkpoint on disk: the names it
    is likely a typo of (any letter case), rather than all of them on one line."""
    keys = difflib.get_close_matches(name.strip().lower(), _BY_KEY, n=3)  # names and aliases, lower case
    close = dict.fromkeys(_BY_KEY[key].name for key in keys)
    guess = f" Did you mean {' or '.join(map(repr, close))}?" if close else ""
    return (
        f"{name!r} is neither a known model nor a checkpoint file or directory.{guess} "
        "`clipsearch models` lists the known models (in Python: clip.available_models())."
    )
