"""The labeled tunnel type's settings: the ``labels`` key and ``tunneld tunnel --label``."""

from __future__ import annotations

import re
from typing import Any

from tunneld.plugin import TunnelOption

_LABEL_PART = re.compile(r"[A-Za-z0-9_.\-/]{1,128}")


def parse_labels(values: Any) -> list[str]:
    """``["k=v", ...]`` checked (keys and values: letters, digits, ``_ . - /``; no key twice)."""
    if isinstance(values, str):
        values = [values]
    if not isinstance(values, list):
        raise ValueError("expected a list of key=value labels")
    out: list[str] = []
    keys: set[str] = set()
    for item in values:
        if not isinstance(item, str):
            raise ValueError(f"{item!r}: a label is a key=value string")
        for part in item.split(","):
            key, sep, value = part.strip().partition("=")
            if not sep or not _LABEL_PART.fullmatch(key) or not _LABEL_PART.fullmatch(value):
                raise ValueError(f"{part!r}: expected key=value (1-128 letters, digits or _ . - / each)")
            if key in keys:
                raise ValueError(f"label key {key!r} given twice")
            keys.add(key)
            out.append(f"{key}={value}")
    return out


LABELED_OPTIONS = (
    TunnelOption("labels", "--label", "A label KEY=VALUE (repeatable): edges whose backend selects all of "
                 "its labels route to this tunnel.", multiple=True, parse=parse_labels, metavar="KEY=VALUE"),
)

LABELED_HELP = """Start a labeled tunnel to ADDR: edges whose backend selects its labels route to it.

The edge decides the protocol: an https edge sends HTTP requests (relayed as `tunneld http`
does), a tcp or tls edge raw connections.  Create edges with `tunneld api edges create`.

\b
Examples:
  tunneld tunnel --label edge=edghts_0123456789abcdef 8080
  tunneld tunnel --label app=web --label dc=eu 8080
"""
