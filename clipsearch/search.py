"""Query vectors and top-k with filters.

A query is a weighted sum of texts and example images, folded into one unit vector, so "a dog"
+ "on a beach" − "people" costs one FAISS search like any other query. Results come back
from FAISS by catalog id and are joined with the catalog's rows. Metadata filters (`Filters`)
and a folder become the catalog ids FAISS may return, so a filter that passes few photos still
gets k of them; a score floor and files deleted since indexing are checked on the few rows
returned, over-fetching until enough survive. A query without terms lists what the filters
pass, in the order asked for.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, cast

import numpy as np

from clipsearch.errors import ClipsearchError, ImageError
from clipsearch.filters import Filters, check_sort
from clipsearch.records import ImageRow, PhotoMeta, decode_path
from clipsearch.walk import IMAGE_EXTENSIONS, normalise_roots
from clipsearch.walk import under as is_under

if TYPE_CHECKING:
    from clipsearch.catalog import Catalog
    from clipsearch.clip.model import Towers
    from clipsearch.encoder import Encoder, TextEncoder
    from clipsearch.vectors import VectorIndex

# A str is text; a Path is an example image; an array is a unit vector already computed (an
# image sent to the web page, or an indexed image's stored vector).
Term = str | Path | np.ndarray
Query = Term | Sequence[tuple[float, Term]]

# The most images a folder (`under`) may hold for the search to be narrowed to their ids: listing
# 100,000 ids took ~60 ms against ~1 ms for a search of everything, kept if under the folder
# (1,024 of them: ~1-2 ms). A larger folder is narrowed to after all once `FOLDER_FETCH` of the
# best of everything held fewer than k of its images: one unlike the query (3,000 images of 153k)
# had fetched and read every row of the collection, 11-14 s a query.
FOLDER_NARROWS = 1024
FOLDER_FETCH = 4 * FOLDER_NARROWS


@dataclass(frozen=True)
class Hit:
    path: Path
    score: float | None  # cosine similarity, in [-1, 1]; None when listed by filters alone
    width: int | None
    height: int | None
    mtime: float  # seconds since the epoch, as os.stat gives it
    size: int
    id: int  # the catalog row: what the web page's thumbnail and "similar" requests name
    metadata: PhotoMeta = field(default_factory=PhotoMeta)

    @classmethod
    def of(cls, row: ImageRow, score: float | None) -> Hit:
        # Stored vectors are unit length only to their float16 (or coarser) rounding: an image
        # compared with itself or a copy can come out at 1.0005, which no cosine can be.
        if score is not None:
            score = min(max(score, -1.0), 1.0)
        return cls(
            decode_path(row.path), score, row.width, row.height, row.mtime_ns / 1e9, row.size, row.id, row.metadata
        )

    def to_json(self) -> dict[str, object]:
        """The one JSON shape of a hit: `clipsearch query --json`, `duplicates --json` and the web page's API."""
        return {
            "id": self.id,
            "path": str(self.path),
            "score": None if self.score is None else round(self.score, 6),
            "width": self.width,
            "height": self.height,
            "mtime": self.mtime,
            "size": self.size,
            **self.metadata.to_json(),
        }


def as_term(text: str) -> Term:
    """A command-line term: the name of an existing file is an example image, anything else is
    text. One word that looks like an image path (an image extension, or a folder part that
    exists) but is no file is a mistake, not a text to search: it raises, saying how to search
    for it as text (add a word)."""
    if os.path.isfile(text):
        return Path(text)
    if os.path.isdir(text):
        raise ImageError(f"{text} is a folder; to search inside it, add --under {text} to a description.")
    parent = os.path.dirname(text)
    extension = os.fsencode(os.path.splitext(text)[1].lower())
    one_word = not any(c.isspace() for c in text)
    if one_word and (extension in IMAGE_EXTENSIONS or (parent and os.path.isdir(parent))):
        raise ImageError(
            f"{text} looks like an image path, but there is no such file; to search for it as text, "
            f"add a word: 'a photo of {text}'."
        )
    return text


def parse_term(term: str) -> tuple[float, Term]:
    """A command-line term with an optional weight: ``[WEIGHT:]TEXT_OR_IMAGE`` (so "note: dogs"
    stays text, weight 1)."""
    if os.path.isfile(term):
        return 1.0, Path(term)
    weight, rest = split_weight(term)
    return weight, as_term(rest)


def split_weight(term: str) -> tuple[float, str]:
    """``WEIGHT:REST`` → (WEIGHT, REST) when WEIGHT is a number, else (1.0, term). "0.5:" is
    (0.5, ""): a weight with nothing to weigh, which the caller refuses as an empty text (it
    had been searched as the text "0.5:")."""
    weight, sep, rest = term.partition(":")
    if sep:
        try:
            return float(weight), rest
        except ValueError:
            pass
    return 1.0, term


def find_hits(
    query: Query | None,
    encoder: Callable[[Towers], Encoder | TextEncoder],
    vectors: Callable[[], VectorIndex | None],
    catalog: Catalog,
    k: int = 10,
    under: str | os.PathLike | None = None,
    min_score: float | None = None,
    filters: Filters | None = None,
    sort: str = "score",
    exclude: Sequence[int] = (),
) -> list[Hit]:
    """A query from its terms to its hits, in ``sort`` order: ``encoder(towers)`` gives a model
    with the towers the terms need (text queries never load the image tower, stored vectors
    need none); ``vectors()`` the model's index. Without terms, the rows ``filters`` pass are
    listed, newest first unless ``sort`` says otherwise. ``exclude`` names ids never returned."""
    filters = filters or Filters()
    check_sort(sort)
    if k < 1:
        raise ValueError(f"k is {k}; ask for at least 1 hit.")
    if min_score is not None and math.isnan(min_score):
        raise ValueError("min_score is NaN; give a cosine from -1 to 1, or None.")
    terms = as_terms(query) if query is not None else []
    if not terms:
        if not filters and under is None:
            raise ClipsearchError("The query is empty; give some text, an image, or a filter such as --after.")
        return list_hits(catalog, k, under, filters, "-date" if sort == "score" else sort, exclude)
    index = vectors()
    if index is None or index.ntotal == 0:
        return []
    for _, term in terms:
        if isinstance(term, np.ndarray) and term.size != index.dim:
            raise ClipsearchError(
                f"A query vector has {term.size} values, but the vectors of this model have {index.dim}."
            )
    needs = needed_towers(terms)
    vector = query_vector(encoder(needs) if needs else None, terms)
    among: np.ndarray | None = None
    folder = _folder(under)
    if filters:
        among = catalog.matching_ids(filters, folder)
    elif folder is not None:
        # A folder narrows the search itself too: found first and kept if under it, a small
        # folder's images could all lie in lists an inverted file's nprobe never reaches.
        among = catalog.ids_under(folder, FOLDER_NARROWS)
    return sort_hits(top_k(index, catalog, vector, k, under, min_score, among, exclude), sort)


def as_terms(query: Query) -> list[tuple[float, Term]]:
    """The query's (weight, term) pairs, each checked: a blank text would rank every image by
    the embedding of nothing, and a weight or a vector value that is not a finite number makes
    every score NaN; both are mistakes to report, not searches. A query of another shape (a
    list of texts, a term of another type) is a TypeError that shows the shape to use."""
    terms = [(1.0, query)] if isinstance(query, Term) else [_pair(entry) for entry in query]
    for weight, term in terms:
        if isinstance(term, str) and not term.strip():
            raise ClipsearchError("A text of the query is empty; give a description, e.g. 'a dog on a beach'.")
        if not math.isfinite(weight):
            raise ClipsearchError(
                f"A weight of the query is {weight}; write WEIGHT:TEXT with a number, e.g. 0.5:at night."
            )
        if isinstance(term, np.ndarray) and not np.isfinite(term).all():
            raise ClipsearchError("A query vector holds values that are not finite numbers (NaN or infinity).")
    return terms


def _pair(entry: object) -> tuple[float, Term]:
    """One (weight, term) pair of a combined query, checked for its shape."""
    shape = "a query combines (weight, term) pairs, e.g. [(1.0, 'a beach'), (-0.5, 'people')]"
    if not isinstance(entry, tuple | list) or len(entry) != 2:
        raise TypeError(f"{shape}; got {entry!r}.")
    weight, term = entry
    if isinstance(weight, bool) or not isinstance(weight, int | float | np.number):
        raise TypeError(f"{shape}; the weight {weight!r} is not a number.")
    if not isinstance(term, Term):
        raise TypeError(f"{shape}; a term is a str (text), a Path (an image) or a vector, not {term!r}.")
    return float(weight), term


def needed_towers(terms: Sequence[tuple[float, Term]]) -> Towers | None:
    """Text queries load only the text tower: the image tower of a big model is most of it.
    Stored vectors need no model at all (None)."""
    kinds: set[Towers] = {
        "image" if isinstance(term, Path) else "text" for _, term in terms if not isinstance(term, np.ndarray)
    }
    return "both" if len(kinds) == 2 else next(iter(kinds), None)


def query_vector(encoder: Encoder | TextEncoder | None, terms: Sequence[tuple[float, Term]]) -> np.ndarray:
    """One unit vector for a weighted combination of texts, images and stored vectors (only
    these need no ``encoder``)."""
    if not terms:
        raise ClipsearchError("The query is empty; give some text or an image path.")
    # The weights scaled to at most 1, which leaves the direction as it is: weights near the
    # largest float had overflowed the sum, and every score was 0.
    largest = max(abs(weight) for weight, _ in terms)
    terms = [(weight / largest if largest else 0.0, term) for weight, term in terms]
    weighted = [weight * term.astype(np.float64) for weight, term in terms if isinstance(term, np.ndarray)]
    if len(weighted) < len(terms):
        if encoder is None:
            raise ValueError("texts and images need an encoder")
        weighted += _encoded(encoder, terms)
    total = np.sum(weighted, axis=0)
    norm = np.linalg.norm(total)
    if norm < 1e-6:
        raise ClipsearchError("The query's terms cancel out; change a weight or remove a --subtract.")
    return (total / norm).astype(np.float32)


def _encoded(encoder: Encoder | TextEncoder, terms: Sequence[tuple[float, Term]]) -> list[np.ndarray]:
    """The weighted sum of the texts' and the images' embeddings, one array each kind."""
    texts = [(weight, term) for weight, term in terms if isinstance(term, str)]
    images = [(weight, term) for weight, term in terms if isinstance(term, Path)]
    found = []
    if texts:
        found.append(np.array([w for w, _ in texts]) @ encoder.encode_texts([t for _, t in texts]))
    if images:
        image_encoder = cast("Encoder", encoder)  # image terms asked for the image tower (`needed_towers`)
        pixels = [_pixels(image_encoder, path, f"use {path} as a query image") for _, path in images]
        found.append(np.array([w for w, _ in images]) @ image_encoder.encode_images(np.stack(pixels)))
    return found


def _pixels(encoder: Encoder, path: Path, doing: str) -> np.ndarray:
    """``path`` preprocessed for ``encoder``; ImageError "Cannot ``doing``: why" if it cannot be."""
    from clipsearch.decode import decode_file

    decoded = decode_file(encoder.preprocess, os.fsencode(path))
    if decoded.pixels is None:
        raise ImageError(f"Cannot {doing}: {decoded.error}")
    return decoded.pixels


def top_k(
    vectors: VectorIndex,
    catalog: Catalog,
    query: np.ndarray,
    k: int = 10,
    under: str | os.PathLike | None = None,
    min_score: float | None = None,
    among: np.ndarray | None = None,
    exclude: Sequence[int] = (),
) -> list[Hit]:
    """The ``k`` best hits that pass the filters, best first: only ids ``among`` (all when
    None), never ids in ``exclude``."""
    folder = _folder(under)
    inside = is_under([folder]) if folder is not None else None
    # A folder too large to list first (`FOLDER_NARROWS`), listed if the best of everything lack it.
    later = folder if among is None else None
    exists: dict[bytes, bool] = {}
    skipped = set(exclude)
    hits: list[Hit] = []
    most = vectors.ntotal if among is None else min(vectors.ntotal, len(among))
    fetch = max(2 * (k + len(skipped)), 16)
    while True:
        fetch = min(fetch, most)
        if fetch == 0:
            return []
        with _one_faiss_thread():
            scores, ids = vectors.search(query.reshape(1, -1), fetch, among)
        candidates = [(float(s), int(i)) for s, i in zip(scores[0], ids[0]) if i >= 0 and i not in skipped]
        rows = catalog.rows([i for _, i in candidates])
        hits = []
        for score, row_id in candidates:
            if min_score is not None and score < min_score:
                return hits  # scores come sorted: nothing further can pass
            row = rows.get(row_id)
            if row is None or (inside is not None and not inside(row.path)):
                continue
            if row.path not in exists:
                exists[row.path] = os.path.exists(row.path)
            if exists[row.path]:
                hits.append(Hit.of(row, score))
                if len(hits) == k:
                    return hits
        if fetch == most:
            return hits
        if later is not None and fetch >= FOLDER_FETCH:
            among, later = catalog.ids_under(later, 2**62), None
            assert among is not None  # fewer than 2**62 rows
            most, fetch = min(vectors.ntotal, len(among)), max(2 * (k + len(skipped)), 16)
        else:
            fetch *= 4


def list_hits(
    catalog: Catalog,
    k: int,
    under: str | os.PathLike | None,
    filters: Filters,
    order: str,
    exclude: Sequence[int] = (),
) -> list[Hit]:
    """The first ``k`` rows ``filters`` pass in ``order`` ("date", "-date", "path"), without a
    score: a query of filters alone. Paged, skipping files deleted since they were indexed."""
    skipped = set(exclude)
    ids = [i for i in catalog.matching_ids(filters, _folder(under)).tolist() if i not in skipped]
    hits: list[Hit] = []
    offset, page = 0, max(2 * k, 64)
    while offset < len(ids):
        rows = catalog.listed(ids, order, page, offset)
        hits += [Hit.of(row, None) for row in rows if os.path.exists(row.path)]
        if len(hits) >= k or not rows:
            return hits[:k]
        offset += page
        page *= 4
    return hits


def sort_hits(hits: list[Hit], order: str) -> list[Hit]:
    """Hits in ``order``: "score" (as they come, best first), "date" (taken, oldest first),
    "-date" (newest first), "path". Hits without a date taken go last either way; ties keep
    their score order."""
    if order == "date":
        return sorted(hits, key=lambda h: (h.metadata.taken is None, h.metadata.taken or ""))
    if order == "-date":
        return sorted(hits, key=lambda h: h.metadata.taken or "", reverse=True)  # "" (no date) sorts last
    if order == "path":
        return sorted(hits, key=lambda h: os.fsencode(h.path))
    return hits


def _folder(under: str | os.PathLike | None) -> bytes | None:
    return normalise_roots([under])[0] if under is not None else None


def unknown_folder(catalog: Catalog, under: str | os.PathLike) -> bool:
    """Whether ``under`` is a mistyped folder: not there, and nothing indexed lies under it. A
    search of it finds nothing, which says no more than that (an unmounted drive's folder is
    not there either, but holds its files)."""
    return not Path(under).exists() and catalog.ids_under(normalise_roots([under])[0], 0) is not None


@contextmanager
def _one_faiss_thread() -> Iterator[None]:
    """FAISS on one OpenMP thread for a moment: one query is too little work to share. With a
    second thread on a busy two-core machine, a query over 100k vectors (IVF) took 10 ms of CPU
    instead of 0.3 ms, the threads waiting at barriers for each other."""
    import faiss

    previous = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(previous)


def zero_shot(encoder: Encoder, image: Path, labels: Sequence[str], template: str = "a photo of a {}") -> np.ndarray:
    """Label probabilities for one image, as the model's family classifies: for CLIP a softmax
    over the scaled similarities between the image and one prompt per label; for SigLIP (a
    model with a ``logit_bias``) each label's own sigmoid probability, which need not sum to 1."""
    image_vector = encoder.encode_images(_pixels(encoder, image, f"classify {image}")[None])[0]
    logits = encoder.logit_scale * encoder.encode_texts([template.format(label) for label in labels]) @ image_vector
    if encoder.logit_bias is not None:
        return 1 / (1 + np.exp(-(logits + encoder.logit_bias)))
    exp = np.exp(logits - logits.max())
    return exp / exp.sum()
