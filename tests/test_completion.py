"""``tunneld completion``: click's scripts, run through their own protocol in real shells and
subprocesses, complete commands, flags and the config file's tunnel names."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tests.test_cli import TUNNELD, base_env

CONFIG = """\
version: "2"
authtoken: tkd_example
tunnels:
  web:
    proto: http
    addr: 8080
  webhooks:
    proto: http
    addr: 9000
  ssh:
    proto: tcp
    addr: 22
"""


def complete(tmp_path: Path, words: str, cword: int, env: dict[str, str] | None = None) -> list[str]:
    """What ``tunneld`` answers to bash's completion request (``type,value`` lines)."""
    res = subprocess.run(TUNNELD, capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL,
                         env={**base_env(tmp_path), **(env or {}), "_TUNNELD_COMPLETE": "bash_complete",
                              "COMP_WORDS": words, "COMP_CWORD": str(cword)})
    assert res.returncode == 0, res.stderr
    return [line for line in res.stdout.splitlines() if line]


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "tunnels.yml"
    path.write_text(CONFIG)
    return path


def test_tunnel_names_commands_and_flags(tmp_path: Path, config: Path) -> None:
    assert complete(tmp_path, f"tunneld start --config {config} we", 4) == ["plain,web", "plain,webhooks"]
    # Names already given are not offered again.
    assert complete(tmp_path, f"tunneld start --config {config} web ", 5) == ["plain,webhooks", "plain,ssh"]
    assert "plain,service" in complete(tmp_path, "tunneld se", 1)
    assert "plain,diagnose" in complete(tmp_path, "tunneld di", 1)
    assert {"plain,--config", "plain,--root", "plain,--force"} <= \
        set(complete(tmp_path, "tunneld service install --", 3))
    assert {"plain,bash", "plain,zsh", "plain,fish"} == set(complete(tmp_path, "tunneld completion ", 2))


def test_default_config_file_and_unreadable_files(tmp_path: Path) -> None:
    default = tmp_path / "config" / "tunneld" / "tunneld.yml"  # base_env's XDG_CONFIG_HOME
    default.parent.mkdir(parents=True)
    default.write_text(CONFIG)
    assert complete(tmp_path, "tunneld start s", 2) == ["plain,ssh"]
    default.write_text("tunnels: [not, a, map")
    assert complete(tmp_path, "tunneld start ", 2) == []  # a broken file completes nothing, quietly


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_bash_script_parses_and_completes_in_bash(tmp_path: Path, config: Path) -> None:
    res = subprocess.run([*TUNNELD, "completion", "bash"], capture_output=True, text=True, timeout=30,
                         env=base_env(tmp_path))
    assert res.returncode == 0, res.stderr
    script = tmp_path / "tunneld.bash"
    script.write_text(res.stdout)
    assert subprocess.run(["bash", "-n", str(script)], timeout=30).returncode == 0
    # The shell function itself, as bash calls it on TAB.
    probe = (f'source {script}; COMP_WORDS=(tunneld start --config {config} ""); COMP_CWORD=4; '
             '_tunneld_completion tunneld; printf "%s\\n" "${COMPREPLY[@]}"')
    env = {**base_env(tmp_path), "PATH": f"{Path(TUNNELD[0]).parent}:/usr/bin:/bin"}
    if len(TUNNELD) > 1:  # no console script: a shell function stands in for it
        probe = f'tunneld() {{ {" ".join(TUNNELD)} "$@"; }}; export -f tunneld; ' + probe
    res = subprocess.run(["bash", "-c", probe], capture_output=True, text=True, timeout=30, env=env)
    assert res.stdout.split() == ["web", "webhooks", "ssh"], res.stderr


@pytest.mark.parametrize("shell", ["zsh", "fish"])
def test_zsh_and_fish_scripts(tmp_path: Path, shell: str) -> None:
    res = subprocess.run([*TUNNELD, "completion", shell], capture_output=True, text=True, timeout=30,
                         env=base_env(tmp_path))
    assert res.returncode == 0 and "_TUNNELD_COMPLETE" in res.stdout and f"{shell}_complete" in res.stdout
    checker = shutil.which(shell)
    if checker:
        script = tmp_path / f"tunneld.{shell}"
        script.write_text(res.stdout)
        args = [checker, "-n", str(script)] if shell == "zsh" else [checker, "--no-execute", str(script)]
        assert subprocess.run(args, timeout=30).returncode == 0


def test_version_command(tmp_path: Path) -> None:
    from tunneld import __version__

    for args in (["version"], ["--version"]):
        res = subprocess.run([*TUNNELD, *args], capture_output=True, text=True, timeout=30,
                             env=base_env(tmp_path))
        assert res.returncode == 0 and res.stdout == f"tunneld version {__version__}\n"
