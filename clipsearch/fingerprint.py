"""Content fingerprints: how a moved, renamed or copied photo is recognised without decoding it,
and the one way the indexer opens a file.

Hashing whole files would read every byte of a library a second time; the size plus the first
MiB and the last KiB tell two photos apart in practice (the head holds the headers, EXIF and
the start of the entropy-coded data, which differs between any two shots, and the tail catches
appended edits), at a fixed cost per file. Only new and changed files are fingerprinted.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
from typing import BinaryIO

HEAD_BYTES = 1 << 20
TAIL_BYTES = 1 << 10
# Formats whose head and tail change with any change to the picture: a compressed stream, where
# an edit moves every byte after it (JPEG, WebP, HEIF, AVIF, GIF), or a checksum of every pixel
# at the end (PNG's Adler-32). An uncompressed one (BMP, most TIFF, PPM) changes in the middle
# alone: an edit there, or two scans with the same margins, left the fingerprint as it was.
_WHOLE_BY_ENDS = {b"jpg", b"jpeg", b"jpe", b"jfif", b"png", b"webp", b"heic", b"heif", b"avif", b"gif"}


def open_regular(path: bytes | str | os.PathLike) -> BinaryIO:
    """The file at ``path``, open for reading; OSError if it cannot be, or is not a regular file.

    The open never blocks: a FIFO named like a photo would block a plain open for ever (hence
    O_NONBLOCK), and whatever was opened is checked on the descriptor itself, so a file swapped
    for a FIFO or a device (behind a symlink, say) after any earlier look at the name is still
    refused. Everything the indexer reads of a file is read from what this returns.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file", os.fsdecode(path))
        return open(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def fingerprint(source: BinaryIO | bytes | str | os.PathLike) -> bytes:
    """A 16-byte digest of the file's size, first MiB and last KiB, from an open file (read from
    its start) or a path (opened with `open_regular`). Raises OSError."""
    if isinstance(source, (bytes, str, os.PathLike)):
        with open_regular(source) as f:
            return fingerprint(f)
    size = os.fstat(source.fileno()).st_size
    digest = hashlib.blake2b(size.to_bytes(8, "little"), digest_size=16)
    source.seek(0)
    digest.update(source.read(HEAD_BYTES))
    if size > HEAD_BYTES:
        source.seek(max(size - TAIL_BYTES, HEAD_BYTES))
        digest.update(source.read(TAIL_BYTES))
    return digest.digest()


def identifies(path: bytes, size: int) -> bool:
    """Whether two files with this fingerprint are the same picture: always for a file read
    whole, else by its format (`_WHOLE_BY_ENDS`). Where not, a file is encoded rather than given
    another's vector, and never called an exact copy."""
    return size <= HEAD_BYTES + TAIL_BYTES or os.path.splitext(path)[1][1:].lower() in _WHOLE_BY_ENDS
