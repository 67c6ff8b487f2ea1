"""The search box's syntax, which is the CLI's: a description, then refinements that start with
``+`` (add, like ``--add``) or ``-`` (subtract, like ``--subtract``), each ``[WEIGHT:]TEXT``:

    a beach +at sunset -0.5:people

A refinement starts at a sign that follows a space, so "t-shirt" and "a - b" stay text. Unlike
the CLI, a term here is always text: a request never names a file on the server.
"""

from __future__ import annotations

import math
import re

from clipsearch.search import split_weight
from clipsearch.serve.errors import RequestError

MAX_CHARS = 1000
MAX_TERMS = 16

_REFINEMENT = re.compile(r"\s+(?=[+-]\S)")


def parse_query(text: str, *, required: bool = True) -> list[tuple[float, str]]:
    """Weighted text terms; an empty ``text`` is an error when ``required``, else no terms."""
    text = text.strip()
    if not text:
        if required:
            raise RequestError("The search is empty; type a description.")
        return []
    if len(text) > MAX_CHARS:
        raise RequestError(f"The search is longer than {MAX_CHARS} characters.")
    parts = _REFINEMENT.split(text)
    if len(parts) > MAX_TERMS:
        raise RequestError(f"The search has more than {MAX_TERMS} terms.")
    return [_term(part) for part in parts]


def _term(part: str) -> tuple[float, str]:
    sign = -1.0 if part.startswith("-") else 1.0
    weight, text = split_weight(part[1:] if part[0] in "+-" else part)
    text = text.strip()
    if not math.isfinite(weight) or not text:
        raise RequestError(f"Cannot read the refinement {part!r}: write +TEXT, -TEXT or -WEIGHT:TEXT.")
    return sign * weight, text
