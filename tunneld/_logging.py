"""Log output in ngrok's formats: ``term``, ``logfmt`` and ``json``.

Wrappers such as pyngrok wait for exact messages (``msg="started tunnel" ... url=...``), so
records may carry an ``event`` (the message to print) and ``fields`` (extra key=values).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any, TextIO

_LEVELS = {"DEBUG": "dbug", "INFO": "info", "WARNING": "warn", "ERROR": "eror", "CRITICAL": "crit"}


def _fields(record: logging.LogRecord) -> tuple[str, dict[str, Any]]:
    event = getattr(record, "event", None)
    fields = dict(getattr(record, "fields", None) or {})
    msg = event if event else record.getMessage()
    fields.setdefault("obj", record.name.rsplit(".", 1)[-1])
    return msg, fields


def _timestamp(record: logging.LogRecord) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(record.created))


def _logfmt_value(value: Any) -> str:
    text = str(value)
    if not text or any(c in text for c in ' "=\\\n'):
        return json.dumps(text)
    return text


class LogfmtFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        msg, fields = _fields(record)
        parts = [f"t={_timestamp(record)}", f"lvl={_LEVELS.get(record.levelname, 'info')}",
                 f"msg={_logfmt_value(msg)}"]
        parts += [f"{k}={_logfmt_value(v)}" for k, v in fields.items()]
        if record.exc_info:
            parts.append(f"err={_logfmt_value(self.formatException(record.exc_info))}")
        return " ".join(parts)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        msg, fields = _fields(record)
        obj = {"t": _timestamp(record), "lvl": _LEVELS.get(record.levelname, "info"), "msg": msg, **fields}
        if record.exc_info:
            obj["err"] = self.formatException(record.exc_info)
        return json.dumps(obj, default=str)


class TermFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%H:%M:%S", time.localtime(record.created))
        text = f"{stamp} {record.levelname:<7} {record.name}: {record.getMessage()}"
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


def setup_logging(target: str, fmt: str, level: str) -> None:
    """Send tunneld's logs to ``target`` (stdout, stderr, a file, or ``false``)."""
    root = logging.getLogger("tunneld")
    root.handlers.clear()
    root.propagate = False
    lvl = {"crit": "CRITICAL", "eror": "ERROR", "error": "ERROR", "warn": "WARNING", "dbug": "DEBUG"}.get(
        level.lower(), level.upper())
    if lvl not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        raise ValueError(f"--log-level: unknown level {level!r} (debug, info, warn, error, crit)")
    root.setLevel(lvl)
    stream: TextIO | None
    if target in ("", "false", "none"):
        stream = None
        handler: logging.Handler = logging.NullHandler()
        # Nothing is written: don't build a record per request only to drop it (6 % of the
        # edge's CPU per request under load).
        root.setLevel(logging.CRITICAL + 1)
    elif target == "stdout":
        stream = sys.stdout
        handler = logging.StreamHandler(stream)
    elif target == "stderr":
        stream = sys.stderr
        handler = logging.StreamHandler(stream)
    else:
        handler = logging.FileHandler(target, encoding="utf-8")
        stream = None
    if fmt == "term" and stream is not None and not stream.isatty():
        fmt = "logfmt"  # as ngrok: term is for terminals, logfmt otherwise
    formatter = {"term": TermFormatter(), "logfmt": LogfmtFormatter(), "json": JsonFormatter()}.get(fmt)
    if formatter is None:
        raise ValueError(f"--log-format: unknown format {fmt!r} (term, logfmt, json)")
    handler.setFormatter(formatter)
    root.addHandler(handler)
