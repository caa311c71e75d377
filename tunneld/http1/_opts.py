"""Bind options of HTTP tunnels in ngrok's wire shape, for whoever builds Binds (agent, ssh gateway).

Nothing here imports trio.
"""

from __future__ import annotations

from typing import Any


def basic_auth_bind_opts(credentials: list[str]) -> dict[str, Any]:
    """Bind options carrying ``credentials`` (``user:password`` strings) in ngrok's wire shape."""
    if len(credentials) == 1:
        return {"Auth": credentials[0]}
    listed = []
    for credential in credentials:
        user, _, password = credential.partition(":")
        listed.append({"username": user, "cleartext_password": password})
    return {"BasicAuth": {"credentials": listed}}
