"""Fuzz tests of the agent config loader (tunneld.core._config); the long run is bench/fuzz.py.

Property: any YAML document, any text and any bytes give an AgentConfig or a ConfigError whose
message starts with the file name and line (``config line 7: tunnels.web.addr: ...``), never
another exception, within the time budget; an accepted config is sane (heartbeats of 1 s to 24 h,
string fields are strings).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from tunneld.core._config import AgentConfig, load_agent_config, parse_agent_config
from tunneld.core._errors import ConfigError

from ._limits import budget, fuzz_settings

FUZZ = fuzz_settings(100)
# Warm up outside any time budget: the first tunnel definition loads the plugins' tunnel types.
parse_agent_config("tunnels: {t: {proto: tcp, addr: 1}}\n")
WHERE = re.compile(r"(config|[\w.-]+\.yml) line \d+: \S[^\n]*\Z")  # file, line, one line of text


def load(src: str | bytes) -> AgentConfig | str:
    """The config, or the ConfigError message (checked to name the file and line)."""
    try:
        with budget():
            cfg = parse_agent_config(src)
    except ConfigError as exc:
        message = str(exc)
        assert WHERE.match(message), message
        return message
    assert 1 <= cfg.heartbeat_interval <= 86400 and 1 <= cfg.heartbeat_tolerance <= 86400
    for field in ("authtoken", "server_addr", "root_cas", "log", "log_format", "log_level"):
        assert isinstance(getattr(cfg, field), str)
    for name, t in cfg.tunnels.items():
        assert isinstance(name, str) and isinstance(t.proto, str) and isinstance(t.addr, str)
        if t.proto in ("tcp", "tls"):
            assert t.option("proxy_proto") in (0, 1, 2)
    return cfg


AGENT_KEYS = ["version", "authtoken", "server_addr", "root_cas", "web_addr", "log", "log_format",
              "log_level", "heartbeat_interval", "heartbeat_tolerance", "console_ui", "update_check",
              "region", "metadata", "inspect_db_size", "bogus"]
TUNNEL_KEYS = ["proto", "addr", "inspect", "subdomain", "hostname", "schemes", "bind_tls", "remote_addr",
               "metadata", "domain", "auth", "basic_auth", "host_header", "crt", "key", "proxy_proto",
               "oauth", "labels", "nope"]
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=12),
    st.sampled_from(["10s", "1500ms", "2m", "1h", "0.5s", "²s", "1e400", ".nan", "-5s", "http", "tcp", "tls",
                     "https", "both", "1", "2", "user:password1", "rewrite", "8080", "false", "~"]),
)
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                      | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=6)
tunnels = st.dictionaries(
    st.text(max_size=6) | st.integers(),
    st.dictionaries(st.sampled_from(TUNNEL_KEYS), scalars | st.lists(scalars, max_size=3), max_size=6)
    | values,
    max_size=3,
)
documents = st.dictionaries(st.sampled_from(AGENT_KEYS), scalars | values, max_size=6).flatmap(
    lambda d: st.one_of(st.just(d), tunnels.map(lambda t: {**d, "tunnels": t}))
) | values


@FUZZ
@given(doc=documents, flow=st.booleans())
def test_structured_documents(doc: Any, flow: bool) -> None:
    load(yaml.safe_dump(doc, default_flow_style=flow, allow_unicode=True))


@FUZZ
@given(text=st.text(max_size=300))
def test_arbitrary_text(text: str) -> None:
    load(text)


@FUZZ
@given(data=st.binary(max_size=300))
def test_arbitrary_bytes(data: bytes) -> None:
    load(data)


SEED = """\
version: "2"
authtoken: tkd_abc
server_addr: tunnels.example.com:4443
web_addr: 127.0.0.1:4040
heartbeat_interval: 10s
tunnels:
  web: {proto: http, addr: 8080, subdomain: myapp, schemes: [https], basic_auth: ['u:password1']}
  ssh: {proto: tcp, addr: 22, proxy_proto: 2}
  t:
    proto: tls
    addr: 443
    crt: a.pem
    key: b.pem
"""
TOKENS = ["!!binary ", "!!int ", "!!float ", "!!timestamp ", "!!bool ", "!!python/object ", "!foo ", "&a ",
          "*a", "? ", "<<: ", "[", "]", "{", "}", "- ", ": ", "\n", "  ", "\t", '"', "'", "#", ".nan",
          "1e400", "9" * 40, "²", "\x00", "\ufeff", "%YAML 1.1\n---\n", "---\n", "...\n", "|\n", ">\n"]


@st.composite
def mutated_seed(draw: st.DrawFn) -> str:
    buf = SEED
    for _ in range(draw(st.integers(1, 4))):
        pos = draw(st.integers(0, len(buf)))
        op = draw(st.integers(0, 2))
        if op == 0:
            buf = buf[:pos] + draw(st.sampled_from(TOKENS) | st.text(min_size=1, max_size=3)) + buf[pos:]
        elif op == 1:
            buf = buf[:pos] + buf[pos + draw(st.integers(1, 12)) :]
        else:
            a = draw(st.integers(0, len(buf)))
            buf = buf[:pos] + buf[a : a + draw(st.integers(1, 30))] + buf[pos:]
    return buf


@FUZZ
@given(text=mutated_seed(), as_bytes=st.booleans())
def test_mutated_valid_config(text: str, as_bytes: bool) -> None:
    load(text.encode("utf-8", "surrogatepass") if as_bytes else text)


def test_seed_is_valid() -> None:
    cfg = load(SEED)
    assert isinstance(cfg, AgentConfig) and sorted(cfg.tunnels) == ["ssh", "t", "web"]


REGRESSIONS = [
    ("a: " + "[" * 5000, "config line 1: nested deeper than"),  # was RecursionError
    ("tunnels:\n  w: {proto: http, addr: " + "[" * 40 + "1" + "]" * 40 + "}",
     "config line 2: nested deeper than"),
    ("authtoken: !!bool maybe\n", "config line 1: authtoken: invalid value"),  # was KeyError
    ("authtoken: !!timestamp 2020-13-45\n", "config line 1: authtoken: invalid value"),  # was ValueError
    ("authtoken: !!timestamp nope\n", "config line 1: authtoken: invalid value"),  # was AttributeError
    ("log: !!int x\n", "config line 1: log: invalid value"),  # was ValueError
    ("log: !!binary abc\n", "config line 1: log: invalid value"),  # was ConstructorError (YAMLError)
    ("log: !custom x\n", "config line 1: log: invalid value"),  # was ConstructorError
    ("region: " + "9" * 5000 + "\n", "config line 1: region: invalid value"),  # int() digit limit
    ("heartbeat_interval: ²s\n", "config line 1: heartbeat_interval: expected a duration"),  # was ValueError
    ("heartbeat_interval: .nan\n", "config line 1: heartbeat_interval: expected a duration"),  # was accepted
    ("heartbeat_interval: .inf\n", "config line 1: heartbeat_interval: expected a duration"),
    # int64 nanoseconds in Auth: a huge interval made the agent fail to encode its Auth message
    ("heartbeat_tolerance: 10000000000000\n", "config line 1: heartbeat_tolerance: must be at most 24h"),
    ("? [a, b]\n: 1\n", "config line 1: keys must be plain names"),
    # PyYAML's scanner raised ValueError/OverflowError itself (found by bench/fuzz.py, config target)
    (' "\\U1e4020040200', "config line 1: not valid YAML: chr() arg not in range"),
    ('a: 1\nb: "\\UFFFFFFFF"', "config line 2: not valid YAML: Python int too large"),
    # a multi-line key was echoed as is: a multi-line message (found by bench/fuzz.py, config target)
    ("tunnels:\n  web: {proto: h ,t|5  \n\n\n   \n \n tdpadr:addr6}\n",
     "config line 2: tunnels.web: key 't|5\\n\\n\\n\\ntdpadr:addr6' contains control characters"),
    ("? |\n  a\n  b\n: 1\n", "config line 1: key 'a\\nb\\n' contains control characters"),
    # the reader's error had no line and a two-line message
    ("a: 1\nb: \x00", "config line 2: not valid YAML: special characters are not allowed (#x0000)"),
    ("tunnels:\n  ? {x: 1}\n  : {proto: tcp, addr: 1}\n", "config line 2: tunnels: keys must be plain"),
    ("tunnels:\n  w:\n    ? [proto]\n    : tcp\n", "config line 3: tunnels.w: keys must be plain names"),
]


@pytest.mark.parametrize(("text", "where"), REGRESSIONS,
                         ids=[w.split(": ", 1)[1][:30] for _, w in REGRESSIONS])
def test_regressions(text: str, where: str) -> None:
    message = load(text)
    assert isinstance(message, str) and message.startswith(where), message


def test_regression_invalid_utf8_file(tmp_path: Path) -> None:
    """A config file that is not UTF-8 raised UnicodeDecodeError from load_agent_config."""
    path = tmp_path / "tunneld.yml"
    path.write_bytes(b"authtoken: abc\nlog: \xff\xfe\n")
    with pytest.raises(ConfigError, match=r"^tunneld\.yml line 2: not valid UTF-8 \(byte 20\)"):
        load_agent_config(path)
    assert load("authtoken: é\n".encode()).authtoken == "é"  # type: ignore[union-attr]
