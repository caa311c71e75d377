"""Remote management: the edge asks an agent to stop, restart or update (ngrok's Stop/Restart/Update).

Each command is a server-opened typed stream (Restart=4, Stop=5, Update=6) carrying one JSON
object; the agent answers ``{"Error": ""}`` (or the reason it refuses) and then does it:
a stopped agent exits 0, a restarted one re-executes itself and resumes its session and
tunnels, an updated one installs the new release first and then restarts
(../shared/reference/ngrok-protocol.md §3.6).

The edge side lives here as functions taking an ``AgentSession`` (the admin API's
``POST /tunnel_sessions/{id}/stop|restart|update`` call them); the agent side is
``Agent._remote_command`` in ``_agent.py``, which shares the error codes below.

Error codes are ngrok's: 804/805/806 = restart/stop/update not supported by the agent (for
ours: ``remote_management: false``), 807/808/809 = the agent tried and failed.
"""

from __future__ import annotations

import enum
import logging
from typing import TYPE_CHECKING

import attrs
import trio

from . import proto
from ._errors import RemoteProtocolError, TunneldError, parse_wire_error
from ._rpc import read_message

if TYPE_CHECKING:
    from ._edge import AgentSession

log = logging.getLogger("tunneld.remote")

#: How long the edge waits for an agent's answer to Stop or Restart.
COMMAND_TIMEOUT = 30.0
#: How long it waits for Update's answer: the agent answers once pip has installed the release.
UPDATE_TIMEOUT = 300.0


class RemoteCode(enum.IntEnum):
    """ngrok's error codes of remote management (``ERR_NGROK_<n>``; ours spell ``ERR_TUNNELD_<n>``)."""

    RESTART_UNSUPPORTED = 804
    STOP_UNSUPPORTED = 805
    UPDATE_UNSUPPORTED = 806
    RESTART_FAILED = 807
    STOP_FAILED = 808
    UPDATE_FAILED = 809

    @property
    def label(self) -> str:
        return f"ERR_TUNNELD_{int(self)}"


class Op(enum.Enum):
    """One remote command: its stream type and its two error codes."""

    STOP = "stop"
    RESTART = "restart"
    UPDATE = "update"

    @property
    def stream_type(self) -> int:
        return {Op.STOP: proto.StreamType.STOP, Op.RESTART: proto.StreamType.RESTART,
                Op.UPDATE: proto.StreamType.UPDATE}[self]

    @property
    def unsupported(self) -> RemoteCode:
        return {Op.STOP: RemoteCode.STOP_UNSUPPORTED, Op.RESTART: RemoteCode.RESTART_UNSUPPORTED,
                Op.UPDATE: RemoteCode.UPDATE_UNSUPPORTED}[self]

    @property
    def failed(self) -> RemoteCode:
        return {Op.STOP: RemoteCode.STOP_FAILED, Op.RESTART: RemoteCode.RESTART_FAILED,
                Op.UPDATE: RemoteCode.UPDATE_FAILED}[self]

    @classmethod
    def for_stream_type(cls, stream_type: int) -> Op | None:
        for op in cls:
            if op.stream_type == stream_type:
                return op
        return None


def remote_error(message: str, code: RemoteCode) -> str:
    """An ``Error`` string for a command's answer, with the code in both spellings (as ``wire_error``)."""
    return f"{message}\n\n{code.label}\nERR_NGROK_{int(code)}"


class RemoteCommandError(TunneldError):
    """The agent refused a remote command, failed to carry it out, or did not answer."""

    def __init__(self, message: str, code: RemoteCode, *, unsupported: bool = False,
                 answered: bool = True) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        #: The agent does not do this command at all (vs. tried and failed).
        self.unsupported = unsupported
        #: False when the agent gave no answer (timeout, session gone).
        self.answered = answered

    def __str__(self) -> str:
        return f"{self.message} ({self.code.label})"


@attrs.frozen
class RemoteCommandReceived(Exception):  # noqa: N818 - a control-flow signal, not an error
    """Raised out of ``Agent.run`` once the agent has accepted a remote command.

    The program running the agent acts on it: exit 0 for stop, re-execute for restart and
    update (the update is already installed when this is raised).
    """

    op: Op


# ---- the edge side ----------------------------------------------------------------------------


def _declared(session: AgentSession, op: Op) -> str | None:
    """What the agent said about ``op`` in its Auth: None = too old to know it, "" = supported."""
    extra = session.auth.extra if session.auth is not None else None
    if extra is None:
        return None
    return {Op.STOP: extra.stop_unsupported_error, Op.RESTART: extra.restart_unsupported_error,
            Op.UPDATE: extra.update_unsupported_error}[op]


async def _command(session: AgentSession, op: Op, msg: object, timeout: float) -> None:
    if not session.authed or not session.client_id:
        raise RemoteCommandError("the agent session is not established", op.failed, answered=False)
    if _declared(session, op) is None:
        # Its Auth had no field for the command: a client that may not know the stream type
        # (ngrok-go would take an unknown type for a proxy stream), so nothing is sent.
        raise RemoteCommandError(f"the agent does not support remote {op.value} (it predates the command)",
                                 op.unsupported, unsupported=True, answered=False)
    # Sent even when the agent declared the command unsupported: it knows the type and answers
    # with its reason, which may be more precise now than at Auth.
    try:
        with trio.fail_after(timeout):
            stream = await session.mux.open_stream(proto.encode_stream_type(op.stream_type)
                                                   + proto.encode_message(msg))
            try:
                resp = await read_message(stream, proto.CommandResp)
            finally:
                await stream.aclose()
    except trio.TooSlowError:
        raise RemoteCommandError(f"the agent did not answer the remote {op.value} within {timeout:g}s",
                                 op.failed, answered=False) from None
    except (trio.BrokenResourceError, trio.ClosedResourceError, RemoteProtocolError) as exc:
        raise RemoteCommandError(f"the agent's session ended before it answered the remote {op.value}: "
                                 f"{exc or type(exc).__name__}", op.failed, answered=False) from None
    if resp.error:
        message, code = parse_wire_error(resp.error)
        try:
            rcode = RemoteCode(code) if code is not None else op.failed
        except ValueError:
            rcode = op.failed
        log.info("agent %s refused remote %s: %s", session.client_id, op.value, message)
        raise RemoteCommandError(message or f"the agent refused the remote {op.value}", rcode,
                                 unsupported=rcode == op.unsupported)
    log.info("agent %s accepted remote %s", session.client_id, op.value)


async def remote_stop(session: AgentSession, *, timeout: float = COMMAND_TIMEOUT) -> None:
    """Ask the agent of ``session`` to stop (it exits 0).

    Raises:
        RemoteCommandError: refused (``.unsupported``), failed, or no answer in ``timeout`` seconds.
    """
    await _command(session, Op.STOP, proto.Stop(), timeout)


async def remote_restart(session: AgentSession, *, timeout: float = COMMAND_TIMEOUT) -> None:
    """Ask the agent to re-execute itself; it comes back with the same tunnels and URLs.

    Raises:
        RemoteCommandError: as :func:`remote_stop`.
    """
    await _command(session, Op.RESTART, proto.Restart(), timeout)


async def remote_update(session: AgentSession, version: str = "", *, permit_major_version: bool = False,
                        timeout: float = UPDATE_TIMEOUT) -> None:
    """Ask the agent to update itself (to ``version``, or its channel's newest) and restart.

    The agent answers once the release is installed, so this may take a while.

    Raises:
        RemoteCommandError: as :func:`remote_stop` (e.g. no newer release, pip failed).
    """
    msg = proto.Update(version=version, permit_major_version=permit_major_version)
    await _command(session, Op.UPDATE, msg, timeout)
