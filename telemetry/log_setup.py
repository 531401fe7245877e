"""Logging for operators: readable text by default, one JSON object per line for shippers."""

from __future__ import annotations

import json
import logging
import os
import sys
import time


class JsonFormatter(logging.Formatter):
    def __init__(self, tag: str | None = None) -> None:
        super().__init__()
        self.tag = tag

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if self.tag:
            entry["instance"] = self.tag
            entry["pid"] = record.process
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def configure_logging(level: str, log_format: str = "text", tag: str | None = None) -> None:
    """Log to stderr at `level`, as text or JSON.

    `tag`: who writes, put in every line with the process id, syslog style
    (`processor-2[4711]`; JSON: "instance" and "pid"): the lines of several processors
    on one machine, or in one log store, then tell apart, and `ps` or `kill` finds the
    process a line came from."""
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(JsonFormatter(tag))
    else:
        who = f"{tag.replace('%', '%%')}[{os.getpid()}] " if tag else ""
        formatter = logging.Formatter(f"%(asctime)sZ %(levelname)-7s {who}%(name)s: %(message)s", "%Y-%m-%dT%H:%M:%S")
        formatter.converter = time.gmtime
        handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
