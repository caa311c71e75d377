"""``tunneld edge api-key create|list|revoke``: the admin API's keys, straight from the store.

The first key has to come from somewhere the API does not guard: the operator's shell on the
edge's machine, like ``tunneld edge token create``.  The key is printed once, alone on stdout.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import click

from ._store_cli import open_store


def _fmt(t: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if t else "-"


@click.group("api-key")
def api_key() -> None:
    """Manage admin API keys (stored hashed; shown once).

    \b
    Examples:
      tunneld edge api-key create --description ci
      tunneld edge api-key list
    """


@api_key.command("create")
@click.option("--data-dir", type=click.Path(path_type=Path), default=None)
@click.option("--description", default="", help="A note to recognise the key by.")
@click.option("--account", default="default", show_default=True,
              help="The account the key manages (created if new); 'default' owns the tokens of "
              "`tunneld edge token`.")
@click.pass_context
def api_key_create(ctx: click.Context, data_dir: Path | None, description: str, account: str) -> None:
    """Create an API key and print it (the only time it is shown).

    \b
    Example:
      tunneld edge api-key create --data-dir /var/lib/tunneld --description ci
    """
    store = open_store(ctx, data_dir)
    try:
        acct = store.ensure_account(account)
        record, secret = store.create_api_key(acct.id, description)
    except ValueError as exc:
        click.echo(f"tunneld: error: {exc}", err=True)
        sys.exit(1)
    finally:
        store.close()
    click.echo(secret)
    click.echo(f"api key id {record.id} (account {acct.name}): store it now, it cannot be shown again",
               err=True)


@api_key.command("list")
@click.option("--data-dir", type=click.Path(path_type=Path), default=None)
@click.pass_context
def api_key_list(ctx: click.Context, data_dir: Path | None) -> None:
    """List API keys of every account (ids and notes; never the secrets).

    \b
    Example:
      tunneld edge api-key list --data-dir /var/lib/tunneld
    """
    store = open_store(ctx, data_dir)
    try:
        click.echo(f"{'ID':<16} {'ACCOUNT':<12} {'CREATED':<20} {'LAST USED':<20} DESCRIPTION")
        for acct in store.list_accounts():
            for rec in reversed(store.list_api_keys(acct.id, limit=1000)):
                click.echo(f"{rec.id:<16} {acct.name:<12} {_fmt(rec.created_at):<20} "
                           f"{_fmt(rec.last_used_at):<20} {rec.description}")
    finally:
        store.close()


@api_key.command("revoke")
@click.argument("key_id")
@click.option("--data-dir", type=click.Path(path_type=Path), default=None)
@click.pass_context
def api_key_revoke(ctx: click.Context, key_id: str, data_dir: Path | None) -> None:
    """Delete an API key by id; requests with it are refused from now on.

    \b
    Example:
      tunneld edge api-key revoke ak_3f9a0c1d2e4b
    """
    store = open_store(ctx, data_dir)
    try:
        done = any(store.delete_api_key(acct.id, key_id) for acct in store.list_accounts())
    finally:
        store.close()
    if not done:
        click.echo(f"tunneld: error: no API key with id {key_id!r}", err=True)
        sys.exit(1)
    click.echo(f"revoked {key_id}")
