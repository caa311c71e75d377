"""File tunnels: ``tunneld http file:///srv/share`` serves a folder (or one file) itself.

The http plugin owns the tunnel; this plugin only claims ``file:`` forwarding addresses through
``tunneld_agent_upstream``, so neither plugin imports the other's tunnel code.
"""

from __future__ import annotations

from tunneld import hookimpl

from ._server import FileServer
from ._url import is_file_url


@hookimpl
def tunneld_agent_upstream(url: str) -> FileServer | None:
    if not is_file_url(url):
        return None
    return FileServer.from_url(url)
