"""`clipsearch status --check`: each model's vector file compared with the catalog row by row,
and the catalog's own vectors checked for damage SQLite cannot see.

A load trusts a vector file whose stamp matches the catalog and whose checksum matched once
(`vectors._read`); this reads every file whole again, compares its checksum, then every vector
it holds with the catalog's (a file that only lags the catalog is first brought up to date, as
a load does: not damage). A vector in the catalog altered in place passes SQLite's
integrity check; every vector clipsearch stores is of unit length, and random damage to its
bytes almost never keeps it so.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from clipsearch.catalog import Catalog
from clipsearch.records import StoredModel, decode_path
from clipsearch.vectors import StaleIndex, VectorIndex

# float16 storage keeps a unit vector's length within about 1e-3 of 1.
NORM_TOLERANCE = 1e-2
# A quantised index (SQ, PQ) holds approximations: a vector passes when this close to the catalog's.
APPROXIMATE_COSINE = 0.9
_CHUNK = 10_000
_SHOWN = 3  # files named per problem


@dataclass
class ModelCheck:
    model: str
    vectors: int  # in the catalog
    problems: list[str] = field(default_factory=list)  # none: the file matches the catalog


def check(home: Path, catalog: Catalog) -> list[ModelCheck]:
    return [check_model(home, catalog, model) for model in catalog.models()]


def check_model(home: Path, catalog: Catalog, model: StoredModel) -> ModelCheck:
    # The file first: one that lags the catalog is brought up to date before the catalog's
    # vectors are read, so that both are of one generation.
    index: VectorIndex | None = None
    unusable = ""
    try:
        index, built_from = VectorIndex.read_checked(home, catalog, model)
    except StaleIndex as reason:
        unusable = f"its vector file cannot be used: {reason}; {_rebuild(catalog, model)}"
    else:
        if built_from != catalog.generation:
            # Not damage: the file of a model that the last runs did not use lags the catalog,
            # and every load brings it up to date by the rows changed since (`refresh`), as this
            # does (saved as a query saves it). The checksum of all it held matched above; the
            # rows it kept are compared below with the rest.
            index = VectorIndex.refresh(home, catalog, model)
    ids, vectors = catalog.all_vectors(model)
    result = ModelCheck(model.name, len(ids))
    norms = np.linalg.norm(vectors, axis=1)
    damaged = ids[~(np.abs(norms - 1) <= NORM_TOLERANCE)]  # NaN fails too
    if len(damaged):
        result.problems.append(
            f"{len(damaged)} of its vectors in the catalog are damaged (not of unit length), of "
            f"{_files(catalog, damaged)}: `clipsearch remove` those files, then index them again"
        )
    if index is None:
        result.problems.append(unusable)
        return result
    held = index.held_ids()
    for ids_wrong, what in ((np.setdiff1d(ids, held), "lacks"), (np.setdiff1d(held, ids), "holds other")):
        if len(ids_wrong):
            result.problems.append(f"its vector file {what} vectors: {_files(catalog, ids_wrong)}")
    common = np.intersect1d(ids, held)
    differ = _differing(index, common, vectors[np.searchsorted(ids, common)])
    if len(differ):
        result.problems.append(
            f"{len(differ)} vector(s) in its vector file differ from the catalog's, of {_files(catalog, differ)}"
        )
    if result.problems and not len(damaged):
        result.problems[-1] += f"; {_rebuild(catalog, model)}"
    return result


def _rebuild(catalog: Catalog, model: StoredModel) -> str:
    """The advice, naming the model unless it is the default, which a plain `rebuild` rebuilds."""
    named = "" if model.name == catalog.default_model else f" --model {model.name}"
    return f"run `clipsearch rebuild{named}`"


def _differing(index: VectorIndex, ids: np.ndarray, expected: np.ndarray) -> np.ndarray:
    exact = re.search(r"SQ|PQ", index.index_type) is None
    wrong = []
    for start in range(0, len(ids), _CHUNK):
        chunk, want = ids[start : start + _CHUNK], expected[start : start + _CHUNK]
        held = index.vectors_of(chunk)
        if exact:
            same = np.all(held == want, axis=1)
        else:
            same = np.sum(held * want, axis=1) >= APPROXIMATE_COSINE * np.linalg.norm(held, axis=1)
        wrong.append(chunk[~same])
    return np.concatenate(wrong) if wrong else np.empty(0, np.int64)


def _files(catalog: Catalog, ids: np.ndarray) -> str:
    rows = catalog.rows(ids[:_SHOWN].tolist())
    named = ", ".join(str(decode_path(rows[i].path)) for i in ids[:_SHOWN].tolist() if i in rows)
    return named + (f" and {len(ids) - _SHOWN} more" if len(ids) > _SHOWN else "") if named else f"ids {ids[:_SHOWN]}"
