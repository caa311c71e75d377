"""What the store-managing commands share (``edge token``, ``edge api-key``): where the data dir is
and how to open its store with a one-line error."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import click


def default_data_dir() -> Path:
    """``$XDG_DATA_HOME/tunneld`` (``~/.local/share/tunneld``)."""
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(base) / "tunneld"


def open_store(ctx: click.Context, data_dir: Path | None) -> Any:
    """The store of ``--data-dir`` (or the ``edge`` group's, or the default); exits 1 on error."""
    from .core import ConfigError
    from .core._store import Store

    obj = ctx.obj or {}
    path = (data_dir or obj.get("data_dir") or default_data_dir()).expanduser()
    try:
        return Store.open(path)
    except ConfigError as exc:
        click.echo(f"tunneld: error: {exc}", err=True)
        sys.exit(1)
