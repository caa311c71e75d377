"""``tunneld diagnose``: step by step, can this agent reach its edge?  (ngrok's ``diagnose``.)

Each step runs only if the one before worked: name resolution, a TCP connection, the TLS
handshake with the configured ``root_cas``, then the tunnel protocol itself (a muxado session,
Auth with the configured authtoken through the agent's own code, and a SrvInfo round trip that
gives the edge's region and the latency).  Lines are printed as steps finish, in ngrok's
layout, ``[ OK ]`` / ``[ FAIL ]`` / ``[ SKIP ]``; a failure is followed by a hint.  The exit
status is 1 when anything failed.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import click
import trio

#: Column of the status cell (ngrok's layout).
STATUS_COLUMN = 44
DEFAULT_TIMEOUT = 10.0


@attrs.define
class Check:
    """One line of the report."""

    section: str
    name: str
    #: True: OK, False: FAIL, None: skipped (an earlier step failed).
    ok: bool | None = None
    error: str = ""
    hint: str = ""
    seconds: float = 0.0

    @property
    def status(self) -> str:
        return {True: "OK", False: "FAIL", None: "SKIP"}[self.ok]

    def as_json(self) -> dict[str, Any]:
        return {"section": self.section, "name": self.name, "status": self.status, "error": self.error,
                "hint": self.hint, "ms": round(self.seconds * 1000, 3)}


@attrs.define
class Diagnosis:
    server_addr: str
    checks: list[Check] = attrs.field(factory=list)
    region: str | None = None
    latency: float | None = None

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    def as_json(self) -> dict[str, Any]:
        return {"server_addr": self.server_addr, "ok": self.ok, "region": self.region,
                "latency_ms": None if self.latency is None else round(self.latency * 1000, 3),
                "checks": [c.as_json() for c in self.checks]}


class _Failed(Exception):
    def __init__(self, error: str, hint: str) -> None:
        super().__init__(error)
        self.error = error
        self.hint = hint


# ---- the steps ----------------------------------------------------------------------------------


async def _resolve(host: str, port: int) -> list[Any]:
    try:
        infos = await trio.socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise _Failed(f"{host}: {exc.strerror or exc}",
                      f"name does not resolve: check server_addr ({host}) and this host's DNS") from None
    if not infos:
        raise _Failed(f"{host}: no address", "name does not resolve: check server_addr and DNS")
    return list(infos)


async def _tcp(host: str, port: int, infos: list[Any]) -> trio.SocketStream:
    """Connect to each address in turn (as resolved), keeping the last error's own type."""
    last: OSError | None = None
    for family, kind, proto, _name, address in infos:
        sock = trio.socket.socket(family, kind, proto)
        try:
            await sock.connect(address)
        except OSError as exc:
            sock.close()
            last = exc
            continue
        except BaseException:
            sock.close()
            raise
        return trio.SocketStream(sock)
    assert last is not None
    where = f"{host}:{port}"
    if isinstance(last, ConnectionRefusedError):
        hint = f"connection refused: is the edge running at {where}? (its --agent-addr)"
    else:
        hint = f"cannot reach {where}: check the address, the network and firewalls"
    raise _Failed(f"connect to {where}: {last.strerror or last}", hint)


def _context(root_cas: str) -> Any:
    from OpenSSL import SSL

    from .core._tls import client_context

    if root_cas in ("", "host", "trusted"):
        return client_context(None)
    path = Path(os.path.expanduser(root_cas))
    if not path.is_file():
        raise _Failed(f"root_cas {path} is not a readable file",
                      "set root_cas to the PEM file of the CA that signed the edge's certificate")
    try:
        return client_context(path)
    except SSL.Error:
        raise _Failed(f"root_cas {path} holds no usable CA certificate",
                      "set root_cas to a PEM file of CA certificates") from None


async def _tls(host: str, port: int, tcp: trio.SocketStream, root_cas: str) -> trio.abc.Stream:
    from .core._tls import BulkTLSStream

    ctx = _context(root_cas)
    stream = BulkTLSStream(tcp, ctx, server_side=False, server_hostname=host)
    try:
        await stream.do_handshake()
    except trio.BrokenResourceError as exc:
        text = str(exc)
        if "verify failed" in text:
            where = f"root_cas {root_cas}" if root_cas not in ("", "host", "trusted") else "the system store"
            hint = ("certificate not trusted: set root_cas to the CA that signed the edge's certificate "
                    f"(tunneld edge --dev: DATA_DIR/ca.pem); now trusting {where}")
        elif "does not match" in text:
            hint = f"the certificate does not name {host}: use a server_addr name it covers"
        else:
            hint = f"TLS handshake failed: is {host}:{port} the edge's agent address (not a web port)?"
        raise _Failed(text, hint) from None
    return stream


async def _tunnel_protocol(diag: Diagnosis, carrier: trio.abc.Stream | None, cfg: Any, ws_url: str | None,
                           root_cas: str) -> None:
    """Auth through the agent's own code, then SrvInfo for the region and the latency."""
    from .core import proto
    from .core._agent import Agent
    from .core._errors import AuthFailed, RemoteProtocolError
    from .core._mux import MuxSession
    from .core._rpc import call
    from .core._websocket import HandshakeError, connect_websocket

    try:
        async with trio.open_nursery() as nursery:
            if ws_url is not None:
                carrier = await connect_websocket(ws_url, _context(root_cas))
            assert carrier is not None
            mux = MuxSession(carrier, client=True)
            await nursery.start(mux.run)
            await Agent(cfg, [])._auth(mux)
            start = time.perf_counter()
            info = await call(mux, proto.StreamType.SRV_INFO, proto.SrvInfo(), proto.SrvInfoResp)
            diag.latency = time.perf_counter() - start
            diag.region = info.region or "unknown"
            await mux.aclose()
            nursery.cancel_scope.cancel()
    except* AuthFailed as group:
        exc = group.exceptions[0]
        hint = ("no authtoken configured: tunneld config add-authtoken TOKEN" if not cfg.authtoken else
                "authtoken refused: set a valid authtoken (tunneld config add-authtoken TOKEN)")
        raise _Failed(f"the edge refused the authtoken: {exc}", hint) from None
    except* HandshakeError as group:
        raise _Failed(f"WebSocket upgrade refused: {group.exceptions[0]}",
                      "check the path of the wss:// server_addr (the edge's default is /tunneld)") from None
    except* (OSError, trio.BrokenResourceError, trio.ClosedResourceError, trio.EndOfChannel,
             RemoteProtocolError) as group:
        hint = "the edge did not speak the tunnel protocol: is server_addr its agent address?"
        raise _Failed(f"{group.exceptions[0]}" or "session failed", hint) from None


async def run_diagnosis(cfg: Any, *, timeout: float = DEFAULT_TIMEOUT,
                        emit: Callable[[str], None] = print) -> Diagnosis:
    """Run every step against ``cfg.server_addr`` (an :class:`AgentConfig`), printing as it goes."""
    from .core._util import split_host_port
    from .core._websocket import is_websocket_url, parse_websocket_url

    ws_url: str | None = None
    if is_websocket_url(cfg.server_addr):
        ws_url = cfg.server_addr
        host, port, _path = parse_websocket_url(ws_url)
    else:
        host, port = split_host_port(cfg.server_addr, default_port=443)
    host = host.strip("[]")
    diag = Diagnosis(f"{host}:{port}")
    emit(f"Testing tunneld connectivity to {cfg.server_addr}...")
    emit("")
    edge = f"tunneld Connectivity - Server: {cfg.server_addr}"
    local = Check("Localhost Connectivity", "Name Resolution")
    steps = [Check(edge, name) for name in ("Name Resolution", "TCP", "TLS", "Tunnel Protocol")]
    section = ""

    def report(check: Check) -> None:
        nonlocal section
        if check.section != section:
            section = check.section
            emit(section)
        emit(f"  {check.name:<{STATUS_COLUMN - 2}}[ {check.status} ]")
        if check.ok is False:
            emit(f"    {check.hint}")

    async def attempt(check: Check, step: Callable[[], Any]) -> Any:
        diag.checks.append(check)
        start = time.perf_counter()
        try:
            with trio.fail_after(timeout):
                result = await step()
            check.ok = True
            return result
        except trio.TooSlowError:
            check.ok = False
            check.error = f"no answer within {timeout:g}s"
            check.hint = (f"{check.name} timed out: a firewall may drop traffic to {host}:{port}, or it is "
                          "not the edge's agent address")
        except _Failed as exc:
            check.ok, check.error, check.hint = False, exc.error, exc.hint
        finally:
            check.seconds = time.perf_counter() - start
            if check.ok is not None:
                report(check)
        return None

    async def local_step() -> Any:
        try:
            return await _resolve("localhost", 80)
        except _Failed:
            raise _Failed("localhost does not resolve",
                          "add '127.0.0.1 localhost' to the hosts file: tunnels to localhost:PORT need it")\
                from None

    await attempt(local, local_step)
    addresses = await attempt(steps[0], lambda: _resolve(host, port))
    tcp = tls = None
    try:
        if addresses:
            tcp = await attempt(steps[1], lambda: _tcp(host, port, addresses))
        if tcp is not None:
            tls = await attempt(steps[2], lambda: _tls(host, port, tcp, cfg.root_cas))
        if tls is not None:
            if ws_url is not None:  # the WebSocket carrier dials its own connection
                await trio.aclose_forcefully(tls)
                tls = None
            await attempt(steps[3], lambda: _tunnel_protocol(diag, tls, cfg, ws_url, cfg.root_cas))
    finally:
        for stream in (tls, tcp):
            if stream is not None:
                await trio.aclose_forcefully(stream)
    for check in steps:
        if check not in diag.checks:
            diag.checks.append(check)
            report(check)
    emit("")
    if diag.ok:
        emit(f"Successfully established tunneld connection! (region: '{diag.region}', "
             f"latency: {diag.latency * 1000 if diag.latency else 0:.3f}ms)")
    else:
        failed = [c for c in diag.checks if c.ok is False]
        emit("Errors encountered during diagnostics:")
        for check in failed:
            emit(f"  * {check.name}: {check.error}")
            emit(f"    hint: {check.hint}")
        emit("")
        emit(f"Error establishing tunneld connection: {failed[0].error}")
    return diag


# ---- the command --------------------------------------------------------------------------------


@click.command()
@click.option("--config", "config_paths", type=click.Path(dir_okay=False, path_type=Path), multiple=True,
              help="Agent config file (repeatable or comma-separated, as for `tunneld start`) "
              "[default: ~/.config/tunneld/tunneld.yml].")
@click.option("--server-addr", default=None, help="Edge agent address (overrides the config and env).")
@click.option("--root-cas", default=None, help="PEM file of the CA that signed the edge's certificate.")
@click.option("--authtoken", default=None, help="Authtoken to try (overrides the config and env).")
@click.option("--timeout", type=click.FloatRange(min=0.1), default=DEFAULT_TIMEOUT, show_default=True,
              help="Seconds each step may take.")
@click.option("-w", "--write-report", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write the results as JSON to this file.")
def diagnose(config_paths: tuple[Path, ...], server_addr: str | None, root_cas: str | None,
             authtoken: str | None, timeout: float, write_report: Path | None) -> None:
    """Test the connection to the edge step by step: DNS, TCP, TLS, tunnel protocol.

    Reads server_addr, root_cas and authtoken like `tunneld start` (flag, then environment, then
    config file).  Exits 1 if a step fails, with a hint for each failure.

    \b
    Examples:
      tunneld diagnose
      tunneld diagnose --config ./tunneld.yml -w report.json
    """
    from .core import ConfigError
    from .core._commands import ENV_AUTHTOKEN, ENV_ROOT_CAS, ENV_SERVER_ADDR
    from .core._config import load_agent_config, split_config_paths
    from .core._websocket import check_server_addr

    try:
        cfg = load_agent_config(split_config_paths(config_paths))
    except ConfigError as exc:
        click.echo(f"tunneld: error: {exc}", err=True)
        sys.exit(1)
    cfg.authtoken = authtoken or os.environ.get(ENV_AUTHTOKEN) or cfg.authtoken
    cfg.server_addr = server_addr or os.environ.get(ENV_SERVER_ADDR) or cfg.server_addr
    cfg.root_cas = root_cas or os.environ.get(ENV_ROOT_CAS) or cfg.root_cas
    try:
        check_server_addr(cfg.server_addr)
    except ValueError as exc:
        click.echo(f"tunneld: error: server_addr {cfg.server_addr}: {exc}", err=True)
        sys.exit(1)
    diag = trio.run(lambda: run_diagnosis(cfg, timeout=timeout, emit=lambda line: click.echo(line)))
    if write_report is not None:
        write_report.write_text(json.dumps(diag.as_json(), indent=2) + "\n", encoding="utf-8")
        click.echo(f"Report written to {write_report}")
    sys.exit(0 if diag.ok else 1)
