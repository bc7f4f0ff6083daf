"""The CLIs' progress display: the library's progress hook (`core.progress.Progress`) as a tqdm bar.

On a terminal, one bar per task that clears itself when done (the log lines and the summary stay); off a
terminal (a pipe, a file, CI) no bar, and optionally a log line now and then so a long job still shows life.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from collections.abc import Mapping
from typing import IO

log = logging.getLogger(__name__)


class TqdmProgress:
    """A `core.progress.Progress` hook drawing tqdm bars on stderr.

    unit: what is counted ("clip", "batch", "utt"); units: per task, where tasks count different things.
    enabled: False draws and logs nothing (-q).
    min_total: counts smaller than this get no bar (a bar for two clips is noise).
    log_every_s: off a terminal, log "done/total unit(s), rate/s" at most this often (None: stay silent).
    echo: off a terminal, write those lines to stderr after this prefix instead of logging them at INFO (for
    a CLI whose console shows only warnings, so that a long job in a pipe or a file still shows life).
    """

    def __init__(self, unit: str, *, units: Mapping[str, str] | None = None, enabled: bool = True,
                 min_total: int = 0, log_every_s: float | None = None, echo: str | None = None) -> None:
        self.default_unit = self.unit = unit
        self.units = dict(units or {})
        self.enabled = enabled
        self.min_total = min_total
        self.log_every_s = log_every_s
        self.echo = echo
        self.tty = sys.stderr.isatty()
        self._bar = None
        self._task: str | None = None
        self._start = self._last_log = time.perf_counter()

    def __call__(self, task: str, done: int, total: int, detail: str = "") -> None:
        if not self.enabled or total < self.min_total:
            return
        if task != self._task:
            self.close()
            self._task, self._start = task, time.perf_counter()
            self.unit = self.units.get(task, self.default_unit)
            self._last_log = self._start
        if not self.tty:
            self._log(done, total)
            return
        if self._bar is None:
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=task, unit=self.unit, leave=False, dynamic_ncols=True,
                             smoothing=0.1, file=sys.stderr)
        if detail:
            self._bar.set_postfix_str(detail, refresh=False)
        self._bar.update(done - self._bar.n)
        if done >= total:
            self.close()

    def _log(self, done: int, total: int) -> None:
        if self.log_every_s is None:
            return
        now = time.perf_counter()
        if done == total or now - self._last_log >= self.log_every_s:
            self._last_log = now
            rate = done / (now - self._start) if now > self._start else 0.0
            units = self.unit if len(self.unit) == 1 else f"{self.unit}s"  # "s" (seconds) has no plural
            line = f"{done}/{total} {units}, {rate:.2f} {units}/s"
            if self.units:  # tasks count different things: say which task this is
                line = f"{self._task}: {line}"
            if self.echo is None:
                log.info("%s", line)
            else:
                print(f"{self.echo}{line}", file=sys.stderr, flush=True)

    def lifted(self, stream: IO[str]) -> contextlib.AbstractContextManager:
        """A context in which writing to `stream` does not garble the bar (it is lifted and redrawn)."""
        if self._bar is None:
            return contextlib.nullcontext()
        return self._bar.external_write_mode(file=stream)

    def close(self) -> None:
        """Clear the bar of the current task (also called when a new task starts or a count completes)."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        self._task = None
