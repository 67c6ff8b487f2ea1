"""Imported at start-up by every Python process of a CLI run that the reliability tests start
with RELIABILITY_SWAP_FOR_FIFO set (the main process, the forkserver and decode workers): it
replaces a file by a FIFO of the same name at a chosen moment, making a race that is otherwise
luck happen every time.

RELIABILITY_SWAP_FOR_FIFO names the file; RELIABILITY_SWAP_AT says when: "fingerprint" (just
after its fingerprint was read) or "decode" (as the image decoder starts on it). Whatever opens
the name again after that blocks for ever, unless it refuses what is not a regular file.
"""

import os

_NAME = os.environ.get("RELIABILITY_SWAP_FOR_FIFO")


def _path_of(source) -> str:
    if isinstance(source, (str, bytes, os.PathLike)):
        return os.fsdecode(source)
    return os.readlink(f"/proc/self/fd/{source.fileno()}")


def _swap(source) -> None:
    path = _path_of(source)
    if os.path.basename(path) == _NAME and not os.path.exists(path + ".orig"):
        os.rename(path, path + ".orig")
        os.mkfifo(path)


def _install() -> None:
    if os.environ.get("RELIABILITY_SWAP_AT") == "decode":
        from PIL import Image

        real_open = Image.open

        def open_then_swap(fp, *args, **kwargs):
            _swap(fp)
            return real_open(fp, *args, **kwargs)

        Image.open = open_then_swap
        return
    import clipsearch.decode
    import clipsearch.fingerprint
    import clipsearch.indexer

    real_fingerprint = clipsearch.fingerprint.fingerprint

    def fingerprint_then_swap(source):
        digest = real_fingerprint(source)
        _swap(source)
        return digest

    for module in (clipsearch.decode, clipsearch.indexer):
        if hasattr(module, "fingerprint"):
            module.fingerprint = fingerprint_then_swap


if _NAME:
    _install()
