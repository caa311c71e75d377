from __future__ import annotations

import re
import sqlite3
import stat
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tunneld.core._errors import ConfigError
from tunneld.core._store import SCHEMA_VERSION, Store, TokenRecord, is_token_format

from ..conftest import sqlite_memory_used


class Clock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store(tmp_path: Path, clock: Clock) -> Iterator[Store]:
    s = Store.open(tmp_path, clock=clock)
    yield s
    s.close()


def test_secret_format(store: Store) -> None:
    rec, secret = store.create_token("laptop")
    assert re.fullmatch(r"tkd_[0-9a-f]{12}_[A-Za-z0-9_-]{40}", secret)
    assert secret.startswith(f"tkd_{rec.id}_")
    assert is_token_format(secret)
    assert rec == TokenRecord(rec.id, "laptop", 1_000.0, None, None)


def test_create_verify_list_revoke(store: Store, clock: Clock) -> None:
    a, sa = store.create_token("a")
    clock.now = 1_001.0
    b, sb = store.create_token()
    assert store.list_tokens() == [a, b]

    clock.now = 2_000.0
    got = store.verify_token(sa)
    assert got == TokenRecord(a.id, "a", 1_000.0, 2_000.0, None)
    assert store.list_tokens()[0].last_used_at == 2_000.0
    assert store.list_tokens()[1].last_used_at is None

    clock.now = 3_000.0
    assert store.revoke_token(a.id) is True
    assert store.revoke_token(a.id) is False  # already revoked: revoked_at is not moved
    assert store.revoke_token("000000000000") is False
    assert store.verify_token(sa) is None
    assert store.verify_token(sb) is not None
    listed = store.list_tokens()
    assert [t.id for t in listed] == [a.id, b.id]  # soft revoke: the row stays
    assert listed[0].revoked_at == 3_000.0
    assert listed[0].last_used_at == 2_000.0  # a refused attempt does not count as use


def test_wrong_secret_with_right_id(store: Store) -> None:
    rec, secret = store.create_token()
    other = secret[:-1] + ("A" if secret[-1] != "A" else "B")
    assert is_token_format(other)
    assert store.verify_token(other) is None
    # Another token's random part under this id is refused as well.
    _, secret2 = store.create_token()
    assert store.verify_token(f"tkd_{rec.id}_{secret2[-40:]}") is None
    assert store.list_tokens()[0].last_used_at is None


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "tkd_",
        "ngrok-token",
        "tkd_0123456789ab",
        "tkd_0123456789AB_" + "a" * 40,  # id is lowercase hex
        "tkd_0123456789ab_" + "a" * 39,
        "tkd_0123456789ab_" + "a" * 41,
        "tkd_0123456789ab_" + "a" * 39 + "=",
        " tkd_0123456789ab_" + "a" * 40,
        "tkd_0123456789ab_" + "a" * 40 + "\n",
        "tkd_0123456789ab_" + "a" * 39 + "é",
    ],
)
def test_malformed(store: Store, bad: str) -> None:
    assert not is_token_format(bad)
    assert store.verify_token(bad) is None


def test_is_token_format_rejects_non_strings() -> None:
    assert not is_token_format(None)  # type: ignore[arg-type]
    assert not is_token_format(b"tkd_0123456789ab_" + b"a" * 40)  # type: ignore[arg-type]


def test_secret_never_stored(tmp_path: Path) -> None:
    s = Store.open(tmp_path)
    secrets_ = [s.create_token(f"t{i}")[1] for i in range(5)]
    for sec in secrets_:
        assert s.verify_token(sec) is not None
    s.close()  # checkpoints the WAL into the main file
    blobs = b"".join(p.read_bytes() for p in tmp_path.iterdir() if p.is_file())
    assert blobs  # we did look at something
    for sec in secrets_:
        assert sec.encode() not in blobs
        assert sec.split("_", 2)[2].encode() not in blobs  # nor the random part alone


def test_secret_not_in_wal_while_open(tmp_path: Path) -> None:
    s = Store.open(tmp_path)
    _, sec = s.create_token()
    try:
        for p in tmp_path.iterdir():
            assert sec.encode() not in p.read_bytes(), p
    finally:
        s.close()


def test_persistence_across_reopen(tmp_path: Path, clock: Clock) -> None:
    s = Store.open(tmp_path, clock=clock)
    rec, sec = s.create_token("persist")
    _, sec2 = s.create_token("revoked")
    s.revoke_token(sec2[4:16])
    s.save_names([("host", "foo.tunnel.test", "agent-1", 5_000.0)], [])
    s.close()

    s = Store.open(tmp_path, clock=clock)
    try:
        assert s.verify_token(sec) is not None
        assert s.verify_token(sec2) is None
        assert [t.description for t in s.list_tokens()] == ["persist", "revoked"]
        assert s.all_names() == [("host", "foo.tunnel.test", "agent-1", 5_000.0)]
    finally:
        s.close()


def test_db_file_and_schema(tmp_path: Path) -> None:
    data = tmp_path / "new"
    Store.open(data).close()
    db = data / "tunneld.db"
    assert stat.S_IMODE(data.stat().st_mode) & 0o077 == 0
    assert stat.S_IMODE(db.stat().st_mode) == 0o600
    conn = sqlite3.connect(db)
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        assert conn.execute("SELECT version FROM schema_version").fetchall() == [(SCHEMA_VERSION,)]
    finally:
        conn.close()


def test_newer_schema_refused(tmp_path: Path) -> None:
    Store.open(tmp_path).close()
    conn = sqlite3.connect(tmp_path / "tunneld.db")
    conn.execute("UPDATE schema_version SET version = 99")
    conn.commit()
    conn.close()
    with pytest.raises(ConfigError, match="schema version 99"):
        Store.open(tmp_path)


def test_not_a_database(tmp_path: Path) -> None:
    (tmp_path / "tunneld.db").write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(ConfigError, match="tunneld.db"):
        Store.open(tmp_path)


def test_names(store: Store) -> None:
    def names() -> dict[tuple[str, str], tuple[str, float]]:
        return {(kind, name): (owner, until) for kind, name, owner, until in store.all_names()}

    assert names() == {}
    store.save_names([("host", "a", "agent-1", 10.0), ("udp", "a", "agent-2", 20.0)], [])
    assert names() == {("host", "a"): ("agent-1", 10.0), ("udp", "a"): ("agent-2", 20.0)}  # kinds apart
    store.save_names([("host", "a", "agent-3", 30.0)], [])  # upsert
    assert names()[("host", "a")] == ("agent-3", 30.0)
    store.save_names([], [("host", "a")])
    store.save_names([], [("host", "a")])  # idempotent
    assert names() == {("udp", "a"): ("agent-2", 20.0)}


def test_threads(store: Store) -> None:
    pairs = [store.create_token(str(i)) for i in range(20)]
    errors: list[BaseException] = []

    def work(sec: str) -> None:
        try:
            for _ in range(20):
                assert store.verify_token(sec) is not None
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(sec,)) for _, sec in pairs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


async def test_from_trio_thread(store: Store) -> None:
    import trio

    rec, sec = await trio.to_thread.run_sync(store.create_token, "trio")
    assert await trio.to_thread.run_sync(store.verify_token, sec) is not None


def test_close_idempotent_and_context_manager(tmp_path: Path) -> None:
    with Store.open(tmp_path) as s:
        s.create_token()
    s.close()


@pytest.mark.skipif(sqlite_memory_used() is None, reason="sqlite3 is not a shared libsqlite3 here")
def test_release_memory_gives_back_the_page_cache(tmp_path: Path) -> None:
    memory_used = sqlite_memory_used()
    assert memory_used is not None
    with Store.open(tmp_path) as store:
        before = memory_used()
        # A crowd of agents' holds: the table grows, its pages are cached, then it empties.
        names = [("host", f"{i:06d}.tunneld.localhost") for i in range(6000)]
        store.save_names([(*key, "owner", 10.0) for key in names], [])
        store.save_names([], names)
        grown = memory_used()
        assert grown - before > 300_000
        store.release_memory()
        assert memory_used() - before < 100_000
        # The store goes on working: the cache fills again as it is read.
        store.save_names([("host", "next", "owner", -1.0)], [])
        assert [n for _, n, _, _ in store.all_names()] == ["next"]


def test_expired_rows_deleted_from_store(tmp_path: Path) -> None:
    with Store.open(tmp_path) as store:
        rows = [("host", "old", "o", 10.0), ("host", "new", "o", 30.0), ("port", "1", "o", -1.0)]
        store.save_names(rows, [])
        assert store.delete_expired_names(20.0) == 1
        assert sorted(n for _, n, _, _ in store.all_names()) == ["1", "new"]
