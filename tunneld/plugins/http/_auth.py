"""HTTP Basic authentication of public requests, enforced by the edge (``--basic-auth``).

Theory of operation
-------------------
A client asks for basic auth in the Bind options, in one of two shapes (keys in any case):

* ``"Auth": "user:password"``: one credential, as the ngrok 2.x agent sends for ``-auth`` and
  as our agent sends for a single ``--basic-auth``;
* ``"BasicAuth": {"credentials": [{"username": "u", "cleartext_password": "p"}, ...]}``: the
  SDKs' shape (Go marshals its protobuf struct with snake_case JSON names, Rust mirrors it),
  which our agent sends for several ``--basic-auth`` flags.

Both may be present; every credential listed is accepted.  The edge checks each credential
against ngrok's limits (username 1-128 characters without ``:``, password 8-128) so that a
client skipping the check is refused at bind time, and keeps nothing but a keyed BLAKE2b digest
of ``user:password`` under a random per-process key: the cleartext is neither stored nor logged.

Every request on a protected host, including each request of a keep-alive connection, must
carry ``Authorization: Basic base64(user:password)`` matching one credential; otherwise the
edge answers 401 with ``WWW-Authenticate`` and nothing reaches the agent.  The comparison runs
over every credential with :func:`hmac.compare_digest`, so its time does not depend on which
one matched or how much of it.  The ``Authorization`` header is passed on to the upstream
unchanged, as ngrok does, so an application may read the user name from it.

Nothing here imports trio.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
from collections.abc import Iterable
from typing import Any

from tunneld.plugin import Code, TunnelRejected, split_basic_auth

#: Realm announced in the 401's ``WWW-Authenticate`` (ngrok announces its own name).
REALM = "tunneld"
#: Random key of the credential digests; per process, so digests are useless elsewhere.
_KEY = secrets.token_bytes(32)
#: Authorization headers longer than this cannot match (2 x 128 characters, UTF-8, base64).
_MAX_AUTHORIZATION = 1100


def _digest(credential: bytes) -> bytes:
    # Keyed BLAKE2b is a MAC in its own right, and 2-3x cheaper per request than HMAC-SHA256.
    return hashlib.blake2b(credential, key=_KEY, digest_size=32).digest()


class BasicAuth:
    """The credentials a tunnel demands, held as keyed digests only."""

    __slots__ = ("_digests",)

    def __init__(self, credentials: Iterable[str]) -> None:
        self._digests = [_digest(c.encode()) for c in credentials]
        if not self._digests:
            raise ValueError("BasicAuth needs at least one credential")

    def __repr__(self) -> str:
        return f"<BasicAuth: {len(self._digests)} credential(s)>"

    def check(self, headers: list[tuple[bytes, bytes]]) -> bool:
        """True when the request's one ``Authorization: Basic`` header matches a credential."""
        value: bytes | None = None
        for name, val in headers:
            if len(name) == 13 and name.lower() == b"authorization":
                if value is not None:
                    return False  # two Authorization headers: ambiguous, refuse
                value = val
        if value is None:
            return False
        scheme, _, token = value.strip().partition(b" ")
        if scheme.lower() != b"basic" or len(token) > _MAX_AUTHORIZATION:
            return False
        try:
            decoded = base64.b64decode(token.strip(), validate=True)
        except (binascii.Error, ValueError):
            return False
        given = _digest(decoded)
        ok = False
        for digest in self._digests:
            # No early exit: every credential is compared.
            ok |= hmac.compare_digest(given, digest)
        return ok


def _field(obj: dict[str, Any], *names: str) -> Any:
    """The value of the first key of ``obj`` matching one of ``names`` (case-insensitive)."""
    wanted = {n.lower() for n in names}
    for key, value in obj.items():
        if key.lower().replace("_", "") in wanted:
            return value
    return None


def _checked(user: str, password: str) -> str:
    """``user:password`` if within ngrok's limits (the agent CLI's own check), else TunnelRejected."""
    if ":" in user:
        raise TunnelRejected("a basic auth username cannot contain ':'", Code.BASIC_AUTH_USERNAME)
    credential = f"{user}:{password}"
    try:
        split_basic_auth(credential)
    except ValueError as exc:
        reason = str(exc)
        code = (Code.BASIC_AUTH_USERNAME if "username" in reason else
                Code.BASIC_AUTH_PASSWORD if "password" in reason else Code.BIND_MALFORMED)
        raise TunnelRejected(reason, code) from None
    return credential


def basic_auth_from_opts(opts: dict[str, Any]) -> BasicAuth | None:
    """The :class:`BasicAuth` a Bind's options ask for, None if none; TunnelRejected if bad."""
    credentials: list[str] = []
    single = _field(opts, "auth")
    if single:
        if not isinstance(single, str):
            raise TunnelRejected("the Auth option must be a 'user:password' string", Code.BIND_MALFORMED)
        user, _, password = single.partition(":")
        credentials.append(_checked(user, password))
    block = _field(opts, "basicauth")
    if block:
        listed = _field(block, "credentials") if isinstance(block, dict) else None
        if not isinstance(listed, list):
            raise TunnelRejected("the BasicAuth option must hold a list of credentials", Code.BIND_MALFORMED)
        for entry in listed:
            if not isinstance(entry, dict):
                raise TunnelRejected("a BasicAuth credential must be an object", Code.BIND_MALFORMED)
            user = _field(entry, "username")
            password = _field(entry, "cleartextpassword")
            if not password and _field(entry, "hashedpassword"):
                # The hash format is ngrok's own and undocumented: refuse rather than guess.
                raise TunnelRejected("hashed basic auth passwords are not supported by this edge; send "
                                     "the password in cleartext_password", Code.OPTION_UNSUPPORTED)
            if not isinstance(user, str) or not isinstance(password, (str, type(None))):
                raise TunnelRejected("a BasicAuth credential needs a username and a password",
                                     Code.BIND_MALFORMED)
            credentials.append(_checked(user, password or ""))
    return BasicAuth(credentials) if credentials else None


def challenge_headers() -> list[tuple[str, str]]:
    """Headers of the 401 answer."""
    return [("WWW-Authenticate", f'Basic realm="{REALM}"')]
