"""Building the plugin manager: built-ins from a tuple, third parties from entry points."""

from __future__ import annotations

import importlib
import os
from collections.abc import Iterable

import pluggy

from .. import hookspecs
from ._tunnel import TunnelTypeRegistry

#: Built-in plugins, registered like third-party ones but without needing installed metadata.
BUILTIN_PLUGINS = (
    "tunneld.plugins.http",
    "tunneld.plugins.tcp",
    "tunneld.plugins.tls",
    "tunneld.plugins.file",
    "tunneld.plugins.ssh",
    "tunneld.plugins.labeled",
)

#: Comma-separated plugin names to skip (built-in module names or entry-point names).
DISABLE_ENV = "TUNNELD_DISABLE_PLUGINS"


def get_plugin_manager(*, entry_points: bool = True, blocked: Iterable[str] = ()) -> pluggy.PluginManager:
    """A fresh plugin manager with the hookspecs, built-ins and (optionally) entry points."""
    pm = pluggy.PluginManager("tunneld")
    pm.add_hookspecs(hookspecs)
    names = list(blocked) + [n.strip() for n in os.environ.get(DISABLE_ENV, "").split(",") if n.strip()]
    for name in names:
        pm.set_blocked(name)
    for modname in BUILTIN_PLUGINS:
        if not pm.is_blocked(modname):
            pm.register(importlib.import_module(modname), name=modname)
    if entry_points:
        pm.load_setuptools_entrypoints("tunneld")
    pm.check_pending()
    return pm


def build_registry(pm: pluggy.PluginManager) -> TunnelTypeRegistry:
    """Ask every plugin to register its tunnel types."""
    registry = TunnelTypeRegistry(upstream_hook=pm.hook.tunneld_agent_upstream)
    pm.hook.tunneld_register_tunnel_types(registry=registry)
    return registry
