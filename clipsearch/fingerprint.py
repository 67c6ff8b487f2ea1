"""Content fingerprints: how a moved, renamed or copied photo is recognised without decoding it.

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

HEAD_BYTES = 1 << 20
TAIL_BYTES = 1 << 10


def fingerprint(path: bytes | str | os.PathLike) -> bytes:
    """A 16-byte digest of the file's size, first MiB and last KiB.

    Raises OSError, also for anything but a regular file: a FIFO named like a photo would block
    the open for ever (hence O_NONBLOCK), and a device behind a symlink never ends.
    """
    with open(os.open(path, os.O_RDONLY | os.O_NONBLOCK), "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.EINVAL, "not a regular file", os.fsdecode(path))
        size = st.st_size
        digest = hashlib.blake2b(size.to_bytes(8, "little"), digest_size=16)
        digest.update(f.read(HEAD_BYTES))
        if size > HEAD_BYTES:
            f.seek(max(size - TAIL_BYTES, HEAD_BYTES))
            digest.update(f.read(TAIL_BYTES))
    return digest.digest()
