"""The agent's tunnels as its local API shows them (ngrok's ``/api/tunnels`` objects).

Its own module so that the web app (:mod:`._web`) and the pages (:mod:`._inspector`) share it
without importing each other.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any
from urllib.parse import quote

if TYPE_CHECKING:
    from ._agent import Agent, AgentTunnel


def tunnel_json(t: AgentTunnel) -> dict[str, Any]:
    """One tunnel in ngrok's ``/api/tunnels`` shape."""
    return {
        "ID": t.tunnel_id,
        "name": t.name,
        "uri": f"/api/tunnels/{quote(t.name)}",
        "public_url": t.public_url,
        "proto": t.proto,
        # Each type says what its config looks like (ngrok's shapes: addr, inspect, ...).
        "config": t.type.api_config(t.config, t.upstream),
        "metrics": t.metrics.as_json(),
        # tunneld's addition: who is connected (public client addresses), newest last.
        "connections": [c.as_json() for c in t.metrics.recent],
    }


def listed_tunnels(agent: Agent) -> list[AgentTunnel]:
    """The tunnels the API shows: those the edge has bound (with an ID), as ngrok lists them.

    A tunnel not bound yet (the first connection under way, or started while offline) has no
    URL or ID to show; a bound one keeps both while the agent reconnects.
    """
    return [t for t in agent.tunnels if t.tunnel_id]
