"""Muxado's stream-state rules, synchronously (tunneld.core.proto._streamrules)."""

from __future__ import annotations

from typing import Any

import pytest

from tunneld.core.proto import (
    ErrorCode,
    RemoteProtocolError,
    admit_syn,
    check_data_after_fin,
    orphan_frame_reply,
)

ROOMY: dict[str, Any] = dict(already_open=False, goaway_sent=False, remote_open=0, max_remote_open=10,
                             open_total=0, max_open_total=10, pending_accept=0, accept_backlog=10)


def syn(stream_id: int, *, we_are_client: bool = False, **changes: Any) -> int | None:
    return admit_syn(stream_id, we_are_client=we_are_client, **{**ROOMY, **changes})


def test_a_syn_of_the_peers_parity_opens_a_stream() -> None:
    assert syn(3) is None  # an agent (client) opens odd ids on the edge
    assert syn(2, we_are_client=True) is None  # the edge opens even ids on the agent


@pytest.mark.parametrize(("stream_id", "we_are_client"), [(2, False), (3, True)])
def test_a_syn_of_our_own_parity_ends_the_session(stream_id: int, we_are_client: bool) -> None:
    with pytest.raises(RemoteProtocolError, match="our parity"):
        syn(stream_id, we_are_client=we_are_client)


def test_a_syn_for_an_open_stream_ends_the_session() -> None:
    with pytest.raises(RemoteProtocolError, match="SYN for open stream 5"):
        syn(5, already_open=True)


@pytest.mark.parametrize("changes", [
    {"goaway_sent": True},
    {"remote_open": 10},
    {"open_total": 10},
])
def test_load_refuses_the_stream_but_keeps_the_session(changes: dict[str, Any]) -> None:
    assert syn(7, **changes) == ErrorCode.STREAM_REFUSED


def test_a_full_accept_queue_says_so_first() -> None:
    assert syn(7, pending_accept=10) == ErrorCode.ACCEPT_QUEUE_FULL
    assert syn(7, pending_accept=10, goaway_sent=True) == ErrorCode.ACCEPT_QUEUE_FULL


def test_frames_for_a_forgotten_stream() -> None:
    assert orphan_frame_reply(has_data=True) == ErrorCode.STREAM_CLOSED
    assert orphan_frame_reply(has_data=False) is None  # a late FIN is ignored, as Go does


def test_data_after_the_peers_fin() -> None:
    check_data_after_fin(9, eof_received=False, has_data=True)
    check_data_after_fin(9, eof_received=True, has_data=False)  # a repeated bare FIN is harmless
    with pytest.raises(RemoteProtocolError, match="DATA after FIN on stream 9") as info:
        check_data_after_fin(9, eof_received=True, has_data=True)
    assert info.value.code == ErrorCode.PROTOCOL
