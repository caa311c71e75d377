"""``tunneld completion bash|zsh|fish`` and ``tunneld version``.

Completion is click's: the script calls ``tunneld`` back with ``_TUNNELD_COMPLETE=<shell>_complete``,
so commands, flags and choices always match the installed version (plugins' commands included).
``tunneld start`` also completes the tunnel names of the config file (:func:`complete_tunnel_names`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import click
from click.shell_completion import CompletionItem, get_completion_class

from . import __version__

SHELLS = ("bash", "zsh", "fish")
#: The variable click's scripts set when they call tunneld back.
COMPLETE_VAR = "_TUNNELD_COMPLETE"


def _tunnel_names(path: Path) -> list[str]:
    """Tunnel and endpoint names of one config file (v2 ``tunnels:``, v3 ``endpoints:``); [] on error."""
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return []
    if not isinstance(data, dict):
        return []
    names: list[str] = []
    tunnels = data.get("tunnels")
    if isinstance(tunnels, dict):
        names += [str(name) for name in tunnels]
    endpoints = data.get("endpoints")
    if isinstance(endpoints, list):
        names += [str(e["name"]) for e in endpoints if isinstance(e, dict) and e.get("name")]
    return names


def complete_tunnel_names(ctx: click.Context, param: click.Parameter,
                          incomplete: str) -> list[CompletionItem]:
    """``shell_complete`` of ``tunneld start NAMES``: the names in ``--config`` (or the default file).

    Runs at every TAB, so it reads the YAML only (no plugin loading) and never fails.
    """
    from .core._config import default_config_path

    given = ctx.params.get("config_path")  # one path, or several once --config is repeatable
    listed = [given] if isinstance(given, (str, Path)) else list(given or ())
    paths = [Path(p) for p in listed] or [default_config_path()]
    paths = [Path(os.path.expanduser(p)) for entry in paths for p in str(entry).split(",") if p]
    chosen = set(ctx.params.get(param.name or "", None) or ())
    seen: dict[str, None] = {}
    for path in paths:
        for name in _tunnel_names(path):
            if name.startswith(incomplete) and name not in chosen:
                seen[name] = None
    return [CompletionItem(name) for name in seen]


@click.command()
@click.argument("shell", type=click.Choice(SHELLS), required=False)
@click.pass_context
def completion(ctx: click.Context, shell: str | None) -> None:
    """Print the shell completion script for SHELL [default: from $SHELL, else bash].

    It completes commands, flags and, for `tunneld start`, the tunnel names of the config file.

    \b
    Examples:
      eval "$(tunneld completion bash)"          # in ~/.bashrc (bash 4.4+)
      eval "$(tunneld completion zsh)"           # in ~/.zshrc
      tunneld completion fish > ~/.config/fish/completions/tunneld.fish
    """
    if shell is None:
        guess = os.path.basename(os.environ.get("SHELL", ""))
        shell = guess if guess in SHELLS else "bash"
    cls = get_completion_class(shell)
    assert cls is not None  # one of click's built-in shells
    root: Any = ctx.find_root().command
    click.echo(cls(root, {}, ctx.find_root().info_name or "tunneld", COMPLETE_VAR).source())


@click.command()
def version() -> None:
    """Print tunneld's version (as `tunneld --version`).

    \b
    Example:
      tunneld version
    """
    click.echo(f"tunneld version {__version__}")
