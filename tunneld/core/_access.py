"""The edge's access log (logger ``tunneld.access``): one line per public connection or request.

Lines are ``key=value`` pairs separated by single spaces, ``client=HOST:PORT`` always first,
so that fail2ban (``contrib/fail2ban/tunneld.conf``) and log tools can match them with one
regular expression whatever the output format (term, logfmt, json) wraps around the message.
Values never contain spaces: absent ones are ``-``.

* HTTP (per request, ``plugins/http/_edge.py``):
  ``client= host= tunnel= method= path="..." status= duration_ms=``
* TCP and TLS (per connection, :func:`log_connection`):
  ``client= proto= host= tunnel= url= result= bytes_in= bytes_out= duration_ms=``

``result`` is ``ok`` for a connection that reached its agent, otherwise why it did not:
``no_sni``, ``not_tls``, ``malformed``, ``too_large``, ``timeout``, ``closed`` (client left
before its ClientHello was complete), ``agent_unreachable``.  ``bytes_in`` counts bytes from
the public client, ``bytes_out`` bytes to it.
"""

from __future__ import annotations

import logging
import time

from .._logging import defer_access
from ._forward import ByteCounts

access_log = logging.getLogger("tunneld.access")


def log_connection(*, client: str, proto: str, result: str, started: float, host: str = "",
                   tunnel_id: str = "", url: str = "", counts: ByteCounts | None = None) -> None:
    """Write the access line of one TCP/TLS connection (``started``: its ``time.monotonic()``).

    ``counts`` is the :func:`~tunneld.core.forward` tally with the public client as ``a``.
    """
    if not access_log.isEnabledFor(logging.INFO):
        return
    bytes_in, bytes_out = (counts.a_to_b, counts.b_to_a) if counts is not None else (0, 0)
    ended = time.monotonic()
    args = (client, proto, host, tunnel_id, url, result, bytes_in, bytes_out, ended - started)
    if not defer_access(connection_line, args, ended):
        access_log.info("%s", connection_line(*args))


def log_request(*, client: str, host: str, tunnel_id: str, method: str, path: str, status: int,
                seconds: float, ended: float) -> None:
    """Write the access line of one HTTP request that took ``seconds`` and ended at ``ended``
    (``time.monotonic()``)."""
    if not access_log.isEnabledFor(logging.INFO):
        return
    args = (client, host, tunnel_id, method, path, status, seconds)
    if not defer_access(request_line, args, ended):
        access_log.info("%s", request_line(*args))


# The lines are rendered when their batch is written (``_logging.defer_access``), maybe in the
# log's flusher thread: they depend on their arguments alone.

def connection_line(client: str, proto: str, host: str, tunnel_id: str, url: str, result: str,
                    bytes_in: int, bytes_out: int, seconds: float) -> str:
    return (f"client={client} proto={proto} host={host or '-'} tunnel={tunnel_id or '-'} url={url or '-'} "
            f"result={result} bytes_in={bytes_in:d} bytes_out={bytes_out:d} duration_ms={seconds * 1000:.1f}")


def request_line(client: str, host: str, tunnel_id: str, method: str, path: str, status: int,
                 seconds: float) -> str:
    # Same shape as the connection lines: client= first, "-" for none.
    quoted = path.replace('"', "%22")[:512]
    return (f'client={client} host={host or "-"} tunnel={tunnel_id or "-"} method={method} '
            f'path="{quoted}" status={status:d} duration_ms={seconds * 1000:.1f}')
