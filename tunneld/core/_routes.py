"""The edge's route table: public hostnames and transport-keyed addresses → the tunnel serving them.

Two kinds of public names:

* a *hostname* is routed per route (``http``, ``https``, ``tls``: the public listener serving
  it) and owned as one name (kind ``host`` in :class:`NameClaims`);
* an *address* is a port of a transport: ``("tcp", 20001)`` and ``("udp", 20001)`` are
  different.  TCP ports keep their own table (:attr:`RouteTable.ports`) and the name kind
  ``port``, as resume tokens already in agents' hands say; every other transport's names are
  of the transport's own kind (``udp``).

Claims go through :class:`NameClaims` too, so a name stays with its owner (authtoken) for the
hold period after its tunnel goes away.  ``owner=""`` claims skip ownership (tests, internal
services).

Every claim with an owner is checked against that owner's :class:`BindPolicy` first (its
credential's ACL, every account's reservations): the one place all tunnel types go through.
"""

from __future__ import annotations

from typing import Any

import attrs

from ._bindpolicy import BindPolicy
from ._errors import Code, TunnelRejected
from ._names import NameClaims

#: The transport whose ports are :attr:`RouteTable.ports` (and names of kind ``port``).
TCP = "tcp"


def address_kind(transport: str) -> str:
    """The :class:`NameClaims` kind of ``transport``'s ports: ``port`` for TCP, else the transport."""
    if transport == TCP:
        return "port"
    if not transport or transport in ("host", "port"):
        # Those kinds are hostnames' and TCP's: a transport named so would share their claims.
        raise ValueError(f"{transport!r} cannot name a transport")
    return transport


@attrs.define(eq=False)
class RouteTable:
    """Public hostnames and transport addresses → the edge tunnel serving them."""

    names: NameClaims = attrs.field(factory=lambda: NameClaims(None))
    #: (route, host) → holder.
    hosts: dict[tuple[str, str], Any] = attrs.field(factory=dict)
    #: Routes per hostname in :attr:`hosts` (``host_in_use`` is asked per random pick: a scan of
    #: every route there made 10,000 agents binding at once quadratic).
    _host_routes: dict[str, int] = attrs.field(factory=dict, init=False)
    #: TCP port → holder (also ``addresses["tcp"]``).
    ports: dict[int, Any] = attrs.field(factory=dict)
    #: Transport → port → holder.
    addresses: dict[str, dict[int, Any]] = attrs.field(init=False)

    #: Reserved hostname (or ``*.suffix``) → account, and reserved TCP port → account: the latest
    #: snapshot of the store's reservations (:meth:`set_reservations`).
    reserved_domains: dict[str, str] = attrs.field(factory=dict)
    reserved_ports: dict[int, str] = attrs.field(factory=dict)
    #: The edge's public TCP host, as ``bind:HOST:PORT`` rules name it.
    tcp_host: str = ""
    #: Owner → (account id, ACL), as of the owner's latest bind (:meth:`grant`).  An owner without
    #: an entry belongs to no account: no reservation is its, and its ACL is empty.
    grants: dict[str, tuple[str | None, tuple[str, ...]]] = attrs.field(factory=dict)

    def __attrs_post_init__(self) -> None:
        self.addresses = {TCP: self.ports}

    # ---- who may claim what ------------------------------------------------------------------

    def set_reservations(self, domains: dict[str, str], ports: dict[int, str]) -> None:
        self.reserved_domains, self.reserved_ports = domains, ports

    def grant(self, owner: str, account_id: str | None, acl: tuple[str, ...]) -> None:
        """Record ``owner``'s account and ACL (read from the store just now)."""
        self.grants[owner] = (account_id, acl)

    def policy(self, owner: str) -> BindPolicy:
        account_id, acl = self.grants.get(owner, (None, ()))
        return BindPolicy(account_id, acl, self.reserved_domains, self.reserved_ports, self.tcp_host)

    # ---- hostnames ---------------------------------------------------------------------------

    def claim_host(self, route: str, host: str, holder: Any, owner: str = "") -> None:
        """Route ``route://host`` to ``holder``; TunnelRejected if taken, held for another owner, or
        not the owner's to have (:meth:`BindPolicy.check_host`)."""
        if owner:
            self.policy(owner).check_host(host)
        key = (route, host)
        current = self.hosts.get(key)
        if current is not None and current is not holder:
            raise TunnelRejected(f"{route}://{host} is already in use by another tunnel", Code.ADDRESS_IN_USE)
        # TLS tunnels and HTTPS share port 443 and are told apart by SNI alone: one name
        # cannot be both (nor an HTTP tunnel's http twin of it).
        for rival in (("http", "https") if route == "tls" else ("tls",)):
            if self.hosts.get((rival, host)) not in (None, holder):
                raise TunnelRejected(f"{host} is already in use by another tunnel ({rival}://{host})",
                                     Code.ADDRESS_IN_USE)
        if owner:
            self.names.acquire("host", host, owner, holder)
        if current is None:
            self._host_routes[host] = self._host_routes.get(host, 0) + 1
        self.hosts[key] = holder

    def release_host(self, route: str, host: str, holder: Any) -> None:
        if self.hosts.get((route, host)) is holder:
            del self.hosts[(route, host)]
            left = self._host_routes[host] - 1
            if left:
                self._host_routes[host] = left
            else:
                del self._host_routes[host]
        self.names.release("host", host, holder)

    def host_in_use(self, host: str) -> bool:
        """Routed under any route (http, https, tls, a plugin's)."""
        return host in self._host_routes

    def host_available(self, host: str, owner: str) -> bool:
        """Free for a new random pick: not routed, and not held for someone else."""
        return not self.host_in_use(host) and self.names.available("host", host, owner)

    def lookup_host(self, route: str, host: str) -> Any | None:
        return self.hosts.get((route, host))

    # ---- transport addresses -----------------------------------------------------------------

    def claim_address(self, transport: str, port: int, holder: Any, owner: str = "", *,
                      requested: bool = False) -> None:
        """Route ``port`` of ``transport`` to ``holder`` (the caller has bound it); TunnelRejected if
        taken, held for another owner, or not the owner's to have (:meth:`BindPolicy.check_address`;
        ``requested``: the tunnel asked for this port rather than taking a random one)."""
        kind = address_kind(transport)
        if owner:
            self.policy(owner).check_address(transport, port, requested=requested)
        table = self.addresses.setdefault(transport, {})
        current = table.get(port)
        if current is not None and current is not holder:
            raise TunnelRejected(f"{_port(transport, port)} is already in use by another tunnel",
                                 Code.ADDRESS_IN_USE)
        if owner:
            self.names.acquire(kind, str(port), owner, holder)
        table[port] = holder

    def release_address(self, transport: str, port: int, holder: Any) -> None:
        table = self.addresses.get(transport)
        if table is not None and table.get(port) is holder:
            del table[port]
        self.names.release(address_kind(transport), str(port), holder)

    def lookup_address(self, transport: str, port: int) -> Any | None:
        table = self.addresses.get(transport)
        return None if table is None else table.get(port)

    def address_available(self, transport: str, port: int, owner: str) -> bool:
        """Free for a random pick by ``owner``: not routed, not held for someone else, not reserved."""
        if transport == TCP and port in self.reserved_ports:
            return False
        return (self.lookup_address(transport, port) is None
                and self.names.available(address_kind(transport), str(port), owner))

    def address_owner(self, transport: str, port: int) -> str | None:
        """Who the address is claimed or held for right now (None: nobody)."""
        return self.names.owner_of(address_kind(transport), str(port))


def address_name(transport: str, port: int) -> tuple[str, str]:
    """``(kind, port)`` as :attr:`TunnelInfo.name` and resume tokens spell an address."""
    return address_kind(transport), str(port)


def _port(transport: str, port: int) -> str:
    # TCP's messages stay as they always were ("port 20001").
    return f"port {port}" if transport == TCP else f"{transport} port {port}"
