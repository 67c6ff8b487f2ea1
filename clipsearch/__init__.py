"""clipsearch: find your photos by describing them.

``from clipsearch import Index`` is the library API (see `clipsearch.index`). It is resolved on
first use, so ``import clipsearch`` (and the CLI's start-up) pays for none of the engine.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"  # the one place the version is written: pyproject.toml reads it from here
__all__ = ["Filters", "Hit", "Index", "__version__"]

if TYPE_CHECKING:
    from clipsearch.filters import Filters
    from clipsearch.index import Index
    from clipsearch.search import Hit


def __getattr__(name: str) -> Any:
    if name == "Index":
        from clipsearch.index import Index

        return Index
    if name == "Filters":
        from clipsearch.filters import Filters

        return Filters
    if name == "Hit":
        from clipsearch.search import Hit

        return Hit
    raise AttributeError(f"module 'clipsearch' has no attribute {name!r}")
