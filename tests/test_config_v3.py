"""``version: "3"`` config files (agent:, endpoints:, tunnels:), ``config upgrade``, add-authtoken edits."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import yaml

from tunneld.core._config import AgentConfig, load_agent_config, parse_agent_config
from tunneld.core._config_edit import check_token, save_authtoken, set_authtoken_text
from tunneld.core._config_upgrade import upgrade_file, upgrade_text
from tunneld.core._errors import ConfigError

TOKEN = "tkd_0123456789ab_" + "A" * 40
NEW = "tkd_ba9876543210_" + "b-_" * 13 + "z"

V3 = f"""\
version: 3
agent:
  authtoken: {TOKEN}
  connect_url: edge.example.com:4443
  connect_cas: /etc/edge-ca.pem
  web_addr: false
  log: stdout
  inspect_db_size: -1
  remote_management: false
  console_ui: true
  update_check: false
  update_channel: unstable
  metadata: session meta
  api_key: ignored-for-tunnels
endpoints:
  - name: web
    url: https://web.example.com
    upstream: {{url: 8080, protocol: http1}}
    metadata: web endpoint
  - name: random
    upstream: {{url: "localhost:3000"}}
  - name: plain
    url: http://
    upstream: {{url: 80}}
  - name: ssh
    url: tcp://example.com:10022
    upstream: {{url: "tcp://127.0.0.1:22", proxy_protocol: 2}}
  - name: e2e
    url: tls://app.example.com
    upstream: {{url: 9000}}
    agent_tls_termination: {{server_certificate: app.crt, server_private_key: app.key}}
tunnels:
  old: {{proto: tcp, addr: 23}}
"""


def parse(text: str) -> AgentConfig:
    return parse_agent_config(text, Path("v3.yml"))


def test_v3_agent_and_endpoints() -> None:
    cfg = parse(V3)
    assert cfg.version == "3"
    assert (cfg.authtoken, cfg.server_addr, cfg.root_cas, cfg.web_addr) == (
        TOKEN, "edge.example.com:4443", "/etc/edge-ca.pem", None)
    assert cfg.inspect_db_size == 0 and not cfg.remote_management and cfg.console_ui is True
    assert not cfg.update_check and cfg.update_channel == "unstable" and cfg.metadata == "session meta"
    assert any("agent.api_key" in w for w in cfg.warnings)
    t = cfg.tunnels
    assert list(t) == ["old", "web", "random", "plain", "ssh", "e2e"]
    assert (t["web"].proto, t["web"].addr, t["web"].metadata) == ("http", "8080", "web endpoint")
    assert t["web"].options == {"schemes": ["https"], "hostname": "web.example.com"}
    assert t["random"].options == {"schemes": ["https"]} and t["plain"].options == {"schemes": ["http"]}
    assert (t["ssh"].proto, t["ssh"].addr) == ("tcp", "127.0.0.1:22")
    assert t["ssh"].options == {"remote_addr": "example.com:10022", "proxy_proto": 2}
    assert t["e2e"].options == {"hostname": "app.example.com", "crt": "app.crt", "key": "app.key"}


@pytest.mark.parametrize(("text", "message"), [
    ("version: 3\nauthtoken: x\n", "v3.yml line 2: unknown key 'authtoken' (version 3 has agent"),
    ("version: 3\n", "v3.yml line 1: version 3 needs an agent: block"),
    ("version: 3\nagent:\n  server_adr: x\n", "v3.yml line 3: unknown key 'agent.server_adr'"),
    ("version: 3\nagent:\n  socks5_proxy: x\n", "v3.yml line 3: agent.socks5_proxy: not supported"),
    ("version: 3\nagent: {}\nendpoints:\n  - url: https://a.example.com\n    upstream: {url: 1}\n",
     "v3.yml line 4: endpoints[0]: missing key 'name'"),
    ("version: 3\nagent: {}\nendpoints:\n  - name: a\n    url: https://a.example.com\n",
     "v3.yml line 4: endpoints.a: missing key 'upstream'"),
    ("version: 3\nagent: {}\nendpoints:\n  - name: a\n    upstream: {url: 1}\n    colour: red\n",
     "v3.yml line 6: unknown key 'endpoints[0].colour'"),
    ("version: 3\nagent: {}\nendpoints:\n  - name: a\n    url: ftp://x\n    upstream: {url: 1}\n",
     "v3.yml line 5: endpoints.a.url: expected an https://"),
    ("version: 3\nagent: {}\nendpoints:\n  - name: a\n    url: https://x.example.com:8443\n"
     "    upstream: {url: 1}\n",
     "v3.yml line 5: endpoints.a.url: the edge chooses the port"),
    ("version: 3\nagent: {}\nendpoints:\n  - name: a\n    upstream: {url: 1, protocol: http2}\n",
     "v3.yml line 5: endpoints.a.upstream.protocol: tunneld speaks HTTP/1.1"),
    ("version: 3\nagent: {}\nendpoints:\n  - name: a\n    upstream: {url: 1}\n    traffic_policy: {}\n",
     "v3.yml line 6: endpoints.a.traffic_policy: not supported"),
    ("version: 3\nagent: {}\nendpoints:\n  - name: a\n    upstream: {url: 1}\n    bindings: [internal]\n",
     "v3.yml line 6: endpoints.a.bindings: tunneld endpoints are public only"),
    ("version: 3\nagent: {}\nendpoints:\n  - name: a\n    upstream: {url: 1}\n"
     "  - name: a\n    upstream: {url: 2}\n",
     "v3.yml line 6: endpoints[1].name: 'a' is also the name of the endpoint at v3.yml line 4"),
    ("version: 3\nagent: {}\ntunnels: {a: {proto: tcp, addr: 1}}\nendpoints:\n"
     "  - name: a\n    upstream: {url: 2}\n",
     "v3.yml line 1: endpoint 'a' has the name of a tunnel"),
    ("version: 3\nagent: {}\nendpoints:\n  - name: a\n    url: https://a.example.com\n"
     "    upstream: {url: 1}\n    agent_tls_termination: {server_certificate: c.pem}\n",
     "v3.yml line 7: endpoints.a.agent_tls_termination.server_certificate: for tls:// endpoints only"),
])
def test_v3_errors(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse(text)
    assert str(info.value).startswith(message), info.value


def test_v2_and_v3_files_do_not_merge(tmp_path: Path) -> None:
    (tmp_path / "a.yml").write_text("authtoken: x\n")
    (tmp_path / "b.yml").write_text("version: 3\nagent: {log: stdout}\n")
    with pytest.raises(ConfigError, match="files of one layout merge"):
        load_agent_config([tmp_path / "a.yml", tmp_path / "b.yml"])
    (tmp_path / "c.yml").write_text("version: 3\nagent: {authtoken: y}\n")
    cfg = load_agent_config([tmp_path / "c.yml", tmp_path / "b.yml"])
    assert (cfg.authtoken, cfg.log) == ("y", "stdout")  # agent: merges key by key


# ---- config add-authtoken: only that key changes --------------------------------------------------------


@pytest.mark.parametrize(("before", "after"), [
    ("", f'version: "2"\nauthtoken: {NEW}\n'),
    ("# only a comment", f'# only a comment\nversion: "2"\nauthtoken: {NEW}\n'),
    (f'# mine\nversion: "2"   # quoted\nauthtoken: "{TOKEN}"  # old\n'
     "tunnels: {w: {proto: tcp, addr: 1}}\n",
     f'# mine\nversion: "2"   # quoted\nauthtoken: {NEW}  # old\n'
     "tunnels: {w: {proto: tcp, addr: 1}}\n"),
    ('version: "2"\ntunnels: {w: {proto: tcp, addr: 1}}\n',
     f'version: "2"\nauthtoken: {NEW}\ntunnels: {{w: {{proto: tcp, addr: 1}}}}\n'),
    ("log: stdout\r\n", f"authtoken: {NEW}\r\nlog: stdout\r\n"),
    ("{version: '2', log: stdout}", f"{{authtoken: {NEW}, version: '2', log: stdout}}"),
    ("version: 3\nagent:\n    log: stdout  # x\n",
     f"version: 3\nagent:\n    authtoken: {NEW}\n    log: stdout  # x\n"),
    ("version: 3\nagent:\n  authtoken: old\n", f"version: 3\nagent:\n  authtoken: {NEW}\n"),
    ("version: 3\nendpoints: []\n", f"version: 3\nagent:\n  authtoken: {NEW}\nendpoints: []\n"),
])
def test_add_authtoken_keeps_the_rest_byte_for_byte(before: str, after: str) -> None:
    assert set_authtoken_text(before, NEW) == after


def test_add_authtoken_file_modes(tmp_path: Path) -> None:
    path = tmp_path / "dir" / "tunneld.yml"
    save_authtoken(path, NEW)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and yaml.safe_load(path.read_text())["authtoken"] == NEW
    os.chmod(path, 0o640)  # a mode the user chose is kept
    save_authtoken(path, TOKEN)
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    path.write_text("a: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        save_authtoken(path, TOKEN)
    assert path.read_text() == "a: [\n"


@pytest.mark.parametrize("token", ["TOK", "", "tkd_0123456789ab_short", "2abc_ngrokStyleToken0123456789",
                                   TOKEN + "x", TOKEN[:-1] + " "])
def test_token_shape_is_checked(token: str) -> None:
    if token == TOKEN[:-1] + " ":
        with pytest.raises(ValueError, match="not an authtoken"):
            check_token(token)
        return
    with pytest.raises(ValueError, match="tkd_<12 hex digits>"):
        check_token(token)


# ---- config upgrade ---------------------------------------------------------------------------------------

V2 = """\
# My ngrok config

authtoken: tkd_0123456789ab_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA  # the token
# where the edge is
server_addr: "tunnel.{region}.example.com:4443"
region: eu   # Europe
update: false
tunnels:
  # web site
  web:
    proto: http
    addr: 8080
    auth: "bob:secret123"   # creds
    bind_tls: both
  ssh: {proto: tcp, addr: 22}
log_level: debug
"""

V2_UPGRADED = """\
# My ngrok config

version: "3"
agent:
  authtoken: tkd_0123456789ab_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA  # the token
  # where the edge is
  connect_url: "tunnel.{region}.example.com:4443"
  region: eu   # Europe
  update_check: false
  log_level: debug
tunnels:
  # web site
  web:
    proto: http
    addr: 8080
    basic_auth: ["bob:secret123"]   # creds
    schemes: [https, http]
  ssh: {proto: tcp, addr: 22}
"""


def test_upgrade_keeps_comments_and_meaning(tmp_path: Path) -> None:
    new, notes = upgrade_text(V2, "ngrok.yml", None)
    assert new == V2_UPGRADED
    assert "ngrok.yml line 5: server_addr is now agent.connect_url" in notes
    path = tmp_path / "ngrok.yml"
    path.write_text(V2)
    os.chmod(path, 0o600)
    _, _, backup = upgrade_file(path, None)
    assert backup.read_text() == V2 and path.read_text() == V2_UPGRADED
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and stat.S_IMODE(backup.stat().st_mode) == 0o600
    with pytest.raises(ConfigError, match="already version 3"):
        upgrade_file(path, None)


def test_upgrade_flow_file_and_refusals() -> None:
    new, notes = upgrade_text("{authtoken: x, tunnels: {a: {proto: http, addr: 1, auth: 'u:password1'}}}",
                              "f.yml", None)
    tunnel = {"proto": "http", "addr": 1, "basic_auth": ["u:password1"]}
    assert yaml.safe_load(new) == {"version": "3", "agent": {"authtoken": "x"}, "tunnels": {"a": tunnel}}
    assert any("without its comments" in note for note in notes)
    with pytest.raises(ConfigError, match=r"remove or fix them first: colour \(f\.yml line 2\)"):
        upgrade_text("authtoken: x\ncolour: red\n", "f.yml", None)
    with pytest.raises(ConfigError, match=r"f\.yml line 1: tunnels\.a"):
        upgrade_text("tunnels: {a: {proto: tcp}}\n", "f.yml", None)
