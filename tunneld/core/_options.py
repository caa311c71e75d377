"""Option parsers and declarations that several tunnel types share (published by :mod:`tunneld.plugin`).

Each parser takes one value (or a list) and returns it normalised, or raises ValueError with a
message that never quotes a secret: the config loader and the agent commands add the file,
line and key, or the flag.
"""

from __future__ import annotations

from ._tunnel import TunnelOption

#: ngrok's limits on basic-auth credentials (its errors 359/360).
BASIC_AUTH_MIN_PASSWORD = 8
BASIC_AUTH_MAX_LENGTH = 128


def split_basic_auth(credential: str) -> tuple[str, str]:
    """Split ``user:password`` and check ngrok's limits; ValueError (never quoting it) if bad.

    The username ends at the first ``:`` (RFC 7617: it cannot contain one); it must be 1-128
    characters, the password 8-128.
    """
    user, sep, password = credential.partition(":")
    if not sep:
        raise ValueError("basic auth credentials must look like USERNAME:PASSWORD")
    if not user or len(user) > BASIC_AUTH_MAX_LENGTH:
        raise ValueError(f"a basic auth username must be 1 to {BASIC_AUTH_MAX_LENGTH} characters")
    if not BASIC_AUTH_MIN_PASSWORD <= len(password) <= BASIC_AUTH_MAX_LENGTH:
        raise ValueError(f"a basic auth password must be {BASIC_AUTH_MIN_PASSWORD} to "
                         f"{BASIC_AUTH_MAX_LENGTH} characters")
    if any(ord(c) < 32 or ord(c) == 127 for c in credential):
        raise ValueError("basic auth credentials cannot contain control characters")
    return user, password


def check_host_header(value: str) -> str:
    """Normalise a ``--host-header`` value ("" and ``preserve`` keep the Host); ValueError if bad."""
    value = value.strip()
    if value.lower() in ("", "preserve"):
        return ""
    if value.lower() == "rewrite":
        return "rewrite"
    if not value.isascii() or any(ord(c) < 33 or ord(c) == 127 for c in value) or "/" in value:
        raise ValueError(f"{value!r} is not a valid Host (use rewrite, or a name such as example.com or "
                         "example.com:8080)")
    return value


def parse_proxy_proto(value: object) -> int:
    """``proxy_proto`` / ``--proxy-proto``: "", 0, 1, 2 (ints or strings) → 0, 1 or 2; ValueError else."""
    text = "" if value is None else str(value).strip()
    if text in ("", "0"):
        return 0
    if text in ("1", "2"):
        return int(text)
    raise ValueError(f"expected 1 or 2 (the PROXY protocol version), got {text[:64]!r}")


#: ``--subdomain`` and ``--hostname`` (ngrok v3: ``--domain``, ``--url``) of name-routed tunnels.
NAME_OPTIONS = (
    TunnelOption("subdomain", "--subdomain", "Ask for NAME.DOMAIN instead of a random name.", default="",
                 metavar="NAME"),
    TunnelOption("hostname", "--hostname", "Full hostname: one label under the edge's domain, or a custom "
                 "hostname the edge allows for your authtoken (--domain and --url are ngrok v3's spellings).",
                 default="", aliases=("domain",), flag_aliases=("--domain", "--url"), metavar="HOST"),
)

#: ``proxy_proto`` / ``--proxy-proto 1|2``, for types whose edge writes a PROXY header (0: none).
PROXY_PROTO_OPTION = TunnelOption(
    "proxy_proto", "--proxy-proto", "Put a PROXY protocol header (version 1 or 2) before each connection's "
    "bytes, so the upstream sees the real client address.", kind=int, default=0, parse=parse_proxy_proto,
    metavar="1|2")
