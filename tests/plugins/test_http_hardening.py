"""Security review, issue 11: attacks on the public HTTP listener, each reproduced on loopback.

Every attack runs while a steady client keeps requesting *another* tunnel through the same
edge: the edge must go on serving it promptly.  Attacks are bounded in count and time; the
limits they hit are module constants lowered here with monkeypatch.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import attrs
import pytest
import trio
import trio.testing

from tunneld.core import ERROR_HEADER
from tunneld.http1 import _relay
from tunneld.http1._relay import Reader, exchange
from tunneld.http1._wire import BadMessage, parse_request_head
from tunneld.plugins.http import _edge

from ..conftest import EdgeEnv
from .test_http import RawClient, Response, Upstream, http_tunnel, request_bytes

MiB = 1024 * 1024


@attrs.define
class Steady:
    """Requests to a bystander tunnel made while an attack runs, and how long each took."""

    latencies: list[float] = attrs.field(factory=list)

    @property
    def worst(self) -> float:
        return max(self.latencies, default=math.inf)


@asynccontextmanager
async def bystander(env: EdgeEnv, host: str, *, pause: float = 0.02) -> AsyncIterator[Steady]:
    """Keep requesting ``host`` (new connection each time) until the block ends."""
    steady = Steady()

    async def run() -> None:
        while True:
            start = trio.current_time()
            client = await RawClient.connect(env.http_port)
            try:
                resp = await client.request("GET", "/hello", host)
            finally:
                await client.aclose()
            assert (resp.status, resp.body) == (200, b"hello from B\n"), resp
            steady.latencies.append(trio.current_time() - start)
            await trio.sleep(pause)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run)
        yield steady
        # Served during the attack, and after it too.
        seen = len(steady.latencies)
        while len(steady.latencies) < max(3, seen + 1):
            await trio.sleep(0.01)
        nursery.cancel_scope.cancel()


@pytest.fixture
async def hosts(edge_env: EdgeEnv, nursery: trio.Nursery) -> tuple[str, str]:
    """(target, bystander): two tunnels on one edge, to upstreams "A" and "B"."""
    up_a = await Upstream("A").start(nursery)
    up_b = await Upstream("B").start(nursery)
    _, target = await http_tunnel(edge_env, up_a.port, "target")
    _, other = await http_tunnel(edge_env, up_b.port, "other")
    return target, other


async def _answer(client: RawClient, timeout: float) -> Response | str:
    """The response, or "reset"/"eof" when the connection ended without one, or "none"."""
    with trio.move_on_after(timeout):
        try:
            return await client.read_response()
        except (trio.BrokenResourceError, ConnectionError):
            return "reset"
        except EOFError:
            return "eof"
    return "none"


# --------------------------------------------------------------------------------------------
# Item 4: unfinished heads must not exhaust memory
# --------------------------------------------------------------------------------------------


async def test_head_flood_bounded_by_budget(edge_env: EdgeEnv, hosts: tuple[str, str],
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """200 connections x 0.95 MiB of head without its blank line: the total buffered stays
    under the budget, the excess is refused with 503, and the memory is given back."""
    target, other = hosts
    monkeypatch.setattr(_edge.HEADS, "limit", 8 * MiB)
    monkeypatch.setattr(_edge, "HEAD_TIMEOUT", 4.0)
    head = request_bytes("GET", "/", target)[:-2] + b"X-Pad: " + b"a" * (int(0.95 * MiB))
    peak = [0]
    outcomes: list[Response | str] = []
    with trio.fail_after(40):
        async with bystander(edge_env, other) as steady:
            async with trio.open_nursery() as flood:

                async def attacker() -> None:
                    client = await RawClient.connect(edge_env.http_port)
                    try:
                        try:
                            await client.send(head)
                        except (trio.BrokenResourceError, ConnectionError):
                            pass
                        peak[0] = max(peak[0], _edge.HEADS.used)
                        outcomes.append(await _answer(client, 6))
                    finally:
                        await client.aclose()

                async def watch() -> None:
                    while True:
                        peak[0] = max(peak[0], _edge.HEADS.used)
                        await trio.sleep(0.005)

                flood.start_soon(watch)
                async with trio.open_nursery() as attackers:
                    for _ in range(200):
                        attackers.start_soon(attacker)
                flood.cancel_scope.cancel()
        refused = [o for o in outcomes if isinstance(o, Response) and o.status == 503]
        ended = [o for o in outcomes if o in ("reset", "eof")]
        timed_out = [o for o in outcomes if isinstance(o, Response) and o.status == 408]
        print(f"503: {len(refused)}, reset/eof: {len(ended)}, 408: {len(timed_out)}, "
              f"peak held {peak[0] / MiB:.1f} MiB, bystander worst {steady.worst * 1000:.0f} ms "
              f"over {len(steady.latencies)} requests")
        assert len(outcomes) == 200
        # Every connection was refused or timed out; only what fits the budget waited.
        assert len(refused) + len(ended) + len(timed_out) == 200, outcomes
        assert len(refused) >= 100
        assert len(timed_out) <= 8 * MiB / (0.9 * MiB) + 1
        assert refused[0].header(ERROR_HEADER) == "ERR_TUNNELD_3431"
        assert refused[0].header("Retry-After") == "5"
        assert peak[0] <= 8 * MiB
        assert steady.worst < 2.0
        # Everything was given back.
        while _edge.HEADS.used:
            await trio.sleep(0.05)


async def test_over_budget_head_answered_503(edge_env: EdgeEnv, hosts: tuple[str, str],
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    target, other = hosts
    monkeypatch.setattr(_edge.HEADS, "limit", 512 * 1024)
    with trio.fail_after(15):
        async with bystander(edge_env, other):
            hog = await RawClient.connect(edge_env.http_port)
            await hog.send(request_bytes("GET", "/", target)[:-2] + b"X-Pad: " + b"a" * 500_000)
            while _edge.HEADS.used < 500_000:
                await trio.sleep(0.01)
            probe = await RawClient.connect(edge_env.http_port)
            await probe.send(request_bytes("GET", "/", target)[:-2] + b"X-Pad: " + b"b" * 40_000)
            resp = await _answer(probe, 3)
            assert isinstance(resp, Response) and resp.status == 503, resp
            assert resp.header(ERROR_HEADER) == "ERR_TUNNELD_3431"
            # A complete head is never charged: ordinary requests go on meanwhile.
            client = await RawClient.connect(edge_env.http_port)
            assert (await client.request("GET", "/hello", target)).status == 200
            await client.aclose()
            await hog.aclose()
            await probe.aclose()
            while _edge.HEADS.used:
                await trio.sleep(0.02)


# --------------------------------------------------------------------------------------------
# Item 5: a bare LF is refused at once
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("data", [b"GET / HTTP/1.1\nHost: x\n\n", b"GET / HTTP/1.1\r\nHost: x\n",
                                  b"GET / HTTP/1.1\nHost: x"], ids=["whole", "partial", "no-end"])
async def test_bare_lf_head_400_at_once(edge_env: EdgeEnv, hosts: tuple[str, str], data: bytes) -> None:
    _, other = hosts
    with trio.fail_after(10):
        async with bystander(edge_env, other):
            client = await RawClient.connect(edge_env.http_port)
            start = trio.current_time()
            await client.send(data)
            resp = await _answer(client, 2)
            assert isinstance(resp, Response), resp
            assert (resp.status, resp.header(ERROR_HEADER)) == (400, "ERR_TUNNELD_3400")
            assert trio.current_time() - start < 1.0
            await client.aclose()


def test_bare_lf_split_across_reads_is_seen() -> None:
    """A CR ending one read and its LF starting the next is no bare LF; a lone LF is."""
    assert not _relay._bare_lf(bytearray(b"GET / HTTP/1.1\r\nHost: x\r"), 0, 26)
    buf = bytearray(b"GET / HTTP/1.1\r\nHost: x\r\nA: b\n")
    assert not _relay._bare_lf(buf, 25, 25)
    assert _relay._bare_lf(buf, 25, len(buf))
    split = bytearray(b"GET / HTTP/1.1\r\nHost: x\r\n")
    assert not _relay._bare_lf(split, 24, len(split))


# --------------------------------------------------------------------------------------------
# Item 9: a malformed request body is the client's fault (400), not the agent's (502)
# --------------------------------------------------------------------------------------------


async def test_malformed_chunked_request_body_400(edge_env: EdgeEnv, hosts: tuple[str, str]) -> None:
    target, other = hosts
    with trio.fail_after(10):
        async with bystander(edge_env, other):
            client = await RawClient.connect(edge_env.http_port)
            await client.send(request_bytes("POST", "/sha256", target,
                                            headers=[("Transfer-Encoding", "chunked")])
                              + b"5\r\nhello\r\nzz\r\n")
            resp = await _answer(client, 3)
            assert isinstance(resp, Response), resp
            assert (resp.status, resp.header(ERROR_HEADER)) == (400, "ERR_TUNNELD_3400")
            assert await client.at_eof()


async def test_agent_side_malformed_body_is_bad_request() -> None:
    """The relay itself (as the agent runs it) raises BadMessage(400), not UpstreamFailed."""
    client_end, client_far = trio.testing.memory_stream_pair()
    upstream_end, upstream_far = trio.testing.memory_stream_pair()
    raw = b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    req = parse_request_head(raw)
    await client_far.send_all(b"3\r\nabc\r\nnot-hex\r\n")
    with trio.fail_after(5):
        with pytest.raises(BadMessage) as info:
            await exchange(Reader(client_end), Reader(upstream_end), req, raw)
    assert info.value.status == 400


# --------------------------------------------------------------------------------------------
# Item 8: request bodies and idle connections cannot be held open by a trickle
# --------------------------------------------------------------------------------------------


async def test_stalled_body_408(edge_env: EdgeEnv, hosts: tuple[str, str],
                                monkeypatch: pytest.MonkeyPatch) -> None:
    target, other = hosts
    monkeypatch.setattr(_relay, "BODY_IDLE_TIMEOUT", 0.5)
    with trio.fail_after(10):
        async with bystander(edge_env, other):
            client = await RawClient.connect(edge_env.http_port)
            await client.send(request_bytes("POST", "/sha256", target, headers=[("Content-Length", "10")])
                              + b"abc")
            start = trio.current_time()
            resp = await _answer(client, 3)
            assert isinstance(resp, Response), resp
            assert (resp.status, resp.header(ERROR_HEADER)) == (408, "ERR_TUNNELD_3408")
            assert 0.4 < trio.current_time() - start < 2.0
            await client.aclose()


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
async def test_trickled_body_cut_off(edge_env: EdgeEnv, hosts: tuple[str, str],
                                     monkeypatch: pytest.MonkeyPatch, chunked: bool) -> None:
    """A byte every 0.2 s keeps the idle clock (1 s) happy but not the minimum rate."""
    target, other = hosts
    monkeypatch.setattr(_relay, "BODY_IDLE_TIMEOUT", 1.0)
    monkeypatch.setattr(_relay, "BODY_MIN_RATE", 100.0)
    headers = [("Transfer-Encoding", "chunked")] if chunked else [("Content-Length", "100000")]
    with trio.fail_after(15):
        async with bystander(edge_env, other):
            client = await RawClient.connect(edge_env.http_port)
            await client.send(request_bytes("POST", "/sha256", target, headers=headers)
                              + (b"186a0\r\n" if chunked else b""))
            start = trio.current_time()

            async def trickle() -> None:
                try:
                    while True:
                        await client.send(b"x")
                        await trio.sleep(0.2)
                except (trio.BrokenResourceError, trio.ClosedResourceError, ConnectionError):
                    pass

            async with trio.open_nursery() as nursery:
                nursery.start_soon(trickle)
                resp = await _answer(client, 5)
                nursery.cancel_scope.cancel()
            took = trio.current_time() - start
            assert isinstance(resp, Response), resp
            assert resp.status == 408, resp
            assert 0.9 < took < 2.5, took
            await client.aclose()


async def test_body_clock_stops_while_upstream_is_slow(edge_env: EdgeEnv, hosts: tuple[str, str],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A fast upload of 8 MiB goes through with a short body timeout: only the client's pace counts."""
    target, other = hosts
    monkeypatch.setattr(_relay, "BODY_IDLE_TIMEOUT", 0.5)
    body = b"y" * (8 * MiB)
    with trio.fail_after(20):
        async with bystander(edge_env, other):
            client = await RawClient.connect(edge_env.http_port)
            resp = await client.request("POST", "/sha256", target, body=body)
            assert resp.status == 200 and resp.json()["length"] == len(body)
            # Kept alive: the deadline was lifted once the body was through.
            await trio.sleep(0.8)
            assert (await client.request("GET", "/hello", target)).status == 200
            await client.aclose()


async def test_crlf_trickle_does_not_hold_idle_connection(edge_env: EdgeEnv, hosts: tuple[str, str],
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    target, other = hosts
    monkeypatch.setattr(_edge, "IDLE_TIMEOUT", 1.0)
    with trio.fail_after(10):
        async with bystander(edge_env, other):
            client = await RawClient.connect(edge_env.http_port)
            assert (await client.request("GET", "/hello", target)).status == 200
            start = trio.current_time()
            ended = False
            try:
                while trio.current_time() - start < 4:
                    await client.send(b"\r\n")
                    await trio.sleep(0.2)
            except (trio.BrokenResourceError, ConnectionError):
                ended = True
            if not ended:
                ended = await client.at_eof()
            took = trio.current_time() - start
            assert ended and took < 2.0, took
            await client.aclose()
