"""Errors a person can act on.

Everything raised for bad input, missing files, offline downloads or a mismatched index
derives from `ClipsearchError`; its message is one complete sentence that says what to do.
The CLI prints that message on one line and exits 1; anything else is a bug and gets a
traceback only with `--verbose`.
"""


class ClipsearchError(Exception):
    """Base class: the message is shown to the user as is."""


class DownloadError(ClipsearchError):
    """A file could not be fetched, or its checksum did not match."""


class CheckpointError(ClipsearchError):
    """A weights file or directory could not be read as a CLIP checkpoint."""


class ImageError(ClipsearchError):
    """An image could not be decoded."""


class IndexStateError(ClipsearchError):
    """The index on disk cannot be used as asked (wrong model, corrupt, locked, newer schema)."""
