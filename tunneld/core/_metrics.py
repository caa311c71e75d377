"""The edge's traffic counters, kept in plain dicts on the hot path and read by ``/metrics``.

Recording is a dict update or two (no locks, no prometheus-client objects per request; an HTTP
request is only queued, and added with others when the series are read): the admin API's
collector (``_admin.EdgeCollector``) turns a snapshot into Prometheus series at
scrape time.  Per-tunnel series exist while their tunnel does: :meth:`EdgeMetrics.prune`
drops those of tunnels that are gone, so a busy edge's memory does not grow with every tunnel
it ever served.  Sans-IO: no trio.
"""

from __future__ import annotations

import bisect
import collections
from collections.abc import Collection

import attrs

#: Requests :meth:`EdgeMetrics.request` keeps before adding them to the series unasked.
SETTLE_BATCH = 1024
#: Upper bounds (seconds) of the HTTP request duration histogram's buckets (+Inf implied).
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


def status_class(status: int) -> str:
    """``2xx``, ``4xx``...; ``0`` (no response: the client or the agent went away) is ``none``."""
    return f"{status // 100}xx" if 100 <= status <= 599 else "none"


@attrs.define
class Histogram:
    """Cumulative-at-read bucket counts, their sum and count."""

    counts: list[int] = attrs.field(factory=lambda: [0] * (len(DURATION_BUCKETS) + 1))
    total: float = 0.0
    count: int = 0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(DURATION_BUCKETS, seconds)] += 1
        self.total += seconds
        self.count += 1

    def cumulative(self) -> list[tuple[str, int]]:
        """``(le, count)`` pairs as Prometheus exposes them, ``+Inf`` last."""
        out, running = [], 0
        for bound, n in zip((*map(str, DURATION_BUCKETS), "+Inf"), self.counts, strict=True):
            running += n
            out.append((bound, running))
        return out


@attrs.define
class EdgeMetrics:
    """Counters of one edge (``Edge.metrics``)."""

    #: Status class → count and duration of proxied HTTP requests (:attr:`http`).
    _http: dict[str, Histogram] = attrs.field(factory=dict, alias="http")
    #: Tunnel id → HTTP requests it served (:attr:`tunnel_requests`).
    _tunnel_requests: dict[str, int] = attrs.field(factory=dict, alias="tunnel_requests")
    #: (tunnel id, proto) → public connections; (tunnel id, direction) → bytes.
    tunnel_connections: dict[tuple[str, str], int] = attrs.field(factory=dict)
    tunnel_bytes: dict[tuple[str, str], int] = attrs.field(factory=dict)
    #: Who failed to log in (``agent``, ``ssh``, ``api``) → failures.
    auth_failures: dict[str, int] = attrs.field(factory=dict)
    #: Error code (``ERR_TUNNELD_316``...) → binds refused with it.
    refused_binds: dict[str, int] = attrs.field(factory=dict)

    #: Requests counted by :meth:`request` and not yet added to the series: (tunnel id,
    #: status, seconds).  Kept to be added when the series are next read, or in
    #: SETTLE_BATCH-sized batches, in one tight loop: per request that costs a fraction of
    #: adding each as it comes, amid the relay's other work.
    _unsettled: collections.deque[tuple[str, int, float]] = attrs.field(factory=collections.deque, init=False)

    @property
    def http(self) -> dict[str, Histogram]:
        self._settle()
        return self._http

    @property
    def tunnel_requests(self) -> dict[str, int]:
        self._settle()
        return self._tunnel_requests

    def request(self, tunnel_id: str, status: int, seconds: float) -> None:
        """Count one proxied HTTP request (``tunnel_id`` "" when none was found)."""
        unsettled = self._unsettled
        unsettled.append((tunnel_id, status, seconds))
        if len(unsettled) >= SETTLE_BATCH:
            self._settle()

    def _settle(self) -> None:
        unsettled = self._unsettled
        if not unsettled:
            return
        http, per_tunnel = self._http, self._tunnel_requests
        while unsettled:
            tunnel_id, status, seconds = unsettled.popleft()
            cls = status_class(status)
            hist = http.get(cls)
            if hist is None:
                hist = http[cls] = Histogram()
            hist.observe(seconds)
            if tunnel_id:
                per_tunnel[tunnel_id] = per_tunnel.get(tunnel_id, 0) + 1

    def connection(self, tunnel_id: str, proto: str, bytes_in: int, bytes_out: int) -> None:
        if not tunnel_id:
            return
        key = (tunnel_id, proto)
        self.tunnel_connections[key] = self.tunnel_connections.get(key, 0) + 1
        for direction, n in (("in", bytes_in), ("out", bytes_out)):
            k = (tunnel_id, direction)
            self.tunnel_bytes[k] = self.tunnel_bytes.get(k, 0) + n

    def auth_failure(self, kind: str) -> None:
        self.auth_failures[kind] = self.auth_failures.get(kind, 0) + 1

    def refused_bind(self, code: str) -> None:
        self.refused_binds[code] = self.refused_binds.get(code, 0) + 1

    @property
    def has_tunnel_series(self) -> bool:
        """True if some tunnel has per-tunnel series (then :meth:`prune` has work)."""
        return bool(self.tunnel_connections or self.tunnel_bytes or self.tunnel_requests)

    def prune(self, live: Collection[str]) -> None:
        """Forget the per-tunnel series of tunnels not in ``live`` (ids of tunnels that exist)."""
        for table in (self.tunnel_connections, self.tunnel_bytes):
            for key in [k for k in table if k[0] not in live]:
                del table[key]
        for tid in [t for t in self.tunnel_requests if t not in live]:
            del self.tunnel_requests[tid]
