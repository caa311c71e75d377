"""Log output in ngrok's formats: ``term``, ``logfmt`` and ``json``.

Wrappers such as pyngrok wait for exact messages (``msg="started tunnel" ... url=...``), so
records may carry an ``event`` (the message to print) and ``fields`` (extra key=values).
"""

from __future__ import annotations

import collections
import json
import logging
import re
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, TextIO

_LEVELS = {"DEBUG": "dbug", "INFO": "info", "WARNING": "warn", "ERROR": "eror", "CRITICAL": "crit"}


def _fields(record: logging.LogRecord) -> tuple[str, dict[str, Any]]:
    event = getattr(record, "event", None)
    fields = dict(getattr(record, "fields", None) or {})
    msg = event if event else record.getMessage()
    fields.setdefault("obj", record.name.rsplit(".", 1)[-1])
    return msg, fields


class _SecondCache:
    """``time.strftime`` of a record's second, computed once per second and format.

    An edge under load writes thousands of access lines a second; formatting the same second
    again for each cost about a fifth of a line's price.
    """

    __slots__ = ("fmt", "second", "text")

    def __init__(self, fmt: str) -> None:
        self.fmt = fmt
        self.second = -1
        self.text = ""

    def __call__(self, created: float) -> str:
        second = int(created)
        if second != self.second:
            self.text = time.strftime(self.fmt, time.localtime(second))
            self.second = second
        return self.text


_iso_second = _SecondCache("%Y-%m-%dT%H:%M:%S%z")
_clock_second = _SecondCache("%H:%M:%S")


def _timestamp(record: logging.LogRecord) -> str:
    return _iso_second(record.created)


_NEEDS_QUOTES = re.compile(r'[ "=\\\n]')


def _logfmt_value(value: Any) -> str:
    text = value if type(value) is str else str(value)
    if not text or _NEEDS_QUOTES.search(text):
        return json.dumps(text)
    return text


class LogfmtFormatter(logging.Formatter):
    def access_line(self, msg: str, created: float) -> str:
        """What :meth:`format` gives for an INFO record of ``tunneld.access`` (no extras)."""
        return f"t={_iso_second(created)} lvl=info msg={_logfmt_value(msg)} obj=access"

    def format(self, record: logging.LogRecord) -> str:
        msg, fields = _fields(record)
        parts = [f"t={_timestamp(record)}", f"lvl={_LEVELS.get(record.levelname, 'info')}",
                 f"msg={_logfmt_value(msg)}"]
        parts += [f"{k}={_logfmt_value(v)}" for k, v in fields.items()]
        if record.exc_info:
            parts.append(f"err={_logfmt_value(self.formatException(record.exc_info))}")
        return " ".join(parts)


class JsonFormatter(logging.Formatter):
    def access_line(self, msg: str, created: float) -> str:
        """What :meth:`format` gives for an INFO record of ``tunneld.access`` (no extras)."""
        obj = {"t": _iso_second(created), "lvl": "info", "msg": msg, "obj": "access"}
        return json.dumps(obj, default=str)

    def format(self, record: logging.LogRecord) -> str:
        msg, fields = _fields(record)
        obj = {"t": _timestamp(record), "lvl": _LEVELS.get(record.levelname, "info"), "msg": msg, **fields}
        if record.exc_info:
            obj["err"] = self.formatException(record.exc_info)
        return json.dumps(obj, default=str)


class TermFormatter(logging.Formatter):
    def access_line(self, msg: str, created: float) -> str:
        """What :meth:`format` gives for an INFO record of ``tunneld.access`` (no extras)."""
        return f"{_clock_second(created)} INFO    {ACCESS_LOGGER}: {msg}"

    def format(self, record: logging.LogRecord) -> str:
        stamp = _clock_second(record.created)
        text = f"{stamp} {record.levelname:<7} {record.name}: {record.getMessage()}"
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


#: The logger whose lines may wait in the buffer (see :class:`DeferredFlushHandler`).
ACCESS_LOGGER = "tunneld.access"
#: Longest time an access line may wait in the buffer before it reaches the file or pipe.
ACCESS_FLUSH_DELAY = 0.25
#: Deferred access lines (:meth:`_DeferredFlush.defer_access`) waiting beyond this many are
#: written out by the caller at once: the bound on what a stalled flusher lets pile up.
ACCESS_BACKLOG = 4096
#: The flusher thread writes waiting lines this many at a time, pausing ACCESS_STEP_PAUSE
#: seconds between steps (see :meth:`_DeferredFlush._flush_in_steps`).
ACCESS_STEP = 32
ACCESS_STEP_PAUSE = 0.0001

#: An access line not written yet: its render function, that function's arguments, and when it
#: happened (``time.monotonic()``).
_Deferred = tuple[Callable[..., str], tuple[Any, ...], float]


class _DeferredFlush(logging.StreamHandler):  # type: ignore[type-arg]
    """A stream handler that lets access lines wait up to :data:`ACCESS_FLUSH_DELAY` seconds.

    Access lines (one per proxied request) are queued unformatted and written and flushed in
    batches at most every :data:`ACCESS_FLUSH_DELAY` seconds, by a daemon thread (or by the
    caller once :data:`ACCESS_BACKLOG` wait); every other record (``started tunnel``, which
    wrappers such as pyngrok wait for, warnings, errors) is written after the waiting lines and
    flushed at once.  Flushing every access line cost a ``write`` system call per request on the
    edge's hot path; formatting and writing each as its request ended cost the edge ~7 % more
    CPU per request under load than the same lines formatted in a batch (README).
    """

    def _init_deferred(self) -> None:
        self._dirty = False
        self._wake = threading.Event()
        self._flusher: threading.Thread | None = None
        #: Access lines queued by :meth:`defer_access`, oldest first (appended by the caller's
        #: thread, taken under the handler's lock: deque operations are atomic).
        self._waiting: collections.deque[_Deferred] = collections.deque()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            msg = self.format(record)
            self._write_waiting()  # (the lock is held) lines deferred before this record first
            self.stream.write(msg + self.terminator)
            if record.name != ACCESS_LOGGER or record.levelno > logging.INFO:
                self.flush()
            elif not self._dirty:
                self._mark_dirty()
        except RecursionError:
            raise
        except Exception:
            self.handleError(record)

    def defer_access(self, render: Callable[..., str], args: tuple[Any, ...], at: float) -> None:
        """Queue one INFO line of ``tunneld.access``, written later as :meth:`emit` would write
        ``render(*args)`` logged at ``at`` (``time.monotonic()``).

        ``render`` runs later, possibly in the flusher's thread: it must depend on ``args``
        alone.  :func:`defer_access` decides when this shortcut gives the same output.
        """
        waiting = self._waiting
        waiting.append((render, args, at))
        if not self._dirty:
            self._mark_dirty()
        elif len(waiting) >= ACCESS_BACKLOG:
            self.flush()

    def write_access(self, msg: str) -> None:
        """Write one INFO line of ``tunneld.access`` now, after any deferred ones."""
        self.acquire()
        try:
            self.defer_access(str, (msg,), time.monotonic())
            self._write_waiting()
        except Exception:
            self.handleError(logging.makeLogRecord({"name": ACCESS_LOGGER, "msg": msg}))
        finally:
            self.release()

    def _write_waiting(self, most: int | None = None) -> int:
        """Format and write the deferred access lines, or the ``most`` oldest of them (the
        caller holds the lock); the number written."""
        waiting = self._waiting
        count = len(waiting)  # lines deferred while this runs wait for the next batch
        if most is not None:
            count = min(count, most)
        if not count:
            return 0
        if self.stream is None:  # closed (FileHandler.close): nowhere to write them
            waiting.clear()
            return 0
        formatter: Any = self.formatter
        line = formatter.access_line
        wall = time.time() - time.monotonic()  # one clock reading turns each ``at`` into wall time
        lines = []
        for _ in range(count):
            render, args, at = waiting.popleft()
            try:
                lines.append(line(render(*args), at + wall))
            except Exception:  # a bug in one render loses its line only, and says so
                self.handleError(logging.makeLogRecord({"name": ACCESS_LOGGER, "msg": f"{render!r}{args!r}"}))
        lines.append("")
        self.stream.write(self.terminator.join(lines))
        return count

    def _mark_dirty(self) -> None:
        self._dirty = True
        self._start_flusher()

    def _start_flusher(self) -> None:
        if self._flusher is None:
            self._flusher = threading.Thread(target=self._flush_loop, name="tunneld-log-flush", daemon=True)
            self._flusher.start()
        self._wake.set()

    def _flush_loop(self) -> None:
        while True:
            self._wake.wait()
            self._wake.clear()
            time.sleep(ACCESS_FLUSH_DELAY)
            if self._dirty:
                self._flush_in_steps()

    def _flush_in_steps(self) -> None:
        """:meth:`flush`, for the flusher thread: the lines are written ACCESS_STEP at a time,
        with a pause between steps that lets the other threads run.

        Formatting a quarter-second's lines (thousands, under load) in one go held the GIL until
        the interpreter's switch interval forced it away: the event loop stood still for up to
        5 ms, four times a second.  A step takes a fraction of a millisecond.
        """
        self._dirty = False  # first: a line deferred meanwhile marks it again
        while True:
            self.acquire()
            try:
                done = self._write_or_report(ACCESS_STEP) < ACCESS_STEP
                if done:
                    super().flush()
            finally:
                self.release()
            if done:
                return
            time.sleep(ACCESS_STEP_PAUSE)

    def flush(self) -> None:
        self.acquire()
        try:
            self._dirty = False  # first: a line deferred meanwhile marks it again
            self._write_or_report()
            super().flush()
        finally:
            self.release()

    def _write_or_report(self, most: int | None = None) -> int:
        try:
            return self._write_waiting(most)
        except Exception:  # the stream failed (disk full...): as emit() reports it
            self.handleError(logging.makeLogRecord({"name": ACCESS_LOGGER, "msg": "(access lines)"}))
            return 0


class DeferredFlushHandler(_DeferredFlush):
    """:class:`_DeferredFlush` on a stream (stdout, stderr)."""

    def __init__(self, stream: TextIO) -> None:
        super().__init__(stream)
        self._init_deferred()


class DeferredFlushFileHandler(_DeferredFlush, logging.FileHandler):
    """:class:`_DeferredFlush` on a file, opened at once (``FileHandler`` with ``delay=False``)."""

    def __init__(self, path: str) -> None:
        logging.FileHandler.__init__(self, path, encoding="utf-8")
        self._init_deferred()


_root = logging.getLogger("tunneld")
_access = logging.getLogger(ACCESS_LOGGER)
#: The handler :func:`setup_logging` installed, when it is one of ours.
_installed: _DeferredFlush | None = None


def _direct_handler() -> _DeferredFlush | None:
    """The handler :func:`setup_logging` installed, if writing to it directly gives exactly
    what ``access_log.info(msg)`` would: it is still the only one, with tunneld's formatter,
    records stop there (no propagation past ``tunneld``), and no logger or handler on the way
    has a filter (tests and embedders that attach their own handlers get ordinary records).
    """
    handler = _installed
    if handler is None or _access.handlers or _access.filters or not _access.propagate or _root.propagate:
        return None
    handlers = _root.handlers
    if len(handlers) != 1 or handlers[0] is not handler or _root.filters \
            or handler.filters or handler.level > logging.INFO:
        return None
    return handler


def write_access(msg: str) -> bool:
    """Write an access line straight through the handler :func:`setup_logging` installed.

    Returns False, writing nothing, unless that gives exactly what ``access_log.info(msg)``
    would (see :func:`_direct_handler`).  The caller has checked that INFO is enabled.
    """
    handler = _direct_handler()
    if handler is None:
        return False
    handler.write_access(msg)
    return True


def defer_access(render: Callable[..., str], args: tuple[Any, ...], at: float) -> bool:
    """Queue the access line ``render(*args)``, logged at ``at`` (``time.monotonic()``), to be
    formatted and written with the next batch (within :data:`ACCESS_FLUSH_DELAY` seconds).

    Returns False, queueing nothing, where :func:`write_access` would; the caller then logs
    ``render(*args)`` the ordinary way.  ``render`` must depend on ``args`` alone: it runs
    later, maybe in another thread.  The caller has checked that INFO is enabled.
    """
    handler = _direct_handler()
    if handler is None:
        return False
    handler.defer_access(render, args, at)
    return True


def _lean_records() -> None:
    """Stop :mod:`logging` from collecting what no tunneld format prints.

    Finding the caller walks the stack for every record (a quarter of an access line's cost);
    the thread, process and task names are never printed either.
    """
    logging._srcfile = None  # documented switch: no findCaller()
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    logging.logAsyncioTasks = False  # type: ignore[attr-defined]  # Python >= 3.12


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
        handler = DeferredFlushHandler(stream)
    elif target == "stderr":
        stream = sys.stderr
        handler = DeferredFlushHandler(stream)
    else:
        handler = DeferredFlushFileHandler(target)
        stream = None
    _lean_records()
    if fmt == "term" and stream is not None and not stream.isatty():
        fmt = "logfmt"  # as ngrok: term is for terminals, logfmt otherwise
    formatter = {"term": TermFormatter(), "logfmt": LogfmtFormatter(), "json": JsonFormatter()}.get(fmt)
    if formatter is None:
        raise ValueError(f"--log-format: unknown format {fmt!r} (term, logfmt, json)")
    handler.setFormatter(formatter)
    root.addHandler(handler)
    global _installed
    _installed = handler if isinstance(handler, _DeferredFlush) else None
