"""The directory scan: which files under the given roots are candidate images.

Paths stay bytes from start to finish (``os.scandir`` on a bytes path returns bytes names), so
a file name that is not valid UTF-8 round-trips into the catalog unchanged and no name is
encoded or decoded per file. Each file costs one ``stat`` (the one ``DirEntry`` caches); that
and the lack of any per-file work beyond it is what keeps a no-change re-run over a big library
in the low seconds.

Only names with a known image extension are candidates. A photo folder is full of sidecars
(``.xmp``, ``.json``, ``.mov``) that would each cost a decode attempt and clutter the failure
list; the extension only decides what is *tried* — the decoder looks at the content, so a PNG
named ``.jpg`` indexes and a text file named ``.jpg`` is recorded as failed.
"""

from __future__ import annotations

import contextlib
import fnmatch
import functools
import logging
import os
import stat
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import NamedTuple

from clipsearch.errors import ClipsearchError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset(
    {
        b".jpg",
        b".jpeg",
        b".jpe",
        b".jfif",
        b".png",
        b".webp",
        b".gif",
        b".bmp",
        b".dib",
        b".tif",
        b".tiff",
        b".heic",
        b".heif",
        b".avif",
    }
)

# Folders that hold caches, thumbnails or other programs' data, never a person's photos.
# Hidden folders (a leading dot) are skipped too; these are the common ones without a dot.
# A NAS share's recycle bin and snapshots (Synology's #recycle and #snapshot, QNAP's @Recycle
# and @Recently-Snapshot) hold deleted photos and whole copies of the share.
JUNK_DIRS = frozenset(
    {
        b"node_modules",
        b"@eaDir",
        b"#recycle",
        b"#snapshot",
        b"@Recycle",
        b"@Recently-Snapshot",
        b"__MACOSX",
        b"$RECYCLE.BIN",
        b"System Volume Information",
        b"__pycache__",
        b"lost+found",
    }
)


class FoundFile(NamedTuple):
    path: bytes  # absolute, normalised, not resolved through symlinks
    size: int
    mtime_ns: int  # as the catalog stores it: `stored_mtime_ns`

    @classmethod
    def of(cls, path: bytes, st: os.stat_result) -> FoundFile:
        return cls(path, st.st_size, stored_mtime_ns(st))


def stored_mtime_ns(st: os.stat_result) -> int:
    """A file's mtime as the catalog records it and compares it with: within SQLite's 64-bit
    integers (years 1677 to 2262), beyond which a file's clock is wrong anyway; one file dated
    2300 had stopped every index run."""
    return min(max(st.st_mtime_ns, -(2**63)), 2**63 - 1)


@dataclass
class Walk:
    """One scan of some roots. Iterate it for the files; afterwards ``unreadable`` lists the
    folders that could not be listed, whose catalog rows must not be taken for deleted."""

    roots: list[bytes]
    exclude: tuple[str, ...] = ()
    follow_symlinks: bool = False
    # Folders not descended into, by whatever path the walk meets them: the index's own, whose
    # thumbnails are images. One named as a root is walked.
    skip: tuple[bytes, ...] = ()
    unreadable: list[bytes] = field(default_factory=list)
    # Links met and not followed (not ``follow_symlinks``) that may be folders: what is indexed
    # under one (``index ~/Pictures/Phone``, a link to a card) the walk did not see, not deleted.
    unfollowed: list[bytes] = field(default_factory=list)

    @functools.cached_property
    def patterns(self) -> list[bytes]:
        """``exclude`` as the walk matches it, against paths in bytes."""
        return [os.fsencode(p) for p in self.exclude]

    def __iter__(self) -> Iterator[FoundFile]:
        patterns = self.patterns
        skipped = set()
        for folder in self.skip:
            with contextlib.suppress(OSError):  # not there (yet): nothing to skip
                st = os.stat(folder)
                skipped.add((st.st_dev, st.st_ino))
        for root in self.roots:
            try:
                st = os.stat(root)
            except OSError as err:
                log.warning("cannot read %s: %s", os.fsdecode(root), err.strerror)
                self.unreadable.append(root)
                continue
            if stat.S_ISDIR(st.st_mode):
                # Folders listed are remembered per root (no loops): a root that is a link to
                # another had been skipped whole, and its indexed files taken for deleted.
                # Roots inside others yield their files twice; `plan_changes` takes them once.
                yield from self._walk_tree(root, st, patterns, skipped - {(st.st_dev, st.st_ino)})
            elif not _is_candidate(os.path.basename(root)):
                log.warning("%s is not an image file (by its name); skipped", os.fsdecode(root))
            elif not _excluded(root, patterns):
                yield FoundFile.of(root, st)

    def excludes(self, path: bytes) -> bool:
        """Whether ``path`` (inside one of the roots) is skipped by an exclude pattern, or for
        being hidden (a name with a leading dot, indexed only where named: ``index .private``),
        itself or through a folder of it below its root: what a walk did not see for that
        reason was not deleted, and is left as it was indexed (as rsync leaves excluded files).
        So is what lies under a link the walk did not follow (`unfollowed`)."""
        patterns = self.patterns
        inside = [root for root in self.roots if path == root or path.startswith(root.rstrip(b"/") + b"/")]
        if not inside:
            return False
        root = max(inside, key=len)
        if path == root:  # a file named as a root
            return _excluded(path, patterns)
        if self._in_unfollowed(path):
            return True
        if not patterns and b"/." not in path[len(root.rstrip(b"/")) :]:
            return False
        while path != root:  # the file, then each folder up to the root, as the walk met them
            if os.path.basename(path)[:1] == b"." or _excluded(path, patterns):
                return True
            path = os.path.dirname(path)
        return False

    @functools.cached_property
    def _in_unfollowed(self) -> Callable[[bytes], bool]:
        """Whether a path lies under one of `unfollowed` (asked once the walk is over)."""
        return under(self.unfollowed)

    def _walk_tree(
        self, root: bytes, root_stat: os.stat_result, patterns: list[bytes], visited: set[tuple[int, int]]
    ) -> Iterator[FoundFile]:
        # An explicit stack, not recursion: deep trees do not hit the recursion limit. The
        # per-entry tests are inline: this loop runs once per file of the whole library.
        follow = self.follow_symlinks
        stack = [(root, (root_stat.st_dev, root_stat.st_ino))]
        while stack:
            folder, key = stack.pop()
            if key in visited:
                continue
            visited.add(key)
            subfolders = []
            try:
                with os.scandir(folder) as entries:
                    for entry in entries:
                        name = entry.name
                        if name[:1] == b"." or (patterns and _excluded(entry.path, patterns, name)):
                            continue
                        try:
                            is_dir = entry.is_dir(follow_symlinks=follow)
                        except OSError as err:  # a link to itself, followed: not the whole folder lost
                            log.warning("cannot read %s: %s", os.fsdecode(entry.path), err.strerror)
                            self.unreadable.append(entry.path)
                            continue
                        if is_dir:
                            if name not in JUNK_DIRS:
                                subfolders.append(entry)
                            continue
                        dot = name.rfind(b".")
                        if dot <= 0 or name[dot:].lower() not in IMAGE_EXTENSIONS:
                            if not follow and entry.is_symlink():
                                self.unfollowed.append(entry.path)
                            continue
                        try:
                            if entry.is_symlink():
                                found = _found_link(entry)
                                if found is not None:
                                    yield found
                                continue
                            st = entry.stat()
                        except FileNotFoundError:  # deleted since the listing
                            continue
                        except OSError as err:  # a folder that lists but cannot be entered (no x)
                            if folder not in self.unreadable:  # said once, its rows kept
                                log.warning("cannot read the files in %s: %s", os.fsdecode(folder), err.strerror)
                                self.unreadable.append(folder)
                            continue
                        yield FoundFile.of(entry.path, st)
            except OSError as err:
                log.warning("cannot list %s: %s", os.fsdecode(folder), err.strerror)
                self.unreadable.append(folder)
                continue
            for entry in reversed(subfolders):  # reversed: folders come out in listing order
                try:
                    st = entry.stat(follow_symlinks=follow)
                except OSError as err:
                    log.warning("cannot read %s: %s", os.fsdecode(entry.path), err.strerror)
                    self.unreadable.append(entry.path)
                    continue
                stack.append((entry.path, (st.st_dev, st.st_ino)))


def _found_link(entry: os.DirEntry) -> FoundFile | None:
    """A symlink to a file is indexed under the link's own path, whatever ``follow_symlinks``
    says (that flag is about descending into folders). A broken link is still reported, with
    the link's own stat, so the decoder records it as failed instead of it vanishing silently.
    OSError if the link itself cannot be stat'ed (a folder that cannot be entered)."""
    try:
        st = entry.stat()
    except OSError:
        try:
            st = entry.stat(follow_symlinks=False)
        except FileNotFoundError:  # deleted between the listing and the stat
            return None
    if stat.S_ISDIR(st.st_mode):  # a link to a folder while not following links
        return None
    return FoundFile.of(entry.path, st)


def _is_candidate(name: bytes) -> bool:
    dot = name.rfind(b".")
    return dot > 0 and name[dot:].lower() in IMAGE_EXTENSIONS


def _excluded(path: bytes, patterns: list[bytes], name: bytes | None = None) -> bool:
    """A pattern excludes a file or folder when it matches its name (``*.png``, ``raw``) or its
    full path (``*/exports/*``)."""
    if not patterns:
        return False
    name = os.path.basename(path) if name is None else name
    return any(fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(path, p) for p in patterns)


def normalise_roots(paths: Iterable[str | os.PathLike] | str | bytes | os.PathLike) -> list[bytes]:
    """Absolute, normalised bytes paths, as the catalog stores them (not resolved through
    symlinks: a library reached through a link keeps the paths the user knows). One path
    alone is one path: a str had been taken for its characters, and ``Index.remove("a.jpg")``
    had forgotten everything under "/"."""
    listed: Iterable[str | bytes | os.PathLike] = [paths] if isinstance(paths, str | bytes | os.PathLike) else paths
    expanded = [os.fsencode(os.path.expanduser(os.fspath(p))) for p in listed]
    if all(os.path.isabs(p) for p in expanded):
        return [_one_leading_slash(os.path.normpath(p)) for p in expanded]
    cwd = _shell_cwd()
    try:
        return [
            _one_leading_slash(
                os.path.abspath(p) if cwd is None or b".." in p.split(b"/") else os.path.normpath(os.path.join(cwd, p))
            )
            for p in expanded
        ]
    except FileNotFoundError:  # os.getcwd, of a folder deleted since the shell went into it
        raise ClipsearchError(
            "The current folder no longer exists (deleted, or its drive unplugged); "
            "cd to it again, or give an absolute path."
        ) from None


def _one_leading_slash(path: bytes) -> bytes:
    """``//photos`` as ``/photos``, the same folder: normpath keeps two leading slashes (POSIX
    lets them mean something else; on Linux and macOS they do not), and the catalog had then
    held every photo under both."""
    return b"/" + path.lstrip(b"/") if path.startswith(b"//") else path


def _shell_cwd() -> bytes | None:
    """The working directory as the shell names it (``$PWD``, through the links ``cd`` went
    through), where that is the working directory; else None. ``os.getcwd`` names it by its real
    path: ``cd ~/photos && index .`` (a link) had indexed every photo again beside the paths that
    ``index ~/photos`` gave them. Paths with ``..`` keep the real one, as the kernel resolves it."""
    pwd = os.fsencode(os.environ.get("PWD", ""))
    if not os.path.isabs(pwd) or pwd != os.path.normpath(pwd):
        return None
    try:
        return pwd if os.path.samestat(os.stat(pwd), os.stat(b".")) else None
    except OSError:
        return None


def under(roots: Iterable[bytes]) -> Callable[[bytes], bool]:
    """A test for "is this catalog path one of ``roots`` or inside one" (``/a/b`` is not inside
    ``/a/bc``), fast enough to run over every row of a large catalog."""
    exact = frozenset(roots)
    prefixes = tuple(root if root.endswith(b"/") else root + b"/" for root in exact)
    return lambda path: path in exact or path.startswith(prefixes)
