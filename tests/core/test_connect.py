"""connect_tcp: the address that last worked for a name is reused, and dropped when it fails."""

from __future__ import annotations

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
        await (await connect_tcp("localhost", port)).aclose()
    assert resolved == ["127.0.0.1"] * 3


async def test_a_failing_or_stale_address_is_resolved_again(nursery: trio.Nursery) -> None:
    port = await listener_port(nursery)
    # The remembered address no longer answers (nothing listens on 127.0.0.2): resolve again.
    _util._last_good[("localhost", port)] = ("127.0.0.2", time.monotonic())
    await (await connect_tcp("localhost", port)).aclose()
    assert _util._last_good[("localhost", port)][0] == "127.0.0.1"
    # Past the TTL the name is resolved again even though the address works.
    _util._last_good[("localhost", port)] = ("127.0.0.3", time.monotonic() - _util.RESOLVE_TTL - 1)
    await (await connect_tcp("localhost", port)).aclose()
    assert _util._last_good[("localhost", port)][0] == "127.0.0.1"


async def test_numeric_hosts_are_not_remembered_and_errors_pass_through(nursery: trio.Nursery) -> None:
    port = await listener_port(nursery)
    await (await connect_tcp("127.0.0.1", port)).aclose()
    assert _util._last_good == {}
    with pytest.raises(OSError):
        await connect_tcp("127.0.0.1", 1)
