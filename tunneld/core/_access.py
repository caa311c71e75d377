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

from .._logging import write_access
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
    line = (f"client={client} proto={proto} host={host or '-'} tunnel={tunnel_id or '-'} url={url or '-'} "
            f"result={result} bytes_in={bytes_in:d} bytes_out={bytes_out:d} "
            f"duration_ms={(time.monotonic() - started) * 1000:.1f}")
    if not write_access(line):
        access_log.info("%s", line)
