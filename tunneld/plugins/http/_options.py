"""The http tunnel type's settings: config keys, ``tunneld http`` flags and how they are checked."""

from __future__ import annotations

from typing import Any

from tunneld.plugin import NAME_OPTIONS, Code, TunnelOption, check_host_header, split_basic_auth

SCHEMES = ("https", "http")


def parse_schemes(value: list[str]) -> list[str]:
    """``schemes`` / ``--scheme`` (repeatable): http and/or https, at least one."""
    if not value or any(s not in SCHEMES for s in value):
        raise ValueError("schemes are http and/or https")
    return list(dict.fromkeys(value))


def parse_bind_tls(value: str) -> list[str]:
    """ngrok v2's ``bind_tls`` (true, false or both) as the ``schemes`` it means."""
    schemes = {"true": ["https"], "false": ["http"], "both": ["https", "http"]}.get(value.strip().lower())
    if schemes is None:
        raise ValueError("expected true, false or both")
    return schemes


def parse_basic_auth(value: list[str]) -> list[str]:
    """``USER:PASSWORD`` credentials with ngrok's limits; the message names its error code, never a secret."""
    for credential in value:
        try:
            split_basic_auth(credential)
        except ValueError as exc:
            code = Code.BASIC_AUTH_PASSWORD if "password" in str(exc) else Code.BASIC_AUTH_USERNAME
            raise ValueError(f"{exc} ({code.label})") from None
    return list(value)


def parse_auth(value: str) -> list[str]:
    """ngrok v2's ``auth: "user:pass"``: one credential, added to ``basic_auth``."""
    return parse_basic_auth([value])


def parse_host_header(value: Any) -> str:
    return check_host_header(str(value))


HTTP_OPTIONS = (
    *NAME_OPTIONS,
    TunnelOption("schemes", "--scheme", "Public endpoints to open, http and/or https (repeatable) "
                 "[default: both].", multiple=True, default=SCHEMES, parse=parse_schemes,
                 flag_aliases=("--schemes",), metavar="http|https"),
    TunnelOption("bind_tls", None, "ngrok v2's spelling of schemes: true (https), false (http) or both.",
                 parse=parse_bind_tls, into="schemes"),
    TunnelOption("basic_auth", "--basic-auth", "Require HTTP Basic auth at the edge (repeatable: several "
                 "users); password 8-128 characters.  The Authorization header is still passed to the "
                 "upstream.", multiple=True, default=(), parse=parse_basic_auth, secret=True,
                 metavar="USER:PASSWORD"),
    TunnelOption("auth", None, "ngrok v2's single basic-auth credential, USER:PASSWORD.", parse=parse_auth,
                 into="basic_auth", secret=True),
    TunnelOption("host_header", "--host-header", "Host header sent upstream: 'rewrite' = the upstream's "
                 "host[:port] (redirects to it are mapped back to the public URL), or a literal value "
                 "[default: the public Host].", default="", parse=parse_host_header, metavar="rewrite|HOST"),
)

HTTP_HELP = """Forward public HTTP/HTTPS to ADDR: a port (8080), HOST:PORT or a URL.

ADDR may be on another machine (192.168.1.2:80, example.internal:8080).  https://...
URLs, and port 443, make the agent speak HTTPS to the upstream; its certificate is NOT
verified (local networks are assumed private).  file:///abs/path serves a folder (or
one file) from the agent itself.

\b
Examples:
  tunneld http 8080 --basic-auth 'alice:correct horse'
  tunneld http 8080 --subdomain myapp --host-header=rewrite
  tunneld http file:///srv/share
"""
