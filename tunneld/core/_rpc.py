"""Control RPCs on typed streams: one JSON object each way.

Go clients end their request with a newline and read one JSON value; Rust clients send no
newline, never half-close, and read the answer to EOF.  So requests are read incrementally
(never waiting for EOF) and every answer is followed by FIN.
"""

from __future__ import annotations

from typing import Any, TypeVar

import trio

from . import proto
from ._mux import MuxSession, MuxStream

T = TypeVar("T")

#: Largest control message accepted.
MAX_MESSAGE = 64 * 1024
#: How long a peer may take to send or answer one control message.
RPC_TIMEOUT = 30.0


async def read_json(stream: trio.abc.ReceiveStream, *, max_size: int = MAX_MESSAGE) -> dict[str, Any]:
    """Read one JSON object from ``stream`` (RemoteProtocolError if malformed or too large)."""
    reader = proto.JsonObjectReader(max_size=max_size)
    with trio.fail_after(RPC_TIMEOUT):
        while True:
            data = await stream.receive_some(max_size)
            if not data:
                reader.feed_eof()
                raise proto.RemoteProtocolError("stream ended before a complete JSON message")
            obj = reader.feed(data)
            if obj is not None:
                return obj


async def read_message(stream: trio.abc.ReceiveStream, cls: type[T]) -> T:
    return proto.decode_message(cls, await read_json(stream))


async def reply(stream: MuxStream, msg: Any) -> None:
    """Answer an RPC and half-close (Rust clients read the answer to EOF)."""
    await stream.send_all(proto.encode_message(msg))
    await stream.send_eof()


async def call(mux: MuxSession, stream_type: int, msg: Any, resp_cls: type[T]) -> T:
    """Open a typed stream, send ``msg``, and read the answer as ``resp_cls``."""
    stream = await mux.open_stream(proto.encode_stream_type(stream_type) + proto.encode_message(msg))
    try:
        return await read_message(stream, resp_cls)
    finally:
        await stream.aclose()
