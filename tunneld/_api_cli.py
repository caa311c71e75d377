"""``tunneld api RESOURCE VERB``: a client for the edge's admin API (ngrok's ``ngrok api``).

Prints the response's JSON on stdout; on an error, exits non-zero with the message (and the
error's code) on stderr.  The stdlib's urllib does the HTTP: no client library needed.
"""

from __future__ import annotations

import json
import os
import sys
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any
from urllib.parse import quote, urlencode

import click

ENV_API_URL = "TUNNELD_API_URL"
ENV_API_KEY = "TUNNELD_API_KEY"
TIMEOUT = 30.0
#: A remote update's answer comes once the agent has installed the release (the edge waits 300 s).
UPDATE_TIMEOUT = 330.0


def _fail(message: str) -> None:
    click.echo(f"tunneld: error: {message}", err=True)
    sys.exit(1)


def request(method: str, path: str, body: dict[str, Any] | None = None, *, api_url: str | None = None,
            api_key: str | None = None, query: dict[str, Any] | None = None, timeout: float = TIMEOUT) -> Any:
    """One API call; the decoded JSON answer (None for 204).  Exits with the error on failure."""
    api_url = api_url or os.environ.get(ENV_API_URL)
    api_key = api_key or os.environ.get(ENV_API_KEY)
    if not api_url:
        _fail(f"give the edge's API address with --api-url or {ENV_API_URL} (e.g. http://127.0.0.1:4041)")
    if not api_key:
        _fail(f"give an API key with --api-key or {ENV_API_KEY} (tunneld edge api-key create)")
    assert api_url is not None and api_key is not None
    url = api_url.rstrip("/") + path
    params = {k: v for k, v in (query or {}).items() if v is not None}
    if params:
        url += "?" + urlencode(params)
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers={
        "Authorization": f"Bearer {api_key}", "Ngrok-Version": "2", "Accept": "application/json",
        **({"Content-Type": "application/json"} if data is not None else {}),
    })
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310 - the user's own URL
            raw = resp.read()
    except urllib.error.HTTPError as exc:
        raw = exc.read()
        try:
            err = json.loads(raw)
            message = f"{err.get('msg', raw.decode(errors='replace'))} ({err.get('error_code', exc.code)})"
        except (ValueError, AttributeError):
            message = f"HTTP {exc.code}: {raw[:200].decode(errors='replace')}"
        _fail(message)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        _fail(f"cannot reach {api_url}: {reason}")
    if not raw:
        return None
    try:
        return json.loads(raw)
    except ValueError:
        _fail("the API answered something that is not JSON")


def _emit(result: Any) -> None:
    if result is not None:
        click.echo(json.dumps(result, indent=2, ensure_ascii=False))


def _conn_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    fn = click.option("--api-key", default=None, help=f"API key [env {ENV_API_KEY}].")(fn)
    return click.option("--api-url", default=None, help=f"The edge's admin API URL [env {ENV_API_URL}].")(fn)


def _conn(ctx: click.Context, kw: dict[str, Any]) -> dict[str, Any]:
    obj = ctx.obj or {}
    return {"api_url": kw.pop("api_url", None) or obj.get("api_url"),
            "api_key": kw.pop("api_key", None) or obj.get("api_key")}


@click.group("api")
@_conn_options
@click.pass_context
def api(ctx: click.Context, api_url: str | None, api_key: str | None) -> None:
    """Call the edge's admin API (tunneld edge --api-addr); prints the JSON answer.

    \b
    Examples:
      tunneld api credentials create --acl 'bind:*.example.com' --description laptop
      tunneld api edges create --proto https --hostname app.example.com --label app=web
      tunneld api tunnel-sessions list
    """
    ctx.ensure_object(dict)
    ctx.obj.update(api_url=api_url, api_key=api_key)


def _meta_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    fn = click.option("--metadata", default=None, help="Free-form text for machines (up to 4096).")(fn)
    return click.option("--description", default=None, help="A note for humans (up to 255).")(fn)


def _body(**fields: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in fields.items():
        if key.endswith("_flag"):
            # ``--domain X`` and the positional ``X`` are one field; the flag wins if both are given.
            key = key[: -len("_flag")]
            value = value if value is not None else fields.get(key)
        elif f"{key}_flag" in fields:
            continue
        if value is None:
            continue
        if key == "acl":
            if not value:
                continue  # the flag was not given
            value = [rule for rule in value if rule]
        out[key] = value
    return out


def _labels(values: tuple[str, ...]) -> dict[str, str] | None:
    if not values:
        return None
    labels: dict[str, str] = {}
    for item in values:
        for part in item.split(","):
            key, sep, value = part.partition("=")
            if not sep:
                raise click.BadParameter(f"{part!r}: expected key=value", param_hint="--label")
            labels[key] = value
    return labels


def _crud_group(name: str, path: str, create_opts: list[Callable[[Any], Any]],
                update_opts: list[Callable[[Any], Any]], help_text: str) -> click.Group:
    """A resource's group: create, list, get, update, delete."""

    def example(*lines: str) -> str:
        return "\b\nExample" + ("s" if len(lines) > 1 else "") + ":\n" + "".join(f"  {x}\n" for x in lines)

    create_args = {"credentials": "--acl 'bind:*.example.com' --description laptop",
                   "reserved-domains": "app.example.com",
                   "reserved-addrs": "edge.example.com:10001",
                   "ssh-credentials": "--public-key @$HOME/.ssh/id_ed25519.pub"}.get(name, "--description ci")

    @click.group(name, help=help_text,
                 epilog=example(f"tunneld api {name} create {create_args}", f"tunneld api {name} list"))
    def group() -> None:
        pass

    @group.command("create", epilog=example(f"tunneld api {name} create {create_args}"))
    @_conn_options
    @click.pass_context
    def create(ctx: click.Context, **kw: Any) -> None:
        conn = _conn(ctx, kw)
        _emit(request("POST", f"/{path}", _body(**kw), **conn))

    for opt in create_opts:
        opt(create)

    @group.command("list", epilog=example(f"tunneld api {name} list --limit 10"))
    @click.option("--limit", type=click.IntRange(1, 100), default=None)
    @click.option("--before-id", default=None)
    @_conn_options
    @click.pass_context
    def list_(ctx: click.Context, limit: int | None, before_id: str | None, **kw: Any) -> None:
        conn = _conn(ctx, kw)
        _emit(request("GET", f"/{path}", query={"limit": limit, "before_id": before_id}, **conn))

    @group.command("get", epilog=example(f"tunneld api {name} get ID"))
    @click.argument("resource_id")
    @_conn_options
    @click.pass_context
    def get(ctx: click.Context, resource_id: str, **kw: Any) -> None:
        _emit(request("GET", f"/{path}/{quote(resource_id, safe='')}", **_conn(ctx, kw)))

    @group.command("update", epilog=example(f"tunneld api {name} update ID --description renamed"))
    @click.argument("resource_id")
    @_conn_options
    @click.pass_context
    def update(ctx: click.Context, resource_id: str, **kw: Any) -> None:
        conn = _conn(ctx, kw)
        _emit(request("PATCH", f"/{path}/{quote(resource_id, safe='')}", _body(**kw), **conn))

    for opt in update_opts:
        opt(update)

    @group.command("delete", epilog=example(f"tunneld api {name} delete ID"))
    @click.argument("resource_id")
    @_conn_options
    @click.pass_context
    def delete(ctx: click.Context, resource_id: str, **kw: Any) -> None:
        _emit(request("DELETE", f"/{path}/{quote(resource_id, safe='')}", **_conn(ctx, kw)))

    return group


def _opt(*args: Any, **kw: Any) -> Callable[[Any], Any]:
    return click.option(*args, **kw)


_META = [_opt("--description", default=None, help="A note for humans (up to 255)."),
         _opt("--metadata", default=None, help="Free-form text for machines (up to 4096).")]
_ACL = _opt("--acl", "acl", multiple=True, metavar="RULE",
            help="bind: rule (repeatable): bind:host, bind:*.domain, bind:host:port, bind:k=v; "
            "--acl '' clears the list on update.")

for _group in (
    _crud_group("credentials", "credentials", [*_META, _ACL], [*_META, _ACL],
                "Authtokens for agents (the token is shown once, on create)."),
    _crud_group("api-keys", "api_keys", _META, _META, "Admin API keys (the key is shown once, on create)."),
    _crud_group("reserved-domains", "reserved_domains",
                [click.argument("domain", required=False),
                 _opt("--domain", "domain_flag", default=None,
                      help="The hostname (or *.domain) to reserve (or give it as the argument)."), *_META],
                _META,
                "Hostnames reserved for this account."),
    _crud_group("reserved-addrs", "reserved_addrs",
                [click.argument("addr", required=False),
                 _opt("--addr", "addr_flag", default=None,
                      help="The TCP HOST:PORT to reserve (or give it as the argument)."), *_META], _META,
                "TCP addresses reserved for this account."),
    _crud_group("ssh-credentials", "ssh_credentials",
                [_opt("--public-key", required=True, help="OpenSSH public key line, or @FILE to read it."),
                 *_META, _ACL], [*_META, _ACL],
                "SSH public keys allowed on the edge's SSH gateway."),
):
    api.add_command(_group)


def _read_key(value: str) -> str:
    if value.startswith("@"):
        try:
            with open(value[1:], encoding="utf-8") as fh:
                return fh.read().strip()
        except OSError as exc:
            _fail(f"cannot read {value[1:]}: {exc.strerror or exc}")
    return value


# ssh-credentials create: --public-key @FILE reads the file.
_ssh_group = api.commands["ssh-credentials"]
assert isinstance(_ssh_group, click.Group)
_ssh_create = _ssh_group.commands["create"]
_ssh_create_callback = _ssh_create.callback


def _ssh_create_cb(**kw: Any) -> Any:
    kw["public_key"] = _read_key(kw["public_key"])
    assert _ssh_create_callback is not None
    return _ssh_create_callback(**kw)


_ssh_create.callback = _ssh_create_cb


# ---- edges: one group for the three protos -------------------------------------------------------

_EDGE_PROTOS = {"edghts_": "https", "edgtcp_": "tcp", "edgtls_": "tls"}


def _edge_path(edge_id: str) -> str:
    for prefix, proto in _EDGE_PROTOS.items():
        if edge_id.startswith(prefix):
            return f"/edges/{proto}/{quote(edge_id, safe='')}"
    _fail(f"{edge_id!r} is not an edge id (edghts_..., edgtcp_..., edgtls_...)")
    raise AssertionError


@api.group("edges")
def edges() -> None:
    """Edges (https, tcp, tls) and the labels of their tunnel-group backends.

    \b
    Examples:
      tunneld api edges create --proto https --hostname app.example.com --label app=web
      tunneld api edges list
    """


@edges.command("create")
@click.option("--proto", type=click.Choice(["https", "tcp", "tls"]), required=True)
@click.option("--hostname", default=None, help="https and tls edges: the public hostname.")
@click.option("--addr", default=None, help="tcp edges: the public HOST:PORT.")
@click.option("--label", "labels", multiple=True, metavar="KEY=VALUE",
              help="Backend selector (repeatable): labeled tunnels with all of these serve the edge "
              "[default: edge=<edge id>].")
@_meta_options
@_conn_options
@click.pass_context
def edges_create(ctx: click.Context, proto: str, hostname: str | None, addr: str | None,
                 labels: tuple[str, ...], **kw: Any) -> None:
    """Create an edge; prints its JSON.

    \b
    Examples:
      tunneld api edges create --proto https --hostname app.example.com --label app=web
      tunneld api edges create --proto tcp --addr edge.example.com:10001
    """
    conn = _conn(ctx, kw)
    if proto == "tcp" and (hostname or not addr):
        raise click.UsageError("a tcp edge takes --addr HOST:PORT (and no --hostname)")
    if proto != "tcp" and (addr or not hostname):
        raise click.UsageError(f"an {proto} edge takes --hostname NAME (and no --addr)")
    body = _body(hostname=hostname, addr=addr, labels=_labels(labels), **kw)
    _emit(request("POST", f"/edges/{proto}", body, **conn))


@edges.command("list")
@click.option("--proto", type=click.Choice(["https", "tcp", "tls"]), default=None,
              help="Only edges of this proto [default: all three, one list each].")
@click.option("--limit", type=click.IntRange(1, 100), default=None)
@click.option("--before-id", default=None)
@_conn_options
@click.pass_context
def edges_list(ctx: click.Context, proto: str | None, limit: int | None, before_id: str | None,
               **kw: Any) -> None:
    """List edges.

    \b
    Example:
      tunneld api edges list --proto https
    """
    conn = _conn(ctx, kw)
    query = {"limit": limit, "before_id": before_id}
    if proto:
        _emit(request("GET", f"/edges/{proto}", query=query, **conn))
        return
    merged: dict[str, Any] = {}
    for p in ("https", "tcp", "tls"):
        merged.update({k: v for k, v in request("GET", f"/edges/{p}", query=query, **conn).items()
                       if k.endswith("_edges")})
    _emit(merged)


@edges.command("get")
@click.argument("edge_id")
@_conn_options
@click.pass_context
def edges_get(ctx: click.Context, edge_id: str, **kw: Any) -> None:
    """Show one edge.

    \b
    Example:
      tunneld api edges get edghts_...
    """
    _emit(request("GET", _edge_path(edge_id), **_conn(ctx, kw)))


@edges.command("update")
@click.argument("edge_id")
@click.option("--label", "labels", multiple=True, metavar="KEY=VALUE", help="Replace the backend's labels.")
@_meta_options
@_conn_options
@click.pass_context
def edges_update(ctx: click.Context, edge_id: str, labels: tuple[str, ...], **kw: Any) -> None:
    """Change an edge's description, metadata or labels.

    \b
    Example:
      tunneld api edges update edghts_... --label app=web-v2
    """
    conn = _conn(ctx, kw)
    _emit(request("PATCH", _edge_path(edge_id), _body(labels=_labels(labels), **kw), **conn))


@edges.command("delete")
@click.argument("edge_id")
@_conn_options
@click.pass_context
def edges_delete(ctx: click.Context, edge_id: str, **kw: Any) -> None:
    """Delete an edge.

    \b
    Example:
      tunneld api edges delete edghts_...
    """
    _emit(request("DELETE", _edge_path(edge_id), **_conn(ctx, kw)))


# ---- live state ----------------------------------------------------------------------------------


@api.group("tunnel-sessions")
def tunnel_sessions() -> None:
    """Agent sessions connected to the edge now.

    \b
    Examples:
      tunneld api tunnel-sessions list
      tunneld api tunnel-sessions restart SESSION_ID
    """


@tunnel_sessions.command("list")
@click.option("--limit", type=click.IntRange(1, 100), default=None)
@click.option("--before-id", default=None)
@_conn_options
@click.pass_context
def tunnel_sessions_list(ctx: click.Context, limit: int | None, before_id: str | None, **kw: Any) -> None:
    """List agent sessions.

    \b
    Example:
      tunneld api tunnel-sessions list --limit 10
    """
    query = {"limit": limit, "before_id": before_id}
    _emit(request("GET", "/tunnel_sessions", query=query, **_conn(ctx, kw)))


@tunnel_sessions.command("get")
@click.argument("session_id")
@_conn_options
@click.pass_context
def tunnel_sessions_get(ctx: click.Context, session_id: str, **kw: Any) -> None:
    """Show one agent session.

    \b
    Example:
      tunneld api tunnel-sessions get SESSION_ID
    """
    _emit(request("GET", f"/tunnel_sessions/{quote(session_id, safe='')}", **_conn(ctx, kw)))


def _session_command(op: str, session_id: str, conn: dict[str, Any], body: dict[str, Any] | None = None,
                     timeout: float = TIMEOUT) -> None:
    request("POST", f"/tunnel_sessions/{quote(session_id, safe='')}/{op}", body if body is not None else {},
            timeout=timeout, **conn)
    click.echo(f"tunnel session {session_id}: the agent accepted the {op}", err=True)


@tunnel_sessions.command("stop")
@click.argument("session_id")
@_conn_options
@click.pass_context
def tunnel_sessions_stop(ctx: click.Context, session_id: str, **kw: Any) -> None:
    """Stop the agent of a session (it exits); fails if it refuses (remote_management: false).

    \b
    Example:
      tunneld api tunnel-sessions stop 9f2c...
    """
    _session_command("stop", session_id, _conn(ctx, kw))


@tunnel_sessions.command("restart")
@click.argument("session_id")
@_conn_options
@click.pass_context
def tunnel_sessions_restart(ctx: click.Context, session_id: str, **kw: Any) -> None:
    """Restart the agent of a session: it re-executes itself and comes back with the same URLs.

    \b
    Example:
      tunneld api tunnel-sessions restart 9f2c...
    """
    _session_command("restart", session_id, _conn(ctx, kw))


@tunnel_sessions.command("update")
@click.argument("session_id")
@click.option("--version", "version", default=None, metavar="X.Y.Z",
              help="Install this version [default: the newest of the agent's update_channel].")
@click.option("--permit-major-version", is_flag=True, help="Allow a new major version.")
@_conn_options
@click.pass_context
def tunnel_sessions_update(ctx: click.Context, session_id: str, version: str | None,
                           permit_major_version: bool, **kw: Any) -> None:
    """Update the agent of a session (pip installs the release), then restart it.

    Waits until the agent has installed the release (up to 5 minutes).

    \b
    Examples:
      tunneld api tunnel-sessions update 9f2c...
      tunneld api tunnel-sessions update 9f2c... --version 1.2.0
    """
    body: dict[str, Any] = {"version": version} if version else {}
    if permit_major_version:
        body["permit_major_version"] = True
    _session_command("update", session_id, _conn(ctx, kw), body, timeout=UPDATE_TIMEOUT)


@api.group("tunnels")
def tunnels() -> None:
    """Tunnels online now.

    \b
    Example:
      tunneld api tunnels list
    """


@tunnels.command("list")
@click.option("--limit", type=click.IntRange(1, 100), default=None)
@click.option("--before-id", default=None)
@_conn_options
@click.pass_context
def tunnels_list(ctx: click.Context, limit: int | None, before_id: str | None, **kw: Any) -> None:
    """List tunnels.

    \b
    Example:
      tunneld api tunnels list --limit 20
    """
    _emit(request("GET", "/tunnels", query={"limit": limit, "before_id": before_id}, **_conn(ctx, kw)))
