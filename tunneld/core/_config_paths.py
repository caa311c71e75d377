"""Where config files live: tunneld's own default, and ngrok's (read when the user passes it)."""

from __future__ import annotations

import os
import sys
from pathlib import Path


def default_config_path() -> Path:
    """tunneld's own config file: where ngrok v3 keeps ``ngrok.yml``, with ``tunneld`` for ``ngrok``.

    ``$XDG_CONFIG_HOME/tunneld/tunneld.yml`` (``~/.config``) on Linux and wherever
    ``XDG_CONFIG_HOME`` is set; ``~/Library/Application Support/tunneld`` on macOS;
    ``%LOCALAPPDATA%\\tunneld`` on Windows.
    """
    return _platform_dir("tunneld") / "tunneld.yml"


def ngrok_config_path() -> Path:
    """ngrok v3's default ``ngrok.yml`` on this platform (read only when passed with ``--config``)."""
    return _platform_dir("ngrok") / "ngrok.yml"


def _platform_dir(app: str) -> Path:
    xdg = os.environ.get("XDG_CONFIG_HOME")
    if xdg:
        return Path(xdg) / app
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Application Support" / app
    if sys.platform == "win32" and os.environ.get("LOCALAPPDATA"):
        return Path(os.environ["LOCALAPPDATA"]) / app
    return Path.home() / ".config" / app
