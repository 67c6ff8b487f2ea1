"""Giving memory the program freed back to the system.

glibc's malloc keeps freed memory for reuse, and after the first large block it frees it stops
returning even large ones (its mmap threshold rises to their size): the float32 weights a
conversion to bf16 or int8 freed (ViT-B-32-256's image tower: 350 MB) stayed resident for the
whole run. ``malloc_trim`` hands the free pages back; elsewhere (musl, macOS) this does nothing.
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:  # the C library the interpreter itself runs on
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


def release_free_memory() -> None:
    """Return the free pages of every malloc arena to the system (a few milliseconds)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
