"""The edge's embedded SQLite store (``<data_dir>/tunneld.db``): authtokens and name reservations.

Calls are blocking; the edge runs them in ``trio.to_thread.run_sync``.  One connection is shared
by all threads and serialised with a lock (sqlite3 objects are not safe for concurrent use).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

import attrs

from ._errors import ConfigError

DB_NAME = "tunneld.db"
SCHEMA_VERSION = 1
TOKEN_PREFIX = "tkd_"

# tkd_<12 hex id>_<40 chars of token_urlsafe(30)>.  The random part may itself contain "_".
_TOKEN_RE = re.compile(r"tkd_([0-9a-f]{12})_([A-Za-z0-9_-]{40})")

_SCHEMA = """
CREATE TABLE schema_version (version INTEGER NOT NULL);
CREATE TABLE tokens (
    id TEXT PRIMARY KEY,
    digest BLOB NOT NULL,
    description TEXT NOT NULL DEFAULT '',
    created_at REAL NOT NULL,
    last_used_at REAL,
    revoked_at REAL
);
CREATE TABLE names (
    kind TEXT NOT NULL,
    name TEXT NOT NULL,
    owner TEXT NOT NULL,
    until REAL NOT NULL,
    PRIMARY KEY (kind, name)
);
"""


@attrs.frozen
class TokenRecord:
    """An authtoken as stored (never including the secret)."""

    id: str
    description: str
    created_at: float
    last_used_at: float | None
    revoked_at: float | None


def is_token_format(secret: str) -> bool:
    """Whether ``secret`` is shaped like a tunneld authtoken (says nothing about validity)."""
    return isinstance(secret, str) and _TOKEN_RE.fullmatch(secret) is not None


def _digest(secret: str) -> bytes:
    # The secrets carry 240 random bits, so a plain hash cannot be brute-forced; a slow KDF
    # (bcrypt, scrypt) only protects low-entropy passwords and would cost CPU on every auth.
    return hashlib.sha256(secret.encode("ascii")).digest()


class Store:
    """Authtokens and name reservations in SQLite.  Use :meth:`open`."""

    def __init__(self, conn: sqlite3.Connection, path: Path, clock: Callable[[], float]) -> None:
        self._conn = conn
        self._lock = threading.Lock()
        self._clock = clock
        #: Path of the database file.
        self.path = path

    @classmethod
    def open(cls, data_dir: Path, *, clock: Callable[[], float] = time.time) -> Store:
        """Open (creating if needed) ``data_dir/tunneld.db``.  ``clock`` is for tests."""
        data_dir = Path(data_dir)
        try:
            if not data_dir.is_dir():
                data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            path = data_dir / DB_NAME
            # Create the file ourselves so it is 0600 from the start; SQLite gives its -wal and
            # -shm files the same mode as the database.
            os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
        except OSError as exc:
            raise ConfigError(f"cannot create store in {data_dir}: {exc.strerror or exc}") from None
        try:
            # isolation_level=None: autocommit, with explicit BEGIN where we need a transaction.
            conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=10)
        except sqlite3.Error as exc:
            raise ConfigError(f"cannot open {path}: {exc}") from None
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            # NORMAL is durable enough in WAL mode (a power cut may lose the last commit only).
            conn.execute("PRAGMA synchronous=NORMAL")
            _migrate(conn, path)
        except BaseException as exc:
            conn.close()
            if isinstance(exc, sqlite3.DatabaseError):
                raise ConfigError(f"cannot use {path}: {exc}") from None
            raise
        return cls(conn, path, clock)

    def close(self) -> None:
        """Close the database.  Idempotent."""
        with self._lock:
            self._conn.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(
        self, t: type[BaseException] | None, v: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # -- tokens ---------------------------------------------------------------------------------

    def create_token(self, description: str = "") -> tuple[TokenRecord, str]:
        """Create a token; return its record and the secret, which is not stored and cannot be
        recovered later."""
        now = self._clock()
        with self._lock:
            while True:
                token_id = secrets.token_hex(6)
                secret = f"{TOKEN_PREFIX}{token_id}_{secrets.token_urlsafe(30)}"
                try:
                    self._conn.execute(
                        "INSERT INTO tokens (id, digest, description, created_at) VALUES (?, ?, ?, ?)",
                        (token_id, _digest(secret), description, now),
                    )
                except sqlite3.IntegrityError:
                    continue  # 48-bit id collision: astronomically rare, just draw again
                break
        return TokenRecord(token_id, description, now, None, None), secret

    def verify_token(self, secret: str) -> TokenRecord | None:
        """Return the record of a valid, unrevoked token (and note its use), else None."""
        m = _TOKEN_RE.fullmatch(secret) if isinstance(secret, str) else None
        if m is None:
            return None
        digest = _digest(secret)
        now = self._clock()
        with self._lock:
            row = self._conn.execute(
                "SELECT digest, description, created_at, revoked_at FROM tokens WHERE id = ?",
                (m.group(1),),
            ).fetchone()
            # Constant-time comparison so response timing leaks nothing about the stored digest.
            if row is None or not hmac.compare_digest(row[0], digest) or row[3] is not None:
                return None
            self._conn.execute("UPDATE tokens SET last_used_at = ? WHERE id = ?", (now, m.group(1)))
        return TokenRecord(m.group(1), row[1], row[2], now, None)

    def list_tokens(self) -> list[TokenRecord]:
        """All tokens, revoked ones included, oldest first."""
        with self._lock:
            rows = self._conn.execute(
                "SELECT id, description, created_at, last_used_at, revoked_at FROM tokens "
                "ORDER BY created_at, rowid"
            ).fetchall()
        return [TokenRecord(*row) for row in rows]

    def revoked_among(self, token_ids: list[str]) -> set[str]:
        """Which of ``token_ids`` are revoked (or no longer exist)."""
        if not token_ids:
            return set()
        with self._lock:
            marks = ",".join("?" * len(token_ids))
            rows = self._conn.execute(
                f"SELECT id FROM tokens WHERE revoked_at IS NULL AND id IN ({marks})", token_ids
            ).fetchall()
        return set(token_ids) - {row[0] for row in rows}

    def revoke_token(self, token_id: str) -> bool:
        """Revoke a token (the row stays, for auditing).  False if unknown or already revoked."""
        now = self._clock()
        with self._lock:
            cur = self._conn.execute(
                "UPDATE tokens SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL",
                (now, token_id),
            )
        return cur.rowcount > 0

    # -- name reservations ----------------------------------------------------------------------

    def remember_name(self, kind: str, name: str, owner: str, until: float) -> None:
        """Reserve ``name`` (of ``kind``, e.g. "hostname") for ``owner`` until ``until``."""
        with self._lock:
            self._conn.execute(
                "INSERT INTO names (kind, name, owner, until) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (kind, name) DO UPDATE SET owner = excluded.owner, until = excluded.until",
                (kind, name, owner, until),
            )

    def lookup_name(self, kind: str, name: str) -> tuple[str, float] | None:
        """(owner, until) of a reservation; expiry is the caller's to judge."""
        with self._lock:
            row = self._conn.execute(
                "SELECT owner, until FROM names WHERE kind = ? AND name = ?", (kind, name)
            ).fetchone()
        return None if row is None else (row[0], row[1])

    def forget_name(self, kind: str, name: str) -> None:
        """Drop a reservation (no error if there is none)."""
        with self._lock:
            self._conn.execute("DELETE FROM names WHERE kind = ? AND name = ?", (kind, name))

    def all_names(self) -> list[tuple[str, str, str, float]]:
        """Every reservation as (kind, name, owner, until)."""
        with self._lock:
            return [tuple(row) for row in self._conn.execute("SELECT kind, name, owner, until FROM names")]

    def delete_expired_names(self, now: float) -> int:
        """Drop the holds that ended before ``now`` (live names stay); return how many."""
        with self._lock:
            cur = self._conn.execute("DELETE FROM names WHERE until >= 0 AND until <= ?", (now,))
        return cur.rowcount

    def save_names(self, upserts: list[tuple[str, str, str, float]], deletes: list[tuple[str, str]]) -> None:
        """Apply a batch of reservation changes in one transaction."""
        with self._lock:
            self._conn.execute("BEGIN")
            try:
                self._conn.executemany(
                    "INSERT INTO names (kind, name, owner, until) VALUES (?, ?, ?, ?) "
                    "ON CONFLICT (kind, name) DO UPDATE SET owner = excluded.owner, until = excluded.until",
                    upserts)
                self._conn.executemany("DELETE FROM names WHERE kind = ? AND name = ?", deletes)
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise


def _migrate(conn: sqlite3.Connection, path: Path) -> None:
    conn.execute("BEGIN IMMEDIATE")  # serialise with another process opening the same file
    try:
        has_version = conn.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'schema_version'"
        ).fetchone()
        if not has_version:
            for stmt in _SCHEMA.split(";"):
                if stmt.strip():
                    conn.execute(stmt)
            conn.execute("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION,))
        else:
            (version,) = conn.execute("SELECT max(version) FROM schema_version").fetchone()
            if version is None or version > SCHEMA_VERSION:
                raise ConfigError(
                    f"{path}: schema version {version} is not supported by this tunneld "
                    f"(expects {SCHEMA_VERSION}); was it written by a newer release?"
                )
            # Future migrations from `version` to SCHEMA_VERSION go here.
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
