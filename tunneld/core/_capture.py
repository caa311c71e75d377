"""Request capture for the local inspector: a bounded in-memory record of HTTP exchanges.

Theory of operation
-------------------
The agent side of an HTTP tunnel asks its tunnel context for an :class:`HttpRecorder` per
request (``AgentTunnelContext.record_http``); None when the tunnel is not inspected, and then
nothing at all is done.  The relay hands the recorder the request head as received, and the
request body, response head and response body as they stream by
(:class:`tunneld.http1.ExchangeTap`).  Each message keeps at most ``body_cap`` bytes of body:
past that the recorder only counts, so a 1 GiB upload costs one copy of the first MiB and an
integer addition per 256 KiB chunk.

When the exchange ends the recorder files a frozen :class:`CapturedExchange` in the agent's
:class:`CaptureStore`, which keeps the newest entries within ``limit`` bytes in all (ngrok's
``inspect_db_size``), evicting the oldest first, and wakes the live feeds (server-sent events
of the local API).  Heads are parsed for the API lazily, when someone asks.
"""

from __future__ import annotations

import base64
import collections
import contextvars
import datetime
import http
import secrets
import time
from collections.abc import Iterator
from typing import Any, NamedTuple, final

import attrs
import trio

#: ngrok's ``inspect_db_size`` default.
DEFAULT_DB_SIZE = 50_000_000
#: Body bytes kept per message; the rest is counted and the message marked truncated.
BODY_CAP = 1024 * 1024
#: Bytes charged per entry besides its heads and bodies (the objects holding them).
ENTRY_OVERHEAD = 512
#: Events a live feed may fall behind by before it is dropped (the browser reconnects).
FEED_BUFFER = 256

#: Set while a replay runs (in the replaying task): the id of the entry being replayed, so the
#: new capture is marked ``replay_of``.  A context variable, because the replay goes through the
#: tunnel type's own handler, which knows nothing of replays.
REPLAY_OF: contextvars.ContextVar[str | None] = contextvars.ContextVar("tunneld_replay_of", default=None)


def db_size(configured: int) -> int:
    """The store's byte bound for ``AgentConfig.inspect_db_size`` (already resolved: 0 means off).

    The config file's ngrok spellings (``0``: 50 MB, ``-1``: off) are resolved by the loader.
    """
    return max(0, configured)


class CapturedMessage(NamedTuple):
    """One side of an exchange as captured: its head and the first ``body_cap`` bytes of body.

    A tuple: cheap to make on the relay's path, and of no concern to the garbage collector.
    """

    head: bytes
    body: bytes
    #: The body's real size in bytes (as framed on the wire, chunk lines included).
    body_size: int

    @property
    def truncated(self) -> bool:
        return self.body_size > len(self.body)

    @property
    def raw(self) -> bytes:
        return self.head + self.body


def _canonical(name: str) -> str:
    # Go's CanonicalMIMEHeaderKey, as ngrok's JSON shows header names: content-type → Content-Type.
    return "-".join(part[:1].upper() + part[1:].lower() for part in name.split("-"))


def parse_head(head: bytes) -> tuple[list[str], dict[str, list[str]]]:
    """The start line's three parts and the headers (canonical names → values) of a head.

    Heads reach the store only after the relay parsed them strictly, so this only splits.
    """
    lines = head.decode("latin-1").split("\r\n")
    start = lines[0].split(" ", 2)
    start += [""] * (3 - len(start))
    headers: dict[str, list[str]] = {}
    for line in lines[1:]:
        if not line:
            continue
        name, _, value = line.partition(":")
        headers.setdefault(_canonical(name.strip()), []).append(value.strip())
    return start, headers


def _rfc3339(t: float) -> str:
    return datetime.datetime.fromtimestamp(t).astimezone().isoformat(timespec="milliseconds")


#: How the store keeps an entry: a plain tuple of strings, bytes and numbers (id, tunnel name,
#: remote address, start, duration in ns, request head, body, body size, response head or None,
#: body, body size, replay_of, size charged).  CPython stops tracking such tuples in the garbage
#: collector, so 50 MB of small captures do not make every full collection longer: kept as
#: objects, they cost the relay ~40 µs per request at 50 MB (measured), as tuples a few.
_Row = tuple[str, str, str, float, int, bytes, bytes, int, "bytes | None", bytes, int, "str | None", int]


@final
class CapturedExchange:
    """One finished HTTP exchange of an inspected tunnel (not to be changed once made).

    A plain slotted class rather than an attrs one: one is made per request on the relay's
    path, where a frozen attrs ``__init__`` costs several times more.
    """

    __slots__ = ("id", "tunnel_name", "remote_addr", "start", "duration_ns", "request", "response",
                 "replay_of", "size")

    def __init__(self, id: str, tunnel_name: str, remote_addr: str, start: float, duration_ns: int,
                 request: CapturedMessage, response: CapturedMessage | None,
                 replay_of: str | None = None) -> None:
        self.id = id
        self.tunnel_name = tunnel_name
        #: The public client's address, host only (as ngrok shows it).
        self.remote_addr = remote_addr
        #: Wall-clock start (seconds since the epoch).
        self.start = start
        self.duration_ns = duration_ns
        self.request = request
        #: None when no response came (the public client went away, the upstream broke).
        self.response = response
        self.replay_of = replay_of
        #: Bytes charged against the store's bound.
        self.size = ENTRY_OVERHEAD + len(request.head) + len(request.body) + (
            len(response.head) + len(response.body) if response is not None else 0)

    def __repr__(self) -> str:
        return f"<CapturedExchange {self.id} {self.tunnel_name!r}>"

    def row(self) -> _Row:
        """The entry as the store keeps it (see :data:`_Row`)."""
        resp = self.response
        return (self.id, self.tunnel_name, self.remote_addr, self.start, self.duration_ns,
                self.request.head, self.request.body, self.request.body_size,
                resp.head if resp is not None else None, resp.body if resp is not None else b"",
                resp.body_size if resp is not None else 0, self.replay_of, self.size)

    @classmethod
    def from_row(cls, row: _Row) -> CapturedExchange:
        (id_, name, addr, start, duration, req_head, req_body, req_size, resp_head, resp_body,
         resp_size, replay_of, _size) = row
        response = CapturedMessage(resp_head, resp_body, resp_size) if resp_head is not None else None
        return cls(id_, name, addr, start, duration, CapturedMessage(req_head, req_body, req_size),
                   response, replay_of)


    def as_json(self) -> dict[str, Any]:
        """ngrok's captured-request object, plus ``replay_of``, ``body_size`` and ``truncated``."""
        (method, target, proto), req_headers = parse_head(self.request.head)
        response: dict[str, Any] | None = None
        if self.response is not None:
            (rproto, code, reason), resp_headers = parse_head(self.response.head)
            if not reason and code.isdigit():
                # An empty reason on the wire (h11 servers send none): show the standard one.
                try:
                    reason = http.HTTPStatus(int(code)).phrase
                except ValueError:
                    pass
            response = {
                "status": f"{code} {reason}".rstrip(),
                "status_code": int(code) if code.isdigit() else 0,
                "proto": rproto,
                "headers": resp_headers,
                "raw": base64.b64encode(self.response.raw).decode("ascii"),
                "body_size": self.response.body_size,
                "truncated": self.response.truncated,
            }
        return {
            "uri": f"/api/requests/http/{self.id}",
            "id": self.id,
            "tunnel_name": self.tunnel_name,
            "remote_addr": self.remote_addr,
            "start": _rfc3339(self.start),
            "duration": self.duration_ns,
            "request": {
                "method": method,
                "proto": proto,
                "headers": req_headers,
                "uri": target,
                "raw": base64.b64encode(self.request.raw).decode("ascii"),
                "body_size": self.request.body_size,
                "truncated": self.request.truncated,
            },
            "response": response,
            "replay_of": self.replay_of,
        }


def _client_host(client_addr: str) -> str:
    """``203.0.113.9:5123`` → ``203.0.113.9``; ``[::1]:80`` → ``::1``."""
    host, sep, port = client_addr.rpartition(":")
    if not sep or not port.isdigit():
        return client_addr
    return host.strip("[]")


class HttpRecorder:
    """Records one exchange as the relay streams it (a :class:`tunneld.http1.ExchangeTap`).

    Each ``*_body`` call keeps only what still fits under the cap, by reference when the whole
    piece fits (a small body is never copied: ``b"".join`` of one part is that part);
    :meth:`finish` files the entry.  Not thread-safe, and not meant to be: one relay task
    drives it.
    """

    __slots__ = ("_store", "_tunnel_name", "_remote_addr", "_head", "_replay_of", "_start",
                 "_t0", "_cap", "_req_parts", "_req_kept", "_req_size", "_resp_head", "_resp_parts",
                 "_resp_kept", "_resp_size", "_done")

    def __init__(self, store: CaptureStore, tunnel_name: str, client_addr: str, head: bytes,
                 replay_of: str | None = None) -> None:
        self._store = store
        self._tunnel_name = tunnel_name
        self._remote_addr = _client_host(client_addr)
        self._head = head
        self._replay_of = replay_of
        self._start = time.time()
        self._t0 = time.monotonic()
        self._cap = store.body_cap
        self._req_parts: list[bytes] = []
        self._req_kept = 0
        self._req_size = 0
        self._resp_head: bytes | None = None
        self._resp_parts: list[bytes] = []
        self._resp_kept = 0
        self._resp_size = 0
        self._done = False

    def request_body(self, data: bytes) -> None:
        """Bytes of the request body, as framed (chunk lines included)."""
        room = self._cap - self._req_kept
        if room > 0:
            part = bytes(data[:room] if len(data) > room else data)
            self._req_parts.append(part)
            self._req_kept += len(part)
        self._req_size += len(data)

    def response_head(self, head: bytes) -> None:
        """The final response head as sent to the client; bytes past the head count as body.

        Called again (a retry, or an error page after a failed attempt), it starts the
        response afresh.
        """
        end = head.find(b"\r\n\r\n")
        self._resp_parts = []
        self._resp_kept = 0
        self._resp_size = 0
        if end < 0 or end + 4 == len(head):
            self._resp_head = head
            return
        self._resp_head = head[:end + 4]
        self.response_body(head[end + 4:])

    def response_body(self, data: bytes) -> None:
        """Bytes of the response body, as framed."""
        room = self._cap - self._resp_kept
        if room > 0:
            part = bytes(data[:room] if len(data) > room else data)
            self._resp_parts.append(part)
            self._resp_kept += len(part)
        self._resp_size += len(data)

    def finish(self) -> str | None:
        """File the exchange in the store; returns its id (None if already filed)."""
        if self._done:
            return None
        self._done = True
        store = self._store
        req_body = b"".join(self._req_parts)
        resp_head = self._resp_head
        resp_body = b"".join(self._resp_parts)
        size = ENTRY_OVERHEAD + len(self._head) + len(req_body) + (
            len(resp_head) + len(resp_body) if resp_head is not None else 0)
        entry_id = store.new_id()
        store.add_row((entry_id, self._tunnel_name, self._remote_addr, self._start,
                       int((time.monotonic() - self._t0) * 1e9), self._head, req_body, self._req_size,
                       resp_head, resp_body, self._resp_size, self._replay_of, size))
        return entry_id


@attrs.frozen
class CaptureEvent:
    """What a live feed receives: ``kind`` "request" (with the entry) or "clear"."""

    kind: str
    entry: CapturedExchange | None = None


class CaptureStore:
    """The agent's captured exchanges: newest kept within ``limit`` bytes, oldest evicted first."""

    def __init__(self, limit: int = DEFAULT_DB_SIZE, body_cap: int = BODY_CAP) -> None:
        if limit < 0 or body_cap < 0:
            raise ValueError("capture limits must not be negative")
        #: Total bytes the entries may hold; 0 disables capture.
        self.limit = limit
        self.body_cap = body_cap
        self.size = 0
        self._entries: collections.OrderedDict[str, _Row] = collections.OrderedDict()
        self._feeds: set[trio.MemorySendChannel[CaptureEvent]] = set()
        #: ngrok's ids are 16 hex digits: 8 random per agent run, then a counter.
        self._prefix = secrets.token_hex(4)
        self._counter = 0

    @property
    def enabled(self) -> bool:
        return self.limit > 0

    def __len__(self) -> int:
        return len(self._entries)

    def new_id(self) -> str:
        self._counter += 1
        return f"{self._prefix}{self._counter & 0xFFFFFFFF:08x}"

    def recorder(self, tunnel_name: str, client_addr: str, head: bytes) -> HttpRecorder | None:
        """A recorder for one request with head ``head``; None when capture is disabled."""
        if not self.enabled:
            return None
        return HttpRecorder(self, tunnel_name, client_addr, head, REPLAY_OF.get())

    def add(self, entry: CapturedExchange) -> None:
        """File ``entry`` (dropped if it alone exceeds the bound), evict, and notify the feeds."""
        self.add_row(entry.row())

    def add_row(self, row: _Row) -> None:
        """:meth:`add` for an entry already in the store's form (the recorders' fast path)."""
        size = row[-1]
        if size > self.limit:
            return
        self._entries[row[0]] = row
        self.size += size
        while self.size > self.limit:
            _, old = self._entries.popitem(last=False)
            self.size -= old[-1]
        if self._feeds:
            self._publish(CaptureEvent("request", CapturedExchange.from_row(row)))

    def get(self, entry_id: str) -> CapturedExchange | None:
        row = self._entries.get(entry_id)
        return CapturedExchange.from_row(row) if row is not None else None

    def newest(self, limit: int | None = None, tunnel_name: str | None = None) -> Iterator[CapturedExchange]:
        """Entries newest first, only ``tunnel_name``'s if given, at most ``limit``."""
        n = 0
        for row in reversed(self._entries.values()):
            if limit is not None and n >= limit:
                return
            if tunnel_name is None or row[1] == tunnel_name:
                n += 1
                yield CapturedExchange.from_row(row)

    def clear(self) -> None:
        self._entries.clear()
        self.size = 0
        self._publish(CaptureEvent("clear"))

    def subscribe(self) -> trio.MemoryReceiveChannel[CaptureEvent]:
        """A live feed of events; it is closed if its reader falls FEED_BUFFER events behind."""
        send, receive = trio.open_memory_channel[CaptureEvent](FEED_BUFFER)
        self._feeds.add(send)
        return receive

    def _publish(self, event: CaptureEvent) -> None:
        for feed in list(self._feeds):
            try:
                feed.send_nowait(event)
            except (trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
                # Too slow, or its reader left: drop it (an EventSource reconnects by itself).
                self._feeds.discard(feed)
                feed.close()
