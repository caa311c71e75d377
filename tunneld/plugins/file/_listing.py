"""Directory listings: a small HTML page, built in a worker thread (scandir and stat block).

Names are shown HTML-escaped and linked percent-quoted with ``safe=""``, so ``a:b`` cannot
turn into a URL scheme and ``<script>`` stays text.  The page is served with a CSP that forbids
scripts, as a second fence.  Entries that would not be served are not listed: hidden names,
names with a backslash (the path rules refuse them: ``\\`` separates names on Windows),
anything but directories and regular files, and symlinks leading outside the root.
"""

from __future__ import annotations

import html
import os
import stat
from urllib.parse import quote, unquote

import attrs

from ._paths import contain

__all__ = ["Entry", "scan", "render", "LISTING_HEADERS"]

#: Extra headers of a listing page: no scripts, no caching (it changes whenever the folder does).
LISTING_HEADERS = [("Content-Type", "text/html; charset=utf-8"), ("Cache-Control", "no-cache"),
                   ("Content-Security-Policy", "default-src 'none'; style-src 'unsafe-inline'"),
                   ("X-Content-Type-Options", "nosniff")]


@attrs.frozen
class Entry:
    name: str
    is_dir: bool
    size: int


def scan(root: str, directory: str) -> list[Entry]:
    """The servable entries of ``directory`` (a real path under ``root``), sorted by name.

    Raises OSError when the directory cannot be read.
    """
    entries = []
    with os.scandir(directory) as it:
        for item in it:
            if item.name.startswith(".") or "\\" in item.name:
                continue
            try:
                if item.is_symlink():
                    real = contain(root, [os.path.relpath(item.path, root)])
                    if real is None:
                        continue
                    st = os.stat(real)
                else:
                    st = item.stat()
            except OSError:
                continue  # vanished or unreadable meanwhile
            if stat.S_ISDIR(st.st_mode):
                entries.append(Entry(item.name, True, 0))
            elif stat.S_ISREG(st.st_mode):
                entries.append(Entry(item.name, False, st.st_size))
    # case-insensitive first so that "b" sits next to "B"; then exact, for a total order
    entries.sort(key=lambda e: (e.name.casefold(), e.name))
    return entries


def _display(name: str) -> str:
    """A name as text: undecodable bytes (surrogate escapes) become U+FFFD."""
    return os.fsencode(name).decode("utf-8", "replace")


def _size(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    value = n / 1024
    unit = "KiB"
    for bigger in ("MiB", "GiB", "TiB"):
        if value < 1024:
            break
        value /= 1024
        unit = bigger
    return f"{value:.1f} {unit}"


def render(url_path: str, entries: list[Entry], *, at_root: bool) -> bytes:
    """The listing page of the directory at ``url_path`` (quoted, ending in ``/``)."""
    title = html.escape(unquote(url_path, errors="replace"))
    rows = [] if at_root else ['<tr><td><a href="../">../</a></td><td></td></tr>']
    for e in entries:
        href = quote(os.fsencode(e.name), safe="") + ("/" if e.is_dir else "")
        text = html.escape(_display(e.name)) + ("/" if e.is_dir else "")
        size = "" if e.is_dir else _size(e.size)
        rows.append(f'<tr><td><a href="{html.escape(href)}">{text}</a></td><td>{size}</td></tr>')
    page = (
        '<!DOCTYPE html>\n<html><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width">'
        f"<title>Index of {title}</title>"
        "<style>body{font-family:sans-serif;margin:2em}td{padding:.1em 1.5em .1em 0}"
        "td+td{text-align:right;color:#555}</style></head>\n"
        f"<body><h1>Index of {title}</h1>\n<table>\n" + "\n".join(rows) + "\n</table></body></html>\n"
    )
    return page.encode("utf-8")
