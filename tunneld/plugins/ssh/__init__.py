"""SSH gateway: ``ssh -R 443:localhost:80 v2@EDGE -p PORT http`` with nothing but OpenSSH (built-in plugin).

Off unless the edge is given ``--ssh-addr HOST:PORT``.  asyncssh serves SSH on its own asyncio
thread; the tunnels themselves are the ordinary http, tcp and tls edge tunnels.  Keys allowed
to log in are read from ``DATA_DIR/authorized_keys`` (OpenSSH format, re-read when it changes).
"""

from __future__ import annotations

from collections.abc import Iterable

from tunneld.plugin import EdgeContext, EdgeService, hookimpl


@hookimpl
def tunneld_edge_services(edge: EdgeContext) -> Iterable[EdgeService]:
    addr = edge.listen_addr("ssh")
    if addr is None:
        return []
    # Imported here: asyncssh takes ~0.1 s to import, which agents and gateway-less edges skip.
    from ._gateway import SshGateway

    return [SshGateway(edge, addr)]
