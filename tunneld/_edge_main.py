"""``tunneld edge``: run an edge in the foreground until SIGTERM/SIGINT."""

from __future__ import annotations

import os
import shlex
import signal
import sys
from pathlib import Path

import trio

from .core import ConfigError, Edge, EdgeConfig, _gcpace
from .core._admin import admin_services
from .core._certs import ensure_private_dir
from .core._store import Store
from .core._util import freeze_startup_objects, raise_fd_limit

DEV_TOKEN_FILE = "dev-authtoken"


def ensure_dev_token(store: Store, data_dir: Path) -> Path:
    """Reuse DIR/dev-authtoken while it is valid; otherwise create one (mode 0600)."""
    path = data_dir / DEV_TOKEN_FILE
    try:
        current = path.read_text().strip()
    except OSError:
        current = ""
    if current and store.verify_token(current) is not None:
        return path
    _record, secret = store.create_token("dev mode")
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(secret + "\n")
    os.replace(tmp, path)
    return path


def _leaves(exc: BaseException) -> list[BaseException]:
    """The real exceptions inside (nested) exception groups from Trio nurseries."""
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for sub in exc.exceptions for leaf in _leaves(sub)]
    return [exc]


def _say(line: str) -> None:
    print(line, flush=True)


def run_edge(config: EdgeConfig, *, dev: bool) -> int:
    # Before anything opens a descriptor: the edge's budgets are cut from this limit.
    raise_fd_limit()
    try:
        ensure_private_dir(config.data_dir)
        store = Store.open(config.data_dir)
    except ConfigError as exc:
        print(f"tunneld: error: {exc}", file=sys.stderr)
        return 1
    errors: list[str] = []
    code = 0
    try:
        token_path = ensure_dev_token(store, config.data_dir) if dev else None
        edge = Edge(config, store, service_factories=(admin_services,))
        code = trio.run(_main, edge, token_path)
    except* ConfigError as group:
        errors = [str(exc) for exc in _leaves(group)]
    except* KeyboardInterrupt:
        code = 130
    finally:
        store.close()
    for error in errors:
        print(f"tunneld: error: {error}", file=sys.stderr)
    return 1 if errors else code


async def _main(edge: Edge, token_path: Path | None) -> int:
    cfg = edge.config
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            info = await nursery.start(edge.serve)
            freeze_startup_objects()
            # Thousands of long-lived sessions: full collections walk only what is new.
            _gcpace.install()
            for name in ("agent", "http", "https", "ssh", "api"):
                if name in info.listeners:
                    _say(f"tunneld edge: {name} listener on {info.listeners[name]}")
            _say(f"tunneld edge: file descriptor limit {edge.fd_limit}: up to {edge.max_sessions} agent "
                 f"sessions, {edge.pool_limit('public')} public connections at once")
            _say(f"tunneld edge: tcp tunnels on {cfg.tcp_host}:{cfg.tcp_ports[0]}-{cfg.tcp_ports[1]}")
            _say(f"tunneld edge: domain {cfg.domain} (point *.{cfg.domain} and {cfg.domain} at this host)")
            if cfg.allowed_hostnames:
                names = ", ".join(a.pattern + (f" (token {a.token_id})" if a.token_id else "")
                                  for a in cfg.allowed_hostnames)
                _say(f"tunneld edge: custom hostnames {names}: CNAME them to {cfg.cname}")
            if "ssh" in info.listeners:
                port = info.listeners["ssh"].rsplit(":", 1)[1]
                _say(f"tunneld edge: ssh gateway: ssh -R 443:localhost:8080 v2@{cfg.domain} -p {port} http "
                     f"(keys in {cfg.data_dir / 'authorized_keys'})")
            if token_path is not None:
                ca = cfg.data_dir / "ca.pem"
                agent_host = info.listeners["agent"]
                if agent_host.startswith(("0.0.0.0:", "[::]:")):
                    agent_host = "127.0.0.1:" + agent_host.rsplit(":", 1)[1]
                _say(f"tunneld edge: dev CA certificate: {ca}")
                _say(f"tunneld edge: dev authtoken file: {token_path}")
                _say("tunneld edge: run an agent with:")
                _say(f"  tunneld http 8080 --server-addr {agent_host} --root-cas {shlex.quote(str(ca))} "
                     f"--authtoken \"$(cat {shlex.quote(str(token_path))})\"")
            async for signum in signals:
                _say(f"tunneld edge: {signal.Signals(signum).name}: shutting down "
                     f"(grace period {cfg.grace_period:g}s)")
                edge.shutdown()
                break
            # A second signal cuts the grace period short.
            async with trio.open_nursery() as waiter:
                async def second_signal() -> None:
                    async for _ in signals:
                        nursery.cancel_scope.cancel()
                        return
                waiter.start_soon(second_signal)
                await edge.stopped.wait()
                waiter.cancel_scope.cancel()
    return 0
