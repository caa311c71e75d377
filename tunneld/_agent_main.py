"""``tunneld start`` and the tunnel commands (``tunneld http|tcp|tls|…``): run the agent in the foreground.

The agent's lifecycle as a process:

- Ctrl+C / SIGTERM stop it at any moment, connected or not.  Connected, it first unbinds its
  tunnels, so the edge releases their names at once (a crash or a lost link keeps them held
  for the edge's hold period instead); a second signal skips that.
- Until it is online the console says what it is doing: connecting, the last error, the next try.
- An edge certificate it cannot verify ends it at once with a hint (exit 1), unless it was
  asked to keep trying (``retry: true`` in the config file, or ``TUNNELD_RETRY=1``).
- Remote management (``tunneld/core/_remote.py``): a remote stop exits 0; a remote restart
  re-executes the same command line, handing the session and its tunnels' resume tokens to
  the new process through an inherited file descriptor (``TUNNELD_RESUME_FD``), so the edge
  gives it the same URLs; a remote update installs the release (``tunneld/_update.py``) first.
- ``update_check: true``: a background check for a newer release on start (a notice, never
  an obstacle).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import tempfile
import time
from typing import Any

import trio

from . import __version__
from .core import (
    Agent,
    AgentConfig,
    AuthFailed,
    ConfigError,
    PluginError,
    TunnelConfig,
    TunnelRejected,
    proto,
)
from .core._agent import CertificateFailed
from .core._remote import Op, RemoteCommandReceived

log = logging.getLogger("tunneld.agent")

#: Environment variable naming the inherited descriptor with a restarted agent's resume state.
ENV_RESUME_FD = "TUNNELD_RESUME_FD"
#: ``TUNNELD_RETRY=1``: keep retrying even when the edge's certificate is not trusted.
ENV_RETRY = "TUNNELD_RETRY"
#: Seconds a graceful stop spends unbinding and letting proxied connections finish.
STOP_GRACE = 5.0
#: Seconds the start-up update check may take (it runs in the background).
UPDATE_CHECK_TIMEOUT = 30.0


def print_console(agent: Agent, web: str | None) -> None:
    """The ngrok-style status block (printed again on every change of state)."""
    rows = [("Session Status", agent.status)]
    if not agent.online.is_set() and agent.last_error:
        rows.append(("Last Error", agent.last_error))
        if agent.retry_at is not None:
            wait = max(0.0, agent.retry_at - time.time())
            rows.append(("Next Try", f"in {wait:.1f}s (attempt {agent.failed_attempts + 1})"))
    rows += [
        ("Version", __version__),
        ("Server", agent.config.server_addr),
        ("Web Interface", f"http://{web}" if web else "disabled"),
    ]
    rows += [("Forwarding", f"{t.public_url or '(not bound yet)'} -> {t.upstream}") for t in agent.tunnels]
    out = ["tunneld" + " " * 23 + "(Ctrl+C to quit)", ""]
    out += [f"{k:<30}{v}" for k, v in rows]
    print("\n".join(out) + "\n", flush=True)


def _truthy(value: object) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "on", "forever")
    return bool(value)


def run_agent(cfg: AgentConfig, tunnels: list[TunnelConfig], *, console: bool = True) -> int:
    """Run the agent until stopped; the process exit code."""
    try:
        agent = Agent(cfg, tunnels)
    except (PluginError, ConfigError, ValueError) as exc:  # e.g. a tls tunnel's --crt/--key pair
        print(f"tunneld: error: {exc}", file=sys.stderr)
        return 1
    agent.remote_ops = frozenset(Op)
    agent.updater = _updater(cfg)
    agent.retry = _truthy(getattr(cfg, "retry", False)) or _truthy(os.environ.get(ENV_RETRY, ""))
    _take_resume_state(agent)
    failure: BaseException | None = None
    command: Op | None = None
    try:
        trio.run(_main, agent, console)
    except* RemoteCommandReceived as group:
        received = _first_leaf(group)
        assert isinstance(received, RemoteCommandReceived)
        command = received.op
        return_code = 0
    except* (AuthFailed, TunnelRejected, CertificateFailed, OSError) as group:
        failure = _first_leaf(group)
    except* KeyboardInterrupt:
        return_code = 130
    else:
        return_code = 0
    if failure is not None:
        prefix = "authentication failed: " if isinstance(failure, AuthFailed) else ""
        print(f"tunneld: error: {prefix}{failure}", file=sys.stderr)
        log.error("%s%s", prefix, failure, extra={"event": "session failed", "fields": {"err": str(failure)}})
        return 1
    if command is Op.STOP:
        log.info("stopped by the edge (remote stop)", extra={"event": "stopped by remote stop", "fields": {}})
        print("tunneld: stopped by the edge (remote stop)", file=sys.stderr, flush=True)
        return 0
    if command is not None:
        return _reexec(agent, command)
    return return_code


def _first_leaf(exc: BaseException) -> BaseException:
    """The first real exception inside (nested) exception groups from Trio nurseries."""
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc


# ---- restart: re-execute with the session handed over --------------------------------------------


def reexec_argv() -> list[str]:
    """The command line that started this process, run by the same interpreter.

    ``python -X dev -m tunneld http 80`` and ``/usr/bin/tunneld http 80`` are replayed as they
    were (interpreter flags, console script); anything else as ``python -m tunneld ARGS``.
    """
    tail = sys.argv[1:]
    orig = list(getattr(sys, "orig_argv", []))
    if len(orig) > len(tail) and orig[len(orig) - len(tail):] == tail:
        head = orig[:len(orig) - len(tail)]
        if len(head) >= 2:
            return [sys.executable, *head[1:], *tail]
    return [sys.executable, "-m", "tunneld", *tail]


def _reexec(agent: Agent, op: Op) -> int:
    """Replace this process by a fresh agent that resumes ``agent``'s session; returns only on failure."""
    state = json.dumps(agent.resume_state()).encode()
    # An unlinked temporary file, inherited across exec: the resume tokens are never in the
    # environment or on disk under a name, and there is no pipe capacity to worry about.
    handle = tempfile.TemporaryFile()
    handle.write(state)
    handle.flush()
    handle.seek(0)
    os.set_inheritable(handle.fileno(), True)
    argv = reexec_argv()
    env = dict(os.environ, **{ENV_RESUME_FD: str(handle.fileno())})
    log.info("re-executing for the remote %s: %s", op.value, " ".join(argv),
             extra={"event": "restarting", "fields": {"op": op.value}})
    print(f"tunneld: restarting (remote {op.value})", file=sys.stderr, flush=True)
    for h in logging.getLogger().handlers:
        h.flush()
    sys.stdout.flush()
    try:
        os.execve(sys.executable, argv, env)
    except OSError as exc:
        print(f"tunneld: error: cannot restart: {exc}", file=sys.stderr)
        return 1
    raise AssertionError("unreachable")  # pragma: no cover


def _take_resume_state(agent: Agent) -> None:
    """Resume the session of the agent this process replaced (remote restart), if it left one."""
    fd_text = os.environ.pop(ENV_RESUME_FD, "")
    if not fd_text:
        return
    try:
        with os.fdopen(int(fd_text), "rb") as handle:
            state: Any = json.loads(handle.read(1 << 20))
        if not isinstance(state, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as exc:
        log.warning("cannot resume the previous session (%s): starting a new one", exc)
        return
    agent.apply_resume_state(state)
    log.info("resuming session %s after a restart", agent.client_id or "?",
             extra={"event": "resuming session", "fields": {"id": agent.client_id}})


# ---- update ----------------------------------------------------------------------------------------


def _updater(cfg: AgentConfig) -> Any:
    """The agent's ``updater``: install what a remote Update asks for (UpdateError if it cannot)."""
    from ._update import UpdateError, find_links_from_env, install_async, plan_async

    channel = str(getattr(cfg, "update_channel", "") or "stable")

    async def update(msg: proto.Update) -> None:
        links = find_links_from_env()
        chosen = await plan_async(channel, links, version=msg.version,
                                  permit_major_version=msg.permit_major_version)
        if chosen.target is None:
            raise UpdateError(f"tunneld {chosen.current} is already the newest release of the {channel} "
                              f"channel of {chosen.source}")
        await install_async(chosen.target, links)
        log.info("installed tunneld %s (was %s)", chosen.target, chosen.current,
                 extra={"event": "updated", "fields": {"version": str(chosen.target)}})

    return update


async def _check_for_update(agent: Agent) -> None:
    """``update_check``: log (and print) a notice when the channel has a newer release."""
    from ._update import UpdateError, find_links_from_env, plan_async, verify_async

    channel = str(getattr(agent.config, "update_channel", "") or "stable")
    links = find_links_from_env()
    try:
        chosen = await plan_async(channel, links, timeout=UPDATE_CHECK_TIMEOUT)
        if chosen.target is not None:
            await verify_async(chosen.target, links, timeout=UPDATE_CHECK_TIMEOUT)
    except (UpdateError, ValueError) as exc:
        log.info("update check failed: %s", exc)
        return
    if chosen.target is not None:
        flag = "" if channel == "stable" else f" --channel {channel}"
        text = (f"tunneld {chosen.target} is available (this is {chosen.current}): "
                f"run 'tunneld update{flag}'")
        log.warning("%s", text, extra={"event": "update available",
                                       "fields": {"version": str(chosen.target)}})
        print(f"tunneld: notice: {text}", file=sys.stderr, flush=True)


# ---- the Trio side ---------------------------------------------------------------------------------


async def _watch_signals(signals: Any, agent: Agent, scope: trio.CancelScope) -> None:
    """First SIGINT/SIGTERM: unbind (names released at once), then stop; a second one: stop now."""
    async for signum in signals:
        name = signal.Signals(signum).name
        log.info("stopping (%s)", name, extra={"event": "stopping", "fields": {"signal": name}})
        if agent.online.is_set():
            async with trio.open_nursery() as graceful:
                async def second_signal() -> None:
                    async for _ in signals:
                        graceful.cancel_scope.cancel()
                        return

                async def leave() -> None:
                    await agent.stop_tunnels(STOP_GRACE)
                    graceful.cancel_scope.cancel()

                graceful.start_soon(second_signal)
                graceful.start_soon(leave)
        scope.cancel()
        return


async def _console(agent: Agent, web: str | None, console: bool) -> None:
    """Print the status block whenever the agent's state changes (online, reconnecting, new error)."""
    shown: tuple[object, ...] | None = None
    while True:
        state = (agent.status, agent.failed_attempts, agent.online.is_set(), agent.online)
        if state != shown:
            shown = state
            if console:
                print_console(agent, web)
        # The agent swaps in a new Event when it goes offline; nothing signals the swap.
        await trio.sleep(0.2)


async def _main(agent: Agent, console: bool) -> None:
    from .core._giveback import watch_crowds
    from .core._util import freeze_startup_objects
    from .core._web import serve_web

    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            # First: a signal must stop the agent at any moment, connected or not.
            nursery.start_soon(_watch_signals, signals, agent, nursery.cancel_scope)
            web = None
            if agent.config.web_addr:
                web = await nursery.start(serve_web, agent, agent.config.web_addr)
            log.info("tunnel session started", extra={"event": "tunnel session started",
                                                       "fields": {"obj": "tunnels.session"}})
            nursery.start_soon(_console, agent, web, console)
            if _truthy(getattr(agent.config, "update_check", False)):
                nursery.start_soon(_check_for_update, agent)
            # Memory given back once a crowd of connections has come and gone.
            nursery.start_soon(watch_crowds)
            await nursery.start(agent.run)
            freeze_startup_objects()
