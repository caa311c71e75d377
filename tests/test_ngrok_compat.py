"""``tunneld-ngrok``: the ngrok agent's command line, without an edge (see interop/test_pyngrok.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from tunneld import __version__
from tunneld._ngrok_compat import cli

TOKEN = "tkd_0123456789ab_" + "a" * 40


@pytest.fixture(autouse=True)
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """ngrok's default config file lives under XDG_CONFIG_HOME: keep it in the test's folder."""
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    for name in ("NGROK_AUTHTOKEN", "TUNNELD_AUTHTOKEN", "TUNNELD_SERVER_ADDR", "TUNNELD_ROOT_CAS"):
        monkeypatch.delenv(name, raising=False)
    return tmp_path / "xdg" / "ngrok" / "ngrok.yml"


def run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli, list(args))
    return result.exit_code, result.stdout, result.stderr


@pytest.mark.parametrize("args", [["--version"], ["-v"], ["version"]])
def test_version(args: list[str]) -> None:
    code, out, _ = run(*args)
    assert code == 0
    # pyngrok: output.split("version ")[1]
    assert out.strip().split("version ")[1] == __version__


def test_update_says_why_nothing_happens() -> None:
    code, out, _ = run("update", "--log", "stdout")
    assert code == 0 and "pip install --upgrade tunneld" in out


def test_add_authtoken_keeps_each_layout(tmp_path: Path, home: Path) -> None:
    v2 = tmp_path / "v2.yml"
    v2.write_text('version: "2"\n# the edge\nserver_addr: edge.example:4443\n')
    v3 = tmp_path / "v3.yml"
    v3.write_text('version: "3"\nagent:\n  connect_url: edge.example:4443\n')
    for path in (v2, v3):
        code, out, err = run("config", "add-authtoken", TOKEN, "--log", "stdout", "--config", str(path))
        assert code == 0, err
        assert out.strip() == f"Authtoken saved to configuration file: {path}"
    assert yaml.safe_load(v2.read_text())["authtoken"] == TOKEN
    assert "# the edge" in v2.read_text()  # edited in place, not re-dumped
    assert yaml.safe_load(v3.read_text())["agent"]["authtoken"] == TOKEN
    # Without --config: ngrok's own default file, created private.
    code, out, _ = run("config", "add-authtoken", TOKEN)
    assert code == 0 and str(home) in out
    assert home.stat().st_mode & 0o077 == 0


def test_add_authtoken_checks_the_token(tmp_path: Path) -> None:
    code, _, err = run("config", "add-authtoken", "2abc_not_ours", "--config", str(tmp_path / "n.yml"))
    assert code == 1 and "authtoken" in err
    assert not (tmp_path / "n.yml").exists()


def test_add_api_key_is_refused() -> None:
    code, _, err = run("config", "add-api-key", "key")
    assert code == 1 and "API key" in err


def test_config_check_reads_both_layouts(tmp_path: Path) -> None:
    v3 = tmp_path / "v3.yml"
    endpoint = {"name": "web", "url": "https://", "upstream": {"url": 80}}
    v3.write_text(yaml.safe_dump({"version": "3", "agent": {"connect_url": "edge.example:4443"},
                                  "endpoints": [endpoint]}))
    code, out, err = run("config", "check", "--config", str(v3))
    assert code == 0, err
    assert out.startswith("Valid configuration file at")
    bad = tmp_path / "bad.yml"
    bad.write_text('version: "3"\nagent: {}\n'
                   'endpoints:\n  - name: web\n    url: ftp://x\n    upstream: {url: 80}\n')
    code, _, err = run("config", "check", "--config", str(bad))
    assert code == 1 and "bad.yml" in err and "url" in err


def test_start_failures_reach_a_wrapper_on_stdout(tmp_path: Path) -> None:
    """pyngrok reads only stdout: a failure to start is a ``lvl=crit ... err=`` logfmt line there."""
    path = tmp_path / "ngrok.yml"
    path.write_text('version: "3"\nagent:\n  proxy_url: http://proxy:3128\n')
    code, out, err = run("start", "--none", "--log", "stdout", "--config", str(path))
    assert code == 1
    assert "proxy_url" in err
    [line] = out.splitlines()
    assert line.startswith("t=") and " lvl=crit " in line and 'err="' in line and "proxy_url" in line

    path.write_text('version: "2"\nserver_addr: edge.example:4443\n')
    code, out, err = run("start", "nosuch", "--config", str(path))
    assert code == 1 and "nosuch" in err
    code, out, err = run("start", "--config", str(path))
    assert code == 1 and "--none" in err
    code, out, err = run("start", "--none", "--config", str(path), "--region", "eu")
    assert code == 1 and "region" in err


def test_other_commands_are_tunneld_s() -> None:
    code, out, _ = run("tcp", "--help")
    assert code == 0 and "Usage: tunneld-ngrok tcp" in out
    code, _, err = run("bogus")
    assert code == 2 and "No such command" in err
