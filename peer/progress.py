"""Progress of long waits (corpus download and tokenizing, model loading, state and checkpoint
transfers): a tqdm bar when stderr is a terminal and logs are text, plain INFO log lines through
`logging` otherwise (so ``--log-format json`` stays one JSON object per line). Waits shorter
than ``MIN_WAIT_S`` show nothing.

    with Progress("checkpoint 12 download", total=nbytes, logger=log) as p:
        for chunk in chunks:
            ...
            p.update(len(chunk))

    with waiting("downloading the corpus", logger=log):   # no measurable progress: elapsed time
        subprocess.run(...)
"""
from __future__ import annotations

import contextlib
import logging
import sys
import threading
import time
from typing import Any, Iterator

from peer.runtime import JsonLogFormatter

MIN_WAIT_S = 2.0      # shorter waits stay silent
LOG_EVERY_S = 10.0    # without a terminal: one log line this often while the wait lasts
_TICK_S = 1.0         # how often an indeterminate wait redraws its bar

log = logging.getLogger("lowband.progress")


def bars_enabled() -> bool:
    """tqdm bars only on a terminal, and not under JSON logs (a bar is not a JSON line)."""
    try:
        tty = sys.stderr.isatty()
    except (AttributeError, ValueError):  # closed or replaced stderr
        return False
    json_logs = any(isinstance(h.formatter, JsonLogFormatter) for h in logging.getLogger().handlers)
    return tty and not json_logs


def _amount(n: float, unit: str) -> str:
    if unit != "B":
        return f"{n:.0f} {unit}"
    for suffix in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or suffix == "GiB":
            return f"{n:.0f} B" if suffix == "B" else f"{n:.1f} {suffix}"
        n /= 1024
    raise AssertionError("unreachable")


class Progress:
    """One wait. ``update(n)`` adds ``n`` units done (thread-safe); ``close`` (or leaving the
    ``with`` block) ends it, with a final line when anything was shown."""

    def __init__(self, desc: str, total: float | None = None, unit: str = "B", *,
                 logger: logging.Logger | None = None, min_wait_s: float = MIN_WAIT_S,
                 log_every_s: float = LOG_EVERY_S, elapsed_only: bool = False) -> None:
        self.desc, self.total, self.unit = desc, total, unit
        self.done = 0.0
        self._log = logger or log
        self._min_wait_s, self._log_every_s = min_wait_s, log_every_s
        self._start = time.monotonic()
        self._next_log = self._start + min_wait_s
        self._logged = False
        self._closed = False
        self._lock = threading.Lock()
        self._last_tick = self._start
        self._bar: Any = None
        if bars_enabled():
            from tqdm import tqdm

            # tqdm's own delay keeps short waits silent; leave=False clears the bar at the end
            # (the closing log line stays)
            self._bar = tqdm(total=total, desc=desc, unit=unit, unit_scale=unit == "B",
                             unit_divisor=1024 if unit == "B" else 1000, delay=min_wait_s,
                             leave=False, dynamic_ncols=True, file=sys.stderr,
                             bar_format="{desc}: {elapsed}" if elapsed_only else None)

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, exc_type: object, *_: object) -> None:
        self.close(failed=exc_type is not None)

    def update(self, n: float = 1) -> None:
        with self._lock:
            if self._closed:
                return
            self.done += n
            if self._bar is not None:
                self._bar.update(n)
            else:
                self._maybe_log()

    def tick(self) -> None:
        """An indeterminate wait's heartbeat: the bar counts the seconds since the last tick
        (through update, so tqdm's delay and clearing still apply), the log path may log."""
        with self._lock:
            if self._closed:
                return
            if self._bar is not None:
                now = time.monotonic()
                self._bar.update(now - self._last_tick)
                self._last_tick = now
            else:
                self._maybe_log()

    def _status(self, elapsed: float) -> str:
        parts = [_amount(self.done, self.unit)]
        if self.total:
            parts[0] += f" of {_amount(self.total, self.unit)} ({100 * self.done / self.total:.0f}%)"
        if self.done and elapsed > 0:
            parts.append(f"{_amount(self.done / elapsed, self.unit)}/s")
        parts.append(f"{elapsed:.0f}s")
        return ", ".join(parts) if self.done or self.total else f"{elapsed:.0f}s"

    def _maybe_log(self) -> None:
        now = time.monotonic()
        if now >= self._next_log:
            self._log.info("%s: %s", self.desc, self._status(now - self._start))
            self._logged = True
            self._next_log = now + self._log_every_s

    def close(self, failed: bool = False) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            elapsed = time.monotonic() - self._start
            if self._bar is not None:
                self._bar.close()
            if self._logged or elapsed >= self._min_wait_s:
                self._log.info("%s: %s after %.1fs", self.desc, "failed" if failed else "done", elapsed)


@contextlib.contextmanager
def waiting(desc: str, *, logger: logging.Logger | None = None,
            min_wait_s: float = MIN_WAIT_S, log_every_s: float = LOG_EVERY_S) -> Iterator[Progress]:
    """A wait with nothing to count (a subprocess, one big request): a bar or log lines showing
    the elapsed time, driven by a ticker thread."""
    progress = Progress(desc, None, "s", logger=logger, min_wait_s=min_wait_s, log_every_s=log_every_s,
                        elapsed_only=True)
    stop = threading.Event()

    def tick() -> None:
        while not stop.wait(_TICK_S):
            progress.tick()

    ticker = threading.Thread(target=tick, name="progress", daemon=True)
    ticker.start()
    failed = False
    try:
        yield progress
    except BaseException:
        failed = True
        raise
    finally:
        stop.set()
        ticker.join(2 * _TICK_S)
        progress.close(failed=failed)
