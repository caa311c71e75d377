"""``tunneld config add-authtoken|check|edit|upgrade`` and ``tunneld start``, as real processes."""

from __future__ import annotations

import json
import stat
import sys
import urllib.request
from collections.abc import Callable
from pathlib import Path

from tests.test_cli import (  # noqa: F401 - fixtures
    STARTED_TUNNEL,
    EdgeProc,
    Proc,
    base_env,
    curl,
    echo_upstream,
    edge,
    free_port,
    http_upstream,
    logfmt,
    procs,
    run_cli,
    spawn,
    started_urls,
    tcp_roundtrip,
)

TOKEN = "tkd_0123456789ab_" + "A" * 40


def test_add_authtoken_cli(tmp_path: Path) -> None:
    env = base_env(tmp_path)
    default = tmp_path / "config" / "tunneld" / "tunneld.yml"
    res = run_cli("config", "add-authtoken", TOKEN, env=env)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == f"Authtoken saved to configuration file: {default}"
    assert stat.S_IMODE(default.stat().st_mode) == 0o600
    text = '# keep me\nversion: "2"\nauthtoken: old   # trailing\ntunnels: {a: {proto: tcp, addr: 1}}\n'
    default.write_text(text)
    new = "tkd_ba9876543210_" + "Z" * 40
    assert run_cli("config", "add-authtoken", new, env=env).returncode == 0
    assert default.read_text() == text.replace("old", new)
    res = run_cli("config", "add-authtoken", "not-a-token", env=env)
    assert res.returncode == 2 and "tkd_<12 hex digits>" in res.stderr
    assert default.read_text() == text.replace("old", new)


def test_check_merges_files_and_warns(tmp_path: Path) -> None:
    env = base_env(tmp_path)
    a, b = tmp_path / "a.yml", tmp_path / "b.yml"
    a.write_text(f"authtoken: {TOKEN}\ncolour: red\ntunnels:\n  w: {{proto: tcp, addr: 1}}\n")
    b.write_text('version: "2"\nlog: stdout\n')
    res = run_cli("config", "check", "--config", f"{a},{b}", env=env)
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines() == [f"Valid configuration file at {a}", f"Valid configuration file at {b}"]
    assert "tunneld: warning: a.yml line 2: unknown key 'colour'" in res.stderr
    b.write_text("tunnels:\n  w: {proto: tcp, addr: 1, remote_adr: x}\n")
    res = run_cli("config", "check", "--config", str(a), "--config", str(b), env=env)
    assert res.returncode == 1 and "b.yml line 2: tunnels.w.remote_adr: unknown key" in res.stderr
    b.write_text("region: eu\n")
    res = run_cli("config", "check", "--config", str(b), env=env)
    assert res.returncode == 1 and "region 'eu'" in res.stderr and "{region}" in res.stderr


def test_edit_runs_the_editor_then_checks(tmp_path: Path) -> None:
    editor = tmp_path / "editor.py"
    editor.write_text("import sys\nopen(sys.argv[1], 'a').write(sys.argv[0] and 'tunnels:\\n  w: "
                      "{proto: tcp, addr: 22}\\n')\n")
    cfg = tmp_path / "new" / "t.yml"
    env = {**base_env(tmp_path), "EDITOR": f"{sys.executable} {editor}"}
    env.pop("VISUAL", None)
    res = run_cli("config", "edit", "--config", str(cfg), env=env)
    assert res.returncode == 0, res.stderr
    assert "Valid configuration file" in res.stdout and "w:" in cfg.read_text()
    res = run_cli("config", "edit", "--config", str(cfg), env=env)  # now "tunnels" twice
    assert res.returncode == 1 and "t.yml line 4: tunnels: given twice" in res.stderr
    res = run_cli("config", "edit", "--config", str(cfg), env={**env, "EDITOR": "false"})
    assert res.returncode == 1 and "exited with status 1" in res.stderr


def test_upgrade_cli(tmp_path: Path) -> None:
    env = base_env(tmp_path)
    cfg = tmp_path / "ngrok.yml"
    old = f"# mine\nauthtoken: {TOKEN}\nserver_addr: edge.example.com:4443  # edge\ntunnels:\n" \
          "  web: {proto: http, addr: 80, bind_tls: true}\n"
    cfg.write_text(old)
    res = run_cli("config", "upgrade", "--config", str(cfg), "--dry-run", env=env)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith('# mine\nversion: "3"\nagent:\n  authtoken: ')
    assert "  connect_url: edge.example.com:4443  # edge\n" in res.stdout and "schemes: [https]" in res.stdout
    assert cfg.read_text() == old
    res = run_cli("config", "upgrade", "--config", str(cfg), env=env)
    assert res.returncode == 0 and "ngrok.yml.v2.bak" in res.stdout
    assert run_cli("config", "check", "--config", str(cfg), env=env).returncode == 0
    res = run_cli("config", "upgrade", "--config", str(cfg), env=env)
    assert res.returncode == 1 and "already version 3" in res.stderr


def _api_tunnels(port: int) -> dict[str, str]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/tunnels", timeout=5) as resp:
        return {t["name"]: t["public_url"] for t in json.load(resp)["tunnels"]}


def test_start_named_all_and_none(edge: EdgeProc, echo_upstream: int, http_upstream: int,
                                  spawn: Callable[..., Proc], tmp_path: Path) -> None:
    # Two files merged, the edge's address from a {region} template, a v3 endpoint and a v2 tunnel.
    base = tmp_path / "base.yml"
    base.write_text(f"version: 3\nagent:\n  authtoken: {edge.token}\n"
                    f"  connect_url: '127.0.0.{{region}}:{edge.agent}'\n"
                    f"  connect_cas: {edge.ca}\n  log: stdout\n  log_format: logfmt\n"
                    "tunnels:\n  echo: {proto: tcp, addr: %d}\n" % echo_upstream)
    more = tmp_path / "more.yml"
    more.write_text("version: 3\nagent:\n  web_addr: false\nendpoints:\n"
                    f"  - name: site\n    url: http://\n    upstream: {{url: {http_upstream}}}\n"
                    "  - name: spare\n    url: tcp://\n    upstream: {url: 9}\n")
    configs = ["--config", f"{base},{more}", "--region", "1"]

    agent = spawn("start", "echo", "site", *configs)
    urls = started_urls(agent, 2)
    assert set(urls) == {"echo", "site"}
    assert tcp_roundtrip(int(urls["echo"].rsplit(":", 1)[1]), b"merged") == b"merged"
    assert curl(urls["site"] + "/x") == "hello from upstream /x"
    assert sum("client session established" in line for line in agent.lines["out"]) == 1  # one session
    agent.stop()

    web = free_port()
    agent = spawn("start", "--all", *configs, "--web-addr", f"127.0.0.1:{web}")
    urls = started_urls(agent, 3)
    assert set(urls) == {"echo", "site", "spare"}
    assert set(_api_tunnels(web)) == {"echo", "site", "spare"}
    assert sum("client session established" in line for line in agent.lines["out"]) == 1
    agent.stop()

    web = free_port()
    agent = spawn("start", "--none", *configs, "--web-addr", f"127.0.0.1:{web}")
    agent.wait_line(lambda line: "client session established" in line, timeout=15)
    assert _api_tunnels(web) == {}
    assert not any(STARTED_TUNNEL in line for line in agent.lines["out"])
    agent.stop()


def test_start_mistakes(tmp_path: Path) -> None:
    env = base_env(tmp_path)
    cfg = tmp_path / "t.yml"
    cfg.write_text("tunnels:\n  w: {proto: tcp, addr: 22}\n  bad: {proto: tcp, addr: 'x:99999'}\n")
    res = run_cli("start", "nope", "--config", str(cfg), env=env)
    assert res.returncode == 1 and "no tunnel named nope" in res.stderr and "defined: w, bad" in res.stderr
    res = run_cli("start", "w", "--all", "--config", str(cfg), env=env)
    assert res.returncode == 2 and "one of them" in res.stderr
    res = run_cli("start", "--config", str(cfg), env=env)
    assert res.returncode == 2 and "--all or --none" in res.stderr
    res = run_cli("start", "bad", "--config", str(cfg), env=env)
    assert res.returncode == 1 and "tunnels.bad:" in res.stderr
    empty = tmp_path / "empty.yml"
    empty.write_text('version: "2"\n')
    res = run_cli("start", "--all", "--config", str(empty), env=env)
    assert res.returncode == 1 and "no tunnels in" in res.stderr
    res = run_cli("tcp", "22", "--config", str(cfg), "--region", "eu", env=env)
    assert res.returncode == 1 and "region 'eu'" in res.stderr


def test_console_ui_false_logs_to_stdout(edge: EdgeProc, echo_upstream: int, spawn: Callable[..., Proc],
                                         tmp_path: Path) -> None:
    cfg = tmp_path / "t.yml"
    cfg.write_text(f"authtoken: {edge.token}\nserver_addr: 127.0.0.1:{edge.agent}\nroot_cas: {edge.ca}\n"
                   "console_ui: false\nlog_format: logfmt\nweb_addr: false\n")
    agent = spawn("tcp", str(echo_upstream), "--config", str(cfg))
    line = agent.wait_line(lambda line: STARTED_TUNNEL in line, timeout=15)
    assert logfmt(line)["name"] == "command_line"
    assert not any("Session Status" in line for line in agent.lines["out"])
    agent.stop()
