"""The edge's counters: an HTTP request is queued on the hot path and added to the series when
they are read (or every SETTLE_BATCH requests), with the same result as adding it at once."""

from __future__ import annotations

import pytest

from tunneld.core import _metrics
from tunneld.core._metrics import DURATION_BUCKETS, EdgeMetrics


def test_queued_requests_are_in_the_series_whenever_they_are_read() -> None:
    metrics = EdgeMetrics()
    metrics.request("tn_a", 200, 0.003)
    metrics.request("tn_a", 404, 0.2)
    metrics.request("", 0, 0.001)  # no tunnel found, no response
    assert metrics.tunnel_requests == {"tn_a": 2}
    assert sorted(metrics.http) == ["2xx", "4xx", "none"]
    assert metrics.http["2xx"].counts[0] == 1 and metrics.http["2xx"].total == pytest.approx(0.003)
    assert metrics.http["4xx"].counts[DURATION_BUCKETS.index(0.25)] == 1
    metrics.request("tn_b", 503, 61.0)
    assert metrics.has_tunnel_series and metrics.tunnel_requests == {"tn_a": 2, "tn_b": 1}
    assert metrics.http["5xx"].counts[-1] == 1  # +Inf
    assert metrics.http["5xx"].cumulative()[-1] == ("+Inf", 1)


def test_prune_sees_the_queued_requests() -> None:
    metrics = EdgeMetrics()
    metrics.request("tn_gone", 200, 0.01)
    metrics.prune(live={"tn_live"})
    metrics.request("tn_live", 200, 0.01)
    assert metrics.tunnel_requests == {"tn_live": 1}


def test_the_queue_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_metrics, "SETTLE_BATCH", 8)
    metrics = EdgeMetrics()
    for _ in range(20):
        metrics.request("tn_a", 200, 0.001)
        assert len(metrics._unsettled) < 8
    assert metrics._tunnel_requests == {"tn_a": 16}  # two batches in, four waiting
    assert metrics.http["2xx"].count == 20
