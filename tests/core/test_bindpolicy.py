"""BindPolicy and RouteTable enforcement, synchronously: ACLs and reservations at claim time."""

from __future__ import annotations

import pytest

from tunneld.core._bindpolicy import BindPolicy, reservation_maps
from tunneld.core._errors import Code, TunnelRejected
from tunneld.core._routes import RouteTable

DOMAIN = "tunnels.test"


def policy(account: str | None = "alice", acl: tuple[str, ...] = (), *,
           domains: dict[str, str] | None = None, ports: dict[int, str] | None = None) -> BindPolicy:
    return BindPolicy(account, acl, domains or {}, ports or {}, DOMAIN)


def refused(fn: object, *args: object, **kw: object) -> Code:
    with pytest.raises(TunnelRejected) as info:
        fn(*args, **kw)  # type: ignore[operator]
    return info.value.code


# ---- hostnames -----------------------------------------------------------------------------------

@pytest.mark.parametrize("host", ["app.alice.test", "APP.Alice.Test", "app.alice.test.", "x.y.alice.test",
                                  "*.alice.test"])
def test_suffix_rule_allows_names_below(host: str) -> None:
    policy(acl=("bind:*.alice.test",)).check_host(host)


@pytest.mark.parametrize("host", ["alice.test", "evil-alice.test", "alice.test.evil", "bob.test",
                                  "xn--bcher-kva.alice.evil"])
def test_suffix_rule_refuses_others(host: str) -> None:
    assert refused(policy(acl=("bind:*.alice.test",)).check_host, host) == Code.BIND_NAME_FORBIDDEN


def test_idn_and_punycode_are_one_name() -> None:
    p = policy(acl=("bind:bücher.alice.test",))
    p.check_host("xn--bcher-kva.alice.test")
    p.check_host("BÜCHER.alice.test")
    assert refused(p.check_host, "bucher.alice.test") == Code.BIND_NAME_FORBIDDEN


def test_empty_acl_and_star_are_unrestricted() -> None:
    for acl in ((), ("*",), ("bind:*",)):
        p = policy(acl=acl)
        assert not p.restricted
        p.check_host("anything.example")
        p.check_address("tcp", 20001, requested=False)
    assert policy(acl=("bind:a.test",)).restricted


def test_domain_reserved_by_another_account() -> None:
    domains = {"app.example.com": "bob", "*.bob.example.com": "bob"}
    alice = policy(domains=domains)
    for host in ("app.example.com", "APP.example.com.", "x.bob.example.com", "x.y.bob.example.com"):
        assert refused(alice.check_host, host) == Code.DOMAIN_RESERVED
    alice.check_host("bob.example.com")  # the wildcard covers names below only
    bob = policy("bob", domains=domains)
    bob.check_host("app.example.com")
    assert bob.owns_domain("x.bob.example.com") and not alice.owns_domain("x.bob.example.com")
    # An owner that belongs to no account owns nothing.
    assert refused(policy(None, domains=domains).check_host, "app.example.com") == Code.DOMAIN_RESERVED


def test_reservation_beats_a_permissive_acl() -> None:
    assert refused(policy(acl=("*",), domains={"a.test": "bob"}).check_host, "a.test") == Code.DOMAIN_RESERVED


# ---- addresses -----------------------------------------------------------------------------------

def test_requested_tcp_address_must_be_reserved_by_the_account() -> None:
    ports = {20001: "alice", 20002: "bob"}
    p = policy(ports=ports)
    p.check_address("tcp", 20001, requested=True)
    assert refused(p.check_address, "tcp", 20002, requested=True) == Code.ADDR_RESERVED
    assert refused(p.check_address, "tcp", 20003, requested=True) == Code.ADDR_NOT_RESERVED
    # Other transports have no reservations.
    p.check_address("udp", 20003, requested=True)


def test_random_ports_skip_reservations_and_restricted_acls_refuse_them() -> None:
    p = policy(ports={20001: "alice"})
    assert not p.port_free("tcp", 20001) and p.port_free("tcp", 20002) and p.port_free("udp", 20001)
    restricted = policy(acl=("bind:*.alice.test",))
    assert refused(restricted.check_address, "tcp", 20002, requested=False) == Code.RANDOM_ADDR_FORBIDDEN


def test_address_rules() -> None:
    p = policy(acl=(f"bind:{DOMAIN}:20001",), ports={20001: "alice", 20005: "alice"})
    p.check_address("tcp", 20001, requested=True)
    assert refused(p.check_address, "tcp", 20005, requested=True) == Code.BIND_ADDR_FORBIDDEN


def test_reservation_maps_match_ports() -> None:
    domains, ports = reservation_maps([("a.test", "x")], [(f"{DOMAIN}:20001", "x"), ("[::1]:20002", "y")])
    assert domains == {"a.test": "x"} and ports == {20001: "x", 20002: "y"}


# ---- random names --------------------------------------------------------------------------------

def test_random_host_follows_the_acl() -> None:
    assert policy().random_host(DOMAIN).endswith("." + DOMAIN)
    assert policy(acl=(f"bind:*.{DOMAIN}",)).random_host(DOMAIN).endswith("." + DOMAIN)
    owned = policy(acl=("bind:*.alice.example.com",), domains={"*.alice.example.com": "alice"})
    host = owned.random_host(DOMAIN)
    assert host.endswith(".alice.example.com") and host.count(".") == 3
    # A wildcard the ACL allows but the account did not reserve gives no random names.
    assert refused(policy(acl=("bind:*.alice.example.com",)).random_host, DOMAIN) == Code.BIND_NAME_FORBIDDEN


# ---- the route table enforces on every claim --------------------------------------------------------

def test_route_table_checks_each_claim() -> None:
    routes = RouteTable()
    routes.tcp_host = DOMAIN
    routes.set_reservations({"app.example.com": "bob"}, {20001: "bob"})
    routes.grant("tok-alice", "alice", ("bind:*.alice.test",))
    holder = object()
    assert refused(routes.claim_host, "https", "app.example.com", holder, "tok-alice") == Code.DOMAIN_RESERVED
    assert refused(routes.claim_host, "https", "x.bob.test", holder, "tok-alice") == Code.BIND_NAME_FORBIDDEN
    routes.claim_host("https", "x.alice.test", holder, "tok-alice")
    assert routes.lookup_host("https", "x.alice.test") is holder
    code = refused(routes.claim_address, "tcp", 20001, holder, "tok-alice", requested=True)
    assert code == Code.ADDR_RESERVED
    assert not routes.address_available("tcp", 20001, "tok-alice")
    # An owner with no grant belongs to no account: bob's reservation is not its.
    code = refused(routes.claim_address, "tcp", 20001, holder, "stranger", requested=True)
    assert code == Code.ADDR_RESERVED
    # owner "" (internal claims, labeled edges) is not checked.
    routes.claim_address("tcp", 20001, holder, "")


def test_host_in_use_counts_every_route_of_a_name() -> None:
    routes = RouteTable()
    http, tls = object(), object()
    routes.claim_host("https", "a.test", http)
    routes.claim_host("http", "a.test", http)
    routes.claim_host("https", "a.test", http)  # claimed again by its holder: still one route
    routes.claim_host("tls", "b.test", tls)
    assert routes.host_in_use("a.test") and routes.host_in_use("b.test")
    routes.release_host("https", "a.test", tls)  # not its holder: nothing changes
    routes.release_host("https", "a.test", http)
    assert routes.host_in_use("a.test")  # its http route is left
    routes.release_host("http", "a.test", http)
    routes.release_host("http", "a.test", http)  # twice: no count below zero
    assert not routes.host_in_use("a.test") and routes.host_available("a.test", "anyone")
    assert routes.host_in_use("b.test")
