"""HTTP/1 building blocks for plugins: head parsing and rewriting, bodies, and the relay.

A public module of the plugin API (see :mod:`tunneld.plugin`): the http plugin routes and
relays with these, the file plugin serves files with them, the ssh gateway answers with
:func:`error_response`.  Heads are parsed with httptools and checked against RFC 9110/9112
(request smuggling: conflicting framing, bad chunk lines); :class:`Reader` is a buffered stream
that reads whole heads within a per-connection and a process-wide byte budget;
:func:`basic_auth_bind_opts` spells basic-auth credentials as Bind options.

``_wire`` (and ``_opts``) are sans-IO (they never import trio), ``_relay`` is the Trio side.  Names
are resolved on first use (PEP 562), so ``tunneld.http1._wire`` alone imports no trio either.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._opts import basic_auth_bind_opts as basic_auth_bind_opts
    from ._relay import HEAD_READ as HEAD_READ
    from ._relay import ExchangeTap as ExchangeTap
    from ._relay import HeadBudget as HeadBudget
    from ._relay import Outcome as Outcome
    from ._relay import Progress as Progress
    from ._relay import Reader as Reader
    from ._relay import ResponseFilter as ResponseFilter
    from ._relay import Truncated as Truncated
    from ._relay import UpstreamFailed as UpstreamFailed
    from ._relay import abort as abort
    from ._relay import copy_body as copy_body
    from ._relay import exchange as exchange
    from ._relay import relay_upgraded as relay_upgraded
    from ._relay import trim_heap as trim_heap
    from ._wire import MAX_CHUNK_LINE as MAX_CHUNK_LINE
    from ._wire import MAX_FORWARDED_HEAD as MAX_FORWARDED_HEAD
    from ._wire import MAX_HEAD as MAX_HEAD
    from ._wire import BadMessage as BadMessage
    from ._wire import BodyKind as BodyKind
    from ._wire import ChunkedScanner as ChunkedScanner
    from ._wire import RequestHead as RequestHead
    from ._wire import ResponseHead as ResponseHead
    from ._wire import error_response as error_response
    from ._wire import find_head_end as find_head_end
    from ._wire import header_value as header_value
    from ._wire import parse_request_head as parse_request_head
    from ._wire import parse_response_head as parse_response_head
    from ._wire import rewrite_head as rewrite_head
    from ._wire import set_header as set_header
    from ._wire import wants_json as wants_json

#: Name → the module defining it (``tests/test_plugin_api.py`` reads this table as imports).
_EXPORTS: dict[str, str] = {
    "basic_auth_bind_opts": "._opts",
    "MAX_HEAD": "._wire",
    "MAX_FORWARDED_HEAD": "._wire",
    "MAX_CHUNK_LINE": "._wire",
    "BadMessage": "._wire",
    "BodyKind": "._wire",
    "ChunkedScanner": "._wire",
    "RequestHead": "._wire",
    "ResponseHead": "._wire",
    "error_response": "._wire",
    "find_head_end": "._wire",
    "header_value": "._wire",
    "parse_request_head": "._wire",
    "parse_response_head": "._wire",
    "rewrite_head": "._wire",
    "set_header": "._wire",
    "wants_json": "._wire",
    "HEAD_READ": "._relay",
    "ExchangeTap": "._relay",
    "HeadBudget": "._relay",
    "Reader": "._relay",
    "Truncated": "._relay",
    "abort": "._relay",
    "copy_body": "._relay",
    "exchange": "._relay",
    "Outcome": "._relay",
    "Progress": "._relay",
    "UpstreamFailed": "._relay",
    "ResponseFilter": "._relay",
    "relay_upgraded": "._relay",
    "trim_heap": "._relay",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    try:
        module = _EXPORTS[name]
    except KeyError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
