"""``Range`` headers (RFC 9110 §14): one byte range, or the whole file.

Only a single range is honoured; a request for several gets the whole representation with
``200``, which RFC 9110 §14.2 allows ("a server MAY ignore the Range header field") and saves a
multipart/byteranges encoder nobody here needs.  A syntactically invalid header is ignored the
same way; a valid range that misses the file entirely is :class:`RangeNotSatisfiable` (416).
"""

from __future__ import annotations

import re

import attrs

__all__ = ["ByteRange", "RangeNotSatisfiable", "parse_range"]

#: ``first-last``, ``first-`` or ``-suffix``; ASCII digits only (``\d`` would take Unicode ones).
_SPEC = re.compile(r"([0-9]*)-([0-9]*)\Z")
#: Numbers longer than this are "bigger than any file"; Python refuses to convert very long
#: digit strings (int_max_str_digits), so they are never converted at all.
_MAX_DIGITS = 18
_HUGE = 10**_MAX_DIGITS


class RangeNotSatisfiable(Exception):
    """The requested range lies outside the file: answer 416 with ``Content-Range: bytes */size``."""


@attrs.frozen
class ByteRange:
    """Bytes ``start`` to ``end`` inclusive, both within the file."""

    start: int
    end: int

    @property
    def length(self) -> int:
        return self.end - self.start + 1


def _number(digits: str) -> int:
    return int(digits) if len(digits) <= _MAX_DIGITS else _HUGE


def parse_range(value: str, size: int) -> ByteRange | None:
    """The single range ``value`` asks for in a file of ``size`` bytes, or None for all of it.

    Raises:
        RangeNotSatisfiable: the range starts at or past the end, or is an empty suffix.
    """
    unit, eq, ranges = value.partition("=")
    if not eq or unit.strip().lower() != "bytes":
        return None
    specs = [spec.strip() for spec in ranges.split(",") if spec.strip()]
    if len(specs) != 1:
        return None
    m = _SPEC.match(specs[0])
    if m is None or not (m.group(1) or m.group(2)):
        return None
    first, last = m.group(1), m.group(2)
    if first:
        start = _number(first)
        if last and _number(last) < start:
            return None  # "5-3" is invalid, not unsatisfiable: ignore the header
        if start >= size:
            raise RangeNotSatisfiable(f"range starts at {start}, file has {size} bytes")
        return ByteRange(start, min(_number(last), size - 1) if last else size - 1)
    suffix = _number(last)
    if suffix == 0 or size == 0:
        raise RangeNotSatisfiable("empty suffix range")
    return ByteRange(max(0, size - suffix), size - 1)
