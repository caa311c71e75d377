"""Request capture for the inspector, and the tunnel metrics (issue 16).

Unit tests of the store (bound, eviction, truncation, feeds) and of the go-metrics EWMA on an
injected clock; then end to end through a real edge and agent on loopback: what an inspected
HTTP tunnel records, ``inspect: false``, TCP tunnels (not inspected; connection durations in
their metrics), binary and large bodies.
"""

from __future__ import annotations

import base64
import math
import random
import tracemalloc

import httpx
import pytest
import trio

from tunneld.core import Agent, TunnelConfig
from tunneld.core._agent import EWMA, SAMPLE_SIZE, Metrics, percentiles
from tunneld.core._capture import (
    DEFAULT_DB_SIZE,
    ENTRY_OVERHEAD,
    CapturedExchange,
    CapturedMessage,
    CaptureStore,
    db_size,
    parse_head,
)

from .conftest import EdgeEnv, start_echo_server
from .plugins.test_http import Upstream

MiB = 1024 * 1024


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _entry(store: CaptureStore, body: bytes = b"", name: str = "t") -> CapturedExchange:
    rec = store.recorder(name, "203.0.113.9:5123", b"POST /x HTTP/1.1\r\nHost: a\r\n\r\n")
    assert rec is not None
    rec.request_body(body)
    rec.response_head(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    assert rec.id is None
    rec.finish()
    entry_id = rec.id
    assert entry_id is not None
    entry = store.get(entry_id)
    assert entry is not None
    return entry


# ---- the store ---------------------------------------------------------------------------------


async def test_no_capture_without_a_web_interface(edge_env: EdgeEnv, upstream: Upstream) -> None:
    agent = Agent(edge_env.agent_config(web_addr=None), [])
    assert not agent.captures.enabled
    assert Agent(edge_env.agent_config(web_addr="127.0.0.1:4040"), []).captures.limit == DEFAULT_DB_SIZE
    small = Agent(edge_env.agent_config(web_addr="127.0.0.1:4040", inspect_db_size=1000), [])
    assert small.captures.limit == 1000
    assert not Agent(edge_env.agent_config(web_addr="127.0.0.1:4040", inspect_db_size=0), []).captures.enabled


def test_db_size() -> None:
    assert DEFAULT_DB_SIZE == 50_000_000
    assert db_size(0) == db_size(-1) == 0 and not CaptureStore(0).enabled
    assert CaptureStore(0).recorder("t", "1.2.3.4:5", b"GET / HTTP/1.1\r\n\r\n") is None
    assert db_size(1234) == 1234


def test_oldest_evicted_first_within_the_bound() -> None:
    store = CaptureStore(limit=10 * (ENTRY_OVERHEAD + 200))
    entries = [_entry(store, bytes([i]) * 100) for i in range(30)]
    assert store.size <= store.limit
    kept = [e.id for e in store.newest()]
    assert kept == [e.id for e in entries[::-1][:len(kept)]]  # the newest ones, newest first
    assert 5 <= len(kept) < 30
    assert store.get(entries[0].id) is None and store.get(entries[-1].id) is not None
    assert store.size == sum(e.size for e in store.newest())


def test_an_entry_larger_than_the_whole_bound_is_dropped() -> None:
    store = CaptureStore(limit=ENTRY_OVERHEAD + 100, body_cap=10_000)
    rec = store.recorder("t", "203.0.113.9:5123", b"POST /x HTTP/1.1\r\nHost: a\r\n\r\n")
    assert rec is not None
    rec.request_body(b"x" * 5000)
    rec.finish()
    entry_id = rec.id
    assert entry_id is not None and store.get(entry_id) is None
    assert len(store) == 0 and store.size == 0


def test_ids_still_found_past_a_dropped_entry_and_a_counter_wrap() -> None:
    store = CaptureStore(limit=100 * (ENTRY_OVERHEAD + 200), body_cap=100_000)
    store._counter = 0xFFFFFFFF - 3  # the ids' counter shows 32 bits: cross that
    before = [_entry(store, b"a") for _ in range(3)]
    rec = store.recorder("t", "203.0.113.9:5123", b"POST /x HTTP/1.1\r\nHost: a\r\n\r\n")
    assert rec is not None
    rec.request_body(b"x" * 50_000)  # larger than the whole bound: dropped, its number not reused
    rec.finish()
    dropped = rec.id
    after = [_entry(store, b"b") for _ in range(3)]
    assert dropped is not None and store.get(dropped) is None
    ids = [e.id for e in before + after]
    assert len(set(ids + [dropped])) == 7 and ids[2].endswith("ffffffff") and dropped.endswith("00000000")
    for entry in before + after:
        found = store.get(entry.id)
        assert found is not None and found.id == entry.id and found.request.body == entry.request.body
    assert [e.id for e in store.newest()] == ids[::-1]
    last = ids[-1]
    for bad in ("", "x" * 16, store._prefix + "zzzzzzzz", "00000000" + ids[0][8:], ids[0] + "0",
                last[:8] + last[8:].upper().replace("0", "_", 1), last[:8] + " " + last[9:],
                last[:8] + "+" + last[9:]):
        assert store.get(bad) is None


def test_the_bound_is_the_memory_the_entries_take() -> None:
    """What an entry is charged (ENTRY_OVERHEAD besides its bytes) is what it really costs."""
    limit = 2 * MiB
    store = CaptureStore(limit=limit)
    head = b"GET /1k.bin HTTP/1.1\r\nHost: nginx.bench.localhost\r\n\r\n"
    resp = b"HTTP/1.1 200 OK\r\nServer: nginx\r\nContent-Length: 100\r\n\r\n"
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        for i in range(20_000):  # the store fills and then evicts
            rec = store.recorder("t", f"127.0.0.1:{1024 + i % 60000}", bytes(bytearray(head)))
            assert rec is not None
            rec.response_head(bytes(bytearray(resp)))
            rec.response_body(bytes(bytearray(100)))
            rec.finish()
        held = tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()
    assert store.size <= limit
    assert 0.8 * limit < held < 1.1 * limit, held


def test_what_is_packed_comes_back_as_recorded() -> None:
    """Random exchanges (bodies in pieces, over and under the cap, head chunks carrying body
    bytes, responses replaced, none at all) read back exactly as a plain model of them."""
    rnd = random.Random(17)
    for _ in range(400):
        cap = rnd.choice([0, 1, 7, 100, 5000])
        store = CaptureStore(limit=10 * MiB, body_cap=cap)
        head = b"POST /%d HTTP/1.1\r\nHost: a\r\n\r\n" % rnd.randrange(10**6)
        rec = store.recorder("t", rnd.choice(["203.0.113.9:5123", "[2001:db8::1]:443", "unix"]), head)
        assert rec is not None
        req = b"".join(rnd.randbytes(rnd.randrange(0, 3000)) for _ in range(rnd.randrange(0, 4)))
        at = 0
        while at < len(req):
            step = rnd.randrange(1, 2000)
            rec.request_body(req[at:at + step])
            at += step
        resp_head = resp_body = None
        for _ in range(rnd.randrange(0, 3)):  # a retry or an error page replaces the response
            resp_head = b"HTTP/1.1 %d X\r\nA: b\r\n\r\n" % rnd.randrange(200, 600)
            first = rnd.randbytes(rnd.choice([0, 0, 5, 3000]))
            rec.response_head(resp_head + first)
            resp_body = first
            for _ in range(rnd.randrange(0, 3)):
                more = rnd.randbytes(rnd.randrange(0, 3000))
                rec.response_body(more)
                resp_body += more
        rec.finish()
        assert rec.id is not None
        entry = store.get(rec.id)
        assert entry is not None
        assert entry.request == CapturedMessage(head, req[:cap], len(req))
        if resp_head is None:
            assert entry.response is None
        else:
            assert resp_body is not None
            assert entry.response == CapturedMessage(resp_head, resp_body[:cap], len(resp_body))
        assert entry.size == ENTRY_OVERHEAD + len(head) + min(cap, len(req)) + (
            0 if resp_head is None or resp_body is None else len(resp_head) + min(cap, len(resp_body)))
        assert store.size == entry.size


def test_bodies_are_truncated_at_the_cap_and_marked() -> None:
    store = CaptureStore(body_cap=1000)
    rec = store.recorder("t", "[2001:db8::1]:443", b"PUT /up HTTP/1.1\r\nHost: a\r\n\r\n")
    assert rec is not None
    for _ in range(5):
        rec.request_body(b"a" * 300)
    # A response whose head and first body bytes came in one write.
    rec.response_head(b"HTTP/1.1 200 OK\r\nContent-Length: 2000\r\n\r\n" + b"b" * 700)
    rec.response_body(b"c" * 1300)
    rec.finish()
    entry_id = rec.id
    rec.finish()  # filed once
    assert entry_id is not None and rec.id == entry_id and len(store) == 1
    entry = store.get(entry_id)
    assert entry is not None
    assert entry.request.body == b"a" * 1000 and entry.request.body_size == 1500 and entry.request.truncated
    assert entry.response is not None
    assert entry.response.body == b"b" * 700 + b"c" * 300 and entry.response.body_size == 2000
    data = entry.as_json()
    assert data["remote_addr"] == "2001:db8::1"
    assert data["request"]["truncated"] and data["request"]["body_size"] == 1500
    assert base64.b64decode(data["request"]["raw"]).endswith(b"\r\n\r\n" + b"a" * 1000)
    assert data["response"]["truncated"] and data["response"]["status"] == "200 OK"


def test_ngrok_shape_with_binary_bodies_and_odd_heads() -> None:
    body = bytes(range(256)) * 4
    msg = CapturedMessage(b"POST /a?b=c HTTP/1.1\r\ncontent-type: application/octet-stream\r\n"
                          b"x-dup: 1\r\nX-DUP: 2\r\nx-latin: \xe9t\xe9\r\n\r\n", body, len(body))
    resp = CapturedMessage(b"HTTP/1.1 404 \r\nContent-Length: 0\r\n\r\n", b"", 0)
    entry = CapturedExchange("00000000000000ab", "web (http)", "203.0.113.9", 1.5e9, 1234, msg, resp, "x")
    data = entry.as_json()
    assert data["uri"] == "/api/requests/http/00000000000000ab" and data["id"] == "00000000000000ab"
    assert data["tunnel_name"] == "web (http)" and data["duration"] == 1234 and data["replay_of"] == "x"
    assert data["start"].startswith("2017-07-1") and ("+" in data["start"][19:] or "-" in data["start"][19:])
    req = data["request"]
    assert (req["method"], req["uri"], req["proto"]) == ("POST", "/a?b=c", "HTTP/1.1")
    assert req["headers"] == {"Content-Type": ["application/octet-stream"], "X-Dup": ["1", "2"],
                              "X-Latin": ["\xe9t\xe9"]}
    assert base64.b64decode(req["raw"]).endswith(body)
    # An empty reason on the wire is shown with the standard one.
    assert data["response"]["status"] == "404 Not Found" and data["response"]["status_code"] == 404
    no_response = CapturedExchange("1", "t", "h", 0.0, 0, msg, None)
    assert no_response.as_json()["response"] is None


def test_parse_head_tolerates_anything() -> None:
    assert parse_head(b"GARBAGE") == (["GARBAGE", "", ""], {})
    assert parse_head(b"\xff\xfe \x00\r\n:\r\n\r\n")[0][0] == "\xff\xfe"


async def test_feeds_get_requests_and_clears_and_slow_ones_are_dropped() -> None:
    store = CaptureStore()
    feed = store.subscribe()
    slow = store.subscribe()
    first = _entry(store)
    store.clear()
    assert len(store) == 0 and store.size == 0
    with trio.fail_after(2):
        event = await feed.receive()
        assert event.kind == "request" and event.entry is not None and event.entry.id == first.id
        assert (await feed.receive()).kind == "clear"
    for _ in range(300):  # the slow feed never reads: dropped once its buffer is full
        _entry(store)
    with trio.fail_after(2):
        got = 0
        async for _ in slow:
            got += 1
    assert 0 < got < 302


# ---- metrics ------------------------------------------------------------------------------------


def test_ewma_matches_go_metrics() -> None:
    clock = FakeClock()
    one, five = EWMA(1, clock), EWMA(5, clock)
    for _ in range(60):
        one.mark()
        five.mark()
    assert one.value() == 0.0  # nothing ticked yet
    clock.now += 5
    assert one.value() == pytest.approx(12.0) and five.value() == pytest.approx(12.0)  # 60 / 5 s
    # go-metrics: a quiet minute decays rate1 by exp(-1) (12 ticks of alpha = 1 - exp(-5/60)).
    clock.now += 60
    assert one.value() == pytest.approx(12.0 * math.exp(-1), rel=1e-9)
    assert five.value() == pytest.approx(12.0 * math.exp(-1 / 5), rel=1e-9)
    # Ticks in one step or one at a time agree.
    stepwise = EWMA(1, clock)
    bulk = EWMA(1, clock)
    stepwise.mark(10)
    bulk.mark(10)
    for _ in range(7):
        clock.now += 5
        stepwise.value()
    assert bulk.value() == pytest.approx(stepwise.value(), rel=1e-12)


def test_metrics_count_rates_and_durations() -> None:
    clock = FakeClock()
    m = Metrics(clock=clock)
    records = [m.conn_opened(f"198.51.100.1:{1000 + i}") for i in range(10)]
    for i in range(20):
        m.request_done(0.001 * (i + 1))
    clock.now += 5
    data = m.as_json()
    conns, reqs = data["conns"], data["http"]
    assert (conns["count"], conns["gauge"], reqs["count"]) == (10, 10, 20)
    assert "gauge" not in reqs
    assert conns["rate1"] == pytest.approx(2.0) and reqs["rate1"] == pytest.approx(4.0)
    assert conns["p50"] == 0.0  # none has ended
    for record in records:
        clock.now += 0.1
        m.conn_closed(record)  # the i-th lasted 5 + 0.1 * i s
    data = m.as_json()
    conns, reqs = data["conns"], data["http"]
    assert conns["gauge"] == 0
    assert conns["p50"] == pytest.approx(5.55e9, rel=1e-6)
    # conns percentiles are connection durations, http ones request durations (nanoseconds).
    assert conns["p50"] > 10 * reqs["p99"] > 0
    assert reqs["p50"] == pytest.approx(0.0105e9, rel=1e-6)  # go-metrics: interpolated at p*(n+1)
    before = reqs["rate1"]
    clock.now += 300
    after = m.as_json()["http"]
    assert after["rate1"] < before * 0.01 and after["rate15"] > after["rate5"] > after["rate1"]
    assert after["count"] == 20


def test_metrics_keep_the_latest_durations_only() -> None:
    """A ring of SAMPLE_SIZE: once full, each new duration replaces the oldest."""
    m = Metrics(clock=FakeClock())
    for i in range(SAMPLE_SIZE + 500):
        m.request_done(1.0 if i < 500 else 2.0)  # the first 500 are pushed out
    assert len(m._req_durations) == SAMPLE_SIZE
    assert sorted(m._req_durations) == [2.0] * SAMPLE_SIZE
    assert m.as_json()["http"]["p50"] == 2e9
    m.request_done(3.0)
    assert sorted(m._req_durations) == [2.0] * (SAMPLE_SIZE - 1) + [3.0]


def test_percentiles_edges() -> None:
    assert percentiles([]) == {"p50": 0.0, "p90": 0.0, "p95": 0.0, "p99": 0.0}
    assert percentiles([2.0]) == {"p50": 2e9, "p90": 2e9, "p95": 2e9, "p99": 2e9}


# ---- end to end ----------------------------------------------------------------------------------


async def _agent(env: EdgeEnv, upstream: Upstream, **kw: object) -> tuple[Agent, httpx.AsyncClient]:
    agent = await env.start_agent(TunnelConfig(name="web", proto="http", addr=f"127.0.0.1:{upstream.port}",
                                               schemes=["http"], **kw),  # type: ignore[arg-type]
                                  web_addr="127.0.0.1:0")
    host = agent.tunnels[0].public_url.split("://", 1)[1]
    client = httpx.AsyncClient(base_url=f"http://127.0.0.1:{env.http_port}", headers={"Host": host},
                               timeout=20)
    return agent, client


@pytest.fixture
async def upstream(nursery: trio.Nursery) -> Upstream:
    return await Upstream("A").start(nursery)


async def test_inspected_tunnel_records_requests(edge_env: EdgeEnv, upstream: Upstream) -> None:
    agent, client = await _agent(edge_env, upstream)
    body = random.Random(1).randbytes(5000)  # binary, with every byte value
    with trio.fail_after(20):
        async with client:
            r = await client.post("/sha256?q=1", content=body, headers={"X-Test": "yes"})
            assert r.status_code == 200
            assert (await client.get("/hello")).status_code == 200
            assert (await client.get("/stream?size=3000")).status_code == 200  # chunked response
    store = agent.captures
    newest = list(store.newest())
    assert [e.tunnel_name for e in newest] == ["web"] * 3
    chunked, hello, posted = newest
    assert posted.request.body == body and not posted.request.truncated
    assert posted.response is not None and posted.response.body == r.content
    data = posted.as_json()
    assert data["request"]["headers"]["X-Test"] == ["yes"] and data["request"]["uri"] == "/sha256?q=1"
    assert data["remote_addr"] == "127.0.0.1" and data["duration"] > 0
    assert data["response"]["status_code"] == 200 and data["response"]["headers"]["X-Upstream"] == ["A"]
    assert chunked.response is not None and chunked.response.body.endswith(b"0\r\n\r\n")
    assert hello.request.body_size == 0 and hello.response is not None
    # Metrics were counted for all three requests.
    assert agent.tunnels[0].metrics.http_count == 3


async def test_large_bodies_are_truncated(edge_env: EdgeEnv, upstream: Upstream) -> None:
    agent, client = await _agent(edge_env, upstream)
    body = b"u" * (3 * MiB)
    with trio.fail_after(30):
        async with client:
            assert (await client.post("/sha256", content=body)).status_code == 200
            r = await client.get(f"/big?size={2 * MiB + 5}")
            assert len(r.content) == 2 * MiB + 5
    big, up = list(agent.captures.newest())
    assert up.request.truncated and up.request.body_size == 3 * MiB and len(up.request.body) == MiB
    assert big.response is not None and big.response.truncated
    assert big.response.body_size == 2 * MiB + 5 and len(big.response.body) == MiB


async def test_inspect_false_records_nothing(edge_env: EdgeEnv, upstream: Upstream) -> None:
    agent, client = await _agent(edge_env, upstream, inspect=False)
    with trio.fail_after(20):
        async with client:
            assert (await client.get("/hello")).status_code == 200
    assert len(agent.captures) == 0
    assert agent.tunnels[0].metrics.http_count == 1
    assert agent.tunnels[0].context.record_http(None, b"") is None  # type: ignore[arg-type]


async def test_tcp_tunnels_are_not_inspected_and_show_connection_durations(
        edge_env: EdgeEnv, nursery: trio.Nursery) -> None:
    port = await start_echo_server(nursery)
    agent = await edge_env.start_agent(TunnelConfig(name="t", proto="tcp", addr=str(port)),
                                       web_addr="127.0.0.1:0")
    public_port = int(agent.tunnels[0].public_url.rsplit(":", 1)[1])
    with trio.fail_after(20):
        for _ in range(3):
            stream = await trio.open_tcp_stream("127.0.0.1", public_port)
            await stream.send_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            await stream.receive_some()
            await trio.sleep(0.05)  # a connection lasting at least 50 ms
            await stream.send_eof()
            while await stream.receive_some():
                pass
            await stream.aclose()
        metrics = agent.tunnels[0].metrics
        while metrics.conns_gauge:
            await trio.sleep(0.01)
    assert len(agent.captures) == 0
    conns = metrics.as_json()["conns"]
    assert conns["count"] == 3 and conns["gauge"] == 0
    assert conns["p50"] >= 0.05e9  # durations of the connections, in ns (was always 0.0)
    assert metrics.as_json()["http"]["count"] == 0
