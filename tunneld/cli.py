"""The ``tunneld`` command line: the edge, the agent commands, tokens and config.

Flag names follow ngrok's where ngrok has one (``--authtoken``, ``--subdomain``, ``--log``),
so its users and their scripts feel at home.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from . import __version__
from ._admin_cli import api_key as api_key_group
from ._api_cli import api as api_group
from ._completion import complete_tunnel_names
from ._completion import completion as completion_command
from ._completion import version as version_command
from ._diagnose import diagnose as diagnose_command
from ._service_cli import service as service_group
from ._store_cli import default_data_dir, open_store
from ._update import update_command
from .core._commands import (
    ENV_AUTHTOKEN,
    ENV_ROOT_CAS,
    ENV_SERVER_ADDR,
    RUN_TUNNELS,
    agent_params,
    logging_params,
)

if TYPE_CHECKING:
    from .core import AgentConfig, TunnelConfig, TunnelTypeRegistry


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


def _with_params(params: list[click.Parameter]) -> Any:
    """A decorator adding ``params`` to a command function, in order (as stacked ``@click.option``)."""

    def decorate(fn: Any) -> Any:
        for param in reversed(params):
            click.decorators._param_memo(fn, param)
        return fn

    return decorate


def _logging_options(fn: Any) -> Any:
    # No click defaults: a flag given wins over the agent config file, which wins over the default.
    return _with_params(logging_params())(fn)


def _setup_logging(target: str, fmt: str, level: str) -> None:
    from ._logging import setup_logging

    try:
        setup_logging(target, fmt, level)
    except (ValueError, OSError) as exc:
        _fail(str(exc))


# ---- the group -------------------------------------------------------------------------------


class _TunneldGroup(click.Group):
    """The ``tunneld`` group: plugins' commands (``http``, ``tcp``, ``tls``, ...) are added on first need.

    Through ``tunneld_add_commands``, each plugin separately: a broken plugin costs its own
    commands (with a warning), never the CLI.  ``tunneld edge`` does not load them at all.
    """

    _plugins_loaded = False

    def load_plugin_commands(self) -> None:
        if self._plugins_loaded:
            return
        self._plugins_loaded = True
        from .core._plugins import get_plugin_manager

        try:
            hook = get_plugin_manager().hook.tunneld_add_commands
        except Exception as exc:  # noqa: BLE001 - report and carry on without plugins
            click.echo(f"tunneld: warning: plugin failed to load: {exc}", err=True)
            return
        for impl in reversed(hook.get_hookimpls()):  # registration order: built-ins first
            try:
                impl.function(cli=self)
            except Exception as exc:  # noqa: BLE001 - report and carry on without the plugin
                click.echo(f"tunneld: warning: plugin {impl.plugin_name} failed to add commands: {exc}",
                           err=True)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        found = super().get_command(ctx, cmd_name)
        if found is None:
            self.load_plugin_commands()
            found = super().get_command(ctx, cmd_name)
        return found

    def list_commands(self, ctx: click.Context) -> list[str]:
        self.load_plugin_commands()
        return super().list_commands(ctx)


@click.group(cls=_TunneldGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "-v", "--version", prog_name="tunneld",
                      message="tunneld version %(version)s")
@click.pass_context
def cli(ctx: click.Context) -> None:
    """tunneld: self-hosted secure tunnels (edge and agent).

    \b
    Examples:
      tunneld http 8080                      forward a public URL to localhost:8080
      tunneld start --all                    the tunnels of the config file
      tunneld edge --dev --data-dir ./edge   a development edge on loopback
    """
    # Tunnel commands (tunneld.plugin.tunnel_command) parse, then hand over to the agent here.
    ctx.meta[RUN_TUNNELS] = _run_tunnels


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
@click.option("--tls-key", type=click.Path(path_type=Path), default=None,
              help="Private key (PEM) of --tls-cert.")
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
@click.option("--api-addr", default=None, help="Admin REST API and Prometheus /metrics HOST:PORT (keys: "
              "`tunneld edge api-key create`), or false [default: off].")
@click.option("--ssh-addr", default=None, help="SSH gateway HOST:PORT for `ssh -R 443:localhost:80 "
              "v2@EDGE -p PORT http` (keys: DATA_DIR/authorized_keys), or false [default: off].")
@_logging_options
@click.pass_context
def edge(ctx: click.Context, dev: bool, data_dir: Path | None, domain: str | None, http_addr: str | None,
         https_addr: str | None, agent_addr: str | None, tcp_ports: str | None, tls_cert: Path | None,
         tls_key: Path | None, grace_period: float, allow_hostnames: tuple[str, ...],
         cname_target: str | None, reserved_names: str | None, hold_period: float, max_sessions: int,
         max_sessions_per_token: int,
         max_tunnels_per_token: int, api_addr: str | None, ssh_addr: str | None, log_target: str | None,
         log_format: str | None, log_level: str | None) -> None:
    """Run the edge: public listeners, agent ingress and the store.

    \b
    Examples:
      tunneld edge --dev --data-dir ./edge
      tunneld edge --domain tunnels.example.com --tls-cert fullchain.pem --tls-key privkey.pem
    """
    ctx.ensure_object(dict)
    ctx.obj["data_dir"] = data_dir
    if ctx.invoked_subcommand is not None:
        return
    _setup_logging(log_target or "stderr", log_format or "term", log_level or "info")
    from .core import ConfigError, EdgeConfig

    data_dir = (data_dir or default_data_dir()).expanduser().absolute()
    loop = "127.0.0.1" if dev else "0.0.0.0"
    domain = (domain or ("tunneld.localhost" if dev else "")).lower().rstrip(".")
    if not domain:
        raise click.UsageError("--domain is required without --dev")
    agent = _addr("--agent-addr", agent_addr or f"{loop}:4443")
    http = _optional_addr("--http-addr",
                          http_addr if http_addr is not None else f"{loop}:{8080 if dev else 80}")
    https = _optional_addr("--https-addr",
                           https_addr if https_addr is not None else f"{loop}:{8443 if dev else 443}")
    ssh = _optional_addr("--ssh-addr", ssh_addr)
    api = _optional_addr("--api-addr", api_addr)
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
    config = EdgeConfig(data_dir=data_dir, domain=domain, tls_cert=tls_cert, tls_key=tls_key,
                        agent_addr=agent, http_addr=http, https_addr=https, tcp_host=tcp_host,
                        tcp_ports=tcp_range, grace_period=grace_period, hold_period=hold_period,
                        reserved_names=reserved, allowed_hostnames=tuple(allowed),
                        cname_target=(cname_target or "").lower().rstrip("."),
                        dev=dev, max_sessions=max_sessions, max_sessions_per_token=max_sessions_per_token,
                        max_tunnels_per_token=max_tunnels_per_token, ssh_addr=ssh, api_addr=api)
    from ._edge_main import run_edge

    sys.exit(run_edge(config, dev=dev))


@edge.group()
def token() -> None:
    """Manage agent authtokens (stored hashed; shown once).

    \b
    Examples:
      tunneld edge token create --description laptop
      tunneld edge token list
    """


@token.command("create")
@click.option("--data-dir", type=click.Path(path_type=Path), default=None)
@click.option("--description", default="", help="A note to recognise the token by.")
@click.pass_context
def token_create(ctx: click.Context, data_dir: Path | None, description: str) -> None:
    """Create an authtoken and print it (the only time it is shown).

    \b
    Example:
      tunneld edge token create --data-dir /var/lib/tunneld --description laptop
    """
    store = open_store(ctx, data_dir)
    record, secret = store.create_token(description)
    store.close()
    click.echo(secret)
    click.echo(f"token id {record.id}: store it now, it cannot be shown again", err=True)


@token.command("list")
@click.option("--data-dir", type=click.Path(path_type=Path), default=None)
@click.pass_context
def token_list(ctx: click.Context, data_dir: Path | None) -> None:
    """List authtokens (ids and notes; never the secrets).

    \b
    Example:
      tunneld edge token list --data-dir /var/lib/tunneld
    """
    import time

    store = open_store(ctx, data_dir)
    click.echo(f"{'ID':<14} {'CREATED':<20} {'LAST USED':<20} {'STATUS':<8} DESCRIPTION")
    for rec in store.list_tokens():
        def fmt(t: float | None) -> str:
            return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if t else "-"

        status = "revoked" if rec.revoked_at else "active"
        click.echo(f"{rec.id:<14} {fmt(rec.created_at):<20} {fmt(rec.last_used_at):<20} "
                   f"{status:<8} {rec.description}")
    store.close()


@token.command("revoke")
@click.argument("token_id")
@click.option("--data-dir", type=click.Path(path_type=Path), default=None)
@click.pass_context
def token_revoke(ctx: click.Context, token_id: str, data_dir: Path | None) -> None:
    """Revoke an authtoken by id; agents using it can no longer connect.

    \b
    Example:
      tunneld edge token revoke 3f9a0c1d2e4b
    """
    store = open_store(ctx, data_dir)
    ok = store.revoke_token(token_id)
    store.close()
    if not ok:
        _fail(f"no active token with id {token_id!r}")
    click.echo(f"revoked {token_id}")


# The admin API: its keys (`tunneld edge api-key ...`) and its client (`tunneld api ...`).
edge.add_command(api_key_group)
cli.add_command(api_group)
# The agent as an OS service, its connectivity check, shell completion, the version (issue 15).
cli.add_command(service_group)
cli.add_command(diagnose_command)
cli.add_command(completion_command)
cli.add_command(version_command)
# `tunneld update` (tunneld/_update.py): pip installs the newest release of a channel.
cli.add_command(update_command)


# ---- agent -------------------------------------------------------------------------------------


def _agent_options(fn: Any) -> Any:
    """The flags every agent command has (tunnel commands get the same from ``tunnel_command``)."""
    return _with_params(agent_params())(fn)


def _registry() -> TunnelTypeRegistry:
    from .core._plugins import build_registry, get_plugin_manager

    return build_registry(get_plugin_manager())


def _config_paths(values: Any) -> list[Path]:
    from .core._config import split_config_paths

    return split_config_paths(values)


def _load_config(config_path: Any, registry: TunnelTypeRegistry | None, *,
                 required: bool = False) -> AgentConfig:
    """The merged ``--config`` files (or the default one); warnings to stderr, errors exit 1."""
    from .core import ConfigError
    from .core._config import load_agent_config

    try:
        cfg = load_agent_config(_config_paths(config_path), required=required, registry=registry)
    except ConfigError as exc:
        _fail(str(exc))
    for warning in cfg.warnings:
        click.echo(f"tunneld: warning: {warning}", err=True)
    return cfg


def _agent_config(config_path: Any, authtoken: str | None, server_addr: str | None,
                  root_cas: str | None, web_addr: str | None,
                  registry: TunnelTypeRegistry | None = None, region: str | None = None) -> AgentConfig:
    from .core import ConfigError
    from .core._config import resolve_region

    cfg = _load_config(config_path, registry)
    cfg.authtoken = authtoken or os.environ.get(ENV_AUTHTOKEN) or cfg.authtoken
    cfg.server_addr = server_addr or os.environ.get(ENV_SERVER_ADDR) or cfg.server_addr
    try:
        resolve_region(cfg, region)
    except ConfigError as exc:
        _fail(str(exc))
    from .core._websocket import check_server_addr

    try:
        check_server_addr(cfg.server_addr)
    except ValueError as exc:
        _fail(f"--server-addr {cfg.server_addr}: {exc}")
    cfg.root_cas = root_cas or os.environ.get(ENV_ROOT_CAS) or cfg.root_cas
    if web_addr is not None:
        cfg.web_addr = None if web_addr.lower() in ("false", "off", "none") else web_addr
    if cfg.root_cas not in ("", "host", "trusted") and not Path(os.path.expanduser(cfg.root_cas)).is_file():
        _fail(f"--root-cas: {cfg.root_cas} is not a readable file")
    return cfg


def _run_agent_cli(cfg: AgentConfig, tunnels: list[TunnelConfig], log_target: str | None,
                   log_format: str | None, log_level: str | None) -> None:
    target = log_target or cfg.log or "false"
    # console_ui: true, false or iftty (the default: only when stdout is a terminal); never
    # mixed with log lines on stdout.  Without the console and without a log target, logs go
    # to stdout, as ngrok's do: an agent never runs mute.
    console = target != "stdout" and cfg.console_enabled(sys.stdout.isatty())
    if not console and target == "false":
        target = "stdout"
    _setup_logging(target, log_format or cfg.log_format or "term", log_level or cfg.log_level or "info")
    from ._agent_main import run_agent

    sys.exit(run_agent(cfg, tunnels, console=console))


def _run_tunnels(flags: dict[str, Any], tunnels: list[TunnelConfig]) -> None:
    """The agent runner of tunnel commands (``ctx.meta[RUN_TUNNELS]``): check ADDR, load the config, run."""
    from .core import ConfigError

    registry = _registry()
    for tunnel in tunnels:
        try:
            # Through the registry: plugins may claim addresses (file:///srv/share).
            registry[tunnel.proto].parse_addr(tunnel.addr)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="ADDR") from None
        try:
            # What the type refuses at start (a tls --crt/--key pair that does not match) is said
            # here, before logging is set up and anything is connected.
            registry[tunnel.proto].agent_binds(tunnel)
        except (ConfigError, ValueError) as exc:
            _fail(str(exc))
    cfg = _agent_config(flags["config_path"], flags["authtoken"], flags["server_addr"], flags["root_cas"],
                        flags["web_addr"], registry, flags["region"])
    _run_agent_cli(cfg, tunnels, flags["log_target"], flags["log_format"], flags["log_level"])


@cli.command()
@click.argument("names", nargs=-1, shell_complete=complete_tunnel_names)
@click.option("--all", "all_", is_flag=True, help="Start every tunnel and endpoint of the config files.")
@click.option("--none", "none_", is_flag=True, help="Start the session and local API only (add tunnels with "
              "POST /api/tunnels).")
@_agent_options
def start(names: tuple[str, ...], all_: bool, none_: bool, **opts: Any) -> None:
    """Start tunnels defined in the config file by NAME (or --all), all on one session.

    \b
    Examples:
      tunneld start --all
      tunneld start web ssh --config ./tunneld.yml
      tunneld start --all --config base.yml,eu.yml --region eu
      tunneld start --none                 the local API only (as pyngrok runs it)
    """
    from .core import ConfigError

    if sum((bool(names), all_, none_)) > 1:
        raise click.UsageError("give tunnel names, --all or --none (one of them)")
    if not (names or all_ or none_):
        raise click.UsageError("name tunnels to start, or use --all or --none")
    registry = _registry()
    cfg = _agent_config(opts.pop("config_path"), opts.pop("authtoken"), opts.pop("server_addr"),
                        opts.pop("root_cas"), opts.pop("web_addr"), registry, opts.pop("region"))
    where = ", ".join(str(p) for p in cfg.paths) or str(cfg.path)
    if none_:
        chosen = []
    elif all_:
        chosen = list(cfg.tunnels.values())
        if not chosen:
            _fail(f"no tunnels in {where}: define some under tunnels: (or endpoints:), or use --none")
    else:
        missing = [n for n in names if n not in cfg.tunnels]
        if missing:
            known = ", ".join(cfg.tunnels) or "none"
            _fail(f"no tunnel named {', '.join(missing)} in {where} (defined: {known})")
        chosen = [cfg.tunnels[n] for n in dict.fromkeys(names)]
    for tunnel in chosen:
        # Said now, naming the tunnel, rather than after connecting (a bad addr, a crt without its key).
        try:
            registry[tunnel.proto].parse_addr(tunnel.addr)
            registry[tunnel.proto].agent_binds(tunnel)
        except (ConfigError, ValueError) as exc:
            _fail(f"tunnels.{tunnel.name}: {exc}")
    _run_agent_cli(cfg, chosen, opts["log_target"], opts["log_format"], opts["log_level"])


@cli.group()
def config() -> None:
    """Manage the agent config file (ngrok's layouts: version "2" and "3").

    \b
    Examples:
      tunneld config add-authtoken tkd_...
      tunneld config check
      tunneld config edit
      tunneld config upgrade --dry-run
    """


def _one_config(flag: str = "--config") -> Any:
    return click.option(flag, "config_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
                        help="The config file [default: ~/.config/tunneld/tunneld.yml].")


@config.command("add-authtoken")
@click.argument("authtoken")
@_one_config()
def config_add_authtoken(authtoken: str, config_path: Path | None) -> None:
    """Save AUTHTOKEN in the config file, changing nothing else in it.

    Creates the file (mode 0600) if it does not exist; in a version "3" file the token goes
    under agent:.  Comments, quoting and layout are kept byte for byte.

    \b
    Example:
      tunneld config add-authtoken tkd_0123456789ab_...
    """
    from .core import ConfigError
    from .core._config import save_authtoken

    try:
        path = save_authtoken(config_path, authtoken)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="AUTHTOKEN") from None
    except (ConfigError, OSError) as exc:
        _fail(f"{exc} (the file was left as it was)")
    click.echo(f"Authtoken saved to configuration file: {path}")


@config.command("check")
@click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path), multiple=True,
              help="Config file; repeat it or separate with commas to check files merged "
              "[default: ~/.config/tunneld/tunneld.yml].")
def config_check(config_path: tuple[Path, ...]) -> None:
    """Validate the config file(s): each mistake is named by file, line and key.

    Warnings (keys a version "2" file has that tunneld does not use) go to stderr; the
    exit status is 0 when the files are valid.

    \b
    Examples:
      tunneld config check
      tunneld config check --config ./tunneld.yml
      tunneld config check --config base.yml,eu.yml
    """
    from .core import ConfigError
    from .core._config import REGION_PLACEHOLDER, resolve_region

    cfg = _load_config(config_path, _registry(), required=True)
    if cfg.region or REGION_PLACEHOLDER in cfg.server_addr:
        try:
            resolve_region(cfg)
        except ConfigError as exc:
            _fail(str(exc))
    for path in cfg.paths or [cfg.path]:
        click.echo(f"Valid configuration file at {path}")


@config.command("edit")
@_one_config()
def config_edit(config_path: Path | None) -> None:
    """Open the config file in $VISUAL or $EDITOR (nano, else vi; Notepad on Windows), then check it.

    Works on a missing or invalid file too.  Exit status 1 if the file is not valid afterwards.

    \b
    Examples:
      tunneld config edit
      EDITOR=vim tunneld config edit --config ./tunneld.yml
    """
    import shlex
    import shutil
    import subprocess

    from .core._config import default_config_path
    from .core._config_edit import write_private

    path = config_path or default_config_path()
    if not path.exists():
        write_private(path, 'version: "2"\n')
    editor = os.environ.get("VISUAL") or os.environ.get("EDITOR")
    if editor:
        argv = shlex.split(editor, posix=os.name != "nt")
    elif os.name == "nt":
        argv = ["notepad"]
    else:
        argv = [next((e for e in ("nano", "vi") if shutil.which(e)), "vi")]
    try:
        code = subprocess.call([*argv, str(path)])
    except OSError as exc:
        _fail(f"cannot run the editor {argv[0]}: {exc.strerror} (set $EDITOR)")
    if code != 0:
        _fail(f"the editor {argv[0]} exited with status {code}")
    cfg = _load_config([path], _registry(), required=True)
    click.echo(f"Valid configuration file at {cfg.path}")


@config.command("upgrade")
@_one_config()
@click.option("--dry-run", is_flag=True, help="Print the upgraded file instead of writing it.")
def config_upgrade(config_path: Path | None, dry_run: bool) -> None:
    """Rewrite a version "2" (or ngrok v2) file in the version "3" layout.

    Agent settings move under agent: (server_addr becomes connect_url, root_cas connect_cas,
    update: update_check); tunnels: stay as they are, with auth and bind_tls renamed
    basic_auth and schemes.  Comments move with their keys.  The old file is kept as
    FILE.v2.bak.  The result is checked to mean exactly what the old file meant.

    \b
    Examples:
      tunneld config upgrade --dry-run
      tunneld config upgrade --config ~/.config/ngrok/ngrok.yml
    """
    from .core import ConfigError
    from .core._config import default_config_path
    from .core._config_upgrade import upgrade_file

    path = config_path or default_config_path()
    try:
        new, notes, backup = upgrade_file(path, _registry(), write=not dry_run)
    except ConfigError as exc:
        _fail(str(exc))
    for note in notes:
        click.echo(f"tunneld: note: {note}", err=True)
    if dry_run:
        click.echo(new, nl=False)
    else:
        click.echo(f"Upgraded {path} to version 3 (the old file is {backup})")


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
    """Run a local edge (dev mode) and an agent forwarding to ADDR (default: a hello page).

    \b
    Examples:
      tunneld demo
      tunneld demo 3000
    """
    from ._demo import run_demo

    sys.exit(run_demo(addr, (data_dir or default_data_dir() / "demo").expanduser().absolute(),
                      http_port, https_port, agent_port, web_addr))


def main() -> None:
    # Plugins' commands (the built-in http, tcp and tls too) are added by the group on first need.
    # SIGPIPE stays ignored (Python's default): the edge and the agent write to sockets that
    # clients may reset at any moment, and must get EPIPE as an error, not die of the signal.
    # The process is ours: its relay buffers stay in the C heap.
    from .core._util import tune_malloc
    tune_malloc()
    cli(prog_name="tunneld")


if __name__ == "__main__":
    main()
