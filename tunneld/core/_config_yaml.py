"""YAML nodes for the config loader: parse with marks, read typed values, name the place of a mistake.

The loader works on PyYAML's node graph, not on plain Python values, so that every error can
say ``FILE line N: KEY.PATH: what is wrong``.  Nodes remember their file (``start_mark.name``),
so trees merged from several ``--config`` files still point into the right one.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from ._errors import ConfigError

#: Deepest nesting of YAML collections accepted (the schema needs 5; PyYAML's composer recurses).
MAX_YAML_DEPTH = 32
#: Longest heartbeat interval/tolerance: the Auth message carries them as int64 nanoseconds.
MAX_HEARTBEAT = 86400.0


def source_name(path: Path | None) -> str:
    """How messages name a file: its base name (``tunneld.yml``), or ``config`` for text."""
    return path.name if path else "config"


class _Loader(yaml.SafeLoader):  # type: ignore[misc]  # (no stubs for yaml here)
    """SafeLoader that refuses deep nesting with a ConfigError instead of a RecursionError."""

    def __init__(self, stream: str | bytes, path: Path | None) -> None:
        super().__init__(stream)
        self.name = source_name(path)  # what marks, hence messages, call the file
        self._depth = 0

    def compose_node(self, parent: yaml.Node | None, index: object) -> yaml.Node | None:
        self._depth += 1
        try:
            if self._depth > MAX_YAML_DEPTH:
                mark = self.peek_event().start_mark
                raise ConfigError(f"{self.name} line {mark.line + 1}: nested deeper than "
                                  f"{MAX_YAML_DEPTH} levels")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def decode(data: str | bytes, path: Path | None) -> str:
    """UTF-8 text of a file's bytes; ConfigError naming the line of the first bad byte."""
    if isinstance(data, str):
        return data
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        lineno = data.count(b"\n", 0, exc.start) + 1
        raise ConfigError(f"{source_name(path)} line {lineno}: not valid UTF-8 (byte {exc.start})") from None


def compose(text: str | bytes, path: Path | None) -> yaml.Node | None:
    """The node tree of one YAML document (None if empty); ConfigError with the line if it is not YAML."""
    name = source_name(path)
    text = decode(text, path)
    loader: _Loader | None = None
    try:
        loader = _Loader(text, path)  # the reader already refuses non-printable characters
        return loader.get_single_node()
    except yaml.reader.ReaderError as exc:  # no mark, and a two-line str(): say it on one line
        lineno = text.count("\n", 0, exc.position) + 1
        char = f"#x{exc.character:04x}" if isinstance(exc.character, int) else repr(exc.character)
        raise ConfigError(f"{name} line {lineno}: not valid YAML: {exc.reason} ({char})") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{name}{line}: not valid YAML: {getattr(exc, 'problem', exc)}") from None
    except (ValueError, OverflowError, RecursionError) as exc:
        # PyYAML's scanner itself fails on some input: '"\U7fffffff"' is chr() out of range.
        line = f" line {loader.get_mark().line + 1}" if loader is not None else ""
        raise ConfigError(f"{name}{line}: not valid YAML: {exc}") from None
    finally:
        if loader is not None:
            loader.dispose()


def from_data(data: Any, name: str) -> yaml.Node:
    """Nodes for plain data (a JSON body): errors then say ``NAME: KEY: ...`` (there is no line)."""
    try:
        node = yaml.representer.SafeRepresenter(sort_keys=False).represent_data(data)
    except (yaml.YAMLError, RecursionError, TypeError) as exc:
        raise ConfigError(f"{name}: not a JSON object of simple values ({type(exc).__name__})") from None
    mark = yaml.Mark(name, -1, -1, -1, None, None)
    todo = [node]
    while todo:
        item = todo.pop()
        item.start_mark = item.end_mark = mark
        if isinstance(item, yaml.SequenceNode):
            todo.extend(item.value)
        elif isinstance(item, yaml.MappingNode):
            todo.extend(n for pair in item.value for n in pair)
    return node


def where(node: yaml.Node) -> str:
    """``tunneld.yml line 7`` for a node of a file; the source's name alone for nodes from data."""
    mark = node.start_mark
    if mark is None:
        return "config"
    return mark.name if mark.line < 0 else f"{mark.name} line {mark.line + 1}"


def join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def is_null(node: yaml.Node) -> bool:
    return isinstance(node, yaml.ScalarNode) and node.tag == "tag:yaml.org,2002:null"


def key(node: yaml.Node, prefix: str = "") -> str:
    """A mapping key: a plain scalar only (a list or mapping as a key is no config key).

    Keys are echoed in error messages (``tunnels.NAME.KEY``), so control characters such as
    the newlines of a multi-line key are refused: a message must stay one line.
    """
    lead = f"{prefix}: " if prefix else ""
    if not isinstance(node, yaml.ScalarNode):
        raise ConfigError(f"{where(node)}: {lead}keys must be plain names, not a list or mapping")
    text = str(node.value)
    if any(ord(c) < 32 or ord(c) == 127 for c in text):
        raise ConfigError(f"{where(node)}: {lead}key {text[:64]!r} contains control characters")
    return text


def mapping(node: yaml.Node, what: str) -> list[tuple[yaml.Node, yaml.Node]]:
    """The (key, value) pairs of a mapping node (a null node is an empty mapping)."""
    if is_null(node):
        return []
    if not isinstance(node, yaml.MappingNode):
        raise ConfigError(f"{where(node)}: {what}: expected a mapping")
    return list(node.value)


def items(node: yaml.Node, what: str) -> list[tuple[str, yaml.Node, yaml.Node]]:
    """A mapping's (key text, key node, value node) triples; a key given twice is an error."""
    seen: dict[str, yaml.Node] = {}
    out = []
    for knode, vnode in mapping(node, what):
        name = key(knode, what)
        if name in seen:
            raise ConfigError(f"{where(knode)}: {join(what, name)}: given twice "
                              f"(first at {where(seen[name])})")
        seen[name] = knode
        out.append((name, knode, vnode))
    return out


def scalar(full: str, node: yaml.Node) -> Any:
    if not isinstance(node, yaml.ScalarNode):
        raise ConfigError(f"{where(node)}: {full}: expected a single value")
    try:
        return yaml.constructor.SafeConstructor().construct_object(node, deep=True)
    except Exception as exc:  # noqa: BLE001 - PyYAML's constructors raise ValueError, KeyError, ...
        detail = getattr(exc, "problem", None) or f"{type(exc).__name__}: {exc}"
        raise ConfigError(f"{where(node)}: {full}: invalid value: {detail}"[:300]) from None


def string(full: str, node: yaml.Node) -> str:
    value = scalar(full, node)
    if value is None:
        return ""
    return str(value)


def boolean(full: str, node: yaml.Node) -> bool:
    value = scalar(full, node)
    if not isinstance(value, bool):
        raise ConfigError(f"{where(node)}: {full}: expected true or false, got {value!r}"[:300])
    return value


def integer(full: str, node: yaml.Node) -> int:
    value = scalar(full, node)
    if isinstance(value, str) and value.strip().lstrip("-").isdigit() and len(value) < 30:
        value = int(value.strip())
    if not isinstance(value, int) or isinstance(value, bool):
        raise ConfigError(f"{where(node)}: {full}: expected an integer, got {str(value)[:64]!r}")
    return value


def choice(full: str, node: yaml.Node, allowed: Mapping[str, Any]) -> Any:
    """One of ``allowed``'s keys (compared as lower-case text, so YAML's ``true`` is "true")."""
    value = scalar(full, node)
    text = str(value).lower() if value is not None else ""
    if text not in allowed:
        raise ConfigError(f"{where(node)}: {full}: expected {', '.join(allowed)}, got {str(value)[:64]!r}")
    return allowed[text]


def duration(full: str, node: yaml.Node) -> float:
    """Seconds of a Go-style duration (``10s``, ``1500ms``, ``2m``, ``1h``) or a plain number."""
    value = scalar(full, node)
    seconds: float | None = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
        text = str(value)
    else:
        text = str(value).strip()
        units = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
        for unit in ("ms", "s", "m", "h"):
            number = text[: -len(unit)]
            if text.endswith(unit) and number.isascii() and number.replace(".", "", 1).isdigit():
                seconds = float(number) * units[unit]
                break
    if seconds is None or not math.isfinite(seconds):
        raise ConfigError(f"{where(node)}: {full}: expected a duration such as 10s, got {text[:64]!r}")
    if seconds > MAX_HEARTBEAT:
        raise ConfigError(f"{where(node)}: {full}: must be at most 24h")
    return seconds
