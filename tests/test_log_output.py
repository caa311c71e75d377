"""The log handlers: access lines are buffered briefly, everything else is written at once.

The edge writes one access line per proxied request; flushing each was a ``write`` system call
on the hot path.  What must not change: a line a wrapper waits for (``started tunnel``) or a
warning is out at once, and an access line never waits longer than ``ACCESS_FLUSH_DELAY``.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tunneld import _logging


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """setup_logging reconfigures the process-wide ``tunneld`` logger: put it back as it was, or
    later tests' caplog sees nothing (records stop at ``tunneld``, or its level is CRITICAL+1)."""
    root = logging.getLogger("tunneld")
    saved = (root.handlers[:], root.level, root.propagate, root.filters[:], _logging._installed)
    try:
        yield
    finally:
        for handler in root.handlers:
            if handler not in saved[0]:
                handler.close()
        root.handlers[:], root.level, root.propagate, root.filters[:], _logging._installed = saved


@pytest.fixture
def log_file(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "edge.log"
    _logging.setup_logging(str(path), "logfmt", "info")
    yield path


def _lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines()


def test_access_lines_reach_the_file_within_the_flush_delay(log_file: Path) -> None:
    access = logging.getLogger("tunneld.access")
    for i in range(50):
        access.info("client=127.0.0.1:%d host=a tunnel=- method=GET path=\"/\" status=200", 1000 + i)
    deadline = time.monotonic() + 5
    while len(_lines(log_file)) < 50 and time.monotonic() < deadline:
        time.sleep(0.05)
    lines = _lines(log_file)
    assert len(lines) == 50, "buffered access lines were not flushed by the background flusher"
    assert 'msg="client=127.0.0.1:1000 ' in lines[0] and "obj=access" in lines[0]
    # Nothing is lost or reordered.
    assert [line.split("client=127.0.0.1:")[1][:4] for line in lines] == [str(1000 + i) for i in range(50)]


def test_other_records_are_written_at_once_with_the_access_lines_before_them(log_file: Path) -> None:
    logging.getLogger("tunneld.access").info("client=127.0.0.1:1 status=200")
    logging.getLogger("tunneld.tunnels").info("started tunnel")
    # Read without waiting: both are out, in order, as soon as the second call returned.
    lines = _lines(log_file)
    assert len(lines) == 2
    assert "client=127.0.0.1:1" in lines[0] and 'msg="started tunnel"' in lines[1]


def test_an_access_warning_is_not_held_back(log_file: Path) -> None:
    logging.getLogger("tunneld.access").warning("client=127.0.0.1:1 refused")
    assert "lvl=warn" in _lines(log_file)[0]


def test_timestamps_follow_the_clock(log_file: Path) -> None:
    record = logging.LogRecord("tunneld.x", logging.INFO, "", 0, "m", None, None)
    fmt = _logging.LogfmtFormatter()
    record.created = 0.0
    first = fmt.format(record)
    record.created = 86400.5
    second = fmt.format(record)
    assert first.split()[0] == "t=" + time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(0))
    assert second.split()[0] == "t=" + time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(86400))


@pytest.mark.parametrize("value, expected", [
    ("plain", "plain"), ("", '""'), ("a b", '"a b"'), ('a"b', '"a\\"b"'), ("a=b", '"a=b"'),
    ("a\\b", '"a\\\\b"'), ("a\nb", '"a\\nb"'), (42, "42"),
])
def test_logfmt_values_are_quoted_when_they_must_be(value: object, expected: str) -> None:
    assert _logging._logfmt_value(value) == expected


@pytest.mark.parametrize("fmt", ["term", "logfmt", "json"])
def test_the_access_shortcut_writes_what_the_logger_would(tmp_path: Path, fmt: str) -> None:
    """``write_access`` skips the LogRecord, not a byte of the line."""
    path = tmp_path / f"{fmt}.log"
    _logging.setup_logging(str(path), fmt, "info")
    access = logging.getLogger("tunneld.access")
    message = 'client=127.0.0.1:9 host=a.example tunnel=tn_1 method=GET path="/a b=c\\\\" status=200'
    try:
        access.info("%s", message)
        assert _logging.write_access(message)
        logging.getLogger("tunneld").warning("flush")  # writes the buffered access lines out
        via_logger, via_shortcut = _lines(path)[:2]
    finally:
        for handler in logging.getLogger("tunneld").handlers:
            handler.close()
        logging.getLogger("tunneld").handlers.clear()
    # The two may straddle a second: compare with the timestamps masked out.
    if fmt == "json":
        assert {**json.loads(via_logger), "t": 0} == {**json.loads(via_shortcut), "t": 0}
    else:
        assert via_logger.split(" ", 1)[1] == via_shortcut.split(" ", 1)[1]


@pytest.mark.parametrize("fmt", ["term", "logfmt", "json"])
def test_a_deferred_access_line_is_what_the_logger_would_write(tmp_path: Path, fmt: str) -> None:
    """``defer_access`` renders the line later, in a batch: the same bytes, stamped with the
    time it was logged, not the time it was written."""
    path = tmp_path / f"{fmt}.log"
    _logging.setup_logging(str(path), fmt, "info")
    access = logging.getLogger("tunneld.access")
    message = 'client=127.0.0.1:9 host=a.example tunnel=tn_1 method=GET path="/a b=c\\\\" status=200'
    rendered: list[tuple[str, ...]] = []

    def render(*args: str) -> str:
        rendered.append(args)
        return " ".join(args)

    assert _logging._installed is not None
    _logging._installed._flusher = threading.Thread(target=lambda: None)  # never started: this test flushes
    access.info("%s", message)
    # Logged "3 s ago": the line's timestamp says so, whenever it is written.
    assert _logging.defer_access(render, tuple(message.split(" ")), time.monotonic() - 3)
    assert not rendered, "rendered at once; it should wait for its batch"
    logging.getLogger("tunneld").warning("flush")  # writes the waiting access lines out first
    via_logger, deferred, warning = _lines(path)[:3]
    assert len(rendered) == 1 and "flush" in warning
    if fmt == "json":
        assert {**json.loads(via_logger), "t": 0} == {**json.loads(deferred), "t": 0}
        stamp = json.loads(deferred)["t"]
    else:
        assert via_logger.split(" ", 1)[1] == deferred.split(" ", 1)[1]
        stamp = deferred.split(" ", 1)[0].removeprefix("t=")
    form = "%H:%M:%S" if fmt == "term" else "%Y-%m-%dT%H:%M:%S%z"
    assert stamp in {time.strftime(form, time.localtime(time.time() - ago)) for ago in (3, 4)}


def test_deferred_access_lines_keep_their_order_and_reach_the_file_in_time(log_file: Path) -> None:
    for i in range(300):
        assert _logging.defer_access("client=127.0.0.1:{} status=200".format, (1000 + i,), time.monotonic())
    _logging.write_access("client=127.0.0.1:1300 status=200")  # written now, after those before it
    deadline = time.monotonic() + 5
    while len(_lines(log_file)) < 301 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert [line.split("client=127.0.0.1:")[1][:4] for line in _lines(log_file)] == \
        [str(1000 + i) for i in range(301)]


def test_no_deferred_line_is_lost_while_the_flusher_runs(log_file: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """The flusher thread takes lines while the caller adds more: all of them arrive, in order."""
    monkeypatch.setattr(_logging, "ACCESS_FLUSH_DELAY", 0.0005)
    count = 20000
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # the two threads take turns between almost any two bytecodes
    try:
        for i in range(count):
            _logging.defer_access("n={}".format, (i,), time.monotonic())
    finally:
        sys.setswitchinterval(interval)
    deadline = time.monotonic() + 10
    while len(_lines(log_file)) < count and time.monotonic() < deadline:
        time.sleep(0.01)
    assert [int(re.search(r"n=(\d+)", line)[1]) for line in _lines(log_file)] == list(range(count))


def count_writes(handler: logging.Handler, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Record how many lines each write to ``handler``'s stream carries (and still write them)."""
    writes: list[int] = []
    stream = handler.stream  # type: ignore[attr-defined]

    class Counting:
        def write(self, text: str) -> int:
            writes.append(text.count("\n"))
            return int(stream.write(text))

        def flush(self) -> None:
            stream.flush()

    monkeypatch.setattr(handler, "stream", Counting())
    return writes


def test_the_flusher_writes_in_short_steps_and_lets_the_event_loop_run(
        log_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A quarter-second's lines formatted in one go held the GIL until the switch interval
    forced it away (the event loop stalled up to 5 ms): the flusher writes ACCESS_STEP lines at a
    time and pauses between steps."""
    monkeypatch.setattr(_logging, "ACCESS_STEP", 10)
    handler = _logging._installed
    assert handler is not None
    handler._flusher = threading.Thread(target=lambda: None)  # never started: this test flushes
    writes = count_writes(handler, monkeypatch)
    pauses: list[float] = []

    class Clock:
        """The time module, with the pauses recorded instead of slept."""

        sleep = staticmethod(pauses.append)

        def __getattr__(self, name: str) -> object:
            return getattr(time, name)

    monkeypatch.setattr(_logging, "time", Clock())
    for cache in (_logging._clock_second, _logging._iso_second):
        monkeypatch.setattr(cache, "second", -1)  # a new second: formatting reads the clock too
    for i in range(95):
        _logging.defer_access(str, (f"client=127.0.0.1:{i}",), time.monotonic())
    handler._flush_in_steps()
    assert writes == [10] * 9 + [5]
    assert pauses == [_logging.ACCESS_STEP_PAUSE] * 9
    assert len(_lines(log_file)) == 95 and not handler._dirty


def test_the_flusher_thread_writes_in_steps(log_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_logging, "ACCESS_STEP", 10)
    handler = _logging._installed
    assert handler is not None
    writes = count_writes(handler, monkeypatch)
    for i in range(95):
        _logging.defer_access(str, (f"client=127.0.0.1:{i}",), time.monotonic())
    deadline = time.monotonic() + 5
    while sum(writes) < 95 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert sum(writes) == 95 and max(writes) == 10, writes


def test_deferred_access_lines_are_bounded(log_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A stalled flusher lets at most ACCESS_BACKLOG lines wait: the caller writes them then."""
    monkeypatch.setattr(_logging, "ACCESS_BACKLOG", 10)
    monkeypatch.setattr(_logging, "ACCESS_FLUSH_DELAY", 3600)  # the flusher never comes
    handler = _logging._installed
    assert handler is not None
    for i in range(25):
        _logging.defer_access(str, (f"client=127.0.0.1:{i}",), time.monotonic())
        assert len(handler._waiting) < 10
    assert len(_lines(log_file)) == 20  # two batches of ten written by the caller, five waiting
    handler.close()  # logging.shutdown() at exit flushes and closes: nothing is lost
    assert len(_lines(log_file)) == 25


def test_a_failing_render_loses_only_its_line_and_says_so(log_file: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    def broken() -> str:
        raise ValueError("boom")

    _logging.defer_access(str, ("client=1",), time.monotonic())
    _logging.defer_access(broken, (), time.monotonic())
    _logging.defer_access(str, ("client=3",), time.monotonic())
    logging.getLogger("tunneld").warning("after")  # the handler carries on
    lines = _lines(log_file)
    assert len(lines) == 3 and "client=1" in lines[0] and "client=3" in lines[1] and "after" in lines[2]
    assert "boom" in capsys.readouterr().err  # logging's handleError reports it


def test_the_access_shortcut_steps_aside_for_other_handlers(log_file: Path) -> None:
    access = logging.getLogger("tunneld.access")
    seen: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record)

    keep = Keep()
    access.addHandler(keep)
    try:
        assert not _logging.write_access("client=1")  # the caller logs it the ordinary way
    finally:
        access.removeHandler(keep)
    assert _logging.write_access("client=2")
    root = logging.getLogger("tunneld")
    root.addFilter(lambda record: True)
    try:
        assert not _logging.write_access("client=3")
    finally:
        root.filters.clear()


def test_no_shortcut_when_logging_is_off(tmp_path: Path) -> None:
    _logging.setup_logging("false", "logfmt", "info")
    assert not _logging.write_access("client=1")
    assert not _logging.defer_access(str, ("client=1",), time.monotonic())


def test_no_shortcut_when_records_propagate_further(log_file: Path) -> None:
    root = logging.getLogger("tunneld")
    root.propagate = True  # e.g. pytest's caplog, or an embedder's root handler, listening above
    assert not _logging.write_access("client=1")
    assert not _logging.defer_access(str, ("client=1",), time.monotonic())
