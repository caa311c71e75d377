"""``tunneld start`` and the tunnel commands (``tunneld http|tcp|tls|…``): run the agent in the foreground."""

from __future__ import annotations

import logging
import signal
import sys

import trio

from . import __version__
from .core import Agent, AgentConfig, AuthFailed, ConfigError, PluginError, TunnelConfig, TunnelRejected

log = logging.getLogger("tunneld.agent")


def print_console(agent: Agent, web: str | None) -> None:
    """The ngrok-style status block (printed again after each reconnect)."""
    rows = [
        ("Session Status", agent.status),
        ("Version", __version__),
        ("Server", agent.config.server_addr),
        ("Web Interface", f"http://{web}" if web else "disabled"),
    ]
    rows += [("Forwarding", f"{t.public_url} -> {t.upstream}") for t in agent.tunnels]
    out = ["tunneld" + " " * 23 + "(Ctrl+C to quit)", ""]
    out += [f"{k:<30}{v}" for k, v in rows]
    print("\n".join(out), flush=True)


def run_agent(cfg: AgentConfig, tunnels: list[TunnelConfig], *, console: bool = True) -> int:
    try:
        agent = Agent(cfg, tunnels)
    except (PluginError, ConfigError, ValueError) as exc:  # e.g. a tls tunnel's --crt/--key pair
        print(f"tunneld: error: {exc}", file=sys.stderr)
        return 1
    failure: BaseException | None = None
    try:
        trio.run(_main, agent, console)
    except* (AuthFailed, TunnelRejected, OSError) as group:
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
    return return_code


def _first_leaf(exc: BaseException) -> BaseException:
    """The first real exception inside (nested) exception groups from Trio nurseries."""
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc


async def _main(agent: Agent, console: bool) -> None:
    from .core._util import freeze_startup_objects
    from .core._web import serve_web

    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            web = None
            if agent.config.web_addr:
                web = await nursery.start(serve_web, agent, agent.config.web_addr)
            log.info("tunnel session started", extra={"event": "tunnel session started",
                                                       "fields": {"obj": "tunnels.session"}})
            await nursery.start(agent.run)
            freeze_startup_objects()

            async def console_task() -> None:
                while True:
                    await agent.online.wait()
                    if console:
                        print_console(agent, web)
                    event = agent.online
                    # The agent swaps in a new Event when it goes offline; nothing signals the swap.
                    while agent.online is event:  # noqa: ASYNC110
                        await trio.sleep(0.2)

            nursery.start_soon(console_task)
            async for _ in signals:
                nursery.cancel_scope.cancel()
                break
