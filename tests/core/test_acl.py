"""ACL ``bind:`` rules: parsing, normalisation and matching, with adversarial inputs."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tunneld.core._acl import (
    ADDR,
    HOST,
    LABELS,
    AclError,
    allows_bind,
    normalize_hostname,
    normalize_rules,
    parse_labels,
    parse_rule,
)


@pytest.mark.parametrize(("rules", "kind", "name", "allowed"), [
    ([], HOST, "anything.example", True),  # empty: unrestricted
    (["*"], ADDR, "1.2.3.4:22", True),
    (["bind:*"], LABELS, {"a": "b"}, True),
    (["bind:app.example.com"], HOST, "app.example.com", True),
    (["bind:app.example.com"], HOST, "APP.Example.COM.", True),  # case, trailing dot
    (["bind:app.example.com"], HOST, "x.app.example.com", False),
    (["bind:app.example.com"], HOST, "app.example.com.evil", False),
    (["bind:*.a.com"], HOST, "x.a.com", True),
    (["bind:*.a.com"], HOST, "x.y.a.com", True),  # any depth below
    (["bind:*.a.com"], HOST, "*.a.com", True),  # the wildcard name itself
    (["bind:*.a.com"], HOST, "*.x.a.com", True),
    (["bind:*.a.com"], HOST, "a.com", False),
    (["bind:*.a.com"], HOST, "evil-a.com", False),
    (["bind:*.a.com"], HOST, "xa.com", False),
    (["bind:*.a.com"], HOST, "x.a.com.evil.com", False),
    (["bind:*.a.com"], HOST, "*.com", False),
    (["bind:a.com"], HOST, "*.a.com", False),
    (["bind:bücher.example"], HOST, "xn--bcher-kva.example", True),  # IDN vs punycode
    (["bind:xn--bcher-kva.example"], HOST, "BÜCHER.example", True),
    (["bind:*.bücher.example"], HOST, "www.xn--bcher-kva.example", True),
    (["bind:bucher.example"], HOST, "bücher.example", False),
    (["bind:a.com"], HOST, "a..com", False),  # malformed names are refused, never matched
    (["bind:a.com"], HOST, " a.com", False),
    (["bind:a.com"], HOST, "", False),
    (["bind:a.com"], ADDR, "a.com:80", False),  # kinds do not mix
    (["bind:a.com:80"], HOST, "a.com", False),
    (["bind:1.tcp.example.com:20002"], ADDR, "1.tcp.example.com:20002", True),
    (["bind:1.tcp.example.com:20002"], ADDR, "1.TCP.example.com.:20002", True),
    (["bind:1.tcp.example.com:20002"], ADDR, "1.tcp.example.com:20003", False),
    (["bind:1.tcp.example.com:20002"], ADDR, "1.tcp.example.com:020002", False),
    (["bind:[::1]:22"], ADDR, "[0:0::1]:22", True),
    (["bind:10.0.0.1:22"], ADDR, "10.0.0.1:22", True),
    (["bind:app=web"], LABELS, {"app": "web"}, True),
    (["bind:app=web"], LABELS, "app=web", True),
    (["bind:app=web"], LABELS, {"app": "Web"}, False),  # labels are case-sensitive
    (["bind:app=web"], LABELS, {"app": "web", "edge": "edghts_x"}, False),  # every label must pass
    (["bind:app=web", "bind:edge=*"], LABELS, {"app": "web", "edge": "edghts_x"}, True),
    (["bind:app=*"], LABELS, {"app": "anything"}, True),
    (["bind:*=web"], LABELS, {"role": "web"}, True),
    (["bind:*=web"], LABELS, {"role": "db"}, False),
    (["bind:app=web"], LABELS, {}, False),
    (["bind:app=web"], LABELS, "app=web=x", False),
    (["bind:app=web"], HOST, "app=web", False),
    (["bind:*.a.com", "bind:b.com"], HOST, "b.com", True),  # any rule may allow
    (["garbage"], HOST, "a.com", False),  # all rules malformed: nothing allowed
])
def test_allows_bind_table(rules: list[str], kind: str, name: object, allowed: bool) -> None:
    assert allows_bind(rules, kind, name) is allowed  # type: ignore[arg-type]


@pytest.mark.parametrize("rule", [
    "", "bind:", "bind", "a.com", "BIND:a.com", " bind:a.com", "bind:a.com ", "bind:a .com", "bind:a\tcom",
    "bind:*.*.a.com", "bind:a.*.com", "bind:*a.com", "bind:a*.com", "bind:**.a.com", "bind:*.",
    "bind:.a.com", "bind:a..com", "bind:a.com..", "bind:-a.com", "bind:a-.com", "bind:a_b.com",
    "bind:" + "a" * 64 + ".com", "bind:" + "a." * 130 + "com",
    "bind:a.com:0", "bind:a.com:65536", "bind:a.com:x", "bind:a.com:", "bind::22", "bind:::1:22",
    "bind:[zz]:22", "bind:a.com,b.com",
    "bind:=v", "bind:k=", "bind:k=v=w", "bind:k,x=v", "bind:k=v,w", "bind:k y=v", "bind:k=v y",
    "bind:xn--zz.com",
    "x" * 600,
])
def test_malformed_rules_refused(rule: str) -> None:
    with pytest.raises(AclError):
        parse_rule(rule)
    with pytest.raises(AclError):
        normalize_rules([rule])


def test_normalize_rules_canonical_and_deduplicated() -> None:
    assert normalize_rules(["bind:App.Example.com.", "bind:app.example.com", "*", "bind:*.BÜCHER.example",
                            "bind:[0::1]:22", "bind:k=*"]) == (
        "bind:app.example.com", "bind:*", "bind:*.xn--bcher-kva.example", "bind:[::1]:22", "bind:k=*")
    with pytest.raises(AclError):
        normalize_rules("bind:a.com")  # a string is not a list of rules
    with pytest.raises(AclError):
        normalize_rules([123])  # type: ignore[list-item]
    with pytest.raises(AclError):
        normalize_rules([f"bind:h{i}.com" for i in range(101)])


def test_unknown_kind_is_an_error() -> None:
    with pytest.raises(ValueError, match="unknown bind kind"):
        allows_bind(["bind:a.com"], "udp", "a.com")


def test_parse_labels() -> None:
    assert parse_labels("a=1,b=2") == {"a": "1", "b": "2"}
    for bad in ("a", "a=1,a=2", "a=1,,b=2", "=1", "a=", "a b=1"):
        with pytest.raises(AclError):
            parse_labels(bad)


_label = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?", fullmatch=True)
_host = st.lists(_label, min_size=1, max_size=4).map(".".join)


@given(_host, _host)
def test_suffix_rule_property(sub: str, parent: str) -> None:
    rules = [f"bind:*.{parent}"]
    assert allows_bind(rules, HOST, f"{sub}.{parent}")
    assert allows_bind(rules, HOST, f"{sub}.{parent}".upper() + ".")
    assert not allows_bind(rules, HOST, parent)
    assert not allows_bind(rules, HOST, f"{sub}-{parent}")
    assert not allows_bind(rules, HOST, f"{sub}{parent}")


@given(_host, _host)
def test_exact_rule_matches_only_itself(a: str, b: str) -> None:
    assert allows_bind([f"bind:{a}"], HOST, a)
    assert allows_bind([f"bind:{a}"], HOST, b) is (a == b)


@given(st.text(max_size=40))
def test_parse_rule_never_crashes(text: str) -> None:
    try:
        rule = parse_rule(text)
    except AclError:
        return
    # What parses is canonical: parsing its canonical form gives it back.
    assert parse_rule(str(rule)) == rule


@given(st.lists(st.text(max_size=20), max_size=4), st.sampled_from([HOST, ADDR, LABELS]),
       st.text(max_size=30))
def test_allows_bind_never_crashes(rules: list[str], kind: str, name: str) -> None:
    assert allows_bind(rules, kind, name) in (True, False)


@given(st.text(max_size=30))
def test_normalize_hostname_idempotent(name: str) -> None:
    try:
        once = normalize_hostname(name)
    except AclError:
        return
    assert normalize_hostname(once) == once
    assert once.isascii() and once == once.lower()


def test_sans_io() -> None:
    import subprocess
    import sys

    code = "import sys, tunneld.core._acl; assert 'trio' not in sys.modules, 'trio imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
