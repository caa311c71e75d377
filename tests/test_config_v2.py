"""The agent config file, legacy (no version) and ``version: "2"`` layouts; merging; API definitions."""

from __future__ import annotations

from pathlib import Path

import pytest

from tunneld.core._config import (
    DEFAULT_INSPECT_DB_SIZE,
    AgentConfig,
    load_agent_config,
    parse_agent_config,
    parse_tunnel_definition,
    resolve_region,
    split_config_paths,
)
from tunneld.core._errors import ConfigError

TOKEN = "tkd_0123456789ab_" + "A" * 40

EVERY_KEY = f"""\
version: "2"
authtoken: {TOKEN}
region: eu
server_addr: "tunnel.{{region}}.example.com:4443"
root_cas: /etc/ca.pem
web_addr: 127.0.0.1:4041
log: stderr
log_level: debug
log_format: json
inspect_db_size: 1000000
update_channel: beta
update_check: false
remote_management: false
console_ui: false
metadata: '{{"team": "infra"}}'
heartbeat_interval: 5s
tunnels:
  web:
    proto: http
    addr: 8080
    subdomain: app
    auth: "bob:secret123"
    host_header: rewrite
    inspect: false
    bind_tls: true
    metadata: web tunnel
  site: {{proto: http, addr: "localhost:3000", hostname: site.example.com, basic_auth: ["a:password1"],
          schemes: [http, https]}}
  ssh: {{proto: tcp, addr: 22, remote_addr: "example.com:10022"}}
  e2e: {{proto: tls, addr: 9000, hostname: app.example.com, crt: app.crt, key: app.key}}
  group: {{labels: ["env=prod", "team=infra"], addr: 8000, inspect: false}}
"""


def parse(text: str, name: str = "t.yml") -> AgentConfig:
    return parse_agent_config(text, Path(name))


def error(text: str, name: str = "t.yml") -> str:
    with pytest.raises(ConfigError) as info:
        parse(text, name)
    return str(info.value)


def test_every_reference_key() -> None:
    cfg = parse(EVERY_KEY)
    assert cfg.version == "2" and cfg.warnings == []
    assert (cfg.authtoken, cfg.region, cfg.root_cas) == (TOKEN, "eu", "/etc/ca.pem")
    assert cfg.web_addr == "127.0.0.1:4041"
    assert (cfg.log, cfg.log_level, cfg.log_format) == ("stderr", "debug", "json")
    assert cfg.inspect_db_size == 1_000_000 and cfg.update_channel == "beta" and cfg.update_check is False
    assert cfg.remote_management is False and cfg.console_ui is False and cfg.metadata == '{"team": "infra"}'
    assert cfg.heartbeat_interval == 5.0
    web = cfg.tunnels["web"]
    assert (web.proto, web.addr, web.inspect, web.metadata) == ("http", "8080", False, "web tunnel")
    assert web.options["subdomain"] == "app" and web.options["host_header"] == "rewrite"
    assert web.options["schemes"] == ["https"] and len(web.options["basic_auth"]) == 1
    assert cfg.tunnels["site"].options["hostname"] == "site.example.com"
    assert cfg.tunnels["ssh"].options["remote_addr"] == "example.com:10022"
    assert cfg.tunnels["e2e"].options["crt"] == "app.crt"
    group = cfg.tunnels["group"]
    assert group.proto == "tunnel" and group.options["labels"] == ["env=prod", "team=infra"]
    # region fills the server_addr template
    resolve_region(cfg)
    assert cfg.server_addr == "tunnel.eu.example.com:4443"


def test_legacy_file_without_version_and_update_key() -> None:
    cfg = parse(f"authtoken: {TOKEN}\nupdate: false\nconsole_ui: iftty\nconsole_ui_color: transparent\n"
                "tunnels:\n  w: {proto: http, addr: 80}\n")
    assert cfg.version == "" and cfg.update_check is False and cfg.console_ui is None
    assert cfg.console_enabled(True) and not cfg.console_enabled(False)
    assert any("console_ui_color" in w and "line 4" in w for w in cfg.warnings)
    assert parse("update: beta\n").update_channel == "beta"


def test_unknown_top_level_key_warns_in_v2() -> None:
    cfg = parse('version: "2"\nserver_adr: x:1\n')
    assert cfg.warnings == ["t.yml line 2: unknown key 'server_adr' (ignored, as ngrok v2 did; an error with "
                            'version: "3")']


@pytest.mark.parametrize(("size", "expected"), [(0, DEFAULT_INSPECT_DB_SIZE), (-1, 0), (123, 123)])
def test_inspect_db_size(size: int, expected: int) -> None:
    assert parse(f"inspect_db_size: {size}\n").inspect_db_size == expected


@pytest.mark.parametrize(("text", "message"), [
    ("inspect_db_size: -5\n", "t.yml line 1: inspect_db_size: expected bytes"),
    ("inspect_db_size: lots\n", "t.yml line 1: inspect_db_size: expected an integer"),
    ("update_channel: nightly\n", "t.yml line 1: update_channel: expected stable, beta, unstable"),
    ("console_ui: sometimes\n", "t.yml line 1: console_ui: expected true, false, iftty"),
    ("remote_management: 1\n", "t.yml line 1: remote_management: expected true or false"),
    ("region: 'e u'\n", "t.yml line 1: region: expected a region name"),
    ("metadata: " + "x" * 5000 + "\n", "t.yml line 1: metadata: at most 4096"),
    ("web_addr: 4040\n", "t.yml line 1: web_addr: expected HOST:PORT or false"),
    ("proxy_url: http://proxy:3128\n", "t.yml line 1: proxy_url: not supported by tunneld"),
    ("version: 4\n", 't.yml line 1: version: expected "2" or "3"'),
    ("tunnels:\n  a: {proto: tcp}\n", "t.yml line 2: tunnels.a: missing key 'addr'"),
    ("tunnels:\n  a: {addr: 1}\n", "t.yml line 2: tunnels.a: missing key 'proto'"),
    ("tunnels:\n  a: {proto: tcp, addr: 1}\n  a: {proto: tcp, addr: 2}\n",
     "t.yml line 3: tunnels.a: given twice (first at t.yml line 2)"),
    ("tunnels:\n  a: {proto: http, addr: 1, basic_aut: ['u:password1']}\n",
     "t.yml line 2: tunnels.a.basic_aut: unknown key"),
    ("tunnels:\n  a: {proto: tcp, addr: 1, labels: [a=b]}\n",
     "t.yml line 2: tunnels.a.proto: a labeled tunnel"),
    ("tunnels:\n  a: {addr: 1, labels: [nope]}\n",
     "t.yml line 2: tunnels.a.labels: 'nope': expected key=value"),
    ("tunnels:\n  a: {proto: http, addr: 1, oauth: {provider: google}}\n",
     "t.yml line 2: tunnels.a.oauth: not supported by tunneld yet"),
    ("tunnels:\n  a: {proto: tcp, addr: 1, inspect: maybe}\n",
     "t.yml line 2: tunnels.a.inspect: expected true"),
    ("tunnels: [a, b]\n", "t.yml line 1: tunnels: expected a mapping"),
    ("- a\n", "t.yml line 1: the file must be a mapping"),
])
def test_errors_name_file_line_and_key(text: str, message: str) -> None:
    assert error(text).startswith(message), error(text)


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_merging_files(tmp_path: Path) -> None:
    a = write(tmp_path, "a.yml", f"authtoken: {TOKEN}\nlog_level: debug\ntunnels:\n"
              "  web: {proto: http, addr: 80, subdomain: a}\n  ssh: {proto: tcp, addr: 22}\n")
    b = write(tmp_path, "b.yml", 'version: "2"\nlog_level: warn\ntunnels:\n  web: {proto: http, addr: 8080}\n'
              "  db: {proto: tcp, addr: 5432}\n")
    cfg = load_agent_config([a, b])
    assert cfg.authtoken == TOKEN and cfg.log_level == "warn"  # scalars: the later file wins
    assert list(cfg.tunnels) == ["web", "ssh", "db"]  # maps merge by key
    # a tunnel is one value: replaced whole
    assert cfg.tunnels["web"].addr == "8080" and "subdomain" not in cfg.tunnels["web"].options
    assert cfg.paths == [a, b] and cfg.path == b
    # an error points into the right file
    c = write(tmp_path, "c.yml", "tunnels:\n  web:\n    proto: http\n    addr: 1\n    schemes: ftp\n")
    with pytest.raises(ConfigError, match=r"^c\.yml line 5: tunnels\.web\.schemes"):
        load_agent_config([a, c])
    assert split_config_paths(["a.yml,b.yml", "c.yml"]) == [Path("a.yml"), Path("b.yml"), Path("c.yml")]


def test_lists_are_replaced(tmp_path: Path) -> None:
    a = write(tmp_path, "a.yml", "tunnels:\n  w: {proto: http, addr: 1, schemes: [http, https]}\n")
    b = write(tmp_path, "b.yml", "tunnels:\n  w: {proto: http, addr: 1, schemes: [https]}\n")
    assert load_agent_config([a, b]).tunnels["w"].options["schemes"] == ["https"]


def test_unreadable_and_missing_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_agent_config([tmp_path / "nope.yml"])
    with pytest.raises(ConfigError, match="is a directory"):
        load_agent_config([tmp_path])
    bad = write(tmp_path, "bad.yml", "a: [\n")
    with pytest.raises(ConfigError, match=r"^bad\.yml line 2: not valid YAML"):
        load_agent_config([bad])


def test_region_without_template_is_refused() -> None:
    cfg = parse("region: us\n")
    with pytest.raises(ConfigError, match="has no {region}"):
        resolve_region(cfg)
    cfg = parse("server_addr: 'edge-{region}.example.com:443'\n")
    with pytest.raises(ConfigError, match="give a region"):
        resolve_region(cfg)
    resolve_region(cfg, "ap")
    assert cfg.server_addr == "edge-ap.example.com:443" and cfg.region == "ap"


def test_tunnel_definition_from_json() -> None:
    t = parse_tunnel_definition("web", {"name": "web", "proto": "http", "addr": 8080, "schemes": ["https"],
                                        "basic_auth": ["bob:secret123"], "inspect": False})
    assert (t.name, t.proto, t.addr, t.inspect) == ("web", "http", "8080", False)
    assert t.options["schemes"] == ["https"]
    labeled = parse_tunnel_definition("g", {"labels": ["a=b"], "addr": "8000"})
    assert labeled.proto == "tunnel"
    for data, message in [
        ({"proto": "http", "addr": 1, "basic_auth": ["a:b"]}, "tunnel definition: basic_auth: a basic auth"),
        ({"proto": "http"}, "tunnel definition: missing key 'addr'"),
        ({"proto": "gopher", "addr": 1}, "tunnel definition: proto: unknown tunnel type 'gopher'"),
        ({"proto": "tcp", "addr": 1, "name": "other"}, "tunnel definition: name: does not match"),
        ({"proto": "tcp", "addr": 1, "remote_adr": "x"}, "tunnel definition: remote_adr: unknown key"),
        ({"proto": "tcp", "addr": 1, "inspect": "yes"}, "tunnel definition: inspect: expected true or false"),
    ]:
        with pytest.raises(ConfigError) as info:
            parse_tunnel_definition("t", data)
        assert str(info.value).startswith(message), info.value


def test_retry_and_update_check_defaults() -> None:
    cfg = parse('version: "2"\n')
    assert cfg.retry is False and cfg.update_check is False  # an agent never queries an index unasked
    cfg = parse('version: "2"\nretry: true\nupdate_check: true\n')
    assert cfg.retry is True and cfg.update_check is True
    with pytest.raises(ConfigError, match="retry"):
        parse('version: "2"\nretry: sometimes\n')
