"""connect_tcp: the address that last worked for a name is reused, and dropped when it fails."""

from __future__ import annotations

import socket
import time
from functools import partial

import pytest
import trio

from tunneld.core import _util
from tunneld.core._util import connect_tcp


async def listener_port(nursery: trio.Nursery) -> int:
    listeners = await nursery.start(partial(trio.serve_tcp, trio.aclose_forcefully, 0, host="127.0.0.1"))
    return listeners[0].socket.getsockname()[1]


@pytest.fixture(autouse=True)
def fresh_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_util, "_last_good", {})


async def test_a_name_is_resolved_once_then_its_address_reused(nursery: trio.Nursery,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    port = await listener_port(nursery)
    stream = await connect_tcp("localhost", port)
    await stream.aclose()
    assert _util._last_good[("localhost", port)][0] == "127.0.0.1"

    resolved: list[str] = []
    real = trio.open_tcp_stream

    async def spy(host: str, port: int, **kwargs: object) -> trio.SocketStream:
        resolved.append(host)
        return await real(host, port)

    monkeypatch.setattr(trio, "open_tcp_stream", spy)
    for _ in range(3):
        stream = await connect_tcp("localhost", port)
        assert stream.socket.getpeername()[:2] == ("127.0.0.1", port)
        await stream.aclose()
    assert resolved == []  # neither resolved nor connected through trio's resolver


class Spawns(trio.abc.Instrument):
    def __init__(self) -> None:
        self.names: list[str] = []

    def task_spawned(self, task: trio.lowlevel.Task) -> None:
        if "serve_listeners" not in task.name:  # the test's listener handling our connection
            self.names.append(task.name)


async def test_an_address_is_connected_from_the_callers_task(nursery: trio.Nursery) -> None:
    """A literal or remembered address needs no task of its own (trio.open_tcp_stream spawns
    one per attempt): a scheduler trip and a spawn fewer for every proxied connection."""
    port = await listener_port(nursery)
    await (await connect_tcp("localhost", port)).aclose()  # resolved once, remembered
    spawns = Spawns()
    trio.lowlevel.add_instrument(spawns)
    try:
        for host in ("127.0.0.1", "localhost"):
            stream = await connect_tcp(host, port)
            assert isinstance(stream, trio.SocketStream)
            # Nagle stays off (trio.SocketStream's default; nothing here sets it again).
            assert stream.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
            assert stream.socket.getpeername()[:2] == ("127.0.0.1", port)
            await stream.aclose()
    finally:
        trio.lowlevel.remove_instrument(spawns)
    assert spawns.names == []


async def test_an_ipv6_literal_is_connected(nursery: trio.Nursery) -> None:
    try:
        listeners = await nursery.start(partial(trio.serve_tcp, trio.aclose_forcefully, 0, host="::1"))
    except OSError:
        pytest.skip("no IPv6 loopback here")
    port = listeners[0].socket.getsockname()[1]
    stream = await connect_tcp("::1", port)
    assert stream.socket.family == socket.AF_INET6
    await stream.aclose()
    with pytest.raises(OSError):
        await connect_tcp("::1", 1)


async def test_a_failing_or_stale_address_is_resolved_again(nursery: trio.Nursery) -> None:
    port = await listener_port(nursery)
    # The remembered address no longer answers (nothing listens on 127.0.0.2): resolve again.
    _util._last_good[("localhost", port)] = ("127.0.0.2", time.monotonic(), socket.AF_INET)
    await (await connect_tcp("localhost", port)).aclose()
    assert _util._last_good[("localhost", port)][0] == "127.0.0.1"
    # Past the TTL the name is resolved again even though the address works.
    stale = time.monotonic() - _util.RESOLVE_TTL - 1
    _util._last_good[("localhost", port)] = ("127.0.0.3", stale, socket.AF_INET)
    await (await connect_tcp("localhost", port)).aclose()
    assert _util._last_good[("localhost", port)][0] == "127.0.0.1"


async def test_numeric_hosts_are_not_remembered_and_errors_pass_through(nursery: trio.Nursery) -> None:
    port = await listener_port(nursery)
    await (await connect_tcp("127.0.0.1", port)).aclose()
    assert _util._last_good == {}
    with pytest.raises(OSError):
        await connect_tcp("127.0.0.1", 1)
