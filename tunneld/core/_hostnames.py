"""Public hostnames for name-routed tunnels (http, https, tls): asked for, resumed or random.

Three ways to get a name:

* ``--subdomain NAME`` → ``NAME.DOMAIN`` (a DNS label; reserved words refused);
* ``--hostname HOST`` (ngrok v3 spells it ``--domain`` / ``--url``) → ``HOST`` itself: either
  one label under the edge's domain, or a *custom* hostname the operator allowed for the
  token's account (``tunneld edge --allow-hostname HOST[=TOKEN_ID]``), pointed at the edge by a
  CNAME to :attr:`EdgeConfig.cname_target`;
* nothing → a random ``xxxxxxxx.DOMAIN``; a reconnecting agent gets its previous name back.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import attrs

from ._certs import name_matches
from ._errors import Code, TunnelRejected

if TYPE_CHECKING:
    from ._bindpolicy import BindPolicy
    from ._routes import RouteTable
    from ._tunnel import SessionContext
    from .proto import Bind

_LABEL = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")
#: Random names tried before giving up (each collision is a 1 in 2**32 event).
_RANDOM_ATTEMPTS = 64
_HOSTNAME_KEYS = ("hostname", "domain", "url")


@attrs.frozen
class AllowedHostname:
    """One ``--allow-hostname`` entry: a name or ``*.suffix`` pattern, for one token or any."""

    pattern: str
    #: Token id the name is reserved for; "" = any authenticated account.
    token_id: str = ""

    @classmethod
    def parse(cls, value: str) -> AllowedHostname:
        """``HOST`` or ``*.SUFFIX``, optionally ``=TOKEN_ID``; ValueError if malformed."""
        pattern, _, token_id = value.strip().partition("=")
        pattern = pattern.strip().lower().rstrip(".")
        labels = pattern.split(".")
        if len(labels) < 2 or any(not _LABEL.match(label) for label in labels[1:]) or \
                not (labels[0] == "*" or _LABEL.match(labels[0])):
            raise ValueError(f"{value!r} is not a hostname or a *.domain pattern")
        return cls(pattern, token_id.strip())

    def matches(self, host: str) -> bool:
        # ``*.`` covers one label only, like a wildcard certificate.
        return name_matches(self.pattern, host)


def _opt(opts: dict[str, Any], name: str) -> str:
    for key, value in opts.items():
        if key.lower() == name and isinstance(value, str):
            return value.strip()
    return ""


def requested_hostname(opts: dict[str, Any]) -> str:
    """The full hostname a Bind asks for (``Hostname``/``Domain``/``URL``), normalised; "" if none."""
    for key in _HOSTNAME_KEYS:
        value = _opt(opts, key)
        if value:
            if "://" in value:
                value = value.split("://", 1)[1]
            return value.split("/", 1)[0].rsplit(":", 1)[0].lower().rstrip(".")
    return ""


def custom_hostname_allowed(allowed: Iterable[AllowedHostname], host: str, token_id: str) -> bool:
    return any(a.matches(host) and a.token_id in ("", token_id) for a in allowed)


@attrs.frozen
class HostPolicy:
    """The edge's naming rules: its domain, the labels nobody may claim, the custom hostnames allowed."""

    domain: str
    reserved: frozenset[str] = frozenset()
    allowed: tuple[AllowedHostname, ...] = ()


@attrs.define(eq=False)
class HostChooser:
    """Picks the public hostnames of one session's name-routed Binds (``SessionContext.choose_host``).

    It remembers the names it gave, so that Binds with the same options and another ``pair``
    (ngrok's v2 agent binds ``https`` and ``http`` separately for one tunnel) get the same
    host.  A session that wants a fresh memory (the ssh gateway, per forward) takes a new one.
    """

    policy: HostPolicy
    routes: RouteTable
    session: SessionContext
    #: (digest of the Bind options, pairs given the name, the name).
    _given: list[tuple[str, set[str], str]] = attrs.field(factory=list)

    def __call__(self, bind: Bind, pair: str) -> str:
        """The public hostname for a name-routed Bind; TunnelRejected if it cannot be had."""
        policy, routes, session = self.policy, self.routes, self.session
        domain = policy.domain
        # The owner's ACL and reservations: checked here, before a certificate is made for the
        # name, and again when the name is claimed (RouteTable.claim_host).
        rights = routes.policy(session.owner) if session.owner else None
        opts = bind.opts
        label = _opt(opts, "subdomain").lower()
        host = requested_hostname(opts)
        if host:
            if host.endswith("." + domain) and "." not in host[: -len(domain) - 1]:
                label = host[: -len(domain) - 1]
            elif not (custom_hostname_allowed(policy.allowed, host, session.owner)
                      or (rights is not None and rights.owns_domain(host))):
                raise TunnelRejected(
                    f"hostname {host!r} is not reserved for your account on this edge (names under {domain} "
                    f"are free; reserve it with `tunneld api reserved-domains create {host}`, or the "
                    "operator can allow it with --allow-hostname)",
                    Code.ADDRESS_NOT_ALLOWED)
            else:
                if rights is not None:
                    rights.check_host(host)
                return host
        if label:
            if not _LABEL.match(label):
                raise TunnelRejected(f"subdomain {label!r} is not a valid DNS label (letters, digits and "
                                     "'-', at most 63)", Code.ADDRESS_NOT_ALLOWED)
            if label in policy.reserved:
                raise TunnelRejected(f"subdomain {label!r} is reserved on this edge",
                                     Code.ADDRESS_NOT_ALLOWED)
            if rights is not None:
                rights.check_host(f"{label}.{domain}")
            return f"{label}.{domain}"
        # A digest, not the options themselves: they may hold basic-auth passwords.
        key = hashlib.sha256(json.dumps(opts, sort_keys=True, default=str).encode()).hexdigest()
        # A reconnecting agent gets the name it had (the resume token proves it was its own).
        resumed = session.resumed_name(bind, "host")
        if resumed and routes.names.available("host", resumed, session.owner) \
                and routes.lookup_host(pair, resumed) is None and (rights is None or _may(rights, resumed)):
            self._remember_pair(key, pair, resumed)
            return resumed
        # Only agents bind twins (ngrok's v2 agent and ours); an SDK's separate listeners with the
        # same options are separate tunnels and get names of their own.
        if not session.client_type.startswith("ngrok-"):
            for opts_key, pairs, known in self._given:
                if opts_key == key and pair not in pairs:
                    pairs.add(pair)
                    return known
        for _ in range(_RANDOM_ATTEMPTS):
            # Under an ACL that does not cover the edge's domain, a name under one of the
            # account's reserved wildcards the ACL allows (BindPolicy.random_host).
            host = rights.random_host(domain) if rights is not None and rights.restricted \
                else f"{secrets.token_hex(4)}.{domain}"
            if routes.host_available(host, session.owner) and (rights is None or _may(rights, host)):
                break
        else:
            raise TunnelRejected("no free random hostname was found", Code.ADDRESS_IN_USE)
        self._given.append((key, {pair}, host))
        return host

    def _remember_pair(self, key: str, pair: str, host: str) -> None:
        for opts_key, pairs, known in self._given:
            if opts_key == key and known == host:
                pairs.add(pair)
                return
        self._given.append((key, {pair}, host))


def _may(rights: BindPolicy, host: str) -> bool:
    try:
        rights.check_host(host)
    except TunnelRejected:
        return False
    return True
