"""Credential ACLs: ngrok's ``bind:`` rules, parsed, normalised and matched (sans-IO, no trio).

A credential (authtoken or SSH key) carries a list of rules; an empty list is unrestricted.
A bind is allowed when one rule allows it (labeled tunnels: when *each* of its labels is
allowed by some rule, so an agent cannot add a label that steers another edge's traffic).

Rule forms (``bind:`` prefix required, except the lone ``*``):

=========================  ==============================================================
``*`` / ``bind:*``          everything
``bind:app.example.com``    exactly that hostname
``bind:*.example.com``      any name *below* ``example.com``, one or more labels deep
                            (``a.example.com``, ``x.y.example.com``, and the wildcard name
                            ``*.example.com`` itself) -- never ``example.com`` nor
                            ``evil-example.com``.  ngrok's rule reads "any name ending
                            ``.example.com``"; a certificate's ``*.`` covers one label only,
                            but an ACL grants a namespace, so the deeper names are in it.
``bind:host:port``          that TCP address (``host`` a hostname or an IP, IPv6 as
                            ``[::1]:22``)
``bind:k=v``                labeled tunnels with label ``k=v``
``bind:k=*`` / ``bind:*=v`` any value of key ``k`` / any key with value ``v``
=========================  ==============================================================

Hostnames are compared in their ASCII form: lower-cased, one trailing dot dropped, and
internationalised labels turned into punycode (stdlib ``encodings.idna``, IDNA 2003, so that
``bücher.example`` and ``xn--bcher-kva.example`` are the same name).  Label keys and values
are case-sensitive.  Rules are refused, with a message saying why, for whitespace anywhere,
empty parts, nested or inner wildcards (``*.*.a.com``, ``a.*.com``, ``*a.com``), ``=`` or
``,`` inside a label, or a port outside 1-65535.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Mapping
from functools import lru_cache

import attrs

#: Kinds of bind :func:`allows_bind` checks.
HOST = "host"
ADDR = "addr"
LABELS = "labels"

PREFIX = "bind:"
#: ngrok's caps: a credential has at most this many rules, each at most this long.
MAX_RULES = 100
MAX_RULE_LENGTH = 512
MAX_LABEL_LENGTH = 128

_DNS_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
_LABEL_PART = re.compile(r"[A-Za-z0-9_.\-/]{1,%s}" % (MAX_LABEL_LENGTH,))  # noqa: UP031


class AclError(ValueError):
    """A malformed ACL rule (or hostname, address or label); the message says what is wrong."""


@attrs.frozen
class Rule:
    """One parsed rule.  ``kind``: ``any``, ``host``, ``suffix``, ``addr`` or ``label``."""

    kind: str
    #: ``host``: the name; ``suffix``: the parent domain (no ``*.``); ``addr``: ``host:port``.
    value: str = ""
    #: ``label``: key and value ("*" = any).
    key: str = ""
    label_value: str = ""

    def __str__(self) -> str:
        if self.kind == "any":
            return "bind:*"
        if self.kind == "suffix":
            return f"bind:*.{self.value}"
        if self.kind == "label":
            return f"bind:{self.key}={self.label_value}"
        return f"bind:{self.value}"


def normalize_hostname(name: str, *, wildcard: bool = False) -> str:
    """``name`` in ASCII form (lower case, punycode, no trailing dot); AclError if malformed.

    ``wildcard``: a leading ``*.`` label is allowed (and kept).
    """
    if not isinstance(name, str) or not name:
        raise AclError("empty hostname")
    if any(c.isspace() for c in name):
        raise AclError(f"{name!r}: hostnames contain no whitespace")
    if name.endswith("."):
        name = name[:-1]  # the root label: "a.com." is "a.com"; "a.com.." stays wrong
    star = ""
    if wildcard and name.startswith("*."):
        star, name = "*.", name[2:]
    if "*" in name:
        raise AclError(f"{star}{name!r}: '*' may only stand alone as the first label ('*.example.com')")
    labels = name.split(".")
    if any(not label for label in labels):
        raise AclError(f"{star}{name!r}: empty label (leading, trailing or double dot)")
    out = []
    for label in labels:
        try:
            ascii_label = label.encode("idna").decode("ascii").lower()
            if ascii_label.startswith("xn--"):
                ascii_label.encode("ascii").decode("idna")  # punycode that decodes
        except UnicodeError as exc:
            raise AclError(f"{name!r}: label {label!r} is not a valid international name ({exc})") from None
        if not _DNS_LABEL.fullmatch(ascii_label):
            raise AclError(f"{name!r}: label {label!r} must be letters, digits and inner hyphens, "
                           "at most 63 characters")
        out.append(ascii_label)
    result = star + ".".join(out)
    if len(result) > 253:
        raise AclError(f"{name[:40]!r}...: hostname longer than 253 characters")
    return result


def normalize_addr(addr: str) -> str:
    """``host:port`` with the host normalised (IPv6 in brackets); AclError if malformed."""
    if not isinstance(addr, str) or any(c.isspace() for c in addr):
        raise AclError(f"{addr!r}: expected HOST:PORT without whitespace")
    host, sep, port_text = addr.rpartition(":")
    if not sep or not host:
        raise AclError(f"{addr!r}: expected HOST:PORT")
    if not port_text.isascii() or not port_text.isdigit() or not 1 <= int(port_text) <= 65535 \
            or port_text != str(int(port_text)):
        raise AclError(f"{addr!r}: the port must be a number from 1 to 65535")
    if host.startswith("[") and host.endswith("]"):
        try:
            ip = ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            raise AclError(f"{addr!r}: {host} is not an IPv6 address") from None
        return f"[{ip.compressed}]:{int(port_text)}"
    try:
        return f"{ipaddress.IPv4Address(host)}:{int(port_text)}"
    except ValueError:
        pass
    if ":" in host:
        raise AclError(f"{addr!r}: write IPv6 addresses in brackets, [::1]:22")
    return f"{normalize_hostname(host)}:{int(port_text)}"


def validate_label(key: str, value: str) -> None:
    """AclError unless ``key=value`` is a well-formed label (letters, digits, ``_.-/``)."""
    for what, part in (("key", key), ("value", value)):
        if not isinstance(part, str) or not _LABEL_PART.fullmatch(part):
            raise AclError(f"label {what} {part!r}: 1-{MAX_LABEL_LENGTH} letters, digits or _ . - / "
                           "(no '=', ',', '*' or whitespace)")


@lru_cache(maxsize=4096)
def parse_rule(text: str) -> Rule:
    """Parse one rule; AclError with the reason if it is malformed."""
    if not isinstance(text, str):
        raise AclError(f"an ACL rule is a string, not {type(text).__name__}")
    if len(text) > MAX_RULE_LENGTH:
        raise AclError(f"ACL rule longer than {MAX_RULE_LENGTH} characters")
    if any(c.isspace() for c in text):
        raise AclError(f"{text!r}: ACL rules contain no whitespace")
    if text == "*":
        return Rule("any")
    if not text.startswith(PREFIX):
        raise AclError(f"{text!r}: an ACL rule is '*' or starts with 'bind:' (bind:app.example.com, "
                       "bind:*.example.com, bind:host:port, bind:key=value)")
    body = text[len(PREFIX):]
    if not body:
        raise AclError(f"{text!r}: nothing after 'bind:'")
    if body == "*":
        return Rule("any")
    if "=" in body:
        key, _, value = body.partition("=")
        if "=" in value:
            raise AclError(f"{text!r}: a label rule has one '=' (bind:key=value)")
        if key == "*" and value == "*":
            return Rule("label", key="*", label_value="*")
        validate_label(key if key != "*" else "x", value if value != "*" else "x")
        return Rule("label", key=key, label_value=value)
    if "," in body:
        raise AclError(f"{text!r}: one name per rule (no ',')")
    if ":" in body:
        return Rule("addr", normalize_addr(body))
    if body.startswith("*."):
        return Rule("suffix", normalize_hostname(body, wildcard=True)[2:])
    return Rule("host", normalize_hostname(body))


def normalize_rules(rules: Iterable[str]) -> tuple[str, ...]:
    """Validate ``rules`` and return them in canonical form, duplicates dropped; AclError if any is bad."""
    if isinstance(rules, (str, bytes)) or not isinstance(rules, Iterable):
        raise AclError("an ACL is a list of rules")
    out: dict[str, None] = {}
    for rule in rules:
        out[str(parse_rule(rule))] = None
    if len(out) > MAX_RULES:
        raise AclError(f"at most {MAX_RULES} ACL rules")
    return tuple(out)


def _host_allowed(rule: Rule, host: str) -> bool:
    if rule.kind == "host":
        return host == rule.value
    # "*.a.com" covers everything strictly below a.com, whatever the depth ("x.a.com" and
    # "x.y.a.com", "*.a.com" itself); never "a.com", and "evil-a.com" fails the dot.
    return rule.kind == "suffix" and host.endswith("." + rule.value)


def _label_allowed(rule: Rule, key: str, value: str) -> bool:
    return rule.kind == "label" and rule.key in ("*", key) and rule.label_value in ("*", value)


def allows_bind(rules: Iterable[str], kind: str, name: str | Mapping[str, str]) -> bool:
    """Whether an ACL lets its credential bind ``name``: the one call the edge makes.

    ``kind`` is :data:`HOST` (a hostname, ``*.`` wildcards included), :data:`ADDR` (a TCP
    ``host:port``) or :data:`LABELS` (a mapping of labels, or ``"k=v,k2=v2"``).  A name that
    does not parse is refused; so is a malformed rule (never taken as "allow").
    """
    rules = list(rules)
    parsed = []
    for text in rules:
        try:
            parsed.append(parse_rule(text))
        except AclError:
            continue
    if not parsed:
        # Unrestricted only when the list is really empty: rules that were all malformed
        # (stored before validation tightened, say) grant nothing.
        return not rules
    if any(r.kind == "any" for r in parsed):
        return True
    try:
        if kind == HOST:
            host = normalize_hostname(str(name), wildcard=True)
            return any(_host_allowed(r, host) for r in parsed)
        if kind == ADDR:
            addr = normalize_addr(str(name))
            return any(r.kind == "addr" and r.value == addr for r in parsed)
        if kind == LABELS:
            labels = parse_labels(name) if isinstance(name, str) else dict(name)
            if not labels:
                return False
            return all(any(_label_allowed(r, k, v) for r in parsed) for k, v in labels.items())
    except (AclError, TypeError, ValueError):
        return False
    raise ValueError(f"unknown bind kind {kind!r} (expected {HOST!r}, {ADDR!r} or {LABELS!r})")


def parse_labels(text: str | Iterable[str]) -> dict[str, str]:
    """``"k=v,k2=v2"`` (or a list of ``k=v``) as a dict; AclError if malformed or a key repeats."""
    items = text.split(",") if isinstance(text, str) else list(text)
    labels: dict[str, str] = {}
    for item in items:
        if not isinstance(item, str):
            raise AclError("a label is a 'key=value' string")
        key, sep, value = item.partition("=")
        if not sep:
            raise AclError(f"label {item!r}: expected key=value")
        validate_label(key, value)
        if key in labels:
            raise AclError(f"label key {key!r} given twice")
        labels[key] = value
    return labels
