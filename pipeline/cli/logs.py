"""Logging at the CLI edge: the library only logs; each command installs these handlers for its run.

Handlers are removed when the command returns, so calling several `main()` functions in one process (tests,
notebooks) never leaves a handler writing to a stream that has since been replaced or closed.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator
from pathlib import Path

DETAILED = "%(asctime)s %(levelname)s %(name)s: %(message)s"
NOISY_LIBRARIES = ("urllib3", "filelock", "h5py", "numba", "matplotlib", "PIL")


class StderrHandler(logging.StreamHandler):
    """A console handler that writes to whatever `sys.stderr` is at the moment of each record.

    Records go through `tqdm.write`, which lifts any progress bar on that stream, prints the line and redraws
    the bar below it: log lines and a live bar share a terminal without leaving frozen copies of the bar.
    """

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=self.stream)
            self.flush()
        except RecursionError:
            raise
        except Exception:  # noqa: BLE001 - logging's own contract: report, never raise
            self.handleError(record)

    @property  # type: ignore[override]
    def stream(self):  # noqa: ANN201 - the stream of the moment
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # noqa: ANN001 - StreamHandler.__init__ assigns it
        pass


class PlainFormatter(logging.Formatter):
    """`%(message)s`, with warnings saying that they are one ("warning: ..."); errors name their command."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        return f"warning: {text}" if record.levelno == logging.WARNING else text


def level_for(quiet: bool, verbose: bool, default: int = logging.INFO) -> int:
    return logging.WARNING if quiet else logging.DEBUG if verbose else default


@contextlib.contextmanager
def cli_logging(console_level: int, console_format: str, log_file: Path | None = None,
                file_level: int = logging.DEBUG) -> Iterator[None]:
    """Install a console handler (and a file handler) on the root logger for the duration of the block."""
    root = logging.getLogger()
    old_level = root.level
    handlers: list[logging.Handler] = []
    console = StderrHandler()
    console.setLevel(console_level)
    console.setFormatter(PlainFormatter(console_format) if console_format.endswith("%(message)s")
                         and "%(levelname)s" not in console_format else logging.Formatter(console_format))
    handlers.append(console)
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        filed = logging.FileHandler(log_file, mode="w", encoding="utf-8")
        filed.setLevel(file_level)
        filed.setFormatter(logging.Formatter(DETAILED))
        handlers.append(filed)
    for h in handlers:
        root.addHandler(h)
    root.setLevel(min(h.level for h in handlers))
    for name in NOISY_LIBRARIES:
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        yield
    finally:
        for h in handlers:
            root.removeHandler(h)
            h.close()
        root.setLevel(old_level)


def quiet_transformers() -> None:
    """transformers draws a "Loading weights" bar per model; our progress bar and JSON need no company."""
    with contextlib.suppress(Exception):
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
