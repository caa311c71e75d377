"""Store v2: migration from a v1 data dir, accounts, and every resource scoped by account."""

from __future__ import annotations

import base64
import hashlib
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tunneld.core._acl import AclError
from tunneld.core._store import (
    DEFAULT_ACCOUNT,
    SCHEMA_VERSION,
    Store,
    StoreConflict,
    TokenRecord,
)

# The schema of the first release (SCHEMA_VERSION = 1), verbatim: a data dir made by it.
V1_SCHEMA = """
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
INSERT INTO schema_version (version) VALUES (1);
"""

V1_TOKENS = [
    ("0123456789ab", "tkd_0123456789ab_" + "A" * 40, "laptop", 100.0, 150.0, None),
    ("fedcba987654", "tkd_fedcba987654_" + "b-_" * 13 + "x", "old", 90.0, None, 120.0),
    ("00000000aaaa", "tkd_00000000aaaa_" + "Z" * 40, "ci", 110.0, None, None),
]
V1_NAMES = [("host", "app.tunneld.test", "0123456789ab", -1.0), ("port", "20001", "00000000aaaa", 5_000.0)]

ED25519 = "ssh-ed25519 " + base64.b64encode(
    b"\x00\x00\x00\x0bssh-ed25519\x00\x00\x00\x20" + bytes(range(32))).decode() + " alice@laptop"


def make_v1_data_dir(path: Path) -> None:
    conn = sqlite3.connect(path / "tunneld.db")
    conn.executescript(V1_SCHEMA)
    for token_id, secret, desc, created, used, revoked in V1_TOKENS:
        conn.execute("INSERT INTO tokens VALUES (?, ?, ?, ?, ?, ?)",
                     (token_id, hashlib.sha256(secret.encode()).digest(), desc, created, used, revoked))
    conn.executemany("INSERT INTO names VALUES (?, ?, ?, ?)", V1_NAMES)
    conn.commit()
    conn.close()


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store.open(tmp_path)
    yield s
    s.close()


def test_v1_data_dir_is_migrated(tmp_path: Path) -> None:
    make_v1_data_dir(tmp_path)
    with Store.open(tmp_path) as store:
        laptop = store.verify_token(V1_TOKENS[0][1])
        assert laptop is not None
        assert (laptop.id, laptop.description, laptop.account_id, laptop.acl) == \
            ("0123456789ab", "laptop", DEFAULT_ACCOUNT, ())
        assert store.verify_token(V1_TOKENS[1][1]) is None  # revoked stays revoked
        assert store.verify_token(V1_TOKENS[2][1]) is not None
        assert store.verify_token(V1_TOKENS[0][1][:-1] + "B") is None
        # Same ids, same order, same times; all in the default account.
        listed = store.list_tokens()
        assert [(t.id, t.created_at, t.revoked_at) for t in listed] == \
            [("fedcba987654", 90.0, 120.0), ("0123456789ab", 100.0, None), ("00000000aaaa", 110.0, None)]
        assert {c.id for c in store.list_credentials(DEFAULT_ACCOUNT)} == {t[0] for t in V1_TOKENS}
        assert store.get_credential(DEFAULT_ACCOUNT, "cr_0123456789ab") is not None
        assert sorted(store.all_names()) == sorted(V1_NAMES)  # holds kept
        assert store.revoked_among(["0123456789ab", "fedcba987654"]) == {"fedcba987654"}
        # New things work on the migrated file.
        rec, secret = store.create_token("new")
        assert store.verify_token(secret) == stored(rec, store)
        store.create_reserved_domain(DEFAULT_ACCOUNT, "app.example.com")
    conn = sqlite3.connect(tmp_path / "tunneld.db")
    try:
        assert conn.execute("SELECT version FROM schema_version").fetchall() == [(SCHEMA_VERSION,)]
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        assert "tokens" not in tables
        assert {"accounts", "credentials", "api_keys", "reserved_domains", "reserved_addrs",
                "ssh_credentials", "edges", "names"} <= tables
    finally:
        conn.close()
    with Store.open(tmp_path) as store:  # a second open migrates nothing
        assert len(store.list_tokens()) == 4


def stored(rec: TokenRecord, store: Store) -> TokenRecord:
    got = store.get_credential(DEFAULT_ACCOUNT, rec.id)
    assert got is not None
    return got


def test_old_token_record_shape_still_compares(store: Store) -> None:
    rec, _ = store.create_token("laptop")
    assert rec == TokenRecord(rec.id, "laptop", rec.created_at, None, None)


def test_credentials_with_acl_and_metadata(store: Store) -> None:
    acct = store.ensure_account("team").id
    rec, secret = store.create_token("dev", account_id=acct, metadata="m",
                                     acl=["bind:*.Example.COM.", "bind:k=v", "bind:k=v"])
    assert rec.acl == ("bind:*.example.com", "bind:k=v")
    assert store.token_acl(rec.id) == rec.acl
    assert store.token_acl("000000000000") is None
    verified = store.verify_token(secret)
    assert verified is not None and verified.account_id == acct and verified.acl == rec.acl
    updated = store.update_credential(acct, rec.credential_id, acl=[], description="d2")
    assert updated is not None and updated.acl == () and updated.description == "d2"
    assert updated.metadata == "m"
    with pytest.raises(AclError):
        store.update_credential(acct, rec.id, acl=["nope"])
    with pytest.raises(ValueError, match="longer than 255"):
        store.create_token("x" * 256)
    with pytest.raises(KeyError):
        store.create_token(account_id="acct_missing")


def test_delete_counts_as_revocation(store: Store) -> None:
    rec, secret = store.create_token()
    assert store.revoked_among([rec.id]) == set()
    assert store.delete_credential(DEFAULT_ACCOUNT, rec.credential_id)
    assert store.revoked_among([rec.id]) == {rec.id}
    assert store.verify_token(secret) is None
    assert not store.delete_credential(DEFAULT_ACCOUNT, rec.credential_id)


def test_api_keys_shown_once(tmp_path: Path) -> None:
    with Store.open(tmp_path) as store:
        rec, secret = store.create_api_key(DEFAULT_ACCOUNT, "ci")
        assert rec.id.startswith("ak_") and secret.startswith("tka_")
        got = store.verify_api_key(secret)
        assert got is not None and got.account_id == DEFAULT_ACCOUNT and got.last_used_at is not None
        assert store.verify_api_key(secret[:-1] + ("A" if secret[-1] != "A" else "B")) is None
        assert store.verify_api_key("tkd_" + secret[4:]) is None
        assert store.verify_api_key(None) is None  # type: ignore[arg-type]
    blob = b"".join(p.read_bytes() for p in tmp_path.iterdir() if p.is_file())
    assert secret.encode() not in blob and secret[17:].encode() not in blob


# Each resource: (create(store, account) -> id, get, update, delete).
def _resources() -> dict[str, tuple[Callable[..., Any], ...]]:
    counter = iter(range(1000))

    def mk_cred(s: Store, a: str) -> str:
        return s.create_token(account_id=a)[0].credential_id

    def mk_key(s: Store, a: str) -> str:
        return s.create_api_key(a)[0].id

    def mk_rd(s: Store, a: str) -> str:
        return s.create_reserved_domain(a, f"d{next(counter)}.example.com").id

    def mk_ra(s: Store, a: str) -> str:
        return s.create_reserved_addr(a, f"tcp.example.com:{20000 + next(counter)}").id

    def mk_ssh(s: Store, a: str) -> str:
        n = next(counter)
        key = "ssh-ed25519 " + base64.b64encode(
            b"\x00\x00\x00\x0bssh-ed25519\x00\x00\x00\x20" + bytes([n]) * 32).decode()
        return s.create_ssh_credential(a, key).id

    def mk_edge(s: Store, a: str) -> str:
        return s.create_edge(a, "https", hostname=f"e{next(counter)}.example.com").id

    return {
        "credential": (mk_cred, Store.get_credential, Store.update_credential, Store.delete_credential,
                       Store.list_credentials),
        "api_key": (mk_key, Store.get_api_key, Store.update_api_key, Store.delete_api_key,
                    Store.list_api_keys),
        "reserved_domain": (mk_rd, Store.get_reserved_domain, Store.update_reserved_domain,
                            Store.delete_reserved_domain, Store.list_reserved_domains),
        "reserved_addr": (mk_ra, Store.get_reserved_addr, Store.update_reserved_addr,
                          Store.delete_reserved_addr, Store.list_reserved_addrs),
        "ssh_credential": (mk_ssh, Store.get_ssh_credential, Store.update_ssh_credential,
                           Store.delete_ssh_credential, Store.list_ssh_credentials),
        "edge": (mk_edge, Store.get_edge, Store.update_edge, Store.delete_edge, Store.list_edges),
    }


@pytest.mark.parametrize("kind", list(_resources()))
def test_every_resource_is_scoped_by_account(store: Store, kind: str) -> None:
    create, get, update, delete, list_ = _resources()[kind]
    mine = store.ensure_account("mine").id
    theirs = store.ensure_account("theirs").id
    rid = create(store, mine)
    other = create(store, theirs)
    assert get(store, mine, rid) is not None
    # Another account sees nothing, changes nothing, deletes nothing.
    assert get(store, theirs, rid) is None
    assert update(store, theirs, rid, description="pwned") is None
    assert not delete(store, theirs, rid)
    assert rid not in {r.credential_id if kind == "credential" else r.id for r in list_(store, theirs)}
    assert list_(store, theirs, before_id=rid) == []
    got = update(store, mine, rid, description="mine")
    assert got is not None and got.description == "mine"
    assert get(store, theirs, other) is not None
    assert delete(store, mine, rid)
    assert get(store, mine, rid) is None


def test_pagination_newest_first(store: Store) -> None:
    ids = [store.create_reserved_addr(DEFAULT_ACCOUNT, f"10.0.0.1:{p}").id for p in range(1, 8)]
    page1 = store.list_reserved_addrs(DEFAULT_ACCOUNT, limit=3)
    assert [r.id for r in page1] == ids[::-1][:3]
    page2 = store.list_reserved_addrs(DEFAULT_ACCOUNT, limit=3, before_id=page1[-1].id)
    assert [r.id for r in page2] == ids[::-1][3:6]
    page3 = store.list_reserved_addrs(DEFAULT_ACCOUNT, limit=3, before_id=page2[-1].id)
    assert [r.id for r in page3] == ids[:1]


def test_unique_values_conflict_across_accounts(store: Store) -> None:
    other = store.ensure_account("other").id
    store.create_reserved_domain(DEFAULT_ACCOUNT, "App.Example.com.")
    with pytest.raises(StoreConflict):
        store.create_reserved_domain(other, "app.example.com")
    assert store.domain_reservation("APP.example.com").account_id == DEFAULT_ACCOUNT  # type: ignore[union-attr]
    assert store.domain_reservation("x.app.example.com") is None
    wild = store.create_reserved_domain(other, "*.Wild.example.com")
    for covered in ("a.wild.example.com", "a.b.wild.example.com", "*.wild.example.com"):
        assert store.domain_reservation(covered) == wild
    assert store.domain_reservation("wild.example.com") is None
    assert store.domain_reservation("bad..name") is None
    store.create_reserved_addr(DEFAULT_ACCOUNT, "1.2.3.4:22")
    with pytest.raises(StoreConflict):
        store.create_reserved_addr(other, "1.2.3.4:22")
    store.create_ssh_credential(DEFAULT_ACCOUNT, ED25519)
    with pytest.raises(StoreConflict):
        store.create_ssh_credential(other, ED25519.rsplit(" ", 1)[0] + " another-comment")
    found = store.ssh_credential_for_key(ED25519)
    assert found is not None and found.public_key == ED25519.rsplit(" ", 1)[0]


@pytest.mark.parametrize("call", [
    lambda s: s.create_reserved_domain(DEFAULT_ACCOUNT, "bad..name"),
    lambda s: s.create_reserved_domain(DEFAULT_ACCOUNT, "a b.com"),
    lambda s: s.create_reserved_addr(DEFAULT_ACCOUNT, "host:0"),
    lambda s: s.create_reserved_addr(DEFAULT_ACCOUNT, "host"),
    lambda s: s.create_ssh_credential(DEFAULT_ACCOUNT, "ssh-ed25519 notbase64!"),
    lambda s: s.create_ssh_credential(DEFAULT_ACCOUNT, "ssh-rsa " + ED25519.split()[1]),
    lambda s: s.create_edge(DEFAULT_ACCOUNT, "http", hostname="a.com"),
    lambda s: s.create_edge(DEFAULT_ACCOUNT, "tcp", hostname="a.com"),
    lambda s: s.create_edge(DEFAULT_ACCOUNT, "https", hostname="a.com", labels={"a=b": "c"}),
    lambda s: s.create_edge(DEFAULT_ACCOUNT, "tls", addr="a.com:1"),
    lambda s: s.create_api_key(DEFAULT_ACCOUNT, metadata="x" * 4097),
    lambda s: s.ensure_account("bad name"),
])
def test_bad_values_refused(store: Store, call: Callable[[Store], object]) -> None:
    with pytest.raises(ValueError):
        call(store)


def test_edges(store: Store) -> None:
    e = store.create_edge(DEFAULT_ACCOUNT, "https", hostname="App.example.com")
    assert e.id.startswith("edghts_") and e.labels == {"edge": e.id} and e.hostname == "app.example.com"
    t = store.create_edge(DEFAULT_ACCOUNT, "tcp", addr="1.2.3.4:5000", labels={"app": "db"})
    assert t.id.startswith("edgtcp_") and t.labels == {"app": "db"}
    assert [x.id for x in store.list_edges(DEFAULT_ACCOUNT, "tcp")] == [t.id]
    assert store.get_edge(DEFAULT_ACCOUNT, t.id, "https") is None
    updated = store.update_edge(DEFAULT_ACCOUNT, t.id, labels={"app": "db", "v": "2"})
    assert updated is not None and updated.labels == {"app": "db", "v": "2"}
    assert {x.id for x in store.all_edges()} == {e.id, t.id}
