"""The edge's embedded SQLite store (``<data_dir>/tunneld.db``): accounts, credentials and names.

Calls are blocking; the edge runs them in ``trio.to_thread.run_sync``.  One connection is shared
by all threads and serialised with a lock (sqlite3 objects are not safe for concurrent use).

Everything the admin API manages belongs to an account, and every getter, list, update and
delete of it takes the account's id: a row of another account is "not found", never shown.
Authtokens are the credentials (``cr_<token id>`` in the API); an authtoken's id is the 12 hex
digits inside it, which name holds and ``--allow-hostname HOST=TOKEN_ID`` refer to.  Secrets
(authtokens, API keys) are returned once, by create, and stored as SHA-256 digests.

Schema history: v1 (tokens, names); v2 (accounts; tokens became the default account's
credentials; API keys, reserved domains and addresses, SSH credentials, edges).  A database of
any older version is migrated on open, in one transaction.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import re
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import attrs

from ._acl import AclError, normalize_addr, normalize_hostname, normalize_rules, validate_label
from ._errors import ConfigError, TunneldError

DB_NAME = "tunneld.db"
SCHEMA_VERSION = 2
TOKEN_PREFIX = "tkd_"
API_KEY_PREFIX = "tka_"
#: The account that authtokens from ``tunneld edge token create`` (and from v1) belong to.
DEFAULT_ACCOUNT = "default"
#: ngrok's caps on a resource's free-text fields.
MAX_DESCRIPTION = 255
MAX_METADATA = 4096

# tkd_<12 hex id>_<40 chars of token_urlsafe(30)>.  The random part may itself contain "_".
_TOKEN_RE = re.compile(r"tkd_([0-9a-f]{12})_([A-Za-z0-9_-]{40})")
# API keys: the same shape under their own prefix (id ak_<12 hex>).
_API_KEY_RE = re.compile(r"tka_([0-9a-f]{12})_([A-Za-z0-9_-]{40})")

# Version 1 (the first release), kept verbatim: a new database is made as v1 and migrated,
# so that the path every existing data dir takes is the one always exercised.
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


# v1 → v2.  Tokens keep their ids (and rowid order) as the default account's credentials.
_MIGRATE_2 = """
CREATE TABLE accounts (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    created_at REAL NOT NULL
);
INSERT INTO accounts (id, name, created_at)
    VALUES ('default', 'default', CAST(strftime('%s', 'now') AS REAL));
CREATE TABLE credentials (
    id TEXT PRIMARY KEY,
    account_id TEXT NOT NULL REFERENCES accounts (id),
    digest BLOB NOT NULL,
    description TEXT NOT NULL DEFAULT '',
    metadata TEXT NOT NULL DEFAULT '',
    acl TEXT NOT NULL DEFAULT '[]',
    created_at REAL NOT NULL,
    last_used_at REAL,
    revoked_at REAL
);
INSERT INTO credentials (id, account_id, digest, description, created_at, last_used_at, revoked_at)
    SELECT id, 'default', digest, description, created_at, last_used_at, revoked_at
    FROM tokens ORDER BY rowid;
DROP TABLE tokens;
CREATE TABLE api_keys (
    id TEXT PRIMARY KEY,
    account_id TEXT NOT NULL REFERENCES accounts (id),
    digest BLOB NOT NULL,
    description TEXT NOT NULL DEFAULT '',
    metadata TEXT NOT NULL DEFAULT '',
    created_at REAL NOT NULL,
    last_used_at REAL
);
CREATE TABLE reserved_domains (
    id TEXT PRIMARY KEY,
    account_id TEXT NOT NULL REFERENCES accounts (id),
    domain TEXT NOT NULL UNIQUE,
    description TEXT NOT NULL DEFAULT '',
    metadata TEXT NOT NULL DEFAULT '',
    created_at REAL NOT NULL
);
CREATE TABLE reserved_addrs (
    id TEXT PRIMARY KEY,
    account_id TEXT NOT NULL REFERENCES accounts (id),
    addr TEXT NOT NULL UNIQUE,
    description TEXT NOT NULL DEFAULT '',
    metadata TEXT NOT NULL DEFAULT '',
    created_at REAL NOT NULL
);
CREATE TABLE ssh_credentials (
    id TEXT PRIMARY KEY,
    account_id TEXT NOT NULL REFERENCES accounts (id),
    public_key TEXT NOT NULL UNIQUE,
    description TEXT NOT NULL DEFAULT '',
    metadata TEXT NOT NULL DEFAULT '',
    acl TEXT NOT NULL DEFAULT '[]',
    created_at REAL NOT NULL
);
CREATE TABLE edges (
    id TEXT PRIMARY KEY,
    account_id TEXT NOT NULL REFERENCES accounts (id),
    proto TEXT NOT NULL,
    hostname TEXT NOT NULL DEFAULT '',
    addr TEXT NOT NULL DEFAULT '',
    labels TEXT NOT NULL DEFAULT '{}',
    description TEXT NOT NULL DEFAULT '',
    metadata TEXT NOT NULL DEFAULT '',
    created_at REAL NOT NULL
);
UPDATE schema_version SET version = 2;
"""

#: Migration scripts: version → the script taking a database from version - 1 to it.
_MIGRATIONS = {2: _MIGRATE_2}


class StoreConflict(TunneldError):
    """A unique value (reserved domain or address, SSH key, account name) is taken."""


@attrs.frozen
class TokenRecord:
    """An authtoken (a credential) as stored, never including the secret.

    ``id`` is the token id (12 hex digits, inside the token); the API calls it ``cr_<id>``.
    """

    id: str
    description: str
    created_at: float
    last_used_at: float | None
    revoked_at: float | None
    account_id: str = DEFAULT_ACCOUNT
    metadata: str = ""
    #: ``bind:`` rules (``tunneld.core._acl``); empty = unrestricted.
    acl: tuple[str, ...] = ()

    @property
    def credential_id(self) -> str:
        return "cr_" + self.id


#: Credentials are authtoken records.
CredentialRecord = TokenRecord


@attrs.frozen
class AccountRecord:
    id: str
    name: str
    created_at: float


@attrs.frozen
class ApiKeyRecord:
    id: str
    account_id: str
    description: str
    metadata: str
    created_at: float
    last_used_at: float | None


@attrs.frozen
class ReservedDomain:
    id: str
    account_id: str
    domain: str
    description: str
    metadata: str
    created_at: float


@attrs.frozen
class ReservedAddr:
    id: str
    account_id: str
    addr: str
    description: str
    metadata: str
    created_at: float


@attrs.frozen
class SshCredential:
    id: str
    account_id: str
    #: ``TYPE BASE64`` (the comment is dropped: the same key is the same credential).
    public_key: str
    description: str
    metadata: str
    acl: tuple[str, ...]
    created_at: float


@attrs.frozen
class EdgeRecord:
    """An edge (ngrok's ``edghts_``/``edgtcp_``/``edgtls_``) and its tunnel-group backend's labels."""

    id: str
    account_id: str
    #: ``https``, ``tcp`` or ``tls``.
    proto: str
    #: https and tls edges: their hostname; tcp edges: "".
    hostname: str
    #: tcp edges: their ``host:port``; others: "".
    addr: str
    #: The tunnel-group backend's selector: labeled tunnels with all of these labels serve it.
    labels: Mapping[str, str]
    description: str
    metadata: str
    created_at: float


_R = TypeVar("_R")

#: Edge protos and their id prefixes (ngrok's).
EDGE_PREFIXES = {"https": "edghts_", "tcp": "edgtcp_", "tls": "edgtls_"}
_SSH_KEY_TYPES = frozenset({
    "ssh-ed25519", "ssh-rsa", "ecdsa-sha2-nistp256", "ecdsa-sha2-nistp384", "ecdsa-sha2-nistp521",
    "sk-ssh-ed25519@openssh.com", "sk-ecdsa-sha2-nistp256@openssh.com",
})


def _text(what: str, value: object, limit: int) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{what} must be a string")
    if len(value) > limit:
        raise ValueError(f"{what} is longer than {limit} characters")
    if "\x00" in value:
        raise ValueError(f"{what} contains a NUL character")
    return value


def normalize_public_key(text: str) -> str:
    """An OpenSSH public key line as ``TYPE BASE64`` (comment dropped); ValueError if malformed."""
    if not isinstance(text, str):
        raise ValueError("public_key must be a string")
    parts = text.split()
    if len(parts) < 2 or parts[0] not in _SSH_KEY_TYPES:
        raise ValueError("public_key: expected an OpenSSH public key line (ssh-ed25519 AAAA... comment)")
    try:
        blob = base64.b64decode(parts[1], validate=True)
    except ValueError:
        raise ValueError("public_key: the key is not valid base64") from None
    # The blob starts with its own type as an SSH string: it must agree with the line's.
    n = int.from_bytes(blob[:4], "big") if len(blob) >= 4 else -1
    if n != len(parts[0]) or blob[4:4 + n] != parts[0].encode() or len(blob) < 4 + n + 16:
        raise ValueError("public_key: the key data does not match its type")
    return f"{parts[0]} {parts[1]}"


def _labels(labels: Mapping[str, str]) -> dict[str, str]:
    if not isinstance(labels, Mapping):
        raise ValueError("labels must be an object of key: value strings")
    if len(labels) > 64:
        raise ValueError("at most 64 labels")
    for key, value in labels.items():
        validate_label(key, value)
    return dict(labels)


def is_token_format(secret: str) -> bool:
    """Whether ``secret`` is shaped like a tunneld authtoken (says nothing about validity)."""
    return isinstance(secret, str) and _TOKEN_RE.fullmatch(secret) is not None


def _bare(value: str, prefix: str) -> str:
    return value[len(prefix):] if isinstance(value, str) and value.startswith(prefix) else value


def _columns(cls: type) -> str:
    return ", ".join(f.name for f in attrs.fields(cls))


def _record(cls: type[_R], row: tuple[Any, ...]) -> _R:
    """A record from a row in field order, its JSON columns (acl, labels) decoded."""
    values = list(row)
    for i, field in enumerate(attrs.fields(cls)):  # type: ignore[arg-type]
        if field.name == "acl":
            values[i] = tuple(json.loads(values[i]))
        elif field.name == "labels":
            values[i] = json.loads(values[i])
    return cls(*values)


def _digest(secret: str) -> bytes:
    # The secrets carry 240 random bits, so a plain hash cannot be brute-forced; a slow KDF
    # (bcrypt, scrypt) only protects low-entropy passwords and would cost CPU on every auth.
    return hashlib.sha256(secret.encode("ascii")).digest()


class Store:
    """Accounts, credentials, reservations, edges and name holds in SQLite.  Use :meth:`open`."""

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

    # -- tokens (the credentials of the API) -----------------------------------------------------

    def create_token(self, description: str = "", *, account_id: str = DEFAULT_ACCOUNT, metadata: str = "",
                     acl: Iterable[str] = ()) -> tuple[TokenRecord, str]:
        """Create a token; return its record and the secret, which is not stored and cannot be
        recovered later.  ValueError (AclError) for a bad field, KeyError for an unknown account."""
        description = _text("description", description, MAX_DESCRIPTION)
        metadata = _text("metadata", metadata, MAX_METADATA)
        rules = normalize_rules(acl)
        now = self._clock()
        with self._lock:
            self._require_account(account_id)
            while True:
                token_id = secrets.token_hex(6)
                secret = f"{TOKEN_PREFIX}{token_id}_{secrets.token_urlsafe(30)}"
                try:
                    self._conn.execute(
                        "INSERT INTO credentials (id, account_id, digest, description, metadata, acl, "
                        "created_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                        (token_id, account_id, _digest(secret), description, metadata, json.dumps(rules),
                         now),
                    )
                except sqlite3.IntegrityError:
                    continue  # 48-bit id collision: astronomically rare, just draw again
                break
        return TokenRecord(token_id, description, now, None, None, account_id, metadata, rules), secret

    _TOKEN_COLUMNS = "id, description, created_at, last_used_at, revoked_at, account_id, metadata, acl"

    @staticmethod
    def _token(row: tuple[Any, ...]) -> TokenRecord:
        token_id, description, created, used, revoked, account, metadata, acl = row
        return TokenRecord(token_id, description, created, used, revoked, account, metadata,
                           tuple(json.loads(acl)))

    def verify_token(self, secret: str) -> TokenRecord | None:
        """Return the record of a valid, unrevoked token (and note its use), else None."""
        m = _TOKEN_RE.fullmatch(secret) if isinstance(secret, str) else None
        if m is None:
            return None
        digest = _digest(secret)
        now = self._clock()
        with self._lock:
            row = self._conn.execute(
                f"SELECT digest, {self._TOKEN_COLUMNS} FROM credentials WHERE id = ?", (m.group(1),),
            ).fetchone()
            # Constant-time comparison so response timing leaks nothing about the stored digest.
            if row is None or not hmac.compare_digest(row[0], digest) or row[5] is not None:
                return None
            self._conn.execute("UPDATE credentials SET last_used_at = ? WHERE id = ?", (now, m.group(1)))
        return attrs.evolve(self._token(row[1:]), last_used_at=now)

    def list_tokens(self) -> list[TokenRecord]:
        """All tokens of every account, revoked ones included, oldest first."""
        with self._lock:
            rows = self._conn.execute(
                f"SELECT {self._TOKEN_COLUMNS} FROM credentials ORDER BY created_at, rowid"
            ).fetchall()
        return [self._token(row) for row in rows]

    def token_acl(self, token_id: str) -> tuple[str, ...] | None:
        """The ``bind:`` rules of an authtoken (empty: unrestricted), None if it is unknown.

        For the edge's bind path: ``_acl.allows_bind(store.token_acl(session.token_id), kind, name)``
        (read at bind time, so an ACL updated through the API applies to the next bind).
        """
        with self._lock:
            row = self._conn.execute("SELECT acl FROM credentials WHERE id = ?", (token_id,)).fetchone()
        return None if row is None else tuple(json.loads(row[0]))

    def token_rights(self, token_id: str) -> tuple[str, tuple[str, ...]] | None:
        """``(account id, ACL)`` of an authtoken, None if it is unknown (deleted) or revoked."""
        with self._lock:
            row = self._conn.execute(
                "SELECT account_id, acl FROM credentials WHERE id = ? AND revoked_at IS NULL", (token_id,)
            ).fetchone()
        return None if row is None else (row[0], tuple(json.loads(row[1])))

    def reservations(self) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
        """Every account's ``(domain, account id)`` and ``(host:port, account id)`` reservations:
        the edge's bind path checks each claim against them (``_bindpolicy``)."""
        with self._lock:
            domains = self._conn.execute("SELECT domain, account_id FROM reserved_domains").fetchall()
            addrs = self._conn.execute("SELECT addr, account_id FROM reserved_addrs").fetchall()
        return [(d, a) for d, a in domains], [(d, a) for d, a in addrs]

    def revoked_among(self, token_ids: list[str]) -> set[str]:
        """Which of ``token_ids`` are revoked or no longer exist (deleted through the API)."""
        if not token_ids:
            return set()
        with self._lock:
            marks = ",".join("?" * len(token_ids))
            rows = self._conn.execute(
                f"SELECT id FROM credentials WHERE revoked_at IS NULL AND id IN ({marks})", token_ids
            ).fetchall()
        return set(token_ids) - {row[0] for row in rows}

    def revoke_token(self, token_id: str) -> bool:
        """Revoke a token (the row stays, for auditing).  False if unknown or already revoked."""
        now = self._clock()
        with self._lock:
            cur = self._conn.execute(
                "UPDATE credentials SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL",
                (now, token_id),
            )
        return cur.rowcount > 0

    # -- credentials, account-scoped (the admin API's /credentials) ------------------------------

    def get_credential(self, account_id: str, credential_id: str) -> TokenRecord | None:
        """A credential of ``account_id`` by id (``cr_<token id>`` or the bare token id)."""
        with self._lock:
            row = self._conn.execute(
                f"SELECT {self._TOKEN_COLUMNS} FROM credentials WHERE id = ? AND account_id = ?",
                (_bare(credential_id, "cr_"), account_id),
            ).fetchone()
        return None if row is None else self._token(row)

    def list_credentials(self, account_id: str, *, limit: int = 100, before_id: str | None = None
                         ) -> list[TokenRecord]:
        """``account_id``'s credentials, newest first, at most ``limit``, older than ``before_id``."""
        rows = self._page("credentials", self._TOKEN_COLUMNS, account_id, limit,
                          _bare(before_id, "cr_") if before_id else None)
        return [self._token(row) for row in rows]

    def update_credential(self, account_id: str, credential_id: str, *, description: str | None = None,
                          metadata: str | None = None, acl: Iterable[str] | None = None
                          ) -> TokenRecord | None:
        """Change the given fields; the new record, or None if there is no such credential."""
        values: dict[str, Any] = {}
        if description is not None:
            values["description"] = _text("description", description, MAX_DESCRIPTION)
        if metadata is not None:
            values["metadata"] = _text("metadata", metadata, MAX_METADATA)
        if acl is not None:
            values["acl"] = json.dumps(normalize_rules(acl))
        if not self._update("credentials", account_id, _bare(credential_id, "cr_"), values):
            return None
        return self.get_credential(account_id, credential_id)

    def delete_credential(self, account_id: str, credential_id: str) -> bool:
        """Delete a credential: its agents are disconnected within seconds (see :meth:`revoked_among`)."""
        return self._delete("credentials", account_id, _bare(credential_id, "cr_"))

    def credential_ids(self, account_id: str) -> set[str]:
        """Token ids of every credential of ``account_id`` (to find its live sessions)."""
        with self._lock:
            rows = self._conn.execute("SELECT id FROM credentials WHERE account_id = ?",
                                      (account_id,)).fetchall()
        return {row[0] for row in rows}

    # -- accounts ----------------------------------------------------------------------------------

    def ensure_account(self, name: str) -> AccountRecord:
        """The account called ``name``, created if needed (``default`` always exists)."""
        name = _text("account name", name, 64)
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
            raise ValueError(f"account name {name!r}: letters, digits, _ . - (a letter or digit first)")
        with self._lock:
            row = self._conn.execute("SELECT id, name, created_at FROM accounts WHERE name = ?",
                                     (name,)).fetchone()
            if row is not None:
                return AccountRecord(*row)
            record = AccountRecord("acct_" + secrets.token_hex(8), name, self._clock())
            self._conn.execute("INSERT INTO accounts (id, name, created_at) VALUES (?, ?, ?)",
                               attrs.astuple(record))
        return record

    def list_accounts(self) -> list[AccountRecord]:
        with self._lock:
            rows = self._conn.execute("SELECT id, name, created_at FROM accounts ORDER BY rowid").fetchall()
        return [AccountRecord(*row) for row in rows]

    # -- API keys --------------------------------------------------------------------------------

    def create_api_key(self, account_id: str, description: str = "", metadata: str = ""
                       ) -> tuple[ApiKeyRecord, str]:
        """Create an API key; return its record and the secret (shown once, stored as a digest)."""
        description = _text("description", description, MAX_DESCRIPTION)
        metadata = _text("metadata", metadata, MAX_METADATA)
        now = self._clock()
        with self._lock:
            self._require_account(account_id)
            while True:
                hex_id = secrets.token_hex(6)
                secret = f"{API_KEY_PREFIX}{hex_id}_{secrets.token_urlsafe(30)}"
                try:
                    self._conn.execute(
                        "INSERT INTO api_keys (id, account_id, digest, description, metadata, created_at) "
                        "VALUES (?, ?, ?, ?, ?, ?)",
                        ("ak_" + hex_id, account_id, _digest(secret), description, metadata, now))
                except sqlite3.IntegrityError:
                    continue
                break
        return ApiKeyRecord("ak_" + hex_id, account_id, description, metadata, now, None), secret

    def verify_api_key(self, secret: str) -> ApiKeyRecord | None:
        """The record of a valid API key (its ``account_id`` is what the caller may see), else None."""
        m = _API_KEY_RE.fullmatch(secret) if isinstance(secret, str) else None
        if m is None:
            return None
        digest = _digest(secret)
        key_id = "ak_" + m.group(1)
        now = self._clock()
        with self._lock:
            row = self._conn.execute(f"SELECT digest, {_columns(ApiKeyRecord)} FROM api_keys WHERE id = ?",
                                     (key_id,)).fetchone()
            if row is None or not hmac.compare_digest(row[0], digest):
                return None
            self._conn.execute("UPDATE api_keys SET last_used_at = ? WHERE id = ?", (now, key_id))
        return attrs.evolve(ApiKeyRecord(*row[1:]), last_used_at=now)

    def get_api_key(self, account_id: str, key_id: str) -> ApiKeyRecord | None:
        return self._get(ApiKeyRecord, "api_keys", account_id, key_id)

    def list_api_keys(self, account_id: str, *, limit: int = 100, before_id: str | None = None
                      ) -> list[ApiKeyRecord]:
        return self._list(ApiKeyRecord, "api_keys", account_id, limit, before_id)

    def update_api_key(self, account_id: str, key_id: str, *, description: str | None = None,
                       metadata: str | None = None) -> ApiKeyRecord | None:
        return self._update_fields(ApiKeyRecord, "api_keys", account_id, key_id, description, metadata, {})

    def delete_api_key(self, account_id: str, key_id: str) -> bool:
        return self._delete("api_keys", account_id, key_id)

    # -- reserved domains and addresses ------------------------------------------------------------

    def create_reserved_domain(self, account_id: str, domain: str, description: str = "",
                               metadata: str = "") -> ReservedDomain:
        """Reserve a hostname (``*.example.com`` too) for ``account_id``; StoreConflict if taken."""
        record = ReservedDomain("rd_" + secrets.token_hex(8), account_id,
                                normalize_hostname(domain, wildcard=True),
                                _text("description", description, MAX_DESCRIPTION),
                                _text("metadata", metadata, MAX_METADATA), self._clock())
        self._insert("reserved_domains", record, f"domain {record.domain} is already reserved")
        return record

    def get_reserved_domain(self, account_id: str, rd_id: str) -> ReservedDomain | None:
        return self._get(ReservedDomain, "reserved_domains", account_id, rd_id)

    def list_reserved_domains(self, account_id: str, *, limit: int = 100, before_id: str | None = None
                              ) -> list[ReservedDomain]:
        return self._list(ReservedDomain, "reserved_domains", account_id, limit, before_id)

    def update_reserved_domain(self, account_id: str, rd_id: str, *, description: str | None = None,
                               metadata: str | None = None) -> ReservedDomain | None:
        return self._update_fields(ReservedDomain, "reserved_domains", account_id, rd_id, description,
                                   metadata, {})

    def delete_reserved_domain(self, account_id: str, rd_id: str) -> bool:
        return self._delete("reserved_domains", account_id, rd_id)

    def domain_reservation(self, domain: str) -> ReservedDomain | None:
        """The reservation covering ``domain``, for the edge's bind path: the name itself, else the
        nearest wildcard above it (``*.example.com`` covers ``a.example.com`` and ``a.b.example.com``,
        as a ``bind:*.example.com`` rule does).  None if nobody reserved it."""
        try:
            domain = normalize_hostname(domain, wildcard=True)
        except AclError:
            return None
        labels = domain.split(".")
        candidates = [domain] + ["*." + ".".join(labels[i:]) for i in range(1, len(labels))]
        with self._lock:
            for name in candidates:
                row = self._conn.execute(
                    f"SELECT {_columns(ReservedDomain)} FROM reserved_domains WHERE domain = ?", (name,)
                ).fetchone()
                if row is not None:
                    return ReservedDomain(*row)
        return None

    def create_reserved_addr(self, account_id: str, addr: str, description: str = "",
                             metadata: str = "") -> ReservedAddr:
        """Reserve a TCP ``host:port`` for ``account_id``; StoreConflict if taken."""
        record = ReservedAddr("ra_" + secrets.token_hex(8), account_id, normalize_addr(addr),
                              _text("description", description, MAX_DESCRIPTION),
                              _text("metadata", metadata, MAX_METADATA), self._clock())
        self._insert("reserved_addrs", record, f"address {record.addr} is already reserved")
        return record

    def get_reserved_addr(self, account_id: str, ra_id: str) -> ReservedAddr | None:
        return self._get(ReservedAddr, "reserved_addrs", account_id, ra_id)

    def list_reserved_addrs(self, account_id: str, *, limit: int = 100, before_id: str | None = None
                            ) -> list[ReservedAddr]:
        return self._list(ReservedAddr, "reserved_addrs", account_id, limit, before_id)

    def update_reserved_addr(self, account_id: str, ra_id: str, *, description: str | None = None,
                             metadata: str | None = None) -> ReservedAddr | None:
        return self._update_fields(ReservedAddr, "reserved_addrs", account_id, ra_id, description,
                                   metadata, {})

    def delete_reserved_addr(self, account_id: str, ra_id: str) -> bool:
        return self._delete("reserved_addrs", account_id, ra_id)

    def addr_reservation(self, addr: str) -> ReservedAddr | None:
        """Who reserved the TCP address ``host:port``: for the edge's bind path."""
        try:
            addr = normalize_addr(addr)
        except AclError:
            return None
        with self._lock:
            row = self._conn.execute(f"SELECT {_columns(ReservedAddr)} FROM reserved_addrs WHERE addr = ?",
                                     (addr,)).fetchone()
        return None if row is None else ReservedAddr(*row)

    # -- SSH credentials -------------------------------------------------------------------------

    def create_ssh_credential(self, account_id: str, public_key: str, description: str = "",
                              metadata: str = "", acl: Iterable[str] = ()) -> SshCredential:
        """Register an SSH public key for the gateway; StoreConflict if the key is registered."""
        record = SshCredential("sshc_" + secrets.token_hex(8), account_id, normalize_public_key(public_key),
                               _text("description", description, MAX_DESCRIPTION),
                               _text("metadata", metadata, MAX_METADATA), normalize_rules(acl), self._clock())
        self._insert("ssh_credentials", record, "this public key is already registered")
        return record

    def get_ssh_credential(self, account_id: str, sshc_id: str) -> SshCredential | None:
        return self._get(SshCredential, "ssh_credentials", account_id, sshc_id)

    def list_ssh_credentials(self, account_id: str, *, limit: int = 100, before_id: str | None = None
                             ) -> list[SshCredential]:
        return self._list(SshCredential, "ssh_credentials", account_id, limit, before_id)

    def update_ssh_credential(self, account_id: str, sshc_id: str, *, description: str | None = None,
                              metadata: str | None = None, acl: Iterable[str] | None = None
                              ) -> SshCredential | None:
        extra = {} if acl is None else {"acl": json.dumps(normalize_rules(acl))}
        return self._update_fields(SshCredential, "ssh_credentials", account_id, sshc_id, description,
                                   metadata, extra)

    def delete_ssh_credential(self, account_id: str, sshc_id: str) -> bool:
        return self._delete("ssh_credentials", account_id, sshc_id)

    def ssh_credential_for_key(self, public_key: str) -> SshCredential | None:
        """The registered credential of an SSH key (any account): for the gateway's login."""
        try:
            key = normalize_public_key(public_key)
        except ValueError:
            return None
        with self._lock:
            row = self._conn.execute(
                f"SELECT {_columns(SshCredential)} FROM ssh_credentials WHERE public_key = ?", (key,)
            ).fetchone()
        return None if row is None else _record(SshCredential, row)

    # -- edges -------------------------------------------------------------------------------------

    def create_edge(self, account_id: str, proto: str, *, hostname: str = "", addr: str = "",
                    labels: Mapping[str, str] | None = None, description: str = "",
                    metadata: str = "") -> EdgeRecord:
        """An https/tls edge (``hostname``) or tcp edge (``addr``) with its backend's label selector.

        Without ``labels`` the selector is ``edge=<its id>``, as ngrok's dashboard makes it.
        """
        if proto not in EDGE_PREFIXES:
            raise ValueError(f"proto must be one of {', '.join(EDGE_PREFIXES)}")
        if proto == "tcp":
            if hostname:
                raise ValueError("a tcp edge has an addr, not a hostname")
            addr, hostname = normalize_addr(addr), ""
        else:
            if addr:
                raise ValueError(f"an {proto} edge has a hostname, not an addr")
            hostname, addr = normalize_hostname(hostname), ""
        edge_id = EDGE_PREFIXES[proto] + secrets.token_hex(8)
        record = EdgeRecord(edge_id, account_id, proto, hostname, addr,
                            _labels(labels) if labels else {"edge": edge_id},
                            _text("description", description, MAX_DESCRIPTION),
                            _text("metadata", metadata, MAX_METADATA), self._clock())
        self._insert("edges", record, "")
        return record

    def get_edge(self, account_id: str, edge_id: str, proto: str | None = None) -> EdgeRecord | None:
        """An edge by id (of ``proto``, when given)."""
        record = self._get(EdgeRecord, "edges", account_id, edge_id)
        return None if record is None or (proto is not None and record.proto != proto) else record

    def list_edges(self, account_id: str, proto: str | None = None, *, limit: int = 100,
                   before_id: str | None = None) -> list[EdgeRecord]:
        where = "" if proto is None else " AND proto = ?"
        rows = self._page("edges", _columns(EdgeRecord), account_id, limit, before_id, where,
                          () if proto is None else (proto,))
        return [_record(EdgeRecord, row) for row in rows]

    def update_edge(self, account_id: str, edge_id: str, *, description: str | None = None,
                    metadata: str | None = None, labels: Mapping[str, str] | None = None
                    ) -> EdgeRecord | None:
        extra = {} if labels is None else {"labels": json.dumps(_labels(labels))}
        if labels is not None and not labels:
            raise ValueError("an edge's backend needs at least one label")
        return self._update_fields(EdgeRecord, "edges", account_id, edge_id, description, metadata, extra)

    def delete_edge(self, account_id: str, edge_id: str) -> bool:
        return self._delete("edges", account_id, edge_id)

    def all_edges(self) -> list[EdgeRecord]:
        """Every edge of every account: for the edge's label routing."""
        with self._lock:
            rows = self._conn.execute(f"SELECT {_columns(EdgeRecord)} FROM edges ORDER BY rowid").fetchall()
        return [_record(EdgeRecord, row) for row in rows]

    # -- generic, account-scoped row access -------------------------------------------------------

    def _require_account(self, account_id: str) -> None:
        # Called with the lock held.
        if self._conn.execute("SELECT 1 FROM accounts WHERE id = ?", (account_id,)).fetchone() is None:
            raise KeyError(f"no account {account_id!r}")

    def _insert(self, table: str, record: Any, conflict: str) -> None:
        names = [f.name for f in attrs.fields(type(record))]
        values = [json.dumps(list(v) if isinstance(v, tuple) else dict(v)) if isinstance(v, (tuple, Mapping))
                  else v for v in attrs.astuple(record, recurse=False)]
        with self._lock:
            self._require_account(record.account_id)
            try:
                self._conn.execute(f"INSERT INTO {table} ({', '.join(names)}) VALUES "
                                   f"({', '.join('?' * len(names))})", values)
            except sqlite3.IntegrityError:
                raise StoreConflict(conflict or f"{record.id} exists") from None

    def _page(self, table: str, columns: str, account_id: str, limit: int, before_id: str | None,
              where: str = "", args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        # Newest first (rowid order: ids are random); before_id names the last row of the previous
        # page.  An unknown before_id (or another account's) gives an empty page, never an error.
        limit = max(1, min(int(limit), 1000))
        if before_id is None:
            sql = f"SELECT {columns} FROM {table} WHERE account_id = ?{where} ORDER BY rowid DESC LIMIT ?"
            params: tuple[Any, ...] = (account_id, *args, limit)
        else:
            sql = (f"SELECT {columns} FROM {table} WHERE account_id = ?{where} AND rowid < "
                   f"(SELECT rowid FROM {table} WHERE id = ? AND account_id = ?) ORDER BY rowid DESC LIMIT ?")
            params = (account_id, *args, before_id, account_id, limit)
        with self._lock:
            return self._conn.execute(sql, params).fetchall()

    def _get(self, cls: type[_R], table: str, account_id: str, row_id: str) -> _R | None:
        with self._lock:
            row = self._conn.execute(f"SELECT {_columns(cls)} FROM {table} WHERE id = ? AND account_id = ?",
                                     (row_id, account_id)).fetchone()
        return None if row is None else _record(cls, row)

    def _list(self, cls: type[_R], table: str, account_id: str, limit: int,
              before_id: str | None) -> list[_R]:
        return [_record(cls, row) for row in self._page(table, _columns(cls), account_id, limit, before_id)]

    def _update(self, table: str, account_id: str, row_id: str, values: dict[str, Any]) -> bool:
        with self._lock:
            if not values:
                found = self._conn.execute(f"SELECT 1 FROM {table} WHERE id = ? AND account_id = ?",
                                           (row_id, account_id)).fetchone()
                return found is not None
            sets = ", ".join(f"{name} = ?" for name in values)
            cur = self._conn.execute(f"UPDATE {table} SET {sets} WHERE id = ? AND account_id = ?",
                                     (*values.values(), row_id, account_id))
        return cur.rowcount > 0

    def _update_fields(self, cls: type[_R], table: str, account_id: str, row_id: str, description: str | None,
                       metadata: str | None, extra: dict[str, Any]) -> _R | None:
        values = dict(extra)
        if description is not None:
            values["description"] = _text("description", description, MAX_DESCRIPTION)
        if metadata is not None:
            values["metadata"] = _text("metadata", metadata, MAX_METADATA)
        if not self._update(table, account_id, row_id, values):
            return None
        return self._get(cls, table, account_id, row_id)

    def _delete(self, table: str, account_id: str, row_id: str) -> bool:
        with self._lock:
            cur = self._conn.execute(f"DELETE FROM {table} WHERE id = ? AND account_id = ?",
                                     (row_id, account_id))
        return cur.rowcount > 0

    # -- name reservations ----------------------------------------------------------------------

    def all_names(self) -> list[tuple[str, str, str, float]]:
        """Every reservation as (kind, name, owner, until)."""
        with self._lock:
            return [tuple(row) for row in self._conn.execute("SELECT kind, name, owner, until FROM names")]

    def delete_expired_names(self, now: float) -> int:
        """Drop the holds that ended before ``now`` (live names stay); return how many."""
        with self._lock:
            cur = self._conn.execute("DELETE FROM names WHERE until >= 0 AND until <= ?", (now,))
        return cur.rowcount

    def release_memory(self) -> None:
        """Give back SQLite's page cache (``PRAGMA shrink_memory``); it fills again as needed.

        The cache grows with the ``names`` table: 6,000 agents that came and went left their
        holds there for a minute, and once the sweep had emptied it the cache still held
        +650 KiB.
        """
        with self._lock:
            self._conn.execute("PRAGMA shrink_memory")

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
            conn.execute("INSERT INTO schema_version (version) VALUES (1)")
        (version,) = conn.execute("SELECT max(version) FROM schema_version").fetchone()
        if version is None or version > SCHEMA_VERSION:
            raise ConfigError(
                f"{path}: schema version {version} is not supported by this tunneld "
                f"(expects {SCHEMA_VERSION}); was it written by a newer release?"
            )
        for target in range(version + 1, SCHEMA_VERSION + 1):
            for stmt in _MIGRATIONS[target].split(";"):
                if stmt.strip():
                    conn.execute(stmt)
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
