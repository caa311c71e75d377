"""``tunneld service``: definitions generated into a temporary root, checked by their own tools
(``systemd-analyze verify``, ``systemctl --root``, plistlib), and the unit's ExecStart line run
for real against a dev edge on loopback until its tunnel answers.
"""

from __future__ import annotations

import os
import plistlib
import re
import shlex
import shutil
import stat
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from tests.test_cli import (  # noqa: F401 - fixtures
    DOMAIN,
    EdgeProc,
    Proc,
    base_env,
    curl,
    edge,
    http_upstream,
    logfmt,
    procs,
    run_cli,
    spawn,
)
from tunneld import _service
from tunneld.cli import cli

CONTRIB = Path(__file__).resolve().parent.parent / "contrib"
#: The placeholder paths of the contrib copies.
CONTRIB_PROGRAM = "/usr/local/bin/tunneld"
CONTRIB_CONFIG = {"systemd": "/etc/tunneld/tunneld.yml", "upstart": "/etc/tunneld/tunneld.yml",
                  "launchd": "/usr/local/etc/tunneld/tunneld.yml"}


@pytest.fixture(autouse=True)
def _real_system_untouched() -> Iterator[None]:
    """Every test here writes under a temporary root: check that the real one stays clean."""
    real = [Path("/etc/systemd/system/tunneld.service"), Path("/etc/init/tunneld.conf"),
            Path("/Library/LaunchDaemons/com.tunneld.agent.plist")]
    before = [p.exists() for p in real]
    yield
    assert [p.exists() for p in real] == before


def write_config(path: Path, edge: EdgeProc | None = None, upstream: int = 8080) -> Path:
    data: dict[str, object] = {"version": "2", "authtoken": edge.token if edge else "tkd_example",
                               "server_addr": f"127.0.0.1:{edge.agent}" if edge else "127.0.0.1:4443",
                               "web_addr": False,
                               "tunnels": {"web": {"proto": "http", "addr": upstream, "subdomain": "svcweb"}}}
    if edge is not None:
        data["root_cas"] = str(edge.ca)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def exec_start(unit: str) -> list[str]:
    """The ExecStart line of a unit, split as systemd does (quotes; %% and $$ unescaped)."""
    line = next(x for x in unit.splitlines() if x.startswith("ExecStart="))
    return [w.replace("%%", "%").replace("$$", "$") for w in shlex.split(line.removeprefix("ExecStart="))]


def install(tmp_path: Path, config: Path, *extra: str) -> tuple[int, str, Path]:
    root = tmp_path / "root"
    res = run_cli("service", "install", "--config", str(config), "--root", str(root), *extra,
                  env=base_env(tmp_path))
    return res.returncode, res.stdout + res.stderr, root


# ---- systemd ------------------------------------------------------------------------------------


def test_systemd_unit_verifies_and_its_exec_start_runs_the_tunnels(
        edge: EdgeProc, http_upstream: int, tmp_path: Path, spawn: Callable[..., Proc]) -> None:
    config = write_config(tmp_path / "agent.yml", edge, http_upstream)
    code, out, root = install(tmp_path, config)
    assert code == 0, out
    unit_path = root / "etc/systemd/system/tunneld.service"
    unit = unit_path.read_text()
    assert stat.S_IMODE(unit_path.stat().st_mode) == 0o644
    # Enabled the way systemctl does it in a real system: the wants symlink.
    link = root / "etc/systemd/system/multi-user.target.wants/tunneld.service"
    assert link.is_symlink(), out

    # systemd's own checker (it also checks that the recorded program exists and is executable).
    if shutil.which("systemd-analyze"):
        res = __import__("subprocess").run(["systemd-analyze", "verify", str(unit_path)], capture_output=True,
                                           text=True, timeout=30)
        assert res.returncode == 0, res.stderr + res.stdout

    argv = exec_start(unit)
    assert os.path.isabs(argv[0]) and os.access(argv[0], os.X_OK)
    assert argv[-8:] == ["start", "--all", "--config", str(config),
                         "--log", "stderr", "--log-format", "logfmt"]
    assert "Restart=on-failure" in unit and "WantedBy=multi-user.target" in unit

    # Run the recorded command line as systemd would (no PATH lookups, absolute paths only),
    # from another directory, and use its tunnel.
    proc = Proc(argv, {**base_env(tmp_path), "PATH": "/usr/bin:/bin"})
    try:
        line = proc.wait_line(lambda x: 'msg="started tunnel"' in x and "url=" in x, timeout=20, stream="err")
        url = logfmt(line)["url"]
        assert f"svcweb.{DOMAIN}" in url
        body = curl(f"http://svcweb.{DOMAIN}:{edge.http}/svc")
        assert body == "hello from upstream /svc"
        # systemctl stop sends SIGTERM and waits TimeoutStopSec (15 s): the agent is out well before.
        start = time.monotonic()
        proc.popen.terminate()
        assert proc.wait_exit(10) == 0
        assert time.monotonic() - start < 10
    finally:
        proc.stop()

    res = run_cli("service", "uninstall", "--root", str(root), env=base_env(tmp_path))
    assert res.returncode == 0, res.stderr
    assert not unit_path.exists() and not link.exists()


def test_generated_systemd_unit_is_contrib_modulo_paths(tmp_path: Path) -> None:
    config = write_config(tmp_path / "agent.yml")
    code, out, root = install(tmp_path, config)
    assert code == 0, out
    unit = (root / "etc/systemd/system/tunneld.service").read_text()
    argv = exec_start(unit)
    program = " ".join(argv[:-8])
    unit = unit.replace(program, CONTRIB_PROGRAM).replace(str(config), CONTRIB_CONFIG["systemd"])
    assert unit == (CONTRIB / "systemd/tunneld.service").read_text()


def test_exec_start_quotes_awkward_paths(tmp_path: Path) -> None:
    odd = tmp_path / "my configs" / "100% $HOME's.yml"
    odd.parent.mkdir()
    write_config(odd)
    code, out, root = install(tmp_path, odd)
    assert code == 0, out
    unit_path = root / "etc/systemd/system/tunneld.service"
    assert exec_start(unit_path.read_text())[-5] == str(odd)
    if shutil.which("systemd-analyze"):
        res = __import__("subprocess").run(["systemd-analyze", "verify", str(unit_path)], capture_output=True,
                                           text=True, timeout=30)
        assert res.returncode == 0, res.stderr + res.stdout


# ---- launchd and upstart --------------------------------------------------------------------------


def test_launchd_plist(tmp_path: Path) -> None:
    config = write_config(tmp_path / "agent.yml")
    code, out, root = install(tmp_path, config, "--init", "launchd", "--user", "nobody")
    assert code == 0, out
    path = root / "Library/LaunchDaemons/com.tunneld.agent.plist"
    job = plistlib.loads(path.read_bytes())
    argv = job["ProgramArguments"]
    assert os.path.isabs(argv[0]) and argv[-8:-4] == ["start", "--all", "--config", str(config)]
    assert job["Label"] == "com.tunneld.agent" and job["RunAtLoad"] is True
    assert job["KeepAlive"] == {"SuccessfulExit": False} and job["UserName"] == "nobody"
    # contrib/launchd/com.tunneld.agent.plist is the same job with the placeholder paths.
    contrib = plistlib.loads((CONTRIB / "launchd/com.tunneld.agent.plist").read_bytes())
    job["ProgramArguments"] = [CONTRIB_PROGRAM, *argv[-8:-5], CONTRIB_CONFIG["launchd"], *argv[-4:]]
    assert job == contrib


def test_upstart_job(tmp_path: Path) -> None:
    config = write_config(tmp_path / "agent.yml")
    code, out, root = install(tmp_path, config, "--init", "upstart")
    assert code == 0, out
    job = (root / "etc/init/tunneld.conf").read_text()
    lines = job.splitlines()
    for stanza in ("respawn", "respawn limit 10 300", "normal exit 0", "console log",
                   "start on (local-filesystems and net-device-up IFACE!=lo)", "stop on runlevel [!2345]"):
        assert stanza in lines
    argv = shlex.split(next(x for x in lines if x.startswith("exec ")).removeprefix("exec "))
    assert os.path.isabs(argv[0]) and argv[-8:-4] == ["start", "--all", "--config", str(config)]
    program = shlex.join(argv[:-8])
    assert job.replace(program, CONTRIB_PROGRAM).replace(str(config), CONTRIB_CONFIG["upstart"]) == \
        (CONTRIB / "upstart/tunneld.conf").read_text()


# ---- refusals ------------------------------------------------------------------------------------


def test_invalid_config_installs_nothing(tmp_path: Path) -> None:
    config = tmp_path / "bad.yml"
    config.write_text("tunnels:\n  web:\n    proto: http\n")  # no addr
    code, out, root = install(tmp_path, config)
    assert code == 1
    assert "invalid config, nothing installed" in out and "bad.yml line" in out, out
    assert not root.exists()
    code, out, root = install(tmp_path, tmp_path / "missing.yml")
    assert code == 1 and "does not exist" in out and not root.exists()


def test_without_root_privileges_one_message_and_nothing_written(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    # The real system's directories, moved to a temporary root so that a bug cannot touch /etc.
    system = tmp_path / "system"
    system.mkdir()
    monkeypatch.setattr(_service, "SYSTEM_ROOT", system)
    monkeypatch.setattr(_service, "_systemd_running", lambda: True)
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    monkeypatch.delenv(_service.ENV_ROOT, raising=False)
    monkeypatch.chdir(system)
    config = write_config(tmp_path / "agent.yml")
    # Never "--root /" here: that is the real system, which this test must not touch.
    res = CliRunner().invoke(cli, ["service", "install", "--config", str(config)])
    assert res.exit_code == 1
    assert res.output.strip().splitlines()[-1] == \
        "tunneld: error: service install needs root privileges: run it with sudo (nothing was changed)"
    assert list(system.iterdir()) == []
    for action in ("start", "uninstall"):
        res = CliRunner().invoke(cli, ["service", action])
        assert res.exit_code == 1, res.output


def test_failed_enable_rolls_back(tmp_path: Path) -> None:
    config = write_config(tmp_path / "agent.yml")
    root = tmp_path / "root"
    # A plain file where systemctl must create the wants directory makes `enable` fail.
    units = root / "etc/systemd/system"
    units.mkdir(parents=True)
    (units / "multi-user.target.wants").write_text("in the way\n")
    code, out, _root = install(tmp_path, config)
    assert code == 1
    assert "systemctl --root=" in out and "removed again, nothing installed" in out, out
    assert sorted(p.name for p in units.iterdir()) == ["multi-user.target.wants"]


def test_reinstall_needs_force_and_status_under_root(tmp_path: Path) -> None:
    config = write_config(tmp_path / "agent.yml")
    code, out, root = install(tmp_path, config)
    assert code == 0, out
    unit_path = root / "etc/systemd/system/tunneld.service"
    before = unit_path.read_text()
    other = write_config(tmp_path / "other.yml")
    code, out, _ = install(tmp_path, other)
    assert code == 1 and "already installed" in out and "--force" in out
    assert unit_path.read_text() == before
    code, out, _ = install(tmp_path, other, "--force")
    assert code == 0, out
    assert str(other) in unit_path.read_text()

    env = base_env(tmp_path)
    res = run_cli("service", "status", "--root", str(root), env=env)
    assert res.returncode == 0 and "enabled: enabled" in res.stdout, res.stdout + res.stderr
    res = run_cli("service", "start", "--root", str(root), env=env)
    assert res.returncode == 1 and "only the running system's services can run" in res.stderr
    # The environment variable works as --root does.
    res = run_cli("service", "status", env={**env, _service.ENV_ROOT: str(root)})
    assert res.returncode == 0 and str(unit_path) in res.stdout


def test_control_commands_drive_systemctl(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """start/stop/restart/status/uninstall on a systemd system: the systemctl calls made."""
    system = tmp_path / "system"
    monkeypatch.setattr(_service, "SYSTEM_ROOT", system)
    monkeypatch.setattr(_service, "_systemd_running", lambda: True)
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.delenv(_service.ENV_ROOT, raising=False)
    # systemctl itself cannot act without a running systemd: record what is asked of it.
    bindir = tmp_path / "bin"
    bindir.mkdir()
    calls = tmp_path / "calls"
    (bindir / "systemctl").write_text(f'#!/bin/sh\necho "$*" >> {calls}\n'
                                      '[ "$1" = status ] && exit 3\nexit 0\n')
    (bindir / "systemctl").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")
    config = write_config(tmp_path / "agent.yml")
    runner = CliRunner()
    res = runner.invoke(cli, ["service", "start"])
    assert res.exit_code == 1 and "not installed" in res.output
    res = runner.invoke(cli, ["service", "install", "--config", str(config)])
    assert res.exit_code == 0, res.output
    assert (system / "etc/systemd/system/tunneld.service").is_file()
    for action in ("start", "stop", "restart"):
        assert runner.invoke(cli, ["service", action]).exit_code == 0
    assert runner.invoke(cli, ["service", "status"]).exit_code == 3  # systemctl's "inactive"
    res = runner.invoke(cli, ["service", "uninstall"])
    assert res.exit_code == 0, res.output
    assert not (system / "etc/systemd/system/tunneld.service").exists()
    assert calls.read_text().splitlines() == [
        "daemon-reload", "enable tunneld.service", "start tunneld.service", "stop tunneld.service",
        "restart tunneld.service", "status --no-pager tunneld.service", "stop tunneld.service",
        "disable tunneld.service", "daemon-reload", "reset-failed tunneld.service"]


def test_service_help_has_examples() -> None:
    res = CliRunner().invoke(cli, ["service", "install", "--help"])
    assert res.exit_code == 0 and re.search(r"Examples?:", res.output)


def test_several_config_files_are_recorded_in_order(tmp_path: Path) -> None:
    base = tmp_path / "base.yml"
    base.write_text("authtoken: tkd_example\nserver_addr: 127.0.0.1:4443\n")
    tunnels = write_config(tmp_path / "tunnels.yml")
    code, out, root = install(tmp_path, base, "--config", str(tunnels))
    assert code == 0, out
    argv = exec_start((root / "etc/systemd/system/tunneld.service").read_text())
    assert argv[-10:-4] == ["start", "--all", "--config", str(base), "--config", str(tunnels)]


def test_program_without_console_script_is_python_dash_m(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setattr(sys, "executable", str(tmp_path / "venv/bin/python3"))
    assert _service.program_argv() == [str(tmp_path / "venv/bin/python3"), "-m", "tunneld"]
