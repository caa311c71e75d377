"""tunneld: self-hosted secure tunnels.

The package root stays light (no trio import) so that ``tunneld --help`` starts fast.
Plugins use :mod:`tunneld.plugin`, the plugin API, which re-exports :data:`hookimpl` from here.
"""

from __future__ import annotations

import pluggy

__version__ = "0.1.0"

#: Marker for plugin hook implementations (``@tunneld.hookimpl``).
hookimpl = pluggy.HookimplMarker("tunneld")

__all__ = ["__version__", "hookimpl"]
