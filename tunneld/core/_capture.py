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

When the exchange ends the agent's :class:`CaptureStore` packs it into one ``bytes``, keeps
the newest entries within ``limit`` bytes in all (ngrok's ``inspect_db_size``), evicting the
oldest first, and wakes the live feeds (server-sent events of the local API).  A
:class:`CapturedExchange` is made, and its heads parsed, only when someone asks.
"""

from __future__ import annotations

import base64
import bisect
import collections
import contextvars
import datetime
import http
import itertools
import secrets
import struct
import time
from collections.abc import Iterator
from typing import Any, NamedTuple, final

import attrs
import trio

#: ngrok's ``inspect_db_size`` default.
DEFAULT_DB_SIZE = 50_000_000
#: Body bytes kept per message; the rest is counted and the message marked truncated.
BODY_CAP = 1024 * 1024
#: Bytes charged per entry besides its heads and bodies: its packed header and the objects
#: holding it (tracemalloc: ~190, ~245 with an address string of its own).
ENTRY_OVERHEAD = 256
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


#: How the store keeps an entry: one ``bytes`` holding this header, then the request head, the
#: kept request body, the response head and the kept response body, back to back.  The header
#: is the entry's number (its id's counter), wall-clock start, duration in ns, the request
#: head's length, the request body's kept and real sizes, the response head's length (-1: no
#: response), the response body's kept and real sizes.  Beside it the store keeps the tunnel's
#: name, the client's address and ``replay_of``.  Two heap objects per entry, neither seen by the
#: garbage collector for long (kept as objects, 50 MB of small captures made every full
#: collection longer and cost the relay ~40 µs per request, measured), and ~190 bytes besides
#: the heads and bodies where a row of thirteen fields took ~550.  In a loop, packing and
#: filing cost what filing the row did (~2.2 µs per exchange); in the running agent, with the
#: recorder's other changes, inspection went from ~10 to ~5 µs per request (README).
_HEADER = struct.Struct("<QdqQQQqQQ")
_NUMBER = struct.Struct("<Q")
#: A kept entry: the packed exchange, the tunnel's name, the client's address (the edge's
#: string, shared by the connection's requests), ``replay_of``.
_Entry = tuple[bytes, str, str, "str | None"]


def _entry_charge(blob: bytes) -> int:
    return ENTRY_OVERHEAD + len(blob) - _HEADER.size


def _number(entry: _Entry) -> int:
    number: int = _NUMBER.unpack_from(entry[0])[0]
    return number


@final
class CapturedExchange:
    """One finished HTTP exchange of an inspected tunnel (not to be changed once made).

    Made only when the API or a live feed asks (the store keeps entries packed); a plain
    slotted class, since a listing makes one per entry.
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

    @classmethod
    def unpack(cls, entry_id: str, entry: _Entry) -> CapturedExchange:
        """The exchange packed in ``entry`` (a store entry), with id ``entry_id``."""
        blob, name, client_addr, replay_of = entry
        (_number, start, duration, req_head, req_kept, req_size, resp_head, resp_kept,
         resp_size) = _HEADER.unpack_from(blob)
        ends = itertools.accumulate((req_head, req_kept, max(resp_head, 0), resp_kept), initial=_HEADER.size)
        pieces = [blob[a:b] for a, b in itertools.pairwise(ends)]
        request = CapturedMessage(pieces[0], pieces[1], req_size)
        response = CapturedMessage(pieces[2], pieces[3], resp_size) if resp_head >= 0 else None
        return cls(entry_id, name, _client_host(client_addr), start, duration, request, response, replay_of)

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
    piece fits (a small body is never copied before it is packed); :meth:`finish` has the store
    pack and file it.  Not thread-safe, and not meant to be: one relay task drives it.
    """

    __slots__ = ("_store", "tunnel_name", "client_addr", "_head", "replay_of", "_start", "_t0",
                 "_cap", "_req_parts", "_req_kept", "_req_size", "_resp_head", "_resp_parts",
                 "_resp_kept", "_resp_size", "number", "duration_ns")

    def __init__(self, store: CaptureStore, tunnel_name: str, client_addr: str, head: bytes,
                 replay_of: str | None = None) -> None:
        self._store = store
        self.tunnel_name = tunnel_name
        #: As the edge gave it (host and port): the API shows the host only.
        self.client_addr = client_addr
        self._head = head
        self.replay_of = replay_of
        self._start = time.time()
        self._t0 = time.monotonic_ns()
        self._cap = store.body_cap
        self._req_parts: list[bytes] | None = None
        self._req_kept = 0
        self._req_size = 0
        #: The response head's length; -1 until one is given.
        self._resp_head = -1
        #: The head as given (with any body bytes after it), then body pieces.
        self._resp_parts: list[bytes] | None = None
        self._resp_kept = 0
        self._resp_size = 0
        #: The entry's number once filed (0 before).
        self.number = 0
        self.duration_ns = 0

    def request_body(self, data: bytes) -> None:
        """Bytes of the request body, as framed (chunk lines included)."""
        room = self._cap - self._req_kept
        if room > 0:
            part = bytes(data[:room] if len(data) > room else data)
            if self._req_parts is None:
                self._req_parts = [part]
            else:
                self._req_parts.append(part)
            self._req_kept += len(part)
        self._req_size += len(data)

    def response_head(self, head: bytes) -> None:
        """The final response head as sent to the client; bytes past the head count as body.

        Called again (a retry, or an error page after a failed attempt), it starts the
        response afresh.
        """
        end = head.find(b"\r\n\r\n") + 4
        body = len(head) - end if end >= 4 else 0
        self._resp_head = len(head) - body
        self._resp_size = body
        if body > self._cap:
            head = head[:len(head) - body + self._cap]
            body = self._cap
        self._resp_parts = [head]
        self._resp_kept = body

    def response_body(self, data: bytes) -> None:
        """Bytes of the response body, as framed."""
        room = self._cap - self._resp_kept
        if room > 0 and self._resp_parts is not None:
            part = bytes(data[:room] if len(data) > room else data)
            self._resp_parts.append(part)
            self._resp_kept += len(part)
        self._resp_size += len(data)

    def finish(self) -> None:
        """File the exchange in the store (once: later calls do nothing); see :attr:`id`."""
        if not self.number:
            self.duration_ns = time.monotonic_ns() - self._t0
            self._store.file(self)

    @property
    def id(self) -> str | None:
        """The entry's id once filed (None before); the entry may since have been evicted."""
        return self._store.entry_id(self.number) if self.number else None

    def pack(self) -> bytes:
        """The exchange in the store's packed form (see :data:`_HEADER`)."""
        parts = [_HEADER.pack(self.number, self._start, self.duration_ns, len(self._head), self._req_kept,
                              self._req_size, self._resp_head, self._resp_kept, self._resp_size),
                 self._head]
        if self._req_parts is not None:
            parts += self._req_parts
        if self._resp_parts is not None:
            parts += self._resp_parts
        return b"".join(parts)


@attrs.frozen
class CaptureEvent:
    """What a live feed receives: ``kind`` "request" (with the entry) or "clear"."""

    kind: str
    entry: CapturedExchange | None = None


class CaptureStore:
    """The agent's captured exchanges: newest kept within ``limit`` bytes, oldest evicted first.

    Entries are kept packed (:data:`_HEADER`), in a deque in the order they were filed, and
    made into :class:`CapturedExchange` objects only when asked for.  A small GET costs ~190
    bytes besides its heads and body this way, against ~550 as a row of its fields.
    """

    def __init__(self, limit: int = DEFAULT_DB_SIZE, body_cap: int = BODY_CAP) -> None:
        if limit < 0 or body_cap < 0:
            raise ValueError("capture limits must not be negative")
        #: Total bytes the entries may hold; 0 disables capture.
        self.limit = limit
        self.body_cap = body_cap
        #: Bytes charged for the entries kept.
        self.size = 0
        self._entries: collections.deque[_Entry] = collections.deque()
        self._feeds: set[trio.MemorySendChannel[CaptureEvent]] = set()
        #: ngrok's ids are 16 hex digits: 8 random per agent run, then a counter.
        self._prefix = secrets.token_hex(4)
        self._counter = 0

    @property
    def enabled(self) -> bool:
        return self.limit > 0

    def __len__(self) -> int:
        return len(self._entries)

    def entry_id(self, number: int) -> str:
        """The id of entry number ``number``."""
        return f"{self._prefix}{number & 0xFFFFFFFF:08x}"

    def recorder(self, tunnel_name: str, client_addr: str, head: bytes) -> HttpRecorder | None:
        """A recorder for one request with head ``head``; None when capture is disabled."""
        if not self.limit:
            return None
        return HttpRecorder(self, tunnel_name, client_addr, head, REPLAY_OF.get())

    def file(self, recorder: HttpRecorder) -> None:
        """Number, pack and keep a finished recorder's exchange (dropped if it alone exceeds
        the bound), evict the oldest beyond the bound, and notify the feeds."""
        self._counter += 1
        recorder.number = self._counter
        blob = recorder.pack()
        charge = _entry_charge(blob)
        limit = self.limit
        if charge <= limit:
            kept = self._entries
            kept.append((blob, recorder.tunnel_name, recorder.client_addr, recorder.replay_of))
            size = self.size + charge
            while size > limit:
                size -= _entry_charge(kept.popleft()[0])
            self.size = size
            if self._feeds:
                self._publish(CaptureEvent("request", self._unpack(kept[-1])))

    def _unpack(self, entry: _Entry) -> CapturedExchange:
        return CapturedExchange.unpack(self.entry_id(_number(entry)), entry)

    def get(self, entry_id: str) -> CapturedExchange | None:
        kept = self._entries
        if len(entry_id) != 16 or not entry_id.startswith(self._prefix) or not kept:
            return None
        try:
            low = int(entry_id[8:], 16)
        except ValueError:
            return None
        # Ids show a number's low 32 bits; the kept ones span far fewer than 2**32.
        first = _number(kept[0])
        number = first + ((low - first) & 0xFFFFFFFF)
        if self.entry_id(number) != entry_id:
            return None  # not as this store writes ids ("0000_0AB", " +00ab"): no such entry
        # Numbers go up by one per entry, except where one too large to keep was dropped.
        at = min(number - first, len(kept) - 1)
        if _number(kept[at]) != number:
            at = bisect.bisect_left(kept, number, key=_number)
            if at == len(kept) or _number(kept[at]) != number:
                return None
        return self._unpack(kept[at])

    def newest(self, limit: int | None = None, tunnel_name: str | None = None) -> Iterator[CapturedExchange]:
        """Entries newest first, only ``tunnel_name``'s if given, at most ``limit``."""
        n = 0
        for entry in reversed(self._entries):
            if limit is not None and n >= limit:
                return
            if tunnel_name is None or entry[1] == tunnel_name:
                n += 1
                yield self._unpack(entry)

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
