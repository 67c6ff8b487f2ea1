"""Giving memory the program freed back to the system.

glibc's malloc keeps freed memory for reuse, and after the first large block it frees it stops
returning even large ones (its mmap threshold rises to their size): the float32 weights a
conversion to bf16 or int8 freed (ViT-B-32-256's image tower: 350 MB) stayed resident for the
whole run. ``malloc_trim`` hands the free pages back; elsewhere (musl, macOS) this does nothing.

A file mapped into memory counts in the process's resident memory for every page read, for as
long as it is mapped, though the system keeps those pages in its cache either way:
`release_mapped` lets them go from the process once an array mapped from a file has been read.
"""

from __future__ import annotations

import ctypes
import functools
import mmap
from collections.abc import Callable

import numpy as np


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


def release_mapped(array: np.ndarray) -> None:
    """Drop the pages that lie wholly inside ``array`` from this process's resident memory, where
    it is a view of a file mapped read-only (`np.memmap` in mode "r"; anything else is left
    alone): they stay in the system's page cache, and are read back from there if the array is
    read again. Building ViT-B/32's image graph from its NumPy tower's mapped file read all 350
    MB of it into the process's memory otherwise, on a first run already holding torch."""
    base: object = array
    while isinstance(base, np.ndarray) and not isinstance(base, np.memmap):
        base = base.base
    madvise = _madvise()
    if not isinstance(base, np.memmap) or base.mode != "r" or madvise is None or not hasattr(mmap, "MADV_DONTNEED"):
        return
    page = mmap.PAGESIZE
    start, end = array.ctypes.data, array.ctypes.data + array.nbytes
    first, last = -(-start // page) * page, end // page * page
    if last > first:
        madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), mmap.MADV_DONTNEED)


@functools.cache
def _madvise() -> Callable[..., int] | None:
    try:
        return ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
