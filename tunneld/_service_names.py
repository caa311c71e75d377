"""What every service backend shares: the service's name and the error a failed operation raises."""

from __future__ import annotations

SERVICE_NAME = "tunneld"


class ServiceError(Exception):
    """A service operation failed; the message is one line for the user."""
