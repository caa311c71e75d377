"""A keep-alive HTTP upstream: answers every request on a connection with ``ok`` until the
client closes.  One process, one task per connection (threads would not hold thousands).

    python bench/ok_upstream.py [PORT]     # prints the port it listens on, 127.0.0.1

Used by ``many_conns.py`` and by ``tests/test_crowd_giveback.py``.
"""

import sys

import trio

RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Type: text/plain\r\n\r\nok"


async def handle(stream: trio.SocketStream) -> None:
    buf = b""
    try:
        while data := await stream.receive_some(65536):
            buf += data
            while b"\r\n\r\n" in buf:
                _head, buf = buf.split(b"\r\n\r\n", 1)
                await stream.send_all(RESPONSE)
    except trio.BrokenResourceError:
        pass


async def main(port: int) -> None:
    listeners = await trio.open_tcp_listeners(port, host="127.0.0.1", backlog=65535)
    print(listeners[0].socket.getsockname()[1], flush=True)
    await trio.serve_listeners(handle, listeners)


if __name__ == "__main__":
    trio.run(main, int(sys.argv[1]) if len(sys.argv) > 1 else 0)
