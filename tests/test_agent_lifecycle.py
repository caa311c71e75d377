"""The agent process's lifecycle: signals at any moment, what the console says, certificate
failures, and names released on a graceful stop (held after a crash).  Real processes."""

from __future__ import annotations

import signal
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import trustme

from .test_cli import (  # noqa: F401 - fixtures are used by name
    EdgeProc,
    Proc,
    base_env,
    edge,
    free_port,
    http_upstream,
    procs,
    run_cli,
    spawn,
    started_urls,
)


@pytest.fixture
def console_config(tmp_path: Path) -> Path:
    """A config file turning the console on (stdout is no terminal here) and the update check off."""
    path = tmp_path / "agent.yml"
    path.write_text('version: "2"\nconsole_ui: true\nupdate_check: false\n')
    return path


def timed_exit(proc: Proc, sig: int, timeout: float = 5.0) -> tuple[int, float]:
    start = time.monotonic()
    proc.popen.send_signal(sig)
    code = proc.wait_exit(timeout)
    return code, time.monotonic() - start


@pytest.fixture
def silent_listener() -> Iterator[int]:
    """A port that accepts TCP and then says nothing (a TLS handshake there never ends)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    try:
        yield sock.getsockname()[1]
    finally:
        sock.close()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_before_first_connection(spawn: Callable[..., Proc], sig: int, console_config: Path) -> None:
    # Nothing listens there: the agent keeps reconnecting, and says so on its console.
    agent = spawn("http", "8080", "--authtoken", "tkd_x", "--server-addr", f"127.0.0.1:{free_port()}",
                  "--web-addr", "false", "--config", str(console_config))
    agent.wait_line(lambda line: line.startswith("Session Status") and "reconnecting" in line, timeout=10)
    agent.wait_line(lambda line: line.startswith("Last Error") and "refused" in line.lower(), timeout=5)
    agent.wait_line(lambda line: line.startswith("Next Try") and "attempt" in line, timeout=5)
    code, took = timed_exit(agent, sig)
    assert code == 0 and took < 3, (code, took, agent.describe())


def test_signal_during_tls_handshake(spawn: Callable[..., Proc], silent_listener: int,
                                     console_config: Path) -> None:
    # The edge address accepts TCP but never answers the handshake: the first attempt hangs.
    agent = spawn("http", "8080", "--authtoken", "tkd_x", "--server-addr", f"127.0.0.1:{silent_listener}",
                  "--web-addr", "false", "--config", str(console_config))
    agent.wait_line(lambda line: line.startswith("Session Status") and "connecting" in line, timeout=10)
    time.sleep(0.5)
    code, took = timed_exit(agent, signal.SIGTERM)
    assert code == 0 and took < 3, (code, took, agent.describe())


@pytest.fixture(scope="module")
def other_ca(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("other-ca") / "ca.pem"
    trustme.CA().cert_pem.write_to_path(str(path))
    return path


def test_untrusted_certificate_fails_at_once(spawn: Callable[..., Proc], edge: EdgeProc,
                                             other_ca: Path, console_config: Path) -> None:
    flags = ["--authtoken", edge.token, "--server-addr", f"127.0.0.1:{edge.agent}", "--web-addr", "false",
             "--config", str(console_config)]
    agent = spawn("http", "8080", *flags, "--root-cas", str(other_ca))
    code = agent.wait_exit(10)
    assert code == 1, agent.describe()
    assert "certificate not trusted" in agent.err and "root_cas" in agent.err, agent.describe()
    assert str(other_ca) in agent.err


def test_untrusted_certificate_with_retry(spawn: Callable[..., Proc], edge: EdgeProc, other_ca: Path,
                                          console_config: Path) -> None:
    flags = ["--authtoken", edge.token, "--server-addr", f"127.0.0.1:{edge.agent}", "--web-addr", "false",
             "--config", str(console_config)]
    agent = spawn("http", "8080", *flags, "--root-cas", str(other_ca), env={"TUNNELD_RETRY": "1"})
    agent.wait_line(lambda line: line.startswith("Last Error") and "certificate not trusted" in line,
                    timeout=10)
    agent.wait_line(lambda line: line.startswith("Next Try"), timeout=5)
    assert agent.popen.poll() is None
    code, took = timed_exit(agent, signal.SIGINT)
    assert code == 0 and took < 3, (code, took)


def second_token(edge: EdgeProc) -> str:
    res = run_cli("edge", "token", "create", "--data-dir", str(edge.data_dir), env=edge.env)
    assert res.returncode == 0, res.stderr
    return res.stdout.strip()


def test_ctrl_c_releases_names_crash_keeps_them(spawn: Callable[..., Proc], edge: EdgeProc,
                                               http_upstream: int, console_config: Path) -> None:
    def flags(token: str) -> list[str]:
        return ["--authtoken", token, "--server-addr", f"127.0.0.1:{edge.agent}", "--root-cas", str(edge.ca),
                "--config", str(console_config), "--log", "stdout", "--log-format", "logfmt",
                "--web-addr", "false", "--scheme", "http"]

    other = second_token(edge)
    sub = f"life{int(time.time() * 1000) % 10**8}"
    first = spawn("http", str(http_upstream), "--subdomain", sub, *flags(edge.token))
    url = next(iter(started_urls(first, 1).values()))
    code, took = timed_exit(first, signal.SIGINT)
    assert code == 0 and took < 5, (code, took, first.describe())
    # Another authtoken's agent gets the name at once: it was released, not held.
    second = spawn("http", str(http_upstream), "--subdomain", sub, *flags(other))
    assert next(iter(started_urls(second, 1).values())) == url

    # A crash keeps the name held for its owner: the first token cannot have it back now.
    second.popen.send_signal(signal.SIGKILL)
    second.wait_exit(5)
    third = spawn("http", str(http_upstream), "--subdomain", sub, *flags(edge.token))
    assert third.wait_exit(15) == 1, third.describe()
    assert sub in third.err
