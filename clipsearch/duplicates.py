"""Groups of images that are the same picture: byte-identical copies, and near-duplicates (the
same photo re-encoded, resized, cropped a little, retouched) found among the stored vectors.

Nothing is decoded or encoded: copies share a content fingerprint, and near-duplicates are pairs
whose stored vectors' cosine similarity reaches a threshold. Groups are transitive (A like B and
B like C make one group), and each suggests a keeper; clipsearch never deletes anything.

Finding the pairs compares every vector with its likely neighbours only, as dense matrix
products. The vectors are clustered (k-means, about sqrt(2n) clusters); each vector is compared
with the members of its `PROBES` nearest clusters, cluster by cluster, a block of queries times
the cluster at a time. Near-duplicates sit far closer together than cluster radii, so a pair is
only lost when neither lies in one of the other's nearest clusters. Cost: the assignment is
n x clusters x dim multiply-adds and the comparisons PROBES x n^2 / clusters x dim, both
O(n^1.5): 10x the photos cost about 32x the time. Below `EXACT_LIMIT` every pair is compared.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from clipsearch.records import ImageRow
from clipsearch.search import Hit
from clipsearch.walk import stored_mtime_ns

if TYPE_CHECKING:
    import torch

    from clipsearch.catalog import Catalog
    from clipsearch.records import StoredModel

log = logging.getLogger(__name__)

# Cosine similarity at or above which two images are the same picture, per model family: the
# best recall at precision >= 0.95 in benchmarks/duplicates.py (re-encoded, resized, cropped,
# retouched, rotated, converted and captioned copies against distractors of the same subject or
# place). demo: precision 0.994, recall 0.970. "clip" was measured on ViT-B/32 at random weights
# (precision 0.957, recall 0.876), whose vectors follow colour layout more than content: no
# trained weights can be downloaded here, and real ones may want a lower threshold.
DEFAULT_THRESHOLDS = {"demo": 0.955, "clip": 0.991}
EXACT_LIMIT = 8192  # below this many vectors, every pair is compared
PROBES = 2  # clusters each vector is compared within
_BLOCK = 2048  # query rows per matrix product: bounds memory on one huge cluster
MARGIN = 0.02  # bfloat16 similarities of unit vectors are off by under 0.01: pairs this close are rechecked


def default_threshold(model: str) -> float:
    """The measured threshold of ``model``'s family: the bundled demo model, else CLIP."""
    return DEFAULT_THRESHOLDS["demo" if model == "demo" else "clip"]


@dataclass(frozen=True)
class Duplicate:
    hit: Hit  # its score is the cosine similarity to the group's keeper
    exact: bool  # the same bytes as the keeper (same content fingerprint)

    def to_json(self) -> dict[str, object]:
        return self.hit.to_json() | {"exact": self.exact}


@dataclass(frozen=True)
class Group:
    """One picture: the copy to keep (largest pixel count, then most metadata, then oldest
    file) and the others, most similar first."""

    keeper: Hit
    duplicates: list[Duplicate]

    def to_json(self) -> dict[str, object]:
        return {"keeper": self.keeper.to_json(), "duplicates": [d.to_json() for d in self.duplicates]}


def find_duplicates(
    catalog: Catalog, model: StoredModel | None, threshold: float, under: bytes | None = None
) -> list[Group]:
    """Groups of two or more indexed images under ``under`` (a normalised folder) that share a
    fingerprint or whose ``model`` vectors reach ``threshold``, ordered by the keeper's path.
    Files deleted since they were indexed are left out."""
    started = time.perf_counter()
    ids, fingerprints = catalog.fingerprints(under)
    links = [_same_content(fingerprints)]
    vectors = None
    if model is not None:
        vector_ids, vectors = catalog.all_vectors(model, among=None if under is None else ids)
        inside = np.isin(vector_ids, ids)
        vector_ids, vectors = vector_ids[inside], vectors[inside]
        first, second, _ = similar_pairs(vectors, threshold)
        links.append(np.searchsorted(ids, vector_ids[np.stack([first, second])]))
    labels = components(len(ids), np.concatenate(links, axis=1))
    members = _groups_of(labels)
    log.info("Found %d groups among %d images in %.1f s", len(members), len(ids), time.perf_counter() - started)
    member_ids = ids[np.concatenate(members)] if members else np.empty(0, np.int64)
    by_id = None if vectors is None else _vectors_of(member_ids, vector_ids, vectors)
    rows = catalog.rows(member_ids.tolist())
    groups = []
    for positions in members:
        present = _distinct_files([rows[i] for i in ids[positions].tolist() if i in rows])
        if len(present) >= 2:
            groups.append(_group(present, dict(zip(ids[positions].tolist(), fingerprints[positions])), by_id))
    return sorted(groups, key=lambda g: os.fsencode(g.keeper.path))


def _distinct_files(rows: list[ImageRow]) -> list[ImageRow]:
    """One row per file on disk, of those still there as they were indexed (a file rewritten
    since has another content than its fingerprint and vector say). Paths that reach one file
    (a symlink, a hard link, a folder indexed again through a link to it) are not copies of each
    other: deleting one "duplicate" would delete the other, or leave it dangling. The path that
    is no symlink stands for the file."""
    chosen: dict[tuple[int, int], tuple[bool, bytes, ImageRow]] = {}
    for row in rows:
        try:
            st = os.stat(row.path)
        except OSError:  # deleted since it was indexed
            continue
        if (st.st_size, stored_mtime_ns(st)) != (row.size, row.mtime_ns):
            continue
        candidate = (os.path.islink(row.path), row.path, row)
        key = (st.st_dev, st.st_ino)
        if key not in chosen or candidate[:2] < chosen[key][:2]:
            chosen[key] = candidate
    return [row for _, _, row in chosen.values()]


def similar_pairs(vectors: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(first, second, similarity): each pair of rows of ``vectors`` (L2-normalised) at or above
    ``threshold``, once, first < second. Exact below `EXACT_LIMIT` rows, else by clusters.

    Up to `EXACT_LIMIT` rows the products run in NumPy: importing torch (1-2 s and ~450 MiB) had
    cost a folder of 1,000 images more than comparing them. Above it they run in torch, in bfloat16
    where the CPU has it (2.5x float32's speed here), one thread each with the clusters spread over
    the cores (two threads on one small product stall each other on a busy machine). Pairs within
    `MARGIN` of the threshold are then measured in float32.
    """
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if len(vectors) <= EXACT_LIMIT:
        blocks = [
            np.stack([rows + start, columns])
            for start in range(0, len(vectors), _BLOCK)
            for rows, columns in [np.nonzero(vectors[start : start + _BLOCK] @ vectors.T >= threshold - MARGIN)]
        ]
    else:
        blocks = _pairs_by_clusters(vectors, threshold)
    first, second = np.concatenate([np.empty((2, 0), np.int64), *blocks], axis=1)
    keep = first < second  # each pair once (it can be met from both ends, and never with itself)
    first, second = np.unique(np.stack([first[keep], second[keep]]), axis=1)
    sims = np.concatenate(
        [np.empty(0, np.float32)]
        + [
            np.einsum("ij,ij->i", vectors[first[i : i + _BLOCK]], vectors[second[i : i + _BLOCK]])
            for i in range(0, len(first), _BLOCK)
        ]
    )
    keep = sims >= threshold
    return first[keep], second[keep], sims[keep]


def _pairs_by_clusters(vectors: np.ndarray, threshold: float) -> list[np.ndarray]:
    """Candidate pairs [2, m] (within `MARGIN` of ``threshold``, either order), cluster by cluster."""
    import torch

    from clipsearch.clip.cpu import has_native_bf16
    from clipsearch.decode import usable_cores

    fast = torch.from_numpy(vectors).to(torch.bfloat16 if has_native_bf16() else torch.float32)

    def compare(job: tuple[np.ndarray, np.ndarray]) -> list[np.ndarray]:
        queries, candidates = job
        held = fast[torch.from_numpy(candidates)]
        found = []
        for start in range(0, len(queries), _BLOCK):
            rows = queries[start : start + _BLOCK]
            q, c = torch.nonzero(fast[torch.from_numpy(rows)] @ held.T >= threshold - MARGIN, as_tuple=True)
            found.append(np.stack([rows[q.numpy()], candidates[c.numpy()]]))
        return found

    with _one_torch_thread(), ThreadPoolExecutor(usable_cores()) as pool:
        return [block for found in pool.map(compare, _comparisons(fast)) for block in found]


def _comparisons(vectors: torch.Tensor) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(query rows, candidate rows) to compare: per cluster, the rows that have it among their
    `PROBES` nearest with the rows it holds."""
    n = len(vectors)
    clusters = 2 ** round(math.log2(math.sqrt(PROBES * n)))
    nearest = _nearest_clusters(vectors, clusters)
    home = nearest[:, 0]
    holds = np.argsort(home, kind="stable")
    bounds = np.searchsorted(home[holds], np.arange(clusters + 1))
    probing = np.argsort(nearest, axis=None, kind="stable")  # rows by each cluster they probe
    probe_bounds = np.searchsorted(nearest.ravel()[probing], np.arange(clusters + 1))
    for cluster in range(clusters):
        held = holds[bounds[cluster] : bounds[cluster + 1]]
        if len(held):
            yield probing[probe_bounds[cluster] : probe_bounds[cluster + 1]] // PROBES, held


def _nearest_clusters(vectors: torch.Tensor, clusters: int, rounds: int = 8) -> np.ndarray:
    """Each row's `PROBES` nearest of ``clusters`` spherical k-means centroids (trained on 40 rows
    a centroid), [n, PROBES]. Directions are taken from the collection's mean: CLIP embeddings
    share one direction, around which k-means makes one giant cluster, and a tenfold cost."""
    import torch

    rng = np.random.default_rng(0)
    mean = vectors[torch.from_numpy(rng.choice(len(vectors), min(len(vectors), 100_000), replace=False))].float()
    mean = mean.mean(dim=0)

    def directions(rows: torch.Tensor) -> torch.Tensor:
        centred = rows.float() - mean
        return (centred / centred.norm(dim=1, keepdim=True).clamp_min(1e-12)).to(vectors.dtype)

    sample = directions(vectors[torch.from_numpy(np.sort(rng.choice(len(vectors), 40 * clusters, replace=False)))])
    centroids = sample[torch.from_numpy(rng.choice(len(sample), clusters, replace=False))].float()
    for _ in range(rounds):
        assigned = (sample @ centroids.to(sample.dtype).T).argmax(dim=1)
        sums = torch.zeros_like(centroids).index_add_(0, assigned, sample.float())
        norms = sums.norm(dim=1, keepdim=True)
        centroids = torch.where(norms > 0, sums / norms.clamp_min(1e-12), centroids)  # an empty one stays
    centroids = centroids.to(vectors.dtype)
    return torch.cat(
        [(directions(rows) @ centroids.T).topk(PROBES, dim=1).indices for rows in vectors.split(16_384)]
    ).numpy()


@contextmanager
def _one_torch_thread() -> Iterator[None]:
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def components(count: int, links: np.ndarray) -> np.ndarray:
    """Connected components of ``count`` nodes joined by ``links`` [2, m]: each node's label is
    the smallest node of its component. Label propagation with pointer jumping, in NumPy."""
    labels = np.arange(count)
    if links.size == 0:
        return labels
    a, b = links
    while True:
        low = np.minimum(labels[a], labels[b])
        before = labels.copy()
        np.minimum.at(labels, labels[a], low)
        np.minimum.at(labels, labels[b], low)
        while not np.array_equal(labels, labels[labels]):  # every node points at its root
            labels = labels[labels]
        if np.array_equal(labels, before):
            return labels


def _same_content(fingerprints: np.ndarray) -> np.ndarray:
    """Links [2, m] from each row to the first row with its fingerprint (None matches nothing)."""
    first: dict[bytes, int] = {}
    links = [(row, first.setdefault(f, row)) for row, f in enumerate(fingerprints.tolist()) if f is not None]
    return np.array(links, dtype=np.int64).reshape(-1, 2).T


def _groups_of(labels: np.ndarray) -> list[np.ndarray]:
    """Positions of each label held by two or more."""
    order = np.argsort(labels, kind="stable")
    cuts = np.flatnonzero(np.diff(labels[order])) + 1
    return [group for group in np.split(order, cuts) if len(group) >= 2]


def _group(rows: Sequence[ImageRow], fingerprints: dict[int, bytes | None], vectors: dict | None) -> Group:
    keeper = min(rows, key=_keeping_order)
    duplicates = []
    for row in rows:
        if row is keeper:
            continue
        exact = fingerprints[row.id] is not None and fingerprints[row.id] == fingerprints[keeper.id]
        similarity = 1.0 if exact else _similarity(vectors, row.id, keeper.id)
        duplicates.append(Duplicate(Hit.of(row, similarity), exact))
    duplicates.sort(key=lambda d: (-(d.hit.score or 0.0), os.fsencode(d.hit.path)))
    return Group(Hit.of(keeper, None), duplicates)


def _vectors_of(wanted: np.ndarray, ids: np.ndarray, vectors: np.ndarray) -> dict[int, np.ndarray]:
    """The rows of ``vectors`` (whose ids, ascending, are ``ids``) of the ``wanted`` ids that have one."""
    at = np.minimum(np.searchsorted(ids, wanted), max(len(ids) - 1, 0))
    return {int(i): vectors[p] for i, p in zip(wanted, at) if len(ids) and ids[p] == i}


def _keeping_order(row: ImageRow) -> tuple:
    """A file that is no symlink (deleting the others must not leave a link to a file outside
    the library as the only copy), then the largest pixel count, then most metadata, then the
    oldest file, then the path."""
    size = (row.width or 0) * (row.height or 0)
    return (os.path.islink(row.path), -size, -row.metadata.known, row.mtime_ns, row.path)


def _similarity(vectors: dict | None, a: int, b: int) -> float | None:
    if vectors is None or a not in vectors or b not in vectors:
        return None
    return float(vectors[a] @ vectors[b])
