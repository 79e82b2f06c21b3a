"""Claims: which worker trains which unit, when several processes share one sweep.

A worker takes a unit by creating ``<dir>/<name>.claim`` exclusively (``O_EXCL``), holding its
process id; another worker that finds the file skips the unit while that process lives. A
claim whose process is gone (killed) is stale: the next worker removes it and takes the unit,
so an interrupted sweep resumes whatever was running. Finished units are known from the
RowStore, not from claims; a worker releases its claim when the unit's row is stored.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

__all__ = ["Claims"]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


class Claims:
    """Exclusive claims on named units under ``directory`` (created when needed)."""

    def __init__(self, directory: str | Path):
        self.dir = Path(directory)

    def _path(self, name: str) -> Path:
        return self.dir / (re.sub(r"[^A-Za-z0-9_.=-]+", "_", name) + ".claim")

    def owner(self, name: str) -> int | None:
        """The process id holding ``name``, or None when nobody does (or the file is unreadable)."""
        try:
            return int(self._path(name).read_text().strip() or "0") or None
        except (OSError, ValueError):
            return None

    def take(self, name: str) -> bool:
        """Claim ``name`` for this process; False when a live process holds it."""
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self._path(name)
        for _ in range(2):  # a stale claim is removed once, then taken like a free one
            # the claim appears with its pid already in it (a hard link of a written file fails
            # if the name exists): no reader ever sees an empty claim
            tmp = self.dir / f".{path.name}.{os.getpid()}"
            tmp.write_text(str(os.getpid()))
            try:
                os.link(tmp, path)
                return True
            except FileExistsError:
                pid = self.owner(name)
                if pid == os.getpid():
                    return True
                if pid is not None and _alive(pid):
                    return False
                if not self._bury(path, pid):
                    return False
            finally:
                tmp.unlink()
        return False

    def _bury(self, path: Path, stale: int | None) -> bool:
        """Move the stale claim (of process ``stale``) out of the way; False if what was moved
        turned out to be a fresh claim of another worker (put back) or it was gone already."""
        grave = self.dir / f".{path.name}.stale.{os.getpid()}"
        try:
            os.rename(path, grave)
        except FileNotFoundError:
            return True  # another worker removed it: try to take the name
        try:
            moved = int(grave.read_text().strip() or "0") or None
        except (OSError, ValueError):
            moved = None
        if moved != stale:  # a worker took the unit between our read and the move: give it back
            try:
                os.link(grave, path)
            except FileExistsError:
                pass
            grave.unlink()
            return False
        grave.unlink()
        return True

    def release(self, name: str) -> None:
        """Drop this process's claim on ``name`` (another's is left alone)."""
        if self.owner(name) == os.getpid():
            try:
                self._path(name).unlink()
            except FileNotFoundError:
                pass
