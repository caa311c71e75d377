"""Who owns a public name (hostname, transport address), across reconnects and edge restarts.

A name in use belongs to the authtoken (the account) whose tunnel holds it.  When the tunnel
goes away the name is *held* for that owner for ``hold_period`` seconds: the owner's agent gets
it back when it reconnects (its Bind carries the resume token we gave it), and nobody else gets
it meanwhile.  Claims are mirrored in the store, so an edge that was killed holds every name
that was live at the time for a fresh ``hold_period`` after it starts again.

The in-memory table is authoritative; store writes are batched by :meth:`NameClaims.run` so the
claim and release paths never block (they run in ``finally`` blocks of cancelled tunnels).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import os
import secrets
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import trio

from ._errors import Code, ConfigError, TunnelRejected
from ._store import Store

log = logging.getLogger("tunneld.names")

SECRET_FILE = "edge-secret"
#: ``until`` stored for a name that is live (in use right now).
LIVE = -1.0
#: Seconds between two sweeps of expired holds (memory and store): without them an expired
#: hold stayed until its very name was asked for again (20,000 one-off names: +17 MB).
SWEEP_INTERVAL = 60.0


def load_secret(data_dir: Path) -> bytes:
    """The edge's HMAC key (``data_dir/edge-secret``, 0600), created on first use.

    Resume tokens and session cookies are signed with it, so they stay valid across restarts.
    """
    path = Path(data_dir) / SECRET_FILE
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        data = b""
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror or exc}") from None
    if len(data) >= 32:
        return data
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            data = secrets.token_bytes(32)
            f.write(data)
    except OSError as exc:
        raise ConfigError(f"cannot write {path}: {exc.strerror or exc}") from None
    return data


@attrs.frozen
class Signer:
    """Opaque, tamper-proof tokens: ``base64url(json) . base64url(hmac)``."""

    key: bytes

    def sign(self, purpose: str, *fields: str) -> str:
        body = base64.urlsafe_b64encode(json.dumps([purpose, *fields]).encode()).rstrip(b"=")
        mac = hmac.new(self.key, body, hashlib.sha256).digest()[:18]
        return (body + b"." + base64.urlsafe_b64encode(mac)).decode()

    def verify(self, purpose: str, token: str) -> list[str] | None:
        """The fields signed into ``token`` for ``purpose``, or None if it is not ours."""
        if not isinstance(token, str) or token.count(".") != 1 or len(token) > 2048:
            return None
        body, _, mac = token.encode("ascii", "replace").partition(b".")
        want = base64.urlsafe_b64encode(hmac.new(self.key, body, hashlib.sha256).digest()[:18])
        if not hmac.compare_digest(want, mac):
            return None
        try:
            data = json.loads(base64.urlsafe_b64decode(body + b"=" * (-len(body) % 4)))
        except ValueError:
            return None
        if not isinstance(data, list) or not data or data[0] != purpose:
            return None
        if not all(isinstance(x, str) for x in data):
            return None
        return data[1:]


@attrs.define
class _Claim:
    owner: str
    #: Live holders (edge tunnels); while any, the name is in use.
    holders: set[Any] = attrs.field(factory=set)
    #: When the hold ends once no holder is left (wall clock, as stored).
    until: float = 0.0


@attrs.define(eq=False)
class NameClaims:
    """Live names and held names, by ``(kind, name)``.

    Kinds are ``host``, ``port`` (TCP ports) and the name of any other transport (``udp``);
    see :func:`tunneld.core._routes.address_kind`.
    """

    store: Store | None
    hold_period: float = 60.0
    clock: Callable[[], float] = time.time
    sweep_interval: float = SWEEP_INTERVAL
    #: Called with how many holds a sweep dropped (the edge gives their memory back).
    on_swept: Callable[[int], object] | None = None
    _claims: dict[tuple[str, str], _Claim] = attrs.field(factory=dict)
    _dirty: set[tuple[str, str]] = attrs.field(factory=set)
    _wakeup: trio.Event = attrs.field(factory=trio.Event)

    def load(self) -> None:
        """Read the store: names live when the edge last stopped are held afresh."""
        if self.store is None:
            return
        now = self.clock()
        for kind, name, owner, until in self.store.all_names():
            key = (kind, name)
            if until == LIVE:
                until = now + self.hold_period
                self._dirty.add(key)
            elif until <= now:
                self._dirty.add(key)
                continue
            self._claims[key] = _Claim(owner, until=until)
        if self._claims:
            log.info("holding %d name(s) for their owners from before the restart", len(self._claims))

    def owner_of(self, kind: str, name: str) -> str | None:
        """Who ``name`` is live or held for right now (None: free)."""
        claim = self._claims.get((kind, name))
        if claim is None:
            return None
        if not claim.holders and claim.until <= self.clock():
            del self._claims[(kind, name)]
            self._mark((kind, name))
            return None
        return claim.owner

    def available(self, kind: str, name: str, owner: str) -> bool:
        """Whether ``owner`` may take ``name`` (free, expired, or already theirs)."""
        current = self.owner_of(kind, name)
        return current is None or current == owner

    def acquire(self, kind: str, name: str, owner: str, holder: Any) -> None:
        """Mark ``name`` live for ``owner``; TunnelRejected if someone else has or holds it."""
        current = self.owner_of(kind, name)
        if current is not None and current != owner:
            claim = self._claims[(kind, name)]
            if claim.holders:
                raise TunnelRejected(f"{_what(kind, name)} is already in use by another account",
                                     Code.ADDRESS_IN_USE)
            left = max(1, int(claim.until - self.clock()))
            raise TunnelRejected(f"{_what(kind, name)} is held for its previous owner for {left} more "
                                 "seconds", Code.ADDRESS_IN_USE)
        claim = self._claims.setdefault((kind, name), _Claim(owner))
        claim.holders.add(holder)
        self._mark((kind, name))

    def release(self, kind: str, name: str, holder: Any) -> None:
        """``holder`` is done with ``name``: hold it for its owner for ``hold_period``."""
        claim = self._claims.get((kind, name))
        if claim is None or holder not in claim.holders:
            return
        claim.holders.discard(holder)
        if not claim.holders:
            claim.until = self.clock() + self.hold_period
            self._mark((kind, name))

    def forget(self, kind: str, name: str, owner: str) -> None:
        """Drop ``owner``'s hold at once (an explicit Unbind: the owner let go on purpose)."""
        claim = self._claims.get((kind, name))
        if claim is not None and claim.owner == owner and not claim.holders:
            del self._claims[(kind, name)]
            self._mark((kind, name))

    def sweep(self) -> int:
        """Drop every expired hold (and, at the next write, its row); return how many."""
        now = self.clock()
        expired = [key for key, claim in self._claims.items() if not claim.holders and claim.until <= now]
        for key in expired:
            del self._claims[key]
            self._dirty.add(key)
        if expired:
            self._wakeup.set()
        return len(expired)

    def _mark(self, key: tuple[str, str]) -> None:
        self._dirty.add(key)
        self._wakeup.set()

    def _snapshot(self) -> tuple[list[tuple[str, str, str, float]], list[tuple[str, str]]]:
        upserts, deletes = [], []
        for key in self._dirty:
            claim = self._claims.get(key)
            if claim is None:
                deletes.append(key)
            else:
                upserts.append((*key, claim.owner, LIVE if claim.holders else claim.until))
        self._dirty.clear()
        return upserts, deletes

    def flush(self) -> None:
        """Write pending changes to the store now (blocking)."""
        upserts, deletes = self._snapshot()
        if self.store is not None and (upserts or deletes):
            self.store.save_names(upserts, deletes)

    async def run(self) -> None:
        """Persist changes in the background, batched, and sweep expired holds; flush once more on exit."""
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._sweeper)
                await self._writer()
        finally:
            try:
                self.flush()
            except sqlite3.Error as exc:
                # The store was closed under us (the edge's owner is tearing down).
                log.warning("could not record name holds: %s", exc)

    async def _sweeper(self) -> None:
        while True:
            await trio.sleep(self.sweep_interval)
            swept = self.sweep()
            if swept and self.on_swept is not None:
                self.on_swept(swept)
            if self.store is not None:
                try:
                    # Rows no claim in memory stands for (another edge process, an old bug).
                    swept += await trio.to_thread.run_sync(self.store.delete_expired_names, self.clock())
                except sqlite3.Error as exc:
                    log.error("could not sweep expired name holds from the store: %s", exc)
            if swept:
                log.debug("swept %d expired name hold(s)", swept)

    async def _writer(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup = trio.Event()
            # The snapshot is taken here, in Trio's thread; only the write runs in a worker.
            upserts, deletes = self._snapshot()
            if self.store is not None and (upserts or deletes):
                try:
                    await trio.to_thread.run_sync(self.store.save_names, upserts, deletes)
                except sqlite3.Error as exc:
                    # Holds still work in memory; only a restart would forget them.
                    log.error("could not record name holds in the store: %s", exc)
            # Not kept while waiting for the next change: after a crowd of agents left, the
            # last batch (their names) would pin the memory of their sessions (see README).
            del upserts, deletes
            # Coalesce bursts (many tunnels binding at once) into one transaction.
            await trio.sleep(0.01)


def _what(kind: str, name: str) -> str:
    """How messages name ``name`` of ``kind``: ``hostname a.example``, ``port 20001`` (TCP's kind),
    ``udp port 20001`` (any other transport's kind is the transport)."""
    if kind == "host":
        return f"hostname {name}"
    return f"port {name}" if kind == "port" else f"{kind} port {name}"
