"""Logging: plain lines (journald adds its own timestamps), levels from config, repeats rate-limited."""

from __future__ import annotations

import logging
import os
import sys
import time


class RepeatFilter(logging.Filter):
    """Lets the first of a series of identical messages through, then one per ``interval_s``
    carrying the count of those it held back, so a flapping bus cannot flood the journal."""

    def __init__(self, interval_s: float = 60.0) -> None:
        super().__init__()
        self.interval_s = interval_s
        self._seen: dict[tuple[str, int, str], tuple[float, int]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        key = (record.name, record.levelno, record.getMessage())
        now = time.monotonic()
        first, held = self._seen.get(key, (0.0, -1))
        if held >= 0 and now - first < self.interval_s:
            self._seen[key] = (first, held + 1)
            return False
        if held > 0:
            record.msg = f"{record.msg} [repeated {held} more times in {now - first:.0f} s]"
        self._seen[key] = (now, 0)
        if len(self._seen) > 1000:  # bounded: forget the oldest series
            for k in sorted(self._seen, key=lambda k: self._seen[k][0])[:500]:
                del self._seen[k]
        return True


def setup_logging(level: str) -> None:
    """Configure the root logger for the daemon."""
    under_journald = bool(os.environ.get("JOURNAL_STREAM"))
    fmt = "%(levelname)s %(name)s: %(message)s" if under_journald else "%(asctime)s %(levelname)s %(name)s: %(message)s"
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(fmt))
    handler.addFilter(RepeatFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
