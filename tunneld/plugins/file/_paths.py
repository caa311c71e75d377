"""From a request target to a file under the served root, and never outside it.

Two steps, each enough on its own against a request that tries to climb out:

1. :func:`split_target` works on the raw target bytes.  It splits on ``/`` *before*
   percent-decoding and refuses any segment that decodes to something a filesystem would read
   as structure: ``.`` or ``..`` (also as ``%2e%2e``), an encoded ``/`` (``%2f``), a backslash
   (a separator on Windows), a NUL byte (``%00`` truncates C strings), a malformed escape.
   Segments starting with ``.`` are refused too: hidden files (``.git``, ``.env``, ``.ssh``)
   are neither listed nor served — a shared folder rarely means to publish them.
2. :func:`contain` resolves the joined path with ``realpath(strict=True)`` (every symlink
   followed) and accepts it only if it is the root or lies below it.  Symlinks that stay
   inside the root work; those that lead out give 404.  (A visibly named symlink to a hidden
   file inside the root is served: someone made it on purpose.)

What remains is a race with a *local* user swapping a checked directory for a symlink between
the check and ``open()``; remote clients cannot create files (only GET and HEAD are served).
"""

from __future__ import annotations

import os
import re
from urllib.parse import quote

__all__ = ["split_target", "contain", "url_path"]

_ESCAPE = re.compile(rb"%[0-9A-Fa-f]{2}")
#: Bytes that never appear in a valid request target (controls, space, DEL).
_CONTROL = re.compile(rb"[\x00-\x20\x7f]")


def _decode_segment(raw: bytes) -> bytes | None:
    """Percent-decode one segment; None if an escape is malformed."""
    if b"%" not in raw:
        return raw
    parts = _ESCAPE.split(raw)
    if any(b"%" in part for part in parts):
        return None  # a '%' not followed by two hex digits
    return _ESCAPE.sub(lambda m: bytes([int(m.group()[1:], 16)]), raw)


def split_target(target: bytes) -> tuple[list[str], bool] | None:
    """The decoded path segments of an origin-form (or http(s) absolute-form) target.

    Returns ``(segments, trailing_slash)``, empty segments dropped; names are decoded with
    the filesystem encoding (``os.fsdecode``) so that any file's name can be asked for.
    None when the target cannot name a file under the root (see the module docstring).
    """
    if _CONTROL.search(target):
        return None
    lower = target[:8].lower()
    if lower.startswith((b"http://", b"https://")):
        # absolute-form (RFC 9112 §3.2.2): the edge already routed by Host, keep the path
        after = target.split(b"://", 1)[1]
        slash = after.find(b"/")
        target = after[slash:] if slash >= 0 else b"/"
    if not target.startswith(b"/"):
        return None  # asterisk-form, authority-form, or another scheme (file:///etc/passwd)
    path = target.split(b"?", 1)[0].split(b"#", 1)[0]
    segments = []
    for raw in path.split(b"/")[1:]:
        name = _decode_segment(raw)
        if name is None or b"/" in name or b"\\" in name or b"\0" in name:
            return None
        if not name:
            continue
        if name.startswith(b"."):  # ".", "..", and hidden files
            return None
        segments.append(os.fsdecode(name))
    return segments, path.endswith(b"/")


def contain(root: str, segments: list[str]) -> str | None:
    """The real path of ``root/segments`` if it exists and lies within ``root``, else None.

    ``root`` must itself be a real path (no symlinks, normalised).
    """
    try:
        real = os.path.realpath(os.path.join(root, *segments), strict=True)
    except (OSError, ValueError):
        return None  # missing, a symlink loop, a name too long, ...
    if real == root or real.startswith(root if root.endswith(os.sep) else root + os.sep):
        return real
    return None


def url_path(segments: list[str], directory: bool) -> str:
    """The canonical quoted URL path of ``segments`` (``/a%20b/c/``), for links and redirects.

    Built from the decoded segments, never echoed from the request, so it always starts with
    exactly one ``/``: ``//evil.example/`` (a protocol-relative open redirect) cannot come out.
    """
    path = "/" + "/".join(quote(os.fsencode(s), safe="") for s in segments)
    if directory and segments:
        path += "/"
    return path
