"""Sans-IO answers of the file server: validators, conditional requests, ranges, response heads.

Everything here is a pure function of the request headers and a file's size and mtime, so the
rules (RFC 9110 §13 and §14) are tested without sockets.  Precedence follows §13.2.2:
``If-None-Match`` wins over ``If-Modified-Since``; ``Range`` is looked at only when neither
yields 304, and only if ``If-Range`` (when sent) still matches.
"""

from __future__ import annotations

import mimetypes
import re
from email.utils import formatdate, parsedate_to_datetime

import attrs

from ._ranges import RangeNotSatisfiable, parse_range

__all__ = ["Answer", "Headers", "content_type", "decide", "etag_for", "http_date", "request_headers",
           "response_head", "text_response"]

#: Request headers by lower-case name; repeated headers joined with ", " (RFC 9110 §5.3).
Headers = dict[str, str]

_REASONS = {200: "OK", 206: "Partial Content", 301: "Moved Permanently", 304: "Not Modified",
            400: "Bad Request", 403: "Forbidden", 404: "Not Found", 405: "Method Not Allowed",
            416: "Range Not Satisfiable", 500: "Internal Server Error", 505: "HTTP Version Not Supported"}

_ETAG = re.compile(r'(W/)?("[^"]*")')

#: Types served as text but not under ``text/``: they get a charset too.
_TEXTUAL = {"application/json", "application/javascript", "application/xml", "image/svg+xml",
            "application/xhtml+xml", "application/x-sh", "application/x-python-code"}
#: ``foo.tar.gz`` is a gzip file to download, not a tar to be un-gzipped by the browser, so
#: mimetypes' "encoding" becomes the type instead of a Content-Encoding header.
_ENCODED = {"gzip": "application/gzip", "bzip2": "application/x-bzip2", "xz": "application/x-xz",
            "br": "application/x-brotli", "compress": "application/x-compress"}


def request_headers(pairs: list[tuple[bytes, bytes]]) -> Headers:
    """Lower-case names to values (latin-1), repeated headers joined with ``", "``."""
    out: Headers = {}
    for name, value in pairs:
        key = name.decode("latin-1").lower()
        text = value.decode("latin-1").strip()
        out[key] = f"{out[key]}, {text}" if key in out else text
    return out


def content_type(name: str) -> str:
    """Content-Type for a file name; text types say ``charset=utf-8``, unknown ones are octets."""
    ctype, encoding = mimetypes.guess_type(name, strict=False)
    if encoding is not None:
        return _ENCODED.get(encoding, "application/octet-stream")
    if ctype is None:
        return "application/octet-stream"
    if ctype.startswith("text/") or ctype in _TEXTUAL:
        return f"{ctype}; charset=utf-8"
    return ctype


def etag_for(size: int, mtime_ns: int) -> str:
    """A strong validator from size and mtime (nginx's recipe, with nanoseconds)."""
    return f'"{mtime_ns:x}-{size:x}"'


def http_date(seconds: float) -> str:
    return formatdate(seconds, usegmt=True)


def _parse_date(value: str) -> int | None:
    try:
        return int(parsedate_to_datetime(value).timestamp())
    except (TypeError, ValueError, IndexError, OverflowError):
        return None


def _none_match(value: str, etag: str) -> bool:
    """``If-None-Match`` uses the weak comparison: ``W/`` prefixes do not matter."""
    if value.strip() == "*":
        return True
    return any(m.group(2) == etag for m in _ETAG.finditer(value))


def _if_range_holds(value: str | None, etag: str, mtime_s: int) -> bool:
    """``If-Range`` needs a strong match: an exact ETag (not ``W/``) or the exact date."""
    if value is None:
        return True
    value = value.strip()
    if value.startswith(('"', "W/")):
        return value == etag
    return _parse_date(value) == mtime_s


@attrs.frozen
class Answer:
    """How to answer a GET or HEAD of one file."""

    status: int
    #: Headers besides Content-Length and Connection.
    headers: list[tuple[str, str]]
    #: The slice of the file to send (``length`` 0 for 304 and 416).
    start: int = 0
    length: int = 0


def decide(req: Headers, size: int, mtime_ns: int, ctype: str) -> Answer:
    """Status, headers and byte slice for a GET of a file of ``size`` bytes modified at ``mtime_ns``."""
    etag = etag_for(size, mtime_ns)
    mtime_s = mtime_ns // 1_000_000_000
    validators = [("ETag", etag), ("Last-Modified", http_date(mtime_s))]
    inm = req.get("if-none-match")
    if inm is not None:
        if _none_match(inm, etag):
            return Answer(304, validators)
    elif (ims := req.get("if-modified-since")) is not None:
        since = _parse_date(ims)
        if since is not None and mtime_s <= since:
            return Answer(304, validators)
    headers = [("Content-Type", ctype), ("Accept-Ranges", "bytes"), *validators]
    rng = req.get("range")
    if rng is not None and _if_range_holds(req.get("if-range"), etag, mtime_s):
        try:
            r = parse_range(rng, size)
        except RangeNotSatisfiable:
            return Answer(416, [*headers, ("Content-Range", f"bytes */{size}")])
        if r is not None:
            return Answer(206, [*headers, ("Content-Range", f"bytes {r.start}-{r.end}/{size}")],
                          r.start, r.length)
    return Answer(200, headers, 0, size)


def response_head(status: int, headers: list[tuple[str, str]], length: int | None, *,
                  keep_alive: bool, http10: bool) -> bytes:
    """A complete response head.  ``length`` None omits Content-Length (304).

    HTTP/1.0 clients get ``Connection: keep-alive`` when they asked for it; HTTP/1.1 clients
    get ``Connection: close`` when the connection ends after this response.
    """
    lines = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Unknown')}", f"Date: {http_date_now()}"]
    lines += [f"{name}: {value}" for name, value in headers]
    if length is not None:
        lines.append(f"Content-Length: {length}")
    if not keep_alive:
        lines.append("Connection: close")
    elif http10:
        lines.append("Connection: keep-alive")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def http_date_now() -> str:
    return formatdate(usegmt=True)


def text_response(status: int, message: str, *, keep_alive: bool, http10: bool, head_only: bool,
                  extra: list[tuple[str, str]] | None = None) -> bytes:
    """A short plain-text answer (errors, redirects)."""
    body = f"{status} {_REASONS.get(status, 'Error')}: {message}\n".encode()
    headers = [("Content-Type", "text/plain; charset=utf-8"), ("X-Content-Type-Options", "nosniff"),
               *(extra or [])]
    head = response_head(status, headers, len(body), keep_alive=keep_alive, http10=http10)
    return head if head_only else head + body
