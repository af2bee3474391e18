"""Structured logs: one ``key=value`` line per event, from every process of ``kiln serve``.

Each line starts with the time, the level, the logger and the process role (``proc=main``,
``proc=core``, ``proc=api0`` ...), so the lines of the supervisor, the engine core and the API
servers can be told apart on one stream.
"""

from __future__ import annotations

import json
import logging
import time


class KeyValueFormatter(logging.Formatter):
    def __init__(self, proc: str | None = None):
        super().__init__()
        self.proc = proc

    def format(self, record):
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(record.created))
        proc = f" proc={self.proc}" if self.proc else ""
        line = f"ts={ts} level={record.levelname.lower()} logger={record.name}{proc} {record.getMessage()}"
        if record.exc_info:
            line += " exc=" + json.dumps(self.formatException(record.exc_info))
        return line


def configure_logging(level: int = logging.INFO, proc: str | None = None) -> None:
    """Sends the ``kiln`` loggers to stderr as key=value lines; ``proc`` names this process's role."""
    root = logging.getLogger("kiln")
    mine = [h for h in root.handlers if getattr(h, "_kiln", False)]
    if mine:
        if proc is not None:
            for h in mine:
                h.setFormatter(KeyValueFormatter(proc))
    else:
        h = logging.StreamHandler()
        h.setFormatter(KeyValueFormatter(proc))
        h._kiln = True
        root.addHandler(h)
    root.setLevel(level)


__all__ = ["KeyValueFormatter", "configure_logging"]
