"""Agent commands built from a tunnel type: ``tunneld NAME ADDR [agent flags] [the type's flags]``.

:func:`tunnel_command` only parses: it turns the type's flags into :attr:`TunnelConfig.options`
and hands the tunnel, with the agent flags, to the runner the ``tunneld`` group puts in the
click context (``ctx.meta[RUN_TUNNELS]``).  So the API never imports the agent, and a plugin's
command runs exactly as the built-in ones.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from ._tunnel import TunnelConfig

if TYPE_CHECKING:
    from collections.abc import Callable

    from ._tunnel import TunnelOption, TunnelType

#: Environment variables read by the agent (flags win over env, env over the config file).
ENV_AUTHTOKEN = "TUNNELD_AUTHTOKEN"
ENV_SERVER_ADDR = "TUNNELD_SERVER_ADDR"
ENV_ROOT_CAS = "TUNNELD_ROOT_CAS"

#: ``ctx.meta`` key of the runner: ``run(agent_flags, tunnels)`` loads the agent configuration,
#: checks each tunnel's ADDR and runs the agent (it exits the process).
RUN_TUNNELS = "tunneld.run_tunnels"

#: Parameter names of the flags every agent command has (see :func:`agent_params`).
AGENT_FLAG_NAMES = ("authtoken", "server_addr", "root_cas", "web_addr", "config_path", "region", "log_target",
                    "log_format", "log_level")


def logging_params() -> list[click.Parameter]:
    """``--log --log-format --log-level``; no click defaults: a flag given wins over the config file."""
    return [
        click.Option(["--log", "log_target"], default=None,
                     help="Where logs go: stdout, stderr, false or a file path."),
        click.Option(["--log-format"], default=None, type=click.Choice(["term", "logfmt", "json"]),
                     help="Log line format [default: term]."),
        click.Option(["--log-level"], default=None, help="debug, info, warn, error or crit [default: info]."),
    ]


def agent_params() -> list[click.Parameter]:
    """The flags of every agent command (``tunneld http|tcp|tls|start``), fresh objects each call."""
    return [
        click.Option(["--authtoken"], default=None, help=f"Authtoken [env {ENV_AUTHTOKEN}]."),
        click.Option(["--server-addr"], default=None,
                     help="Edge agent address HOST:PORT, or wss://HOST[:PORT][/PATH] to carry the session "
                     "in a WebSocket (for networks that pass only HTTPS) "
                     f"[env {ENV_SERVER_ADDR}; default localhost:4443]."),
        click.Option(["--root-cas"], default=None, help="PEM file with the CA that signed the edge's "
                     f"certificate, or 'host' for the system store [env {ENV_ROOT_CAS}]."),
        click.Option(["--web-addr"], default=None,
                     help="Local API/inspector HOST:PORT, or false [default: 127.0.0.1:4040]."),
        # Repeatable and comma-separated, as ngrok's: later files win (see tunneld.core._config).
        click.Option(["--config", "config_path"], type=click.Path(path_type=Path), multiple=True,
                     help="Agent config file; repeat it or separate with commas to merge several "
                     "[default: ~/.config/tunneld/tunneld.yml]."),
        click.Option(["--region"], default=None, metavar="NAME",
                     help="Region: fills {region} of a server_addr such as "
                     "tunnel.{region}.example.com:4443."),
        *logging_params(),
    ]


def _param_name(option: TunnelOption) -> str:
    # Prefixed: a type's option may be called like an agent flag (``key``, ``config``).
    return f"option_{option.key}"


def _click_option(option: TunnelOption) -> click.Option:
    assert option.flag is not None
    if option.kind is bool and not option.multiple:
        flag = option.flag.removeprefix("--")
        return click.Option([f"--{flag}/--no-{flag}", _param_name(option)], default=None,
                            help=option.help)
    # With a parser, the flag's text goes to it as is (it gives the message); else click checks the kind.
    kind: Any = str if option.parse is not None else option.kind
    return click.Option([option.flag, *option.flag_aliases, _param_name(option)], type=kind,
                        multiple=option.multiple, default=None, metavar=option.metavar, help=option.help)


def tunnel_command(tunnel_type: TunnelType) -> click.Command:
    """``tunneld NAME ADDR``: the agent command of ``tunnel_type``, for ``tunneld_add_commands``.

    It has the agent flags every tunnel command has (``--authtoken``, ``--server-addr``,
    ``--root-cas``, ``--web-addr``, ``--config``, ``--log``, ``--log-format``, ``--log-level``),
    ``--inspect/--no-inspect`` if the type :attr:`~TunnelType.inspects`, and a flag for each
    of :attr:`TunnelType.options` that has one.  Flag values are checked with the option's
    ``parse`` (a usage error naming the flag) and become :attr:`TunnelConfig.options` of a tunnel
    named ``command_line``.  Its help is :attr:`TunnelType.help`.
    """
    _check_flags(tunnel_type)
    params: list[click.Parameter] = [click.Argument(["addr"])]
    if tunnel_type.inspects:
        params.append(click.Option(["--inspect/--no-inspect"], default=True,
                                   help="Record requests for the local inspector."))
    params += [_click_option(o) for o in tunnel_type.options if o.flag is not None]
    params += agent_params()

    def run(addr: str, **values: Any) -> None:
        flags = {name: values.pop(name) for name in AGENT_FLAG_NAMES}
        inspect = values.pop("inspect", True)
        tunnel = TunnelConfig(name="command_line", proto=tunnel_type.name, addr=addr, inspect=inspect,
                              options=options_from_flags(tunnel_type, values))
        ctx = click.get_current_context()
        runner: Callable[[dict[str, Any], list[TunnelConfig]], None] | None = ctx.meta.get(RUN_TUNNELS)
        if runner is None:
            raise click.UsageError(f"{ctx.command_path}: run it as a tunneld command (no agent runner here)")
        runner(flags, [tunnel])

    return click.Command(tunnel_type.name, callback=run, params=params,
                         help=tunnel_type.help or f"Forward public {tunnel_type.name} connections to ADDR.")


def _check_flags(tunnel_type: TunnelType) -> None:
    """PluginError for options whose keys or flags collide (click would silently pick one)."""
    from ._errors import PluginError

    taken = {"--authtoken", "--server-addr", "--root-cas", "--web-addr", "--config", "--region", "--log",
             "--log-format",
             "--log-level", "--help", "-h", "--inspect", "--no-inspect"}
    keys: set[str] = set()
    for option in tunnel_type.options:
        for key in (option.key, *option.aliases):
            if key in keys:
                raise PluginError(f"tunnel type {tunnel_type.name!r}: config key {key!r} is declared twice")
            keys.add(key)
        if option.flag is None:
            continue
        flags = [option.flag, *option.flag_aliases]
        if option.kind is bool and not option.multiple:
            flags.append("--no-" + option.flag.removeprefix("--"))
        for flag in flags:
            if flag in taken:
                raise PluginError(f"tunnel type {tunnel_type.name!r}: flag {flag} is taken")
            taken.add(flag)


def options_from_flags(tunnel_type: TunnelType, values: dict[str, Any]) -> dict[str, Any]:
    """The options set by flags (click's ``values`` by parameter name), parsed; UsageError if bad."""
    options: dict[str, Any] = {}
    by_key = {o.key: o for o in tunnel_type.options}
    for option in tunnel_type.options:
        if option.flag is None:
            continue
        raw = values.get(_param_name(option))
        if raw is None or (option.multiple and not raw):
            continue
        value = list(raw) if option.multiple else raw
        if option.parse is not None:
            try:
                value = option.parse(value)
            except ValueError as exc:
                raise click.BadParameter(str(exc), param_hint=option.flag) from None
        if option.target in options and by_key.get(option.target, option).multiple:
            options[option.target] = [*options[option.target], *value]
        else:
            options[option.target] = value
    for key, value in list(options.items()):
        owner = by_key.get(key)
        if owner is None or not value:
            continue
        for needed in owner.requires:
            if not options.get(needed):
                other = by_key[needed].flag or needed
                raise click.UsageError(f"{owner.flag} and {other} go together")
    return options
