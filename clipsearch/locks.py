"""Whether an index run is going on in a home, without ever taking its writer lock.

Trying the lock, even for a moment, could make an indexer that starts in that moment give up
("another process is indexing"): a server or `status` must never get in its way. So the
kernel's table of held locks is read instead (Linux's /proc/locks); elsewhere the answer is
"unknown".
"""

from __future__ import annotations

import os
from pathlib import Path

from clipsearch.catalog import LOCK_FILE

PROC_LOCKS = Path("/proc/locks")


def indexing(home: Path) -> bool | None:
    """True while some process holds ``home``'s writer lock, None where that cannot be known."""
    try:
        inode = os.stat(home / LOCK_FILE).st_ino
    except FileNotFoundError:
        return False  # no run has ever taken it
    except OSError:
        return None
    try:
        table = PROC_LOCKS.read_text()
    except OSError:
        return None
    # "1: FLOCK  ADVISORY  WRITE 4242 00:2d:1234 0 EOF": the sixth field is major:minor:inode.
    # The device numbers are left out: overlay filesystems report others in stat.
    for line in table.splitlines():
        fields = line.split()
        if len(fields) > 5 and fields[1] == "FLOCK" and fields[5].rsplit(":", 1)[-1] == str(inode):
            return True
    return False
