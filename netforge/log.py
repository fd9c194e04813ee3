"""Caffe's glog-style log lines, to stderr and to a log file, without breaking a tqdm bar.

Line format: ``Lmmdd hh:mm:ss.uuuuuu thread file:line] message`` (L is I, W, E or F), which
is what Caffe's tools/extra/parse_log.py and parse_log.sh read.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import threading
from datetime import datetime
from pathlib import Path
from typing import TextIO

from tqdm import tqdm

LOGGER = logging.getLogger("netforge")
_LEVELS = {logging.DEBUG: "I", logging.INFO: "I", logging.WARNING: "W", logging.ERROR: "E",
           logging.CRITICAL: "F"}


def fmt(x: float) -> str:
    """A number as C++'s ostream prints it by default (6 significant digits)."""
    return f"{x:.6g}"


class GlogFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        t = datetime.fromtimestamp(record.created)
        level = _LEVELS.get(record.levelno, "I")
        prefix = (f"{level}{t:%m%d %H:%M:%S}.{t.microsecond:06d} "
                  f"{threading.get_native_id():5d} {record.filename}:{record.lineno}] ")
        text = record.getMessage()
        if record.exc_info:
            text += " " + self.formatException(record.exc_info).replace("\n", " | ")
        return prefix + text


class TqdmStderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes log lines above any active progress bar instead of through it."""

    def __init__(self, stream: TextIO | None = None):
        super().__init__(stream or sys.stderr)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=self.stream)
            self.flush()
        except Exception:  # pragma: no cover - logging must never raise
            self.handleError(record)


def configure(log_file: str | os.PathLike[str] | None = None, *, stderr: bool = True,
              level: int = logging.INFO) -> list[logging.Handler]:
    """Send netforge's log to stderr (and a file). Returns the handlers it installed."""
    for h in list(LOGGER.handlers):
        if getattr(h, "_netforge", False):
            LOGGER.removeHandler(h)
            h.close()
    LOGGER.setLevel(level)
    LOGGER.propagate = False
    handlers: list[logging.Handler] = []
    formatter = GlogFormatter()
    if stderr:
        handlers.append(TqdmStderrHandler())
    if log_file is not None:
        path = Path(log_file)
        path.parent.mkdir(parents=True, exist_ok=True)
        new = not path.exists() or path.stat().st_size == 0
        fh = logging.FileHandler(path, encoding="utf-8")
        if new:
            now = datetime.now()
            fh.stream.write(f"Log file created at: {now:%Y/%m/%d %H:%M:%S}\n"
                            f"Running on machine: {socket.gethostname()}\n"
                            "Log line format: [IWEF]mmdd hh:mm:ss.uuuuuu threadid file:line] msg\n")
        handlers.append(fh)
    for h in handlers:
        h.setFormatter(formatter)
        h._netforge = True  # type: ignore[attr-defined]
        LOGGER.addHandler(h)
    return handlers
