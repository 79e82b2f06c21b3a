"""Claims: which worker trains which unit, when several processes share one sweep.

A worker takes a unit by holding an exclusive ``flock`` on ``<dir>/<name>.claim`` for as long as
it trains it; another worker that cannot get the lock skips the unit. The kernel drops the lock
when its process dies, however it dies, so a killed worker's unit is free again at once (no
process ids to trust: they are reused). The file holds the owner's pid for people reading the
directory. Finished units are known from the RowStore, not from claims; a worker releases its
claim (unlinks the file, then drops the lock) when the unit's row is stored.
"""

from __future__ import annotations

import fcntl
import os
import re
from pathlib import Path

__all__ = ["Claims"]


class Claims:
    """Exclusive claims on named units under ``directory`` (created when needed)."""

    def __init__(self, directory: str | Path):
        self.dir = Path(directory)
        self._held: dict[str, int] = {}  # name -> fd holding the lock

    def _path(self, name: str) -> Path:
        return self.dir / (re.sub(r"[^A-Za-z0-9_.=-]+", "_", name) + ".claim")

    def owner(self, name: str) -> int | None:
        """The pid written in ``name``'s claim file (informational; the lock decides), or None."""
        try:
            return int(self._path(name).read_text().strip() or "0") or None
        except (OSError, ValueError):
            return None

    def take(self, name: str) -> bool:
        """Claim ``name`` for this process; False when another process holds it."""
        if name in self._held:
            return True
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self._path(name)
        while True:
            fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                return False
            try:  # locked the file now at ``path``, not one a releasing owner just unlinked?
                same = os.fstat(fd).st_ino == os.stat(path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._held[name] = fd
        return True

    def release(self, name: str) -> None:
        """Drop this process's claim on ``name`` (unlinked while still locked; others' untouched)."""
        fd = self._held.pop(name, None)
        if fd is None:
            return
        try:
            self._path(name).unlink()
        except FileNotFoundError:
            pass
        os.close(fd)
