"""``tunneld update``, the agent's update check and remote update, against wheels built from this repo.

Wheels with bumped versions are built from a temporary copy of the source (``pip wheel
--no-deps --no-build-isolation``); installs go into a throwaway venv made with
``--system-site-packages`` (so the dependencies come from the real environment, and the real
install is never touched).  No network: pip runs with ``--no-index --find-links DIR``.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import trio
from packaging.version import Version

from tunneld import __version__
from tunneld._agent_main import _check_for_update
from tunneld._update import UpdateError, choose, in_channel
from tunneld.core import Agent, AgentConfig

from .test_cli import Proc, base_env, curl, http_upstream, logfmt, spawn, started_urls  # noqa: F401
from .test_remote_management import make_api_edge, wait_count

REPO = Path(__file__).resolve().parent.parent
CURRENT = Version(__version__)
STABLE = f"{CURRENT.major}.{CURRENT.minor}.{CURRENT.micro + 1}"
BETA = f"{CURRENT.major}.{CURRENT.minor + 1}.0b1"
DEV = f"{CURRENT.major}.{CURRENT.minor + 2}.0.dev1"
MAJOR = f"{CURRENT.major + 1}.0.0"


def build_wheel(src: Path, version: str, out: Path, *, summary: str | None = None) -> None:
    init = src / "tunneld" / "__init__.py"
    text = init.read_text()
    init.write_text(text.replace(f'__version__ = "{__version__}"', f'__version__ = "{version}"'))
    if summary is not None:
        cfg = src / "setup.cfg"
        cfg.write_text("\n".join(f"description = {summary}" if line.startswith("description =") else line
                                 for line in cfg.read_text().splitlines()) + "\n")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "--disable-pip-version-check", "-w", str(out), str(src)], check=True, timeout=120,
                   capture_output=True)
    init.write_text(text)


@pytest.fixture(scope="module")
def wheels(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Directories of wheels: ``channels`` (stable, beta and dev releases) and ``foreign`` (a
    "tunneld" of another project)."""
    root = tmp_path_factory.mktemp("wheels")
    src = root / "src"
    src.mkdir()
    for name in ("tunneld", "setup.cfg", "setup.py", "pyproject.toml", "README.md"):
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.so"))
        else:
            shutil.copy(REPO / name, src / name)
    dirs = {name: root / name for name in ("channels", "foreign")}
    for version in (STABLE, BETA, DEV):
        build_wheel(src, version, dirs["channels"])
    build_wheel(src, "9.9.9", dirs["foreign"], summary="An SSH tunnel manager")
    shutil.rmtree(src / "build", ignore_errors=True)
    return dirs


@pytest.fixture
def venv(tmp_path: Path) -> Path:
    """A throwaway venv seeing the real site-packages (pip included), where installs land."""
    path = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(path)],
                   check=True, timeout=60)
    return path


def venv_run(venv: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    # cwd outside the repo: ``-m tunneld`` must import the installed package, not the checkout.
    return subprocess.run([str(venv / "bin" / "python"), *args], capture_output=True, text=True, timeout=120,
                          cwd=cwd, env=base_env(cwd), stdin=subprocess.DEVNULL)


def venv_version(venv: Path, cwd: Path) -> str:
    res = venv_run(venv, "-c", "import tunneld; print(tunneld.__version__)", cwd=cwd)
    assert res.returncode == 0, res.stderr
    return res.stdout.strip()


def test_channels() -> None:
    v = Version
    assert [in_channel(v("1.2.0"), c) for c in ("stable", "beta", "unstable")] == [True, True, True]
    assert [in_channel(v("1.2.0rc1"), c) for c in ("stable", "beta", "unstable")] == [False, True, True]
    assert [in_channel(v("1.2.0b3"), c) for c in ("stable", "beta", "unstable")] == [False, True, True]
    assert [in_channel(v("1.2.0a1"), c) for c in ("stable", "beta", "unstable")] == [False, False, True]
    assert [in_channel(v("1.2.0.dev4"), c) for c in ("stable", "beta", "unstable")] == [False, False, True]
    assert [in_channel(v("1.2.0b1.dev1"), c) for c in ("stable", "beta", "unstable")] == [False, False, True]
    assert in_channel(v("1.2.0.post1"), "stable")
    with pytest.raises(ValueError, match="unknown update channel"):
        in_channel(v("1.0"), "nightly")
    offered = [Version(x) for x in (STABLE, BETA, DEV, MAJOR)]
    assert choose(offered[:3], "stable").target == Version(STABLE)
    assert choose(offered[:3], "beta").target == Version(BETA)
    assert choose(offered[:3], "unstable").target == Version(DEV)
    assert choose([CURRENT], "stable").target is None
    assert choose(offered, "stable").target == Version(MAJOR)
    with pytest.raises(UpdateError, match="new major version"):
        choose(offered, "stable", permit_major_version=False)
    assert choose(offered, "stable", version=BETA).target == Version(BETA)
    with pytest.raises(UpdateError, match="not available"):
        choose(offered, "stable", version="7.7.7")
    with pytest.raises(ValueError, match="not a version"):
        choose(offered, "stable", version="latest!")


def test_update_command(wheels: dict[str, Path], venv: Path, tmp_path: Path) -> None:
    links = str(wheels["channels"])
    # (Every channel's choice is in test_channels; the command's --check shows two.)
    for channel, expected in (("stable", STABLE), ("unstable", DEV)):
        res = venv_run(venv, "-m", "tunneld", "update", "--check", "--channel", channel,
                       "--find-links", links, cwd=tmp_path)
        assert res.returncode == 0 and f"tunneld {expected} is available" in res.stdout, res
    assert venv_version(venv, tmp_path) == __version__  # --check installs nothing
    res = venv_run(venv, "-m", "tunneld", "update", "--channel", "beta", "--find-links", links, cwd=tmp_path)
    assert res.returncode == 0 and f"Updated tunneld {__version__} -> {BETA}" in res.stdout, res
    assert venv_version(venv, tmp_path) == BETA
    # The real install is untouched.
    import tunneld

    assert tunneld.__version__ == __version__
    res = venv_run(venv, "-m", "tunneld", "update", "--channel", "beta", "--find-links", links, cwd=tmp_path)
    assert res.returncode == 0 and "up to date" in res.stdout, res
    # Refusals: another project's "tunneld", a missing directory.
    res = venv_run(venv, "-m", "tunneld", "update", "--find-links", str(wheels["foreign"]), cwd=tmp_path)
    assert res.returncode == 1 and "another project" in res.stderr, res
    assert venv_version(venv, tmp_path) == BETA
    res = venv_run(venv, "-m", "tunneld", "update", "--find-links", str(tmp_path / "nope"), cwd=tmp_path)
    assert res.returncode != 0


async def test_update_check_on_start(wheels: dict[str, Path], monkeypatch: pytest.MonkeyPatch,
                                     caplog: pytest.LogCaptureFixture,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("TUNNELD_UPDATE_FIND_LINKS", str(wheels["channels"]))
    agent = Agent(AgentConfig(), [])
    caplog.set_level(logging.INFO, "tunneld.agent")
    with trio.fail_after(60):
        await _check_for_update(agent)
    assert f"tunneld {STABLE} is available" in capsys.readouterr().err
    assert any("update available" in r.getMessage() or STABLE in r.getMessage() for r in caplog.records)
    # Another project's release is no news.
    monkeypatch.setenv("TUNNELD_UPDATE_FIND_LINKS", str(wheels["foreign"]))
    with trio.fail_after(60):
        await _check_for_update(agent)
    assert "available" not in capsys.readouterr().err


def test_remote_update(wheels: dict[str, Path], venv: Path, tmp_path: Path, spawn: Callable[..., Proc],
                       http_upstream: int) -> None:
    api = make_api_edge(lambda args: spawn(*args), tmp_path)
    config = tmp_path / "agent.yml"
    config.write_text('version: "2"\nupdate_check: false\n')
    env = {"TUNNELD_UPDATE_FIND_LINKS": str(wheels["channels"])}
    # -P: the checkout (the test's cwd) is not put first on sys.path, so the venv's tunneld is
    # the one imported once installed; the restart replays the flag.
    agent_cmd = [str(venv / "bin" / "python"), "-P", "-m", "tunneld", "http", str(http_upstream),
                 "--scheme", "http", *api.agent_flags(config)]
    agent = Proc(agent_cmd, {**base_env(tmp_path), **env})
    try:
        url = next(iter(started_urls(agent, 1).values()))
        line = agent.wait_line(lambda line: "client session established" in line, timeout=15)
        sid = logfmt(line)["id"]
        [session] = [s for s in api.sessions() if s["id"] == sid]
        assert session["agent_version"] == __version__
        status, body = api.call("POST", f"/tunnel_sessions/{sid}/update", {}, timeout=120)
        assert status == 204, body
        lines = wait_count(agent, lambda line: "started tunnel" in line and "url=" in line, 2, timeout=30)
        assert [logfmt(line)["url"] for line in lines] == [url, url], agent.describe()
        # The second "started tunnel" could also be the old process reconnecting (a link lost
        # under load; or, before a fix, the accepted update lost to the link's end): wait for
        # the session the updated process resumes, and every URL must be the same.
        deadline = time.monotonic() + 60
        while True:
            versions = [s["agent_version"] for s in api.sessions() if s["id"] == sid]
            if versions == [STABLE] or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert versions == [STABLE], agent.describe()
        assert all(logfmt(line)["url"] == url for line in list(agent.lines["out"]) if "started tunnel" in line
                   and "url=" in line), agent.describe()
        assert "hello from upstream /updated" in curl(url + "/updated")
        # Nothing newer now: the agent says so, and keeps running.
        status, body = api.call("POST", f"/tunnel_sessions/{sid}/update", {}, timeout=120)
        assert status == 409 and body["error_code"] == "ERR_TUNNELD_809", body
        assert "already the newest" in body["msg"]
        assert agent.popen.poll() is None
    finally:
        agent.stop()
