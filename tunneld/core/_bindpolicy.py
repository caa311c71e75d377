"""Who may bind what: a credential's ACL and every account's reservations, checked at claim time.

The :class:`~tunneld.core._routes.RouteTable` keeps what a policy is made of: every account's
reservations, and each claiming owner's account and ACL, as read from the store when one of its
sessions last bound (off the event loop, ``EdgeAdapter.refresh_bind_policy``).  Every hostname and address
claim goes through :meth:`BindPolicy.check_host` / :meth:`BindPolicy.check_address`, whichever
plugin makes it, so neither an agent's Bind nor an SSH forward nor a third-party tunnel type
can route a name its credential may not have.  Sans-IO: no trio, no store.

Rules, in order (ngrok's codes):

* a hostname reserved by another account → 320; the account's own reserved domains (exact or
  ``*.`` wildcard) are hostnames it may use although they are not under the edge's domain;
* a hostname the ACL does not allow → 316;
* a TCP port reserved by another account → 309; a requested (not random) TCP port the account
  has not reserved → 307; a random port never lands on a reserved one (:meth:`port_free`);
* an address the ACL does not allow → 308, or 356 when the tunnel asked for a random one
  under an ACL that names addresses (a random port cannot match a ``host:port`` rule).
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable, Mapping

import attrs

from ._acl import ADDR, HOST, AclError, allows_bind, normalize_hostname, parse_rule
from ._errors import Code, TunnelRejected

#: The one transport reserved addresses are about.
TCP = "tcp"


def _domain_owner(domains: Mapping[str, str], host: str) -> str | None:
    """The account that reserved ``host``: the name itself, else the nearest ``*.`` above it."""
    owner = domains.get(host)
    if owner is not None:
        return owner
    labels = host.split(".")
    for i in range(1, len(labels)):
        owner = domains.get("*." + ".".join(labels[i:]))
        if owner is not None:
            return owner
    return None


def reservation_maps(domains: Iterable[tuple[str, str]], addrs: Iterable[tuple[str, str]]
                     ) -> tuple[dict[str, str], dict[int, str]]:
    """``(domain, account)`` and ``(host:port, account)`` rows as the maps :class:`BindPolicy` takes.

    Addresses are matched by port: the edge has one public TCP host, so a reservation's host
    part only names it.
    """
    by_port: dict[int, str] = {}
    for addr, account in addrs:
        port = addr.rsplit(":", 1)[-1]
        if port.isdigit():
            by_port[int(port)] = account
    return dict(domains), by_port


@attrs.frozen
class BindPolicy:
    """One owner's right to names: its account, its credential's ACL, every account's reservations."""

    #: The account the owner belongs to; None for an owner nobody registered (it owns nothing).
    account_id: str | None
    #: ``bind:`` rules; empty = unrestricted.
    acl: tuple[str, ...] = ()
    #: Reserved hostname (or ``*.suffix``) → account id, every account's.
    domains: Mapping[str, str] = attrs.field(factory=dict)
    #: Reserved TCP port → account id, every account's.
    ports: Mapping[int, str] = attrs.field(factory=dict)
    #: The edge's public TCP host (``bind:HOST:PORT`` rules name it).
    tcp_host: str = ""

    @property
    def restricted(self) -> bool:
        """Whether the ACL limits anything (non-empty and without ``*``)."""
        return bool(self.acl) and not allows_bind(self.acl, HOST, "*.unrestricted.invalid")

    def owns_domain(self, host: str) -> bool:
        """Whether the account reserved ``host`` (or a ``*.`` wildcard covering it)."""
        return self.account_id is not None and _domain_owner(self.domains, _norm(host)) == self.account_id

    def check_host(self, host: str) -> None:
        """TunnelRejected (320, 316) unless this owner may route ``host``."""
        name = _norm(host)
        owner = _domain_owner(self.domains, name)
        if owner is not None and owner != self.account_id:
            raise TunnelRejected(f"the domain {host} is reserved by another account", Code.DOMAIN_RESERVED)
        if not allows_bind(self.acl, HOST, name):
            raise TunnelRejected(f"the credential's ACL does not allow binding {host} "
                                 f"(it allows: {', '.join(self.acl)})", Code.BIND_NAME_FORBIDDEN)

    def port_free(self, transport: str, port: int) -> bool:
        """Whether a *random* pick may take ``port``: reserved TCP ports are never picked."""
        return transport != TCP or port not in self.ports

    def check_address(self, transport: str, port: int, *, requested: bool) -> None:
        """TunnelRejected (309, 307, 308, 356) unless this owner may route ``port`` of ``transport``.

        ``requested``: the tunnel asked for this port (``--remote-addr``), rather than taking a
        random one.
        """
        if transport == TCP:
            owner = self.ports.get(port)
            if owner is not None and owner != self.account_id:
                raise TunnelRejected(f"the address {self.tcp_host}:{port} is reserved by another account",
                                     Code.ADDR_RESERVED)
            if requested and owner is None:
                raise TunnelRejected(f"the address {self.tcp_host}:{port} must be reserved first "
                                     "(tunneld api reserved-addrs create ADDR)", Code.ADDR_NOT_RESERVED)
        if not allows_bind(self.acl, ADDR, f"{self.tcp_host}:{port}"):
            if not requested:
                raise TunnelRejected("the credential's ACL does not allow a random address "
                                     f"(it allows: {', '.join(self.acl)}); ask for a reserved one "
                                     "with --remote-addr", Code.RANDOM_ADDR_FORBIDDEN)
            raise TunnelRejected(f"the credential's ACL does not allow binding {self.tcp_host}:{port} "
                                 f"(it allows: {', '.join(self.acl)})", Code.BIND_ADDR_FORBIDDEN)

    def random_host(self, domain: str) -> str:
        """A random hostname this owner may bind: under ``domain`` when the ACL allows it, else under
        one of the account's reserved wildcards its ACL allows; TunnelRejected (316) if neither."""
        label = secrets.token_hex(4)
        if allows_bind(self.acl, HOST, f"{label}.{domain}"):
            return f"{label}.{domain}"
        for text in self.acl:
            try:
                rule = parse_rule(text)
            except AclError:
                continue
            if rule.kind == "suffix" and self.owns_domain(f"{label}.{rule.value}"):
                return f"{label}.{rule.value}"
        raise TunnelRejected("the credential's ACL does not allow a random hostname "
                             f"(it allows: {', '.join(self.acl)}); ask for one with --subdomain or "
                             "--hostname", Code.BIND_NAME_FORBIDDEN)


def _norm(host: str) -> str:
    try:
        return normalize_hostname(host, wildcard=True)
    except AclError:
        return host.lower().rstrip(".")
