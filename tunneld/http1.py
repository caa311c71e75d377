"""HTTP/1 building blocks for plugins: head parsing and rewriting, bodies, and the relay.

A public module of the plugin API (see :mod:`tunneld.plugin`): the http plugin routes and
relays with these, the file plugin serves files with them.  Heads are parsed with httptools
and checked against RFC 9110/9112 (request smuggling: conflicting framing, bad chunk lines);
:class:`Reader` is a buffered stream that reads whole heads within a per-connection and a
process-wide byte budget.

For now a re-export of the http plugin's modules; the code moves here in the second phase of
issue 12, when the http plugin itself imports it from here.
"""

from __future__ import annotations

from tunneld.plugins.http._relay import HEAD_READ as HEAD_READ
from tunneld.plugins.http._relay import HeadBudget as HeadBudget
from tunneld.plugins.http._relay import Reader as Reader
from tunneld.plugins.http._relay import Truncated as Truncated
from tunneld.plugins.http._relay import abort as abort
from tunneld.plugins.http._relay import copy_body as copy_body
from tunneld.plugins.http._wire import MAX_HEAD as MAX_HEAD
from tunneld.plugins.http._wire import BadMessage as BadMessage
from tunneld.plugins.http._wire import BodyKind as BodyKind
from tunneld.plugins.http._wire import ChunkedScanner as ChunkedScanner
from tunneld.plugins.http._wire import RequestHead as RequestHead
from tunneld.plugins.http._wire import ResponseHead as ResponseHead
from tunneld.plugins.http._wire import error_response as error_response
from tunneld.plugins.http._wire import find_head_end as find_head_end
from tunneld.plugins.http._wire import header_value as header_value
from tunneld.plugins.http._wire import parse_request_head as parse_request_head
from tunneld.plugins.http._wire import parse_response_head as parse_response_head
from tunneld.plugins.http._wire import rewrite_head as rewrite_head
from tunneld.plugins.http._wire import set_header as set_header
from tunneld.plugins.http._wire import wants_json as wants_json

__all__ = [
    "HEAD_READ",
    "MAX_HEAD",
    "BadMessage",
    "BodyKind",
    "ChunkedScanner",
    "HeadBudget",
    "Reader",
    "RequestHead",
    "ResponseHead",
    "Truncated",
    "abort",
    "copy_body",
    "error_response",
    "find_head_end",
    "header_value",
    "parse_request_head",
    "parse_response_head",
    "rewrite_head",
    "set_header",
    "wants_json",
]
