"""Servers for the browser tests of the inspector, run by Trio in a background thread.

The browser is driven synchronously (Playwright's sync API) from the test's own thread, so
the edge, agent, upstream and web server live in a second thread with its own Trio loop:
:class:`TrioThread` starts a ``run(task_status=...)`` function there and cancels it on exit.
"""

from __future__ import annotations

import datetime
import json
import queue
import socket
import threading
from functools import partial
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit

import h11
import httpx
import trio

from tunneld.core import Agent, AgentConfig, Edge, TunnelConfig
from tunneld.core._store import Store

from .conftest import make_edge_config


class TrioThread:
    """``with TrioThread(fn):`` runs ``await nursery.start(fn)`` in a thread until the block ends."""

    def __init__(self, fn: Any) -> None:
        self._fn = fn
        self._token: trio.lowlevel.TrioToken | None = None
        self._cancel: trio.CancelScope | None = None
        self._thread: threading.Thread | None = None

    def __enter__(self) -> TrioThread:
        ready: queue.Queue[BaseException | None] = queue.Queue()

        async def main() -> None:
            self._token = trio.lowlevel.current_trio_token()
            async with trio.open_nursery() as nursery:
                self._cancel = nursery.cancel_scope
                with trio.fail_after(30):
                    await nursery.start(self._fn)
                ready.put(None)

        def thread() -> None:
            try:
                trio.run(main)
            except BaseException as exc:  # reported to the test thread, which raises it
                ready.put(exc)

        self._thread = threading.Thread(target=thread, name="inspector-servers", daemon=True)
        self._thread.start()
        error = ready.get(timeout=60)
        if error is not None:
            raise RuntimeError("the test servers did not start") from error
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        assert self._cancel is not None and self._thread is not None
        trio.from_thread.run_sync(self._cancel.cancel, trio_token=self._token)
        self._thread.join(20)


class Upstream:
    """An HTTP/1.1 server (h11) that records each request and answers JSON describing it."""

    def __init__(self) -> None:
        self.port = 0
        self.seen: list[dict[str, Any]] = []

    async def start(self, nursery: trio.Nursery) -> None:
        listeners = await nursery.start(partial(trio.serve_tcp, self._handle, 0, host="127.0.0.1"))
        self.port = int(listeners[0].socket.getsockname()[1])

    def count(self, target: str) -> int:
        return sum(1 for r in self.seen if r["target"] == target)

    def last(self, target: str) -> dict[str, Any]:
        return [r for r in self.seen if r["target"] == target][-1]

    async def _handle(self, stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER)
        request: h11.Request | None = None
        body = b""
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await stream.receive_some(65536))
            elif isinstance(event, h11.Request):
                request = event
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                break
            else:  # closed or paused before a whole request: nothing to answer
                return
        assert request is not None
        target = request.target.decode("latin-1")
        self.seen.append({
            "method": request.method.decode(), "target": target, "body": body,
            "headers": {k.decode(): v.decode("latin-1") for k, v in request.headers},
            "trailers": {k.decode(): v.decode("latin-1") for k, v in event.headers},
        })
        payload = json.dumps({"path": urlsplit(target).path, "method": request.method.decode()}).encode()
        status = 404 if target.startswith("/missing") else 200
        data = conn.send(h11.Response(status_code=status, headers=[
            ("Content-Type", "application/json"), ("Content-Length", str(len(payload))),
            ("Connection", "close")]))
        data += conn.send(h11.Data(data=payload)) + conn.send(h11.EndOfMessage())
        await stream.send_all(data)
        await stream.aclose()


class LiveStack:
    """A real edge, an agent with its web server (the inspector), and an :class:`Upstream`."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.upstream = Upstream()
        self.web_url = ""
        self.public_url = ""
        self.token = ""
        self.http_port = 0
        self.agent: Agent | None = None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        from tunneld.core._web import serve_web

        store = Store.open(self.tmp)
        _rec, self.token = store.create_token("inspector")
        try:
            async with trio.open_nursery() as nursery:
                edge = Edge(make_edge_config(self.tmp), store)
                info = await nursery.start(edge.serve)
                self.http_port = info.ports["http"]
                await self.upstream.start(nursery)
                config = AgentConfig(authtoken=self.token, server_addr=f"127.0.0.1:{info.ports['agent']}",
                                     root_cas=str(self.tmp / "ca.pem"), web_addr="127.0.0.1:0")
                agent = self.agent = Agent(config, [TunnelConfig("web", "http", str(self.upstream.port))])
                await nursery.start(agent.run)
                self.public_url = next(t.public_url for t in agent.tunnels
                                       if t.public_url.startswith("http:"))
                self.web_url = "http://" + await nursery.start(serve_web, agent, "127.0.0.1:0")
                task_status.started()
        finally:
            store.close()

    @property
    def host(self) -> str:
        return urlsplit(self.public_url).netloc

    def public_get(self, target: str, headers: dict[str, str] | None = None) -> httpx.Response:
        """GET ``target`` through the edge's public HTTP port, as a visitor would."""
        with httpx.Client(timeout=10) as client:
            return client.get(f"http://127.0.0.1:{self.http_port}{target}",
                              headers={"Host": self.host, **(headers or {})})

    def public_post(self, target: str, body: bytes, content_type: str,
                    headers: dict[str, str] | None = None) -> httpx.Response:
        with httpx.Client(timeout=10) as client:
            return client.post(f"http://127.0.0.1:{self.http_port}{target}", content=body,
                               headers={"Host": self.host, "Content-Type": content_type, **(headers or {})})

    def public_raw(self, request: str) -> bytes:
        """Send a hand-written request (``{host}`` filled in) and read the answer to its end."""
        with socket.create_connection(("127.0.0.1", self.http_port), timeout=10) as sock:
            sock.sendall(request.replace("{host}", self.host).encode("latin-1"))
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
        return answer


def fake_request(i: int) -> dict[str, Any]:
    """A captured request in the API's shape (every fifth answered 500)."""
    import base64

    start = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC) + datetime.timedelta(seconds=i)
    status = 500 if i % 5 == 0 else 200
    req = f"GET /item/{i}?n={i} HTTP/1.1\r\nHost: demo.tunneld.test\r\nX-Index: {i}\r\n\r\n".encode()
    resp = (f"HTTP/1.1 {status} {'OK' if status == 200 else 'Internal Server Error'}\r\n"
            f"Content-Type: text/plain\r\nContent-Length: 2\r\n\r\nok").encode()
    return {
        "uri": f"/api/requests/http/{i:016x}", "id": f"{i:016x}", "tunnel_name": "web",
        "remote_addr": "127.0.0.1", "start": start.isoformat().replace("+00:00", "Z"),
        "duration": 1_000_000 + i * 1000, "replay_of": None,
        "request": {"method": "GET", "proto": "HTTP/1.1", "uri": f"/item/{i}?n={i}",
                    "headers": {"Host": ["demo.tunneld.test"], "X-Index": [str(i)]},
                    "raw": base64.b64encode(req).decode(), "body_size": 0, "truncated": False},
        "response": {"status": f"{status} OK", "status_code": status, "proto": "HTTP/1.1",
                     "headers": {"Content-Type": ["text/plain"], "Content-Length": ["2"]},
                     "raw": base64.b64encode(resp).decode(), "body_size": 2, "truncated": False},
    }


class FakeApi:
    """The inspector's pages over a fake request API holding ``count`` captured requests."""

    def __init__(self, count: int) -> None:
        self.requests = [fake_request(i) for i in reversed(range(count))]   # newest first
        self.by_id = {r["id"]: r for r in self.requests}
        self.url = ""

    def app(self) -> Any:
        from starlette.applications import Starlette
        from starlette.requests import Request
        from starlette.responses import JSONResponse, Response, StreamingResponse
        from starlette.routing import Route

        from tunneld.core._inspector import page_routes

        agent = Agent(AgentConfig(authtoken="fake-token-0123456789"), [TunnelConfig("web", "http", "8080")])
        listing = json.dumps({"uri": "/api/requests/http", "requests": self.requests}).encode()

        async def requests(request: Request) -> Response:
            return Response(listing, media_type="application/json")

        async def one(request: Request) -> Response:
            r = self.by_id.get(request.path_params["id"])
            return JSONResponse(r) if r else JSONResponse({"msg": "not found"}, 404)

        async def tunnels(request: Request) -> Response:
            return JSONResponse({"uri": "/api/tunnels", "tunnels": []})

        async def events(request: Request) -> Response:
            async def stream() -> Any:
                yield ": fake feed\n\n"
                await trio.sleep_forever()
            return StreamingResponse(stream(), media_type="text/event-stream")

        return Starlette(routes=[
            Route("/api/requests/http", requests), Route("/api/requests/http/events", events),
            Route("/api/requests/http/{id}", one), Route("/api/tunnels", tunnels), *page_routes(agent)])

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        from hypercorn.config import Config
        from hypercorn.trio import serve

        config = Config()
        config.bind = ["127.0.0.1:0"]
        config.accesslog = None
        config.graceful_timeout = 0.5
        async with trio.open_nursery() as nursery:
            bound = await nursery.start(partial(serve, self.app(), config,
                                                shutdown_trigger=trio.sleep_forever))
            self.url = bound[0]
            task_status.started()
