"""The command an SSH client runs (``http --basic-auth u:p``) and the Binds it asks for.

``ssh -R [NAME:]PORT:LOCAL v2@EDGE COMMAND [flags]``: the ``v2`` user selects this syntax, as
on ngrok; flags carry the agent's names.  Each ``-R`` forward becomes its own tunnel(s): the
command says which kind, the forward's remote port (and name) say which endpoint.

Sans-IO: nothing here imports trio or asyncio.
"""

from __future__ import annotations

import shlex

import attrs

from tunneld.http1 import basic_auth_bind_opts
from tunneld.plugin import proto, split_basic_auth

#: The user name selecting this command syntax (ngrok's ``v2@connect.ngrok-agent.com``).
SYNTAX_USER = "v2"
PROTOCOLS = ("http", "tcp", "tls")
#: Remote-forward bind addresses that name no host (OpenSSH sends ``localhost`` for ``-R 443:...``).
_NO_NAME = frozenset({"", "localhost", "*", "0.0.0.0", "::", "127.0.0.1", "::1"})

USAGE = """\
Usage: ssh -R [NAME:]PORT:LOCAL_HOST:LOCAL_PORT v2@{host} -p {port} COMMAND [ADDR] [flags]

Commands:
  http   HTTP tunnel.  -R 443:... https URL, -R 80:... http URL, -R 0:... both
  tcp    TCP tunnel on a public port.  -R 0:... a random port, -R N:... port N
  tls    TLS tunnel passed through by SNI on the HTTPS port.  -R 443:...

Flags (the agent's names):
  --subdomain NAME       http, tls: NAME.{domain}
  --hostname HOST        http, tls: a full hostname (also -R HOST:443:...)
  --basic-auth U:P       http: require these credentials (repeatable)
  --scheme S             http: http, https or both (comma-separated)
  --remote-addr H:P      tcp: the public address to bind
  --host-header VALUE    http: not supported through SSH (the agent does it)
  --help                 this text

Each -R forward becomes a tunnel; the session lasts as long as ssh runs (Ctrl-C ends it).
Example: ssh -R 443:localhost:80 v2@{host} -p {port} http --basic-auth 'user:secret-pw'
"""


class UsageError(Exception):
    """The command or a flag is wrong; the message is printed into the session."""


@attrs.frozen
class SshCommand:
    """What the client asked for."""

    proto: str
    #: Local address as the user wrote it (``22``), shown only: the ssh client knows the real one.
    addr: str = ""
    subdomain: str = ""
    hostname: str = ""
    basic_auth: tuple[str, ...] = ()
    schemes: tuple[str, ...] = ()
    remote_addr: str = ""
    help: bool = False


_VALUE_FLAGS = {"--subdomain": "subdomain", "--hostname": "hostname", "--domain": "hostname",
                "--url": "hostname", "--basic-auth": "basic_auth", "--scheme": "schemes",
                "--remote-addr": "remote_addr", "--host-header": "host_header"}
_ALLOWED = {"http": {"subdomain", "hostname", "basic_auth", "schemes", "host_header"},
            "tcp": {"remote_addr"},
            "tls": {"subdomain", "hostname"}}


def parse_command(text: str) -> SshCommand:
    """Parse the exec command line; UsageError with a message for the user if it is wrong."""
    try:
        words = shlex.split(text)
    except ValueError as exc:
        raise UsageError(f"cannot parse the command: {exc}") from exc
    if not words or words[0] in ("help", "--help", "-h"):
        return SshCommand(proto="", help=True)
    name, rest = words[0], words[1:]
    if name not in PROTOCOLS:
        raise UsageError(f"unknown command {name!r}: use http, tcp or tls (or --help)")
    values: dict[str, list[str]] = {}
    positional: list[str] = []
    i = 0
    while i < len(rest):
        word = rest[i]
        i += 1
        if word in ("--help", "-h"):
            return SshCommand(proto=name, help=True)
        if not word.startswith("-"):
            positional.append(word)
            continue
        flag, eq, value = word.partition("=")
        field = _VALUE_FLAGS.get(flag)
        if field is None:
            raise UsageError(f"unknown flag {flag!r} for {name} (see --help)")
        if field not in _ALLOWED[name]:
            raise UsageError(f"{flag} does not apply to {name} tunnels (see --help)")
        if not eq:
            if i >= len(rest):
                raise UsageError(f"{flag} needs a value")
            value = rest[i]
            i += 1
        values.setdefault(field, []).append(value)
    if len(positional) > 1:
        raise UsageError(f"unexpected arguments: {' '.join(positional[1:])!r}")
    if "host_header" in values:
        # The agent rewrites Host itself; through SSH nothing on the client side can.
        raise UsageError("--host-header is not supported through SSH: the ssh client cannot rewrite "
                         "requests; use the tunneld agent for it")
    for field in ("subdomain", "hostname", "remote_addr"):
        if len(values.get(field, ())) > 1:
            raise UsageError(f"--{field.replace('_', '-')} may be given once")
    for credential in values.get("basic_auth", ()):
        try:
            split_basic_auth(credential)
        except ValueError as exc:
            raise UsageError(f"--basic-auth: {exc}") from exc
    schemes: list[str] = []
    for value in values.get("schemes", ()):
        for scheme in value.split(","):
            scheme = scheme.strip().lower()
            if scheme not in ("http", "https"):
                raise UsageError(f"--scheme {scheme!r}: use http or https")
            if scheme not in schemes:
                schemes.append(scheme)
    return SshCommand(proto=name, addr=positional[0] if positional else "",
                      subdomain=_one(values, "subdomain"), hostname=_one(values, "hostname"),
                      basic_auth=tuple(values.get("basic_auth", ())), schemes=tuple(schemes),
                      remote_addr=_one(values, "remote_addr"))


def _one(values: dict[str, list[str]], field: str) -> str:
    found = values.get(field)
    return found[0].strip() if found else ""


def binds_for(cmd: SshCommand, listen_host: str, listen_port: int, ports: dict[str, int],
              domain: str) -> list[proto.Bind]:
    """The Binds for one ``-R listen_host:listen_port:...`` forward; UsageError if it cannot be had.

    ``ports`` are the edge's bound public ports (``http``, ``https``).
    """
    name = "" if listen_host in _NO_NAME else listen_host.lower().rstrip(".")
    forward = f"-R {listen_host + ':' if name else ''}{listen_port}"
    if cmd.proto == "tcp":
        if name and name != domain:
            raise UsageError(f"{forward}: a TCP tunnel's name can only be {domain}")
        addr = cmd.remote_addr or (f"{domain}:{listen_port}" if listen_port else "")
        opts: dict[str, object] = {"Addr": addr} if addr else {}
        return [proto.Bind(proto="tcp", forwards_to=cmd.addr, opts=opts)]
    if name and cmd.hostname and name != cmd.hostname.lower():
        raise UsageError(f"{forward} names {name} but --hostname names {cmd.hostname}: give the name once")
    host_opts: dict[str, object] = {}
    if name or cmd.hostname:
        host_opts["Hostname"] = name or cmd.hostname
    if cmd.subdomain:
        host_opts["Subdomain"] = cmd.subdomain
    if cmd.proto == "tls":
        if listen_port not in (0, 443, ports.get("https")):
            raise UsageError(f"{forward}: TLS tunnels are served on port 443 (use -R 443:...)")
        return [proto.Bind(proto="tls", forwards_to=cmd.addr, opts=host_opts)]
    schemes = cmd.schemes or _schemes_for_port(listen_port, ports, forward)
    opts = dict(host_opts)
    if cmd.basic_auth:
        opts.update(basic_auth_bind_opts(list(cmd.basic_auth)))
    return [proto.Bind(proto=scheme, forwards_to=cmd.addr, opts=dict(opts)) for scheme in schemes]


def _schemes_for_port(port: int, ports: dict[str, int], forward: str) -> tuple[str, ...]:
    if port in (443, ports.get("https")):
        return ("https",)
    if port in (80, ports.get("http")):
        return ("http",)
    if port == 0:
        # Like the agent's default: both, sharing one hostname; only those the edge serves.
        return tuple(s for s in ("https", "http") if s in ports) or ("https",)
    raise UsageError(f"{forward}: HTTP tunnels use port 443 (https), 80 (http) or 0 (both)")
