"""The sweep's progress display: a tqdm bar on a terminal, one flushed line per point in a log."""

from __future__ import annotations

import sys
import time

__all__ = ["progress_bar"]


class LineProgress:
    """The progress bar's stand-in for log files: one flushed line per point, no carriage returns."""

    def __init__(self, total: int, desc: str):
        self.total, self.desc, self.done, self.postfix = total, desc, 0, ""
        self.t0 = time.perf_counter()

    def set_postfix_str(self, text: str, *a, **k):
        self.postfix = text

    def update(self, k: int = 1):
        self.done += k
        print(f"{self.desc} [{self.done}/{self.total}] {self.postfix} ({time.perf_counter() - self.t0:.0f} s)",
              flush=True)

    def close(self):
        pass


def progress_bar(total: int, enabled: bool, desc: str):
    """A tqdm bar when ``enabled``, else a ``LineProgress``; both take ``set_postfix_str``,
    ``update`` and ``close``."""
    if not enabled:
        return LineProgress(total, desc)
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="pt", file=sys.stderr, dynamic_ncols=True)
