"""Per-stream flow-control accounting (muxado credit), kept apart from any IO.

muxado has no window negotiation: each side assumes the other grants 256 KiB of receive
buffer per stream.  The receiver returns credit with WNDINC as its application consumes
bytes.  tunneld peers may agree a larger window through ``Auth.Extra`` (frp lost 10x
throughput to a 256 KiB window on real links); official clients never see it.
"""

from __future__ import annotations

from .._errors import RemoteProtocolError
from ._frames import ErrorCode

__all__ = ["DEFAULT_WINDOW", "MAX_DATA_FRAME", "ReceiveWindow"]

#: The window every muxado peer assumes (Go ``MaxWindowSize``, Rust ``DEFAULT_WINDOW``).
DEFAULT_WINDOW = 256 * 1024
#: The largest DATA payload we write; larger frames buy nothing and delay other streams.
MAX_DATA_FRAME = 256 * 1024


class ReceiveWindow:
    """Tracks the bytes a peer sent on one stream that we have not yet returned as credit.

    ``buffered`` bytes wait in the stream for the application; ``unacked`` bytes were read
    by it but not yet returned to the peer.  Their sum may never exceed ``size``: a peer that
    sends more broke the protocol.
    """

    __slots__ = ("size", "buffered", "unacked", "_threshold")

    def __init__(self, size: int = DEFAULT_WINDOW) -> None:
        self.size = size
        self.buffered = 0
        self.unacked = 0
        # Returning credit in quarter-window steps keeps WNDINC frames rare without ever
        # letting the sender run dry while the reader keeps up.
        self._threshold = max(1, size // 4)

    def on_data(self, n: int) -> None:
        """Account for ``n`` bytes received; raise if the peer overran its credit."""
        self.buffered += n
        if self.buffered + self.unacked > self.size:
            raise RemoteProtocolError(
                f"peer sent {self.buffered + self.unacked} bytes into a {self.size}-byte window",
                code=ErrorCode.FLOW_CONTROL,
            )

    def on_consumed(self, n: int) -> int:
        """Account for ``n`` bytes handed to the application; return a WNDINC to send (or 0)."""
        self.buffered -= n
        self.unacked += n
        if self.unacked >= self._threshold:
            inc, self.unacked = self.unacked, 0
            return inc
        return 0
