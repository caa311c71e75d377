"""The ``tunneld`` command line: the edge, the agent commands, tokens and config.

Flag names follow ngrok's where ngrok has one (``--authtoken``, ``--subdomain``, ``--log``),
so its users and their scripts feel at home.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import click

from . import __version__

#: Environment variables read by the agent (flags win over env, env over the config file).
ENV_AUTHTOKEN = "TUNNELD_AUTHTOKEN"
ENV_SERVER_ADDR = "TUNNELD_SERVER_ADDR"
ENV_ROOT_CAS = "TUNNELD_ROOT_CAS"


def _default_data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(base) / "tunneld"


def _fail(message: str, code: int = 1) -> None:
    click.echo(f"tunneld: error: {message}", err=True)
    sys.exit(code)


def _addr(flag: str, value: str) -> tuple[str, int]:
    from .core._util import split_host_port

    try:
        host, port = split_host_port(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint=flag) from None
    return host.strip("[]"), port


def _optional_addr(flag: str, value: str | None) -> tuple[str, int] | None:
    if value is None or value.lower() in ("false", "off", "none", ""):
        return None
    return _addr(flag, value)


def _tcp_ports(value: str, default_host: str = "0.0.0.0") -> tuple[str, tuple[int, int]]:
    host, sep, span = value.rpartition(":")
    if not sep:
        host, span = default_host, value
    low_s, dash, high_s = span.partition("-")
    if not dash or not low_s.isdigit() or not high_s.isdigit():
        raise click.BadParameter(f"expected HOST:LOW-HIGH such as 0.0.0.0:10000-10999, got {value!r}",
                                 param_hint="--tcp-ports")
    low, high = int(low_s), int(high_s)
    if not 1 <= low <= high <= 65535:
        raise click.BadParameter(f"bad port range {low}-{high}", param_hint="--tcp-ports")
    return host.strip("[]") or default_host, (low, high)


def _logging_options(fn: Any) -> Any:
    # No click defaults: a flag given wins over the agent config file, which wins over the default.
    fn = click.option("--log-level", default=None,
                      help="debug, info, warn, error or crit [default: info].")(fn)
    fn = click.option("--log-format", default=None,
                      type=click.Choice(["term", "logfmt", "json"]),
                      help="Log line format [default: term].")(fn)
    fn = click.option("--log", "log_target", default=None,
                      help="Where logs go: stdout, stderr, false or a file path.")(fn)
    return fn


def _setup_logging(target: str, fmt: str, level: str) -> None:
    from ._logging import setup_logging

    try:
        setup_logging(target, fmt, level)
    except (ValueError, OSError) as exc:
        _fail(str(exc))


# ---- the group -------------------------------------------------------------------------------


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "-v", "--version", prog_name="tunneld", message="tunneld version %(version)s")
def cli() -> None:
    """tunneld: self-hosted secure tunnels (edge and agent)."""


# ---- edge --------------------------------------------------------------------------------------


@cli.group(invoke_without_command=True)
@click.option("--dev", is_flag=True, help="Development mode: private CA, dev authtoken, loopback defaults.")
@click.option("--data-dir", type=click.Path(path_type=Path), default=None,
              help="Where the store, certificates and dev token live [default: ~/.local/share/tunneld].")
@click.option("--domain", default=None, help="Public base domain; tunnels get NAME.DOMAIN "
              "[--dev default: tunneld.localhost].")
@click.option("--http-addr", default=None, help="Public HTTP listener HOST:PORT, or false "
              "[default 0.0.0.0:80; --dev 127.0.0.1:8080].")
@click.option("--https-addr", default=None, help="Public HTTPS listener HOST:PORT, or false "
              "[default 0.0.0.0:443; --dev 127.0.0.1:8443].")
@click.option("--agent-addr", default=None, help="Agent ingress HOST:PORT "
              "[default 0.0.0.0:4443; --dev 127.0.0.1:4443].")
@click.option("--tcp-ports", default=None, help="HOST:LOW-HIGH ports for TCP tunnels "
              "[default 0.0.0.0:10000-10999; --dev 127.0.0.1:20000-20999].")
@click.option("--tls-cert", type=click.Path(path_type=Path), default=None,
              help="Certificate chain (PEM) for agents and HTTPS; required without --dev.")
@click.option("--tls-key", type=click.Path(path_type=Path), default=None, help="Private key (PEM) of --tls-cert.")
@click.option("--grace-period", type=float, default=10.0, show_default=True,
              help="Seconds in-flight connections get after SIGTERM.")
@click.option("--allow-hostname", "allow_hostnames", multiple=True, metavar="HOST[=TOKEN_ID]",
              help="Let agents bind a custom hostname outside --domain (CNAMEd to the edge); "
              "'*.example.org' allows one level; '=TOKEN_ID' reserves it for one authtoken. Repeatable.")
@click.option("--cname-target", default=None, help="The name custom hostnames should be CNAMEd to "
              "[default: --domain].")
@click.option("--reserved-names", default=None, metavar="LIST",
              help="Comma-separated subdomains agents may not claim ('' allows all) "
              "[default: www,api,admin,edge,mail,...].")
@click.option("--hold-period", type=click.FloatRange(min=0), default=60.0, show_default=True,
              help="Seconds a hostname or TCP port stays reserved for its owner after its agent "
              "disconnects (also after an edge restart), so a reconnecting agent gets it back.")
@click.option("--max-sessions", type=click.IntRange(min=0), default=0,
              help="Agent connections served at once; more are refused with a reason the agent prints "
              "[default 0: a third of the file descriptor limit].")
@click.option("--max-sessions-per-token", type=click.IntRange(min=1), default=64, show_default=True,
              help="Agent sessions one authtoken may hold at once.")
@click.option("--max-tunnels-per-token", type=click.IntRange(min=1), default=256, show_default=True,
              help="Tunnels one authtoken may hold at once, over all its sessions.")
@click.option("--ssh-addr", default=None, help="SSH gateway HOST:PORT for `ssh -R 443:localhost:80 "
              "v2@EDGE -p PORT http` (keys: DATA_DIR/authorized_keys), or false [default: off].")
@_logging_options
@click.pass_context
def edge(ctx: click.Context, dev: bool, data_dir: Path | None, domain: str | None, http_addr: str | None,
         https_addr: str | None, agent_addr: str | None, tcp_ports: str | None, tls_cert: Path | None,
         tls_key: Path | None, grace_period: float, allow_hostnames: tuple[str, ...], cname_target: str | None,
         reserved_names: str | None, hold_period: float, max_sessions: int, max_sessions_per_token: int,
         max_tunnels_per_token: int, ssh_addr: str | None, log_target: str | None, log_format: str | None,
         log_level: str | None) -> None:
    """Run the edge: public listeners, agent ingress and the store."""
    ctx.ensure_object(dict)
    ctx.obj["data_dir"] = data_dir
    if ctx.invoked_subcommand is not None:
        return
    _setup_logging(log_target or "stderr", log_format or "term", log_level or "info")
    from .core import ConfigError, EdgeConfig

    data_dir = (data_dir or _default_data_dir()).expanduser().absolute()
    loop = "127.0.0.1" if dev else "0.0.0.0"
    domain = (domain or ("tunneld.localhost" if dev else "")).lower().rstrip(".")
    if not domain:
        raise click.UsageError("--domain is required without --dev")
    agent = _addr("--agent-addr", agent_addr or f"{loop}:4443")
    http = _optional_addr("--http-addr", http_addr if http_addr is not None else f"{loop}:{8080 if dev else 80}")
    https = _optional_addr("--https-addr", https_addr if https_addr is not None else f"{loop}:{8443 if dev else 443}")
    ssh = _optional_addr("--ssh-addr", ssh_addr)
    tcp_host, tcp_range = _tcp_ports(tcp_ports or ('20000-20999' if dev else '10000-10999'), loop)
    try:
        if dev:
            from .core._certs import ensure_dev_certs

            hosts = [agent[0], "localhost", "127.0.0.1"]
            certs = ensure_dev_certs(data_dir, domain, hosts)
            if tls_cert is None:
                tls_cert, tls_key = certs.cert, certs.key
        if tls_cert is None or tls_key is None:
            raise click.UsageError("--tls-cert and --tls-key are required without --dev")
        from .core._certs import load_cert_key_pair

        load_cert_key_pair(tls_cert, tls_key)
    except ConfigError as exc:
        _fail(str(exc))
    from .core._edge import DEFAULT_RESERVED
    from .core._hostnames import AllowedHostname

    allowed = []
    for value in allow_hostnames:
        try:
            allowed.append(AllowedHostname.parse(value))
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--allow-hostname") from None
    reserved = DEFAULT_RESERVED if reserved_names is None else \
        frozenset(n.strip().lower() for n in reserved_names.split(",") if n.strip())
    config = EdgeConfig(data_dir=data_dir, domain=domain, tls_cert=tls_cert, tls_key=tls_key, agent_addr=agent,
                        http_addr=http, https_addr=https, tcp_host=tcp_host, tcp_ports=tcp_range,
                        grace_period=grace_period, hold_period=hold_period, reserved_names=reserved,
                        allowed_hostnames=tuple(allowed), cname_target=(cname_target or "").lower().rstrip("."),
                        dev=dev, max_sessions=max_sessions, max_sessions_per_token=max_sessions_per_token,
                        max_tunnels_per_token=max_tunnels_per_token, ssh_addr=ssh)
    from ._edge_main import run_edge

    sys.exit(run_edge(config, dev=dev))


@edge.group()
def token() -> None:
    """Manage agent authtokens (stored hashed; shown once)."""


def _open_store(ctx: click.Context, data_dir: Path | None) -> Any:
    from .core import ConfigError
    from .core._store import Store

    path = (data_dir or ctx.obj.get("data_dir") or _default_data_dir()).expanduser()
    try:
        return Store.open(path)
    except ConfigError as exc:
        _fail(str(exc))


@token.command("create")
@click.option("--data-dir", type=click.Path(path_type=Path), default=None)
@click.option("--description", default="", help="A note to recognise the token by.")
@click.pass_context
def token_create(ctx: click.Context, data_dir: Path | None, description: str) -> None:
    """Create an authtoken and print it (the only time it is shown)."""
    store = _open_store(ctx, data_dir)
    record, secret = store.create_token(description)
    store.close()
    click.echo(secret)
    click.echo(f"token id {record.id}: store it now, it cannot be shown again", err=True)


@token.command("list")
@click.option("--data-dir", type=click.Path(path_type=Path), default=None)
@click.pass_context
def token_list(ctx: click.Context, data_dir: Path | None) -> None:
    """List authtokens (ids and notes; never the secrets)."""
    import time

    store = _open_store(ctx, data_dir)
    click.echo(f"{'ID':<14} {'CREATED':<20} {'LAST USED':<20} {'STATUS':<8} DESCRIPTION")
    for rec in store.list_tokens():
        def fmt(t: float | None) -> str:
            return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if t else "-"

        status = "revoked" if rec.revoked_at else "active"
        click.echo(f"{rec.id:<14} {fmt(rec.created_at):<20} {fmt(rec.last_used_at):<20} {status:<8} {rec.description}")
    store.close()


@token.command("revoke")
@click.argument("token_id")
@click.option("--data-dir", type=click.Path(path_type=Path), default=None)
@click.pass_context
def token_revoke(ctx: click.Context, token_id: str, data_dir: Path | None) -> None:
    """Revoke an authtoken by id; agents using it can no longer connect."""
    store = _open_store(ctx, data_dir)
    ok = store.revoke_token(token_id)
    store.close()
    if not ok:
        _fail(f"no active token with id {token_id!r}")
    click.echo(f"revoked {token_id}")


# ---- agent -------------------------------------------------------------------------------------


def _agent_options(fn: Any) -> Any:
    fn = click.option("--config", "config_path", type=click.Path(path_type=Path), default=None,
                      help="Agent config file [default: ~/.config/tunneld/tunneld.yml].")(fn)
    fn = click.option("--web-addr", default=None,
                      help="Local API/inspector HOST:PORT, or false [default: 127.0.0.1:4040].")(fn)
    fn = click.option("--root-cas", default=None, help="PEM file with the CA that signed the edge's "
                      f"certificate, or 'host' for the system store [env {ENV_ROOT_CAS}].")(fn)
    fn = click.option("--server-addr", default=None,
                      help="Edge agent address HOST:PORT, or wss://HOST[:PORT][/PATH] to carry the session "
                      "in a WebSocket (for networks that pass only HTTPS) "
                      f"[env {ENV_SERVER_ADDR}; default localhost:4443].")(fn)
    fn = click.option("--authtoken", default=None, help=f"Authtoken [env {ENV_AUTHTOKEN}].")(fn)
    fn = _logging_options(fn)
    return fn


def _agent_config(config_path: Path | None, authtoken: str | None, server_addr: str | None,
                  root_cas: str | None, web_addr: str | None) -> Any:
    from .core import ConfigError
    from .core._config import load_agent_config

    try:
        cfg = load_agent_config(config_path)
    except ConfigError as exc:
        _fail(str(exc))
    cfg.authtoken = authtoken or os.environ.get(ENV_AUTHTOKEN) or cfg.authtoken
    cfg.server_addr = server_addr or os.environ.get(ENV_SERVER_ADDR) or cfg.server_addr
    from .core._util import split_host_port
    from .core._websocket import is_websocket_url, parse_websocket_url

    try:
        if is_websocket_url(cfg.server_addr):
            parse_websocket_url(cfg.server_addr)
        else:
            split_host_port(cfg.server_addr, default_port=443)
    except ValueError as exc:
        _fail(f"--server-addr {cfg.server_addr}: {exc}")
    cfg.root_cas = root_cas or os.environ.get(ENV_ROOT_CAS) or cfg.root_cas
    if web_addr is not None:
        cfg.web_addr = None if web_addr.lower() in ("false", "off", "none") else web_addr
    if cfg.root_cas not in ("", "host", "trusted") and not Path(os.path.expanduser(cfg.root_cas)).is_file():
        _fail(f"--root-cas: {cfg.root_cas} is not a readable file")
    return cfg


def _run_agent_cli(cfg: Any, tunnels: list[Any], log_target: str | None, log_format: str | None,
                   log_level: str | None) -> None:
    _setup_logging(log_target or cfg.log or "false", log_format or cfg.log_format or "term",
                   log_level or cfg.log_level or "info")
    from ._agent_main import run_agent

    sys.exit(run_agent(cfg, tunnels, console=(log_target or cfg.log or "false") != "stdout"))


def _name_options(fn: Any) -> Any:
    """``--subdomain`` and ``--hostname`` (ngrok v3: ``--domain``, ``--url``) of name-routed tunnels."""
    fn = click.option("--hostname", "--domain", "--url", "hostname", default="",
                      help="Full hostname: one label under the edge's domain, or a custom hostname the "
                      "edge allows for your authtoken (--domain and --url are ngrok v3's spellings).")(fn)
    fn = click.option("--subdomain", default="", help="Ask for NAME.DOMAIN instead of a random name.")(fn)
    return fn


def _tunnel(proto: str, addr: str, **kw: Any) -> Any:
    from .core import TunnelConfig

    return TunnelConfig(name="command_line", proto=proto, addr=addr, **kw)


@cli.command()
@click.argument("addr")
@_name_options
@click.option("--scheme", "--schemes", "schemes", multiple=True, type=click.Choice(["http", "https"]),
              help="Public endpoints to open (repeatable) [default: both].")
@click.option("--basic-auth", "basic_auth", multiple=True, metavar="USER:PASSWORD",
              help="Require HTTP Basic auth at the edge (repeatable: several users); password 8-128 "
              "characters.  The Authorization header is still passed to the upstream.")
@click.option("--host-header", default="", metavar="rewrite|HOST",
              help="Host header sent upstream: 'rewrite' = the upstream's host[:port] (redirects to it "
              "are mapped back to the public URL), or a literal value [default: the public Host].")
@click.option("--inspect/--no-inspect", default=True, help="Record requests for the local inspector.")
@_agent_options
def http(addr: str, subdomain: str, hostname: str, schemes: tuple[str, ...], basic_auth: tuple[str, ...],
         host_header: str, inspect: bool, **opts: Any) -> None:
    """Forward public HTTP/HTTPS to ADDR: a port (8080), HOST:PORT or a URL.

    ADDR may be on another machine (192.168.1.2:80, example.internal:8080).  https://...
    URLs, and port 443, make the agent speak HTTPS to the upstream; its certificate is NOT
    verified (local networks are assumed private).  file:///abs/path serves a folder (or
    one file) from the agent itself.
    """
    from .core import Code
    from .core._config import check_host_header, split_basic_auth
    from .core._plugins import build_registry, get_plugin_manager

    try:
        # through the registry: plugins may claim addresses (file:///srv/share)
        build_registry(get_plugin_manager())["http"].parse_addr(addr)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="ADDR") from None
    for credential in basic_auth:
        try:
            split_basic_auth(credential)
        except ValueError as exc:
            code = Code.BASIC_AUTH_PASSWORD if "password" in str(exc) else Code.BASIC_AUTH_USERNAME
            raise click.BadParameter(f"{exc} ({code.label})", param_hint="--basic-auth") from None
    try:
        host_header = check_host_header(host_header)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--host-header") from None
    cfg = _agent_config(opts.pop("config_path"), opts.pop("authtoken"), opts.pop("server_addr"),
                        opts.pop("root_cas"), opts.pop("web_addr"))
    t = _tunnel("http", addr, subdomain=subdomain, hostname=hostname, inspect=inspect,
                schemes=list(schemes) or ["https", "http"], basic_auth=list(basic_auth),
                host_header=host_header)
    _run_agent_cli(cfg, [t], opts["log_target"], opts["log_format"], opts["log_level"])


def _proxy_proto(_ctx: click.Context, _param: click.Parameter, value: str | None) -> int:
    from .core._config import parse_proxy_proto

    try:
        return parse_proxy_proto(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


_PROXY_PROTO_HELP = ("Put a PROXY protocol header (version 1 or 2) before each connection's bytes, so "
                     "the upstream sees the real client address.")


@cli.command()
@click.argument("addr")
@click.option("--remote-addr", default="", help="Public HOST:PORT to ask for (within the edge's range).")
@click.option("--proxy-proto", default="", callback=_proxy_proto, metavar="1|2", help=_PROXY_PROTO_HELP)
@_agent_options
def tcp(addr: str, remote_addr: str, proxy_proto: int, **opts: Any) -> None:
    """Forward a public TCP port to ADDR (a port or HOST:PORT)."""
    from .plugins.tcp import parse_tcp_addr

    try:
        parse_tcp_addr(addr)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="ADDR") from None
    cfg = _agent_config(opts.pop("config_path"), opts.pop("authtoken"), opts.pop("server_addr"),
                        opts.pop("root_cas"), opts.pop("web_addr"))
    t = _tunnel("tcp", addr, remote_addr=remote_addr, proxy_proto=proxy_proto)
    _run_agent_cli(cfg, [t], opts["log_target"], opts["log_format"], opts["log_level"])


@cli.command()
@click.argument("addr")
@_name_options
@click.option("--crt", default="", metavar="FILE",
              help="Certificate chain (PEM): the agent terminates TLS and forwards plaintext to ADDR.")
@click.option("--key", default="", metavar="FILE", help="Private key (PEM) of --crt.")
@click.option("--proxy-proto", default="", callback=_proxy_proto, metavar="1|2", help=_PROXY_PROTO_HELP)
@_agent_options
def tls(addr: str, subdomain: str, hostname: str, crt: str, key: str, proxy_proto: int, **opts: Any) -> None:
    """Forward public TLS connections for a name to ADDR (a port or HOST:PORT), routed by SNI.

    The edge does not decrypt: ADDR gets the client's TLS as is, unless --crt and --key are
    given, in which case the agent terminates TLS with them and ADDR gets plaintext.
    """
    from .plugins.tls._agent import parse_tls_addr, termination_context

    try:
        parse_tls_addr(addr)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="ADDR") from None
    if bool(crt) != bool(key):
        raise click.UsageError("--crt and --key go together")
    if crt:
        from .core import ConfigError

        try:
            termination_context(crt, key)  # a bad pair fails here, before connecting
        except ConfigError as exc:
            _fail(str(exc))
    cfg = _agent_config(opts.pop("config_path"), opts.pop("authtoken"), opts.pop("server_addr"),
                        opts.pop("root_cas"), opts.pop("web_addr"))
    t = _tunnel("tls", addr, subdomain=subdomain, hostname=hostname, crt=crt, key=key,
                proxy_proto=proxy_proto)
    _run_agent_cli(cfg, [t], opts["log_target"], opts["log_format"], opts["log_level"])


@cli.command()
@click.argument("names", nargs=-1)
@click.option("--all", "all_", is_flag=True, help="Start every tunnel in the config file.")
@click.option("--none", "none_", is_flag=True, help="Start the session and local API only.")
@_agent_options
def start(names: tuple[str, ...], all_: bool, none_: bool, **opts: Any) -> None:
    """Start tunnels defined in the config file by NAME (or --all)."""
    cfg = _agent_config(opts.pop("config_path"), opts.pop("authtoken"), opts.pop("server_addr"),
                        opts.pop("root_cas"), opts.pop("web_addr"))
    if none_:
        chosen = []
    elif all_:
        chosen = list(cfg.tunnels.values())
    else:
        if not names:
            raise click.UsageError("name tunnels to start, or use --all or --none")
        missing = [n for n in names if n not in cfg.tunnels]
        if missing:
            _fail(f"no tunnel named {', '.join(missing)} in {cfg.path}")
        chosen = [cfg.tunnels[n] for n in names]
    _run_agent_cli(cfg, chosen, opts["log_target"], opts["log_format"], opts["log_level"])


@cli.group()
def config() -> None:
    """Manage the agent config file."""


@config.command("add-authtoken")
@click.argument("authtoken")
@click.option("--config", "config_path", type=click.Path(path_type=Path), default=None)
def config_add_authtoken(authtoken: str, config_path: Path | None) -> None:
    """Save AUTHTOKEN in the config file."""
    from .core._config import save_authtoken

    path = save_authtoken(config_path, authtoken)
    click.echo(f"Authtoken saved to configuration file: {path}")


@config.command("check")
@click.option("--config", "config_path", type=click.Path(path_type=Path), default=None)
def config_check(config_path: Path | None) -> None:
    """Validate the config file."""
    from .core import ConfigError
    from .core._config import load_agent_config

    try:
        cfg = load_agent_config(config_path, required=True)
    except ConfigError as exc:
        _fail(str(exc))
    click.echo(f"Valid configuration file at {cfg.path}")


# ---- demo --------------------------------------------------------------------------------------


@cli.command()
@click.argument("addr", required=False)
@click.option("--data-dir", type=click.Path(path_type=Path), default=None,
              help="Data dir of the demo edge [default: ~/.local/share/tunneld/demo].")
@click.option("--http-port", type=int, default=8080, show_default=True)
@click.option("--https-port", type=int, default=8443, show_default=True)
@click.option("--agent-port", type=int, default=4443, show_default=True)
@click.option("--web-addr", default="127.0.0.1:4040", show_default=True)
def demo(addr: str | None, data_dir: Path | None, http_port: int, https_port: int, agent_port: int,
         web_addr: str) -> None:
    """Run a local edge (dev mode) and an agent forwarding to ADDR (default: a hello page)."""
    from ._demo import run_demo

    sys.exit(run_demo(addr, (data_dir or _default_data_dir() / "demo").expanduser().absolute(),
                      http_port, https_port, agent_port, web_addr))


def main() -> None:
    from .core._plugins import get_plugin_manager

    # Third-party plugins may add commands; a broken plugin must not make the CLI unusable.
    try:
        get_plugin_manager().hook.tunneld_add_commands(cli=cli)
    except Exception as exc:  # noqa: BLE001 - report and carry on without the plugin
        click.echo(f"tunneld: warning: plugin failed to load: {exc}", err=True)
    # SIGPIPE stays ignored (Python's default): the edge and the agent write to sockets that
    # clients may reset at any moment, and must get EPIPE as an error, not die of the signal.
    cli(prog_name="tunneld")


if __name__ == "__main__":
    main()
