"""``tunneld-ngrok``: tunneld's agent behind the ngrok agent's command line.

Wrappers of the ngrok agent (pyngrok, and others built the same way) run the ``ngrok`` binary
and read what it prints.  Pointed at ``tunneld-ngrok`` instead (pyngrok:
``PyngrokConfig(ngrok_path=shutil.which("tunneld-ngrok"))``) they get what they expect:

* ``start --none --log stdout [--config PATH] [--authtoken T] [--region R]``: the agent with its
  local API and no tunnels; the wrapper then starts tunnels through ``POST /api/tunnels``
  (config version 2) or ``POST /api/endpoints`` (version 3).  The log lines it waits for
  (logfmt: ``msg="starting web service" addr=…``, ``msg="tunnel session started"``,
  ``msg="client session established"``) are the agent's own; a failure to start is a
  ``lvl=crit`` line with ``err=`` on stdout too, which pyngrok reports.
* ``--version`` / ``version``: ``tunneld-ngrok version X`` (pyngrok reads what follows
  ``version``); ``update``: nothing to do, said so; ``config add-authtoken|check``
  (``config add-api-key`` says where an API key goes instead: tunneld keeps none in the file).
* ngrok's config files, either layout (v2: flat keys and ``tunnels:``; v3: ``agent:`` with
  ``connect_url``/``connect_cas``, ``endpoints:``), read by tunneld's own loader; without
  ``--config``, ngrok's default file.  ``NGROK_AUTHTOKEN`` is honoured, and
  ``TUNNELD_SERVER_ADDR`` / ``TUNNELD_ROOT_CAS`` override the files' edge settings (as for
  ``tunneld start``).
* Other commands run tunneld's own: ``http``, ``tcp``, ``tls``, ... with the ngrok config
  files; ``api`` (pyngrok's ``ngrok.api()``: ``--config P api --api-key K ...``) against the
  edge's admin API at ``TUNNELD_API_URL``, ``NGROK_API_KEY`` standing in for ``TUNNELD_API_KEY``.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import click

from . import __version__

if TYPE_CHECKING:
    from .core._config import AgentConfig

#: ngrok reads the authtoken from this variable (pyngrok sets it from ``PyngrokConfig.auth_token``).
NGROK_ENV_AUTHTOKEN = "NGROK_AUTHTOKEN"


def config_paths(values: Sequence[str]) -> list[Path]:
    """``--config`` values (repeated and/or comma-separated), or ngrok's default file if it exists."""
    from .core._config import ngrok_config_path, split_config_paths

    paths = split_config_paths(list(values))
    if not paths and ngrok_config_path().is_file():
        paths = [ngrok_config_path()]
    return paths


def load_config(paths: Sequence[Path], region: str | None = None) -> AgentConfig:
    """The merged ngrok config files (either layout; none: an empty config), region resolved.

    Raises ConfigError naming file, line and key.
    """
    from .core._config import AgentConfig, load_agent_config, resolve_region
    from .core._plugins import build_registry, get_plugin_manager

    cfg = load_agent_config(list(paths), registry=build_registry(get_plugin_manager())) if paths \
        else AgentConfig()
    resolve_region(cfg, region)
    return cfg


# ---- the command line -----------------------------------------------------------------------


def _fail(message: str, log_target: str | None = None) -> NoReturn:
    """Say why on stderr, and as a logfmt line where a wrapper reads the log (pyngrok: stdout)."""
    click.echo(f"ERROR:  {message}", err=True)
    if log_target == "stdout":
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        click.echo(f"t={stamp} lvl=crit msg=\"command failed\" err={json.dumps(message)}")
    sys.exit(1)


def _log_options(fn: Any) -> Any:
    for option in (
        click.option("--log", "log_target", default=None, help="stdout, stderr, a file, or false."),
        click.option("--log-format", default=None, help="term, logfmt or json."),
        click.option("--log-level", default=None, help="debug, info, warn, error or crit."),
        click.option("--config", "configs", multiple=True,
                     help="ngrok config file(s) [default: ngrok's own location]."),
    ):
        fn = option(fn)
    return fn


class _Cli(click.Group):
    """ngrok's commands; any other runs tunneld's command of that name (``http``, ``tcp``, ...)."""

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        command = super().get_command(ctx, cmd_name)
        if command is not None:
            return command
        return _delegate(cmd_name)


def _version(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    if value and not ctx.resilient_parsing:
        click.echo(f"tunneld-ngrok version {__version__}")
        ctx.exit(0)


@click.group(cls=_Cli, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--version", "-v", is_flag=True, expose_value=False, is_eager=True, callback=_version,
              help="Print the version and exit.")
@click.option("--config", "configs", multiple=True, metavar="PATH",
              help="ngrok config file(s), before the command too (as pyngrok's `api` passes it).")
def cli(configs: tuple[str, ...]) -> None:
    """tunneld's agent with the ngrok agent's command line (for pyngrok and similar wrappers).

    \b
    Examples:
      tunneld-ngrok start --none --log stdout --config ngrok.yml
      tunneld-ngrok config add-authtoken tkd_...
      tunneld-ngrok http 8080
      TUNNELD_API_URL=http://edge:4041 tunneld-ngrok api --api-key tka_... tunnels list
    """


def _with_global(configs: tuple[str, ...]) -> tuple[str, ...]:
    """``--config`` given before the command, then after it (ngrok's flags are global)."""
    root = click.get_current_context().find_root()
    return (*root.params.get("configs", ()), *configs)


@cli.command()
def version() -> None:
    """Print the version."""
    click.echo(f"tunneld-ngrok version {__version__}")


@cli.command()
@click.option("--channel", default=None, help="Accepted for ngrok compatibility.")
@_log_options
def update(channel: str | None, **_: Any) -> None:
    """Nothing to do: tunneld-ngrok is updated with the tunneld package."""
    click.echo("tunneld-ngrok is updated with tunneld itself (pip install --upgrade tunneld); "
               "no update performed.")


@cli.command()
@click.argument("names", nargs=-1)
@click.option("--all", "all_", is_flag=True, help="Start every tunnel and endpoint in the config files.")
@click.option("--none", "none_", is_flag=True, help="Start the session and local API only.")
@click.option("--authtoken", default=None, help=f"Authtoken [env {NGROK_ENV_AUTHTOKEN}].")
@click.option("--region", default=None, metavar="NAME",
              help="Fills {region} of the config's server_addr (as tunneld --region).")
@_log_options
def start(names: tuple[str, ...], all_: bool, none_: bool, authtoken: str | None, region: str | None,
          log_target: str | None, log_format: str | None, log_level: str | None,
          configs: tuple[str, ...]) -> None:
    """Start tunnels or endpoints of the config files by NAME (or --all, or --none)."""
    from .core import ConfigError
    from .core._commands import ENV_AUTHTOKEN, ENV_ROOT_CAS, ENV_SERVER_ADDR
    from .core._websocket import check_server_addr

    try:
        cfg = load_config(config_paths(_with_global(configs)), region)
    except ConfigError as exc:
        _fail(str(exc), log_target)
    for warning in cfg.warnings:
        click.echo(f"tunneld-ngrok: warning: {warning}", err=True)
    cfg.authtoken = (authtoken or os.environ.get(NGROK_ENV_AUTHTOKEN) or os.environ.get(ENV_AUTHTOKEN)
                     or cfg.authtoken)
    cfg.server_addr = os.environ.get(ENV_SERVER_ADDR) or cfg.server_addr
    cfg.root_cas = os.environ.get(ENV_ROOT_CAS) or cfg.root_cas
    try:
        check_server_addr(cfg.server_addr)
    except ValueError as exc:
        _fail(f"server_addr {cfg.server_addr}: {exc}", log_target)
    if cfg.root_cas not in ("", "host", "trusted") and not Path(os.path.expanduser(cfg.root_cas)).is_file():
        _fail(f"root_cas {cfg.root_cas}: not a readable file", log_target)
    if none_:
        chosen = []
    elif all_:
        chosen = list(cfg.tunnels.values())
    else:
        if not names:
            _fail("name tunnels to start, or use --all or --none", log_target)
        missing = [n for n in names if n not in cfg.tunnels]
        if missing:
            _fail(f"no tunnel or endpoint named {', '.join(missing)} in the config", log_target)
        chosen = [cfg.tunnels[n] for n in names]
    from ._agent_main import run_agent
    from ._logging import setup_logging

    target = log_target or cfg.log or "false"
    # As `tunneld start`: the console block only on a terminal, never mixed with log lines.
    console = target != "stdout" and cfg.console_enabled(sys.stdout.isatty())
    if not console and target == "false":
        target = "stdout"
    try:
        setup_logging(target, log_format or cfg.log_format or "term", log_level or cfg.log_level or "info")
    except (ValueError, OSError) as exc:
        _fail(str(exc), log_target)
    sys.exit(run_agent(cfg, chosen, console=console))


@cli.group("config")
def config_group() -> None:
    """Edit or check the ngrok config file."""


@config_group.command("add-authtoken")
@click.argument("token")
@_log_options
def add_authtoken(token: str, configs: tuple[str, ...], **_: Any) -> None:
    """Save TOKEN as the authtoken of the config file (v3: agent.authtoken), keeping the rest as it is."""
    from .core import ConfigError
    from .core._config import ngrok_config_path, save_authtoken, split_config_paths

    paths = split_config_paths(list(_with_global(configs)))
    try:
        path = save_authtoken(paths[0] if paths else ngrok_config_path(), token)
    except (ConfigError, ValueError, OSError) as exc:
        _fail(str(exc))
    click.echo(f"Authtoken saved to configuration file: {path}")


@config_group.command("add-api-key")
@click.argument("key")
@_log_options
def add_api_key(key: str, **_: Any) -> None:
    """Not saved: give the edge's admin API key with --api-key, NGROK_API_KEY or TUNNELD_API_KEY."""
    _fail("tunneld-ngrok keeps no API key in the config file; give the edge's admin API key to "
          "`api` with --api-key, or set NGROK_API_KEY or TUNNELD_API_KEY (pyngrok: "
          "PyngrokConfig(api_key=...)); nothing saved")


@config_group.command("check")
@_log_options
def check(configs: tuple[str, ...], **_: Any) -> None:
    """Check the config files."""
    from .core import ConfigError

    paths = config_paths(_with_global(configs))
    try:
        cfg = load_config(paths)
    except ConfigError as exc:
        _fail(str(exc))
    for warning in cfg.warnings:
        click.echo(f"tunneld-ngrok: warning: {warning}", err=True)
    click.echo(f"Valid configuration file at {', '.join(str(p) for p in paths) or '(none)'}")


#: ngrok reads the cloud API key from this variable (pyngrok too: ``PyngrokConfig.api_key``).
NGROK_ENV_API_KEY = "NGROK_API_KEY"


def _delegate(cmd_name: str) -> click.Command | None:
    """tunneld's command ``cmd_name`` (``http``, ``tcp``, ``api``, ...) under ngrok's settings.

    An agent command reads the ngrok config files (``--config``, else ngrok's default file);
    ``NGROK_AUTHTOKEN`` and ``NGROK_API_KEY`` stand in for tunneld's variables.
    """
    from .cli import cli as tunneld_cli

    if cmd_name in ("edge", "start", "config", "update", "version"):
        return None
    target = tunneld_cli.get_command(click.Context(tunneld_cli), cmd_name)
    if target is None:
        return None
    reads_config = any(param.name == "config_path" for param in target.params)

    @click.command(cmd_name, context_settings={"ignore_unknown_options": True, "allow_extra_args": True,
                                               "help_option_names": []},
                   help=f"tunneld's {cmd_name} command (tunneld {cmd_name} --help).")
    @click.argument("args", nargs=-1, type=click.UNPROCESSED)
    def run(args: tuple[str, ...]) -> None:
        from ._api_cli import ENV_API_KEY
        from .core._commands import ENV_AUTHTOKEN

        rest = list(args)
        if reads_config and not any(a == "--config" or a.startswith("--config=") for a in rest):
            rest += [f"--config={p}" for p in config_paths(_with_global(()))]
        for ngrok_env, env in ((NGROK_ENV_AUTHTOKEN, ENV_AUTHTOKEN), (NGROK_ENV_API_KEY, ENV_API_KEY)):
            value = os.environ.get(ngrok_env)
            if value and not os.environ.get(env):
                os.environ[env] = value
        tunneld_cli.main([cmd_name, *rest], prog_name="tunneld-ngrok")

    return run


def main() -> None:
    """The ``tunneld-ngrok`` console script."""
    cli(prog_name="tunneld-ngrok")


if __name__ == "__main__":
    main()
