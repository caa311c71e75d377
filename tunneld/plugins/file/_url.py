"""``file://`` forwarding addresses (RFC 8089): absolute paths only, POSIX or Windows.

ngrok accepts ``file:///abs/path`` and, on Windows, ``file:///C:\\Users\\alan\\Public Folder``
(backslashes and spaces as typed).  A URL has no notion of a current directory, so every
relative form (``file://relative``, ``file://./x``, ``file:relative``, ``file:///C:rel``) is
refused rather than guessed at.  Percent-escapes are decoded, as Go's ``url.Parse`` does for
ngrok; ``?`` and ``#`` are part of the path (a directory may be called ``a#b``).

Nothing here touches the filesystem: existence is checked when the server is built.
"""

from __future__ import annotations

import re
from pathlib import PurePath, PurePosixPath, PureWindowsPath
from urllib.parse import unquote

__all__ = ["is_file_url", "parse_file_url"]

#: A drive letter where a Windows path starts: ``C:``, optionally after the URL's ``/``.
_DRIVE = re.compile(r"/?([A-Za-z]:.*)\Z", re.DOTALL)

_HINT = "use an absolute path such as file:///srv/share (or file:///C:/Users/alan/share on Windows)"


def is_file_url(addr: str) -> bool:
    """True for addresses in the ``file:`` scheme (any case, any form, valid or not)."""
    return addr.strip()[:5].lower() == "file:"


def parse_file_url(url: str) -> PurePath:
    """The absolute path a ``file:`` URL names: a PurePosixPath, or a PureWindowsPath for ``C:…``.

    Raises:
        ValueError: not a ``file:`` URL, a relative path, a remote host, or a NUL byte.
    """
    text = url.strip()
    if not is_file_url(text):
        raise ValueError(f"{url!r} is not a file:// URL")
    rest = text[5:]
    if rest.startswith("//"):
        rest = rest[2:]
        # ``file://C:/x`` puts the drive where the host belongs: unambiguous, so take it.
        if not _DRIVE.match(rest):
            host, slash, path = rest.partition("/")
            if host.lower() not in ("", "localhost"):
                raise ValueError(f"{url!r}: {host!r} would be a host name or a relative path; {_HINT}")
            rest = slash + path
    path = unquote(rest, errors="surrogateescape")
    if "\0" in path:
        raise ValueError(f"{url!r}: NUL byte in path")
    if drive := _DRIVE.match(path):
        win = PureWindowsPath(drive.group(1))
        if not win.is_absolute():  # "C:rel" is relative to drive C:'s current directory
            raise ValueError(f"{url!r} is a relative Windows path; {_HINT}")
        return win
    if not path.startswith("/"):
        raise ValueError(f"{url!r} is a relative path; {_HINT}")
    return PurePosixPath(path)
