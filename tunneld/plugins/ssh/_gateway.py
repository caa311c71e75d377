"""The Trio side of the gateway: the listener, the login, and one session per SSH connection.

Theory of operation
-------------------
::

    SshGateway.run(*, task_status)              the edge service (``--ssh-addr``)
    ├── AsyncioThread                           asyncssh on its own loop (see _bridge, _server)
    └── edge.serve_public(pool="ssh")           accept loop: budgets, grace on shutdown
          └── per connection: SshGateway._handle
                login (asyncssh.run_server on a dup of the socket), FailureLimiter
                └── SshSession.run()            session nursery
                      ├── per -R forward: EdgeTunnel.run()   the same tunnel code as agents
                      └── setup timers

A connection is accepted by Trio (so the edge's connection budgets and shutdown apply), and
a duplicate of its socket is handed to asyncssh.  asyncssh's callbacks post events (forward
requested, command received, Ctrl-C, closed); :class:`SshSession` turns them into Binds and
runs the ordinary edge tunnels with itself as their session.  Each public connection asks
:meth:`SshSession.open_stream` for a stream, which opens a ``forwarded-tcpip`` channel
back to the ssh client and hands Trio one end of a socketpair.

Forward requests are answered only once the command is known, so a ``-R 0`` forward of a
TCP tunnel is told its real public port (OpenSSH prints ``Allocated port N``) and a forward
that cannot be bound is refused.  OpenSSH sends its forward requests before it opens the
session, and asyncssh serves them one at a time: they reach us before or just after the command.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import asyncssh
import attrs
import trio

from tunneld.http1 import error_response
from tunneld.plugin import (
    Code,
    EdgeContext,
    ListedSession,
    TunnelInfo,
    TunnelRejected,
    format_host_port,
    peer_addr,
    proto,
)

from . import _server
from ._bridge import AsyncioThread
from ._command import SYNTAX_USER, USAGE, SshCommand, UsageError, binds_for, parse_command
from ._keys import AuthorizedKeysFile, KeyLookup, RegisteredKeys, SshCredential
from ._server import Closed, CommandReceived, Event, ForwardRequested, Interrupted, Link, VirtualListener

log = logging.getLogger("tunneld.ssh")

#: Host key file in the data directory (made on first start, like sshd's).
HOST_KEY_FILE = "ssh_host_ed25519_key"
#: Seconds a client has to finish the SSH handshake and log in.
LOGIN_TIMEOUT = 20.0
#: Longest delay the failure limiter puts before a repeat offender's handshake.
MAX_LOGIN_DELAY = 5.0
#: Seconds after login within which a command must arrive (``ssh -N`` sends none).
COMMAND_TIMEOUT = 30.0
#: Seconds after the command within which the first ``-R`` forward must arrive.  OpenSSH
#: sends forwards before the command, so this only has to absorb scheduling jitter.
FORWARD_TIMEOUT = 2.0
#: Events of one connection waiting for its Trio task (forwards are capped at MAX_FORWARDS).
EVENT_BUFFER = 64
#: Seconds a session's exit status and farewell get before the connection is cut.
FAREWELL = 2.0


def load_host_key(data_dir: Path) -> asyncssh.SSHKey:
    """The gateway's host key, generated (ed25519, mode 0600) on first use."""
    path = data_dir / HOST_KEY_FILE
    if not path.exists():
        key = asyncssh.generate_private_key("ssh-ed25519", comment="tunneld ssh gateway")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(key.export_private_key("openssh"))
        path.with_name(HOST_KEY_FILE + ".pub").write_bytes(key.export_public_key("openssh"))
        return key
    return asyncssh.read_private_key(path)


@attrs.define(eq=False)
class SshGateway:
    """The edge service serving ``ssh -R ... v2@EDGE http``; started with ``nursery.start(gw.run)``."""

    edge: EdgeContext
    addr: tuple[str, int]
    #: Who may log in (default: ``DATA_DIR/authorized_keys``).
    keys: KeyLookup | None = None
    bridge: AsyncioThread = attrs.field(factory=AsyncioThread)
    host_key: asyncssh.SSHKey | None = None
    port: int = 0
    sessions: set[SshSession] = attrs.field(factory=set)

    async def run(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        """Bind ``addr``, report the bound port, and serve until the edge shuts down.

        The asyncio thread lives exactly as long as this call.
        """
        if self.keys is None:
            authorized = self.edge.data_dir / "authorized_keys"
            if not authorized.exists():
                log.info("SSH gateway: %s does not exist yet: only keys registered through the admin API "
                         "(ssh_credentials) can log in until it does", authorized)
            self.keys = RegisteredKeys(AuthorizedKeysFile(authorized), self.edge.store)
        # asyncssh logs every connection and channel at INFO: ours are the session log lines.
        asyncssh_log = logging.getLogger("asyncssh")
        if asyncssh_log.level == logging.NOTSET:
            asyncssh_log.setLevel(logging.WARNING)
        self.host_key = await trio.to_thread.run_sync(load_host_key, self.edge.data_dir)
        listeners = await self.edge.open_public_listeners("ssh", "--ssh-addr", self.addr)
        self.port = self.edge.ports["ssh"]
        self.bridge.start()
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(partial(self.edge.serve_public, pool="ssh"), self._handle, listeners)
                log.info("SSH gateway on %s (host key %s)", format_host_port(self.addr[0], self.port),
                         self.host_key.get_fingerprint("sha256"))
                task_status.started(self.port)
        finally:
            with trio.CancelScope(shield=True):
                await self.bridge.stop()

    async def _handle(self, stream: trio.SocketStream) -> None:
        addr = peer_addr(stream)
        host = addr.rsplit(":", 1)[0].strip("[]")
        limiter = self.edge.limiter
        # Counted before the login is checked, so parallel guesses see the delay grow; the
        # delay stays well inside LOGIN_TIMEOUT, so a valid key from a shared address gets in.
        delay = min(limiter.attempt(host, time.monotonic()), MAX_LOGIN_DELAY)
        if delay:
            log.info("ssh %s: login delayed %gs (repeated failures from %s)", addr, delay, host)
            await trio.sleep(delay)
        send, receive = trio.open_memory_channel[Event](EVENT_BUFFER)

        def deliver(event: Event) -> None:
            try:
                send.send_nowait(event)
            except (trio.WouldBlock, trio.ClosedResourceError, trio.BrokenResourceError):
                pass  # a flood of requests, or the session is over: nothing to tell

        assert self.keys is not None and self.host_key is not None
        link = Link(self.keys, partial(self.bridge.to_trio, deliver))
        # asyncssh gets a descriptor of its own (serve_public closes ``stream`` when we return),
        # closed only on its thread: a close from here could race its selector.
        link.sock = socket.socket(fileno=os.dup(stream.socket.fileno()))
        try:
            with trio.fail_after(LOGIN_TIMEOUT + 1):
                await self.bridge.call(_server.login(link, self.host_key, LOGIN_TIMEOUT))
        except (asyncssh.Error, OSError, trio.TooSlowError) as exc:
            log.info("ssh %s: login failed (user %r): %s", addr, link.username, exc or type(exc).__name__)
            self.edge.count("auth_failures", kind="ssh")
            self.bridge.call_soon(link.abort)
            return
        except BaseException:
            self.bridge.call_soon(link.abort)
            raise
        # Only this attempt is taken back: one valid key must not wipe its neighbours' failures.
        limiter.refund(host)
        assert link.credential is not None
        session = SshSession(self, link, addr, link.credential)
        if link.conn is not None:
            session.agent_version = str(link.conn.get_extra_info("client_version") or "")
        self.sessions.add(session)
        self.edge.add_session(session)
        try:
            async with receive:
                await session.run(receive)
        finally:
            self.sessions.discard(session)
            self.edge.remove_session(session)
            self.bridge.call_soon(link.abort)


@attrs.define(eq=False)
class _Target:
    """Where a tunnel's public connections go: the forward as the ssh client knows it."""

    host: str
    port: int = 0
    ready: trio.Event = attrs.field(factory=trio.Event)


@attrs.define(eq=False)
class SshSession:
    """One logged-in SSH connection: its command, its forwards and their tunnels.

    Edge tunnels see it as their session: it implements ``tunneld.plugin.SessionContext``.
    """

    gateway: SshGateway
    link: Link
    remote_addr: str
    credential: SshCredential
    #: The edge's naming rules, remembering this session's names (see :meth:`choose_host`).
    _hosts: Callable[[proto.Bind, str], str] | None = None
    command: SshCommand | None = None
    _pending: list[ForwardRequested] = attrs.field(factory=list)
    _targets: dict[str, _Target] = attrs.field(factory=dict)
    #: (listen host, port) of every forward accepted, as the client names it in channel opens.
    _forward_keys: set[tuple[str, int]] = attrs.field(factory=set)
    _tunnel_scopes: list[trio.CancelScope] = attrs.field(factory=list)
    _forwarded: int = 0
    _ending: bool = False
    _nursery: trio.Nursery | None = None
    _events_scope: trio.CancelScope | None = None
    _reason: str = ""
    # ---- as the admin API lists it (tunneld.plugin.ListedSession) ----
    session_id: str = attrs.field(factory=lambda: "ssh_" + secrets.token_hex(12))
    started_at: float = attrs.field(factory=time.time)
    #: The client's SSH version string (``SSH-2.0-OpenSSH_9.2p1 …``).
    agent_version: str = ""
    client_type: str = "ssh"

    @property
    def account_id(self) -> str:
        return self.credential.account_id

    @property
    def credential_id(self) -> str:
        return self.credential.credential_id

    @property
    def tunnel_ids(self) -> list[str]:
        return list(self._targets)

    def stop(self, reason: str) -> None:
        """End the session at once (the admin API's stop): its tunnels close, ssh exits 0."""
        self._end(0, f"\nStopped by the edge: {reason}\n", "stopped through the admin API")

    # ---- the session interface edge tunnels use ----------------------------------------

    @property
    def owner(self) -> str:
        """Whose names these tunnels claim: the key's owner id (``ssh:SHA256:...``)."""
        return self.credential.owner

    def resumed_name(self, bind: proto.Bind, kind: str) -> str | None:
        """SSH sessions do not resume: every session starts with fresh names (or held ones)."""
        return None

    def choose_host(self, bind: proto.Bind, pair: str) -> str:
        """The public hostname for a name-routed Bind (the edge's naming rules, this session's owner)."""
        if self._hosts is None:
            self._hosts = self.gateway.edge.host_chooser(self)
        return self._hosts(bind, pair)

    async def open_stream(self, tunnel_id: str, client_addr: str, proto: str, *,
                          passthrough_tls: bool = False, first: bytes = b"") -> trio.abc.HalfCloseableStream:
        """Open a ``forwarded-tcpip`` channel to the ssh client for one public connection.

        Raises BrokenResourceError when the session is gone or the client refuses the channel
        (its local service is not listening).
        """
        target = self._targets.get(tunnel_id)
        if target is None or self._ending:
            raise trio.BrokenResourceError("the SSH session has ended")
        with trio.move_on_after(5):
            await target.ready.wait()
        host, _, port = client_addr.rpartition(":")
        try:
            sock = await self.gateway.bridge.call(
                self.link.open_forward(target.host, target.port, host.strip("[]"), int(port or 0)),
                discard=socket.socket.close)
        except (asyncssh.Error, OSError) as exc:
            reason = getattr(exc, "reason", "") or str(exc) or type(exc).__name__
            if proto in ("http", "https") and self._nursery is not None:
                # What the agent does when its upstream is down: a 502 with ERR_TUNNELD_8012.
                return await self._answer_502(reason)
            raise trio.BrokenResourceError(f"the ssh client refused the connection: {reason}") from exc
        stream = trio.SocketStream(trio.socket.from_stdlib_socket(sock))
        if first:
            try:
                await stream.send_all(first)
            except BaseException:
                await trio.aclose_forcefully(stream)
                raise
        return stream

    async def _answer_502(self, reason: str) -> trio.SocketStream:
        ours, theirs = trio.socket.socketpair()
        body = error_response(502, Code.UPSTREAM_UNREACHABLE, f"the ssh client could not reach its local "
                              f"service: {reason}")

        async def answer() -> None:
            peer = trio.SocketStream(theirs)
            try:
                with trio.move_on_after(10):
                    await peer.send_all(body)
                    # Read the request away, so the edge's writes never fail before it reads the answer.
                    while await peer.receive_some(65536):
                        pass
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
            finally:
                await trio.aclose_forcefully(peer)

        assert self._nursery is not None
        self._nursery.start_soon(answer)
        return trio.SocketStream(ours)

    # ---- the session ------------------------------------------------------------------------

    async def run(self, events: trio.MemoryReceiveChannel[Event]) -> None:
        log.info("ssh session from %s started: key %s%s, user %s", self.remote_addr,
                 self.credential.fingerprint,
                 f" ({self.credential.comment})" if self.credential.comment else "", self.link.username)
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._command_deadline)
                with trio.CancelScope() as self._events_scope:
                    async for event in events:
                        if isinstance(event, Closed):
                            self._reason = self._reason or event.reason
                            break
                        await self._on_event(event)
                nursery.cancel_scope.cancel()
        finally:
            for pending in self._pending:
                self.gateway.bridge.call_soon(_server.resolve, pending.reply, False)
            log.info("ssh session from %s ended (%s)", self.remote_addr, self._reason or "closed")

    async def _on_event(self, event: Event) -> None:
        if isinstance(event, Interrupted):
            self._end(130, "\nInterrupted: tunnels closed.\n", "interrupted")
        elif isinstance(event, CommandReceived):
            self._on_command(event.command)
            for forward in self._pending[:]:
                await self._on_forward(forward)
        elif isinstance(event, ForwardRequested):
            await self._on_forward(event)

    def _on_command(self, text: str | None) -> None:
        if self._ending or self.command is not None:
            return
        usage = USAGE.format(host=self.gateway.edge.domain, port=self.gateway.port,
                             domain=self.gateway.edge.domain)
        if self.link.username != SYNTAX_USER:
            self._end(2, f"Error: log in as {SYNTAX_USER}@... (the user name selects the command syntax; "
                      f"got {self.link.username!r})\n", "wrong user name")
            return
        if text is None:
            self._end(2, "Error: no command given.\n\n" + usage, "no command")
            return
        try:
            command = parse_command(text)
        except UsageError as exc:
            self._end(2, f"Error: {exc}\n", "bad command")
            return
        if command.help:
            self._end(0, usage, "usage shown")
            return
        self.command = command
        log.info("ssh session from %s: command %r", self.remote_addr, command.proto)
        assert self._nursery is not None
        self._nursery.start_soon(self._forward_deadline)

    async def _on_forward(self, event: ForwardRequested) -> None:
        bridge = self.gateway.bridge
        if self._ending:
            bridge.call_soon(_server.resolve, event.reply, False)
            return
        if self.command is None:
            if event not in self._pending:
                self._pending.append(event)
            return
        if event in self._pending:
            self._pending.remove(event)
        edge = self.gateway.edge
        forward = f"-R {event.host + ':' if event.host not in ('', 'localhost') else ''}{event.port}"
        try:
            if (event.host, event.port) in self._forward_keys:
                # The client tells its forwards apart by (name, port) alone.
                raise UsageError("given twice: each -R needs its own remote port or name")
            binds = binds_for(self.command, event.host, event.port, dict(edge.ports), edge.domain)
            # The key's account, ACL and the reservations, read now: the claims of this
            # forward's tunnels are checked against them (as an agent's Binds are).
            cred = self.credential
            await edge.refresh_bind_policy(self.owner, cred.account_id, cred.acl)
            target = _Target(event.host)
            # Only the binds of one forward share a random name (https and http of -R 0).
            self._hosts = edge.host_chooser(self)
            infos = [await self._start_tunnel(bind, target) for bind in binds]
        except (UsageError, TunnelRejected) as exc:
            bridge.call_soon(_server.resolve, event.reply, False)
            reason = exc.reason if isinstance(exc, TunnelRejected) else str(exc)
            code = f" [{exc.code}]" if isinstance(exc, TunnelRejected) and exc.code else ""
            if isinstance(exc, TunnelRejected):
                edge.count("refused_binds", code=exc.code.label)
            self._end(1, f"Error: {forward}: {reason}{code}\n", "forward refused")
            return
        # The port the client will name in its channel opens: its own, or (for -R 0) ours.
        target.port = event.port or self._free_port(event.host, _url_port(infos[0].url))
        self._forward_keys.add((event.host, target.port))
        target.ready.set()
        bridge.call_soon(_server.resolve, event.reply, VirtualListener(target.port))
        self._forwarded += 1
        local = self.command.addr or "your ssh client"
        lines = "".join(f"Forwarding {info.url} -> {local}\n" for info in infos)
        bridge.call_soon(self.link.write, lines)

    def _free_port(self, host: str, port: int) -> int:
        # A -R 0 forward is told a port; it must differ from the session's other forwards'.
        while (host, port) in self._forward_keys:
            port = port % 65535 + 1
        return port

    async def _start_tunnel(self, bind: proto.Bind, target: _Target) -> TunnelInfo:
        edge = self.gateway.edge
        tunnel_type = edge.registry.for_bind_proto(bind.proto)
        if tunnel_type is None:
            raise TunnelRejected(f"protocol {bind.proto!r} is not served by this edge",
                                 Code.PROTO_UNSUPPORTED)
        tunnel_id = "tn_" + secrets.token_hex(12)
        tunnel = tunnel_type.edge_tunnel(edge, self, bind, tunnel_id)
        self._targets[tunnel_id] = target
        assert self._nursery is not None
        try:
            info: TunnelInfo = await self._nursery.start(self._run_tunnel, tunnel)
        except BaseException:
            self._targets.pop(tunnel_id, None)
            raise
        log.info("ssh session from %s: tunnel %s online at %s", self.remote_addr, tunnel_id, info.url)
        return info

    async def _run_tunnel(self, tunnel: Any, *, task_status: trio.TaskStatus[TunnelInfo]) -> None:
        with trio.CancelScope() as scope:
            self._tunnel_scopes.append(scope)
            await tunnel.run(task_status=task_status)

    def _end(self, status: int, message: str, reason: str) -> None:
        """Say ``message``, close every tunnel now, and end the session with exit ``status``."""
        if self._ending:
            return
        self._ending = True
        self._reason = reason
        for scope in self._tunnel_scopes:
            scope.cancel()
        bridge = self.gateway.bridge
        for pending in self._pending:
            bridge.call_soon(_server.resolve, pending.reply, False)
        if self.link.chan is None:
            first_line = message.strip().splitlines()[0] if message.strip() else reason
            bridge.call_soon(self.link.disconnect, first_line)
        else:
            bridge.call_soon(self.link.write, message)
            bridge.call_soon(self.link.finish, status)
        # Wait for the client to go (Closed), but not for ever.
        if self._events_scope is not None:
            self._events_scope.deadline = min(self._events_scope.deadline, trio.current_time() + FAREWELL)

    async def _command_deadline(self) -> None:
        await trio.sleep(COMMAND_TIMEOUT)
        if self.command is None and not self._ending:
            self._end(2, f"Error: no command within {COMMAND_TIMEOUT:g}s: run e.g. "
                      f"ssh -R 443:localhost:80 {SYNTAX_USER}@{self.gateway.edge.domain} "
                      f"-p {self.gateway.port} http\n", "no command")

    async def _forward_deadline(self) -> None:
        await trio.sleep(FORWARD_TIMEOUT)
        if not self._forwarded and not self._pending and not self._ending:
            self._end(2, "Error: no -R forward was requested: add one, e.g. "
                      f"ssh -R 443:localhost:80 {SYNTAX_USER}@{self.gateway.edge.domain} "
                      f"-p {self.gateway.port} http\n", "no forward")


def _url_port(url: str) -> int:
    scheme, _, rest = url.partition("://")
    hostport = rest.split("/", 1)[0]
    if hostport.rsplit(":", 1)[-1].isdigit() and ":" in hostport:
        return int(hostport.rsplit(":", 1)[-1])
    return {"http": 80, "https": 443, "tls": 443}.get(scheme, 443)


if TYPE_CHECKING:  # what the admin API lists of it (checked by mypy)
    _LISTED: type[ListedSession] = SshSession
