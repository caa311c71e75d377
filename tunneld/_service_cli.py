"""``tunneld service install|start|stop|restart|status|uninstall`` (see :mod:`tunneld._service`)."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from ._service import ENV_ROOT, INIT_SYSTEMS


def _root_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    fn = click.option("--init", "init", type=click.Choice(INIT_SYSTEMS), default=None,
                      help="Init system [default: the one running this system].")(fn)
    return click.option("--root", "root", type=click.Path(file_okay=False, path_type=Path), default=None,
                        envvar=ENV_ROOT, show_envvar=True,
                        help="Install under this directory instead of / (images, packaging, tests); "
                        "needs no privileges.")(fn)


def _fail(message: str) -> None:
    click.echo(f"tunneld: error: {message}", err=True)
    sys.exit(1)


@click.group()
def service() -> None:
    """Run the agent as an operating-system service (tunneld start --all at boot).

    \b
    Examples:
      sudo tunneld service install --config /etc/tunneld/tunneld.yml
      sudo tunneld service start
      tunneld service status
    """


@service.command("install")
@click.option("--config", "config_paths", type=click.Path(dir_okay=False, path_type=Path), required=True,
              multiple=True, help="The agent config file the service runs (checked now; its absolute path "
              "is recorded).  Repeatable: later files win, as for `tunneld start`.")
@click.option("--user", default=None, help="Run the service as this user [default: root].")
@click.option("--force", is_flag=True, help="Replace an installed definition.")
@_root_options
def service_install(config_paths: tuple[Path, ...], user: str | None, force: bool, root: Path | None,
                    init: str | None) -> None:
    """Check the config file and install the service that runs `tunneld start --all` with it.

    systemd unit (/etc/systemd/system/tunneld.service, enabled), upstart job
    (/etc/init/tunneld.conf), launchd plist (/Library/LaunchDaemons/com.tunneld.agent.plist) or,
    with pywin32, a Windows service.  Needs root unless --root is given.

    \b
    Examples:
      sudo tunneld service install --config /etc/tunneld/tunneld.yml
      tunneld service install --config ./tunneld.yml --root ./image --init systemd
    """
    from ._service import ServiceError, install

    try:
        done = install(config_paths, root=root, init=init, user=user, force=force)
    except ServiceError as exc:
        _fail(str(exc))
        return
    where = f" at {done.path}" if done.path else ""
    click.echo(f"Installed the tunneld {done.target.init} service{where}")
    click.echo(f"  runs: {' '.join(done.argv)}")
    for note in done.notes:
        click.echo(f"  {note}")


def _action(name: str, doc: str) -> click.Command:
    @click.pass_context
    @_root_options
    def run(ctx: click.Context, root: Path | None, init: str | None) -> None:
        from ._service import ServiceError, control

        try:
            code = control(name, root=root, init=init)
        except ServiceError as exc:
            _fail(str(exc))
            return
        ctx.exit(code)

    run.__doc__ = doc
    return service.command(name)(run)


_action("start", "Start the installed service.\n\n\b\nExample:\n  sudo tunneld service start")
_action("stop", "Stop the service (it starts again at boot).\n\n\b\nExample:\n  sudo tunneld service stop")
_action("restart", "Restart the service (to read its edited config file).\n\n\b\nExample:\n"
        "  sudo tunneld service restart")
_action("status", "Show the service's state, as its init system reports it (exit 3: not running)."
        "\n\n\b\nExample:\n  tunneld service status")


@service.command("uninstall")
@_root_options
def service_uninstall(root: Path | None, init: str | None) -> None:
    """Stop the service, disable it and remove its definition.

    \b
    Example:
      sudo tunneld service uninstall
    """
    from ._service import ServiceError, uninstall

    try:
        path = uninstall(root=root, init=init)
    except ServiceError as exc:
        _fail(str(exc))
        return
    click.echo(f"Uninstalled the tunneld service{f' ({path} removed)' if path else ''}")
