"""Muxado's stream-state rules (sans-IO): what a DATA frame may do to the streams of a session.

The Trio adapter (:mod:`tunneld.core._mux`) owns the streams; these functions only decide, so
the rules are tested synchronously, h11-style.  Stream ids are 31-bit; clients (agents) open
odd ids, servers (the edge) even ones.
"""

from __future__ import annotations

from tunneld.core._errors import RemoteProtocolError

from ._frames import ErrorCode

__all__ = ["admit_syn", "check_data_after_fin", "orphan_frame_reply"]


def admit_syn(stream_id: int, *, we_are_client: bool, already_open: bool, goaway_sent: bool,
              remote_open: int, max_remote_open: int, open_total: int, max_open_total: int,
              pending_accept: int, accept_backlog: int) -> int | None:
    """Whether a peer's SYN for ``stream_id`` opens a stream: None if so, else the RST code.

    Raises :class:`RemoteProtocolError` (the session ends) for a SYN on a stream that is open
    or an id of our own parity: those are protocol violations, not load.  A SYN after our
    GOAWAY, or beyond the stream limits, is refused (STREAM_REFUSED) and a full accept queue is
    ACCEPT_QUEUE_FULL, as Go's muxado answers: the session goes on.
    """
    if already_open:
        raise RemoteProtocolError(f"SYN for open stream {stream_id}")
    if (stream_id % 2 == 1) == we_are_client:
        raise RemoteProtocolError(f"peer opened stream {stream_id} with our parity")
    if pending_accept >= accept_backlog:
        return ErrorCode.ACCEPT_QUEUE_FULL
    if goaway_sent or remote_open >= max_remote_open or open_total >= max_open_total:
        return ErrorCode.STREAM_REFUSED
    return None


def orphan_frame_reply(has_data: bool) -> int | None:
    """The RST code for a frame on a stream we no longer know, or None to ignore it.

    A late FIN (the peer closing a stream we already forgot) is ignored, as Go does; data gets
    STREAM_CLOSED so the peer stops sending.
    """
    return ErrorCode.STREAM_CLOSED if has_data else None


def check_data_after_fin(stream_id: int, eof_received: bool, has_data: bool) -> None:
    """DATA after the peer's own FIN on a stream breaks the protocol: RemoteProtocolError."""
    if has_data and eof_received:
        raise RemoteProtocolError(f"DATA after FIN on stream {stream_id}", code=ErrorCode.PROTOCOL)
