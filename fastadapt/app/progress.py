"""Progress that stays visible without a terminal: a tqdm bar when stderr is a terminal, else a
log line (``logging``, level INFO) at the start, every :data:`INTERVAL_S` seconds and at the end,
so a job piped to a file or run under CI never goes silent for minutes."""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

logger = logging.getLogger("fastadapt.progress")

#: Seconds between two progress lines when there is no terminal.
INTERVAL_S = 30.0


def stderr_is_terminal() -> bool:
    return bool(getattr(sys.stderr, "isatty", None) and sys.stderr.isatty())


class LineProgress:
    """tqdm's ``update``/``close`` as log lines: ``eval: 20/50 ex (40%), 31 s, ~46 s left``."""

    def __init__(self, total: int, desc: str, unit: str, *, initial: int = 0, interval: float = INTERVAL_S) -> None:
        self.total, self.desc, self.unit, self.interval = total, desc, unit, interval
        self.done = self.initial = initial
        self.start = self.last = time.monotonic()
        logger.info("%s: %d/%d %s", desc, initial, total, unit)

    def update(self, n: int = 1, note: str = "") -> None:
        """Count ``n`` more; log a line (ending in ``note``) at the end or when ``interval`` passed."""
        self.done += n
        now = time.monotonic()
        if self.done >= self.total or now - self.last >= self.interval:
            self.last = now
            self._log(now, note)

    def _log(self, now: float, note: str) -> None:
        spent = now - self.start
        rate = (self.done - self.initial) / spent if spent > 0 else 0.0
        eta = f", ~{(self.total - self.done) / rate:.0f} s left" if self.done < self.total and rate > 0 else ""
        logger.info("%s: %d/%d %s (%.0f%%), %.0f s%s%s", self.desc, self.done, self.total, self.unit,
                    100 * self.done / max(self.total, 1), spent, eta, f"; {note}" if note else "")

    def close(self) -> None:
        pass


def progress(total: int, *, desc: str, unit: str, enabled: bool = True) -> Any:
    """An object with ``update(n)`` and ``close()``: a tqdm bar on a terminal, log lines otherwise,
    nothing when ``enabled`` is false."""
    if enabled and stderr_is_terminal():
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, unit=unit)
    return LineProgress(total, desc, unit) if enabled else _Silent()


class _Silent:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass
