"""The ``tunneld`` command line, run as real processes on loopback.

One dev-mode edge serves the whole module; tests that must own an edge (SIGTERM, bad flags)
start their own.  Every process is killed in a ``finally``.
"""

from __future__ import annotations

import http.server
import ipaddress
import json
import os
import random
import re
import shlex
import shutil
import signal
import socket
import socketserver
import stat
import struct
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml
from cryptography import x509

from tunneld.core._store import DEFAULT_ACCOUNT, Store

DOMAIN = "tunneld.test"
#: The console script when installed (what users run), else the module.
TUNNELD = [shutil.which("tunneld") or ""] if shutil.which("tunneld") else [sys.executable, "-m", "tunneld"]
STARTED_TUNNEL = 'msg="started tunnel"'


# ---- ports -----------------------------------------------------------------------------------


def _ephemeral_ports() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def free_range(n: int) -> tuple[int, int]:
    """``n`` consecutive loopback ports that are free right now, outside the ephemeral range
    (where any outgoing connection could take one of them at any moment)."""
    eph_low, eph_high = _ephemeral_ports()
    span = (10000, eph_low - n) if eph_low - n > 12000 else (eph_high + 1, 65535 - n)
    for _ in range(200):
        low = random.randrange(*span)
        socks = []
        try:
            for port in range(low, low + n):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", port))
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
        return low, low + n - 1
    raise RuntimeError("no free port range")


def free_port() -> int:
    """A free loopback port (checked by binding it), outside the ephemeral range."""
    return free_range(1)[0]


# ---- processes -------------------------------------------------------------------------------


def base_env(home: Path) -> dict[str, str]:
    """The test's environment without any TUNNELD_* setting, and private config/data dirs."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TUNNELD_")}
    env.update(XDG_CONFIG_HOME=str(home / "config"), XDG_DATA_HOME=str(home / "data"), PYTHONUNBUFFERED="1")
    return env


class Proc:
    """A child process whose stdout and stderr lines are collected as they arrive."""

    def __init__(self, args: list[str], env: dict[str, str]) -> None:
        self.args = args
        self.popen = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                      env=env, stdin=subprocess.DEVNULL)
        self.lines: dict[str, list[str]] = {"out": [], "err": []}
        self._cond = threading.Condition()
        self._threads = [threading.Thread(target=self._pump, args=(name, stream), daemon=True)
                         for name, stream in (("out", self.popen.stdout), ("err", self.popen.stderr))]
        for t in self._threads:
            t.start()

    def _pump(self, name: str, stream: object) -> None:
        for line in stream:  # type: ignore[attr-defined]
            with self._cond:
                self.lines[name].append(line.rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    @property
    def out(self) -> str:
        return "\n".join(self.lines["out"])

    @property
    def err(self) -> str:
        return "\n".join(self.lines["err"])

    def describe(self) -> str:
        return (f"command: {shlex.join(self.args)}\nexit code: {self.popen.poll()}\n"
                f"--- stdout\n{self.out}\n--- stderr\n{self.err}")

    def wait_line(self, pred: Callable[[str], bool], timeout: float = 10.0, stream: str = "out") -> str:
        """The first line of ``stream`` satisfying ``pred``; fails on timeout or early exit."""
        deadline = time.monotonic() + timeout
        seen = 0
        with self._cond:
            while True:
                lines = self.lines[stream]
                for line in lines[seen:]:
                    if pred(line):
                        return line
                seen = len(lines)
                if self.popen.poll() is not None and not any(t.is_alive() for t in self._threads):
                    raise AssertionError(f"process exited before the expected line\n{self.describe()}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"expected line not seen within {timeout}s\n{self.describe()}")
                self._cond.wait(min(left, 0.1))

    def wait_lines(self, pred: Callable[[str], bool], count: int, timeout: float = 10.0,
                   stream: str = "out") -> list[str]:
        deadline = time.monotonic() + timeout
        while True:
            found = [line for line in self.lines[stream] if pred(line)]
            if len(found) >= count:
                return found[:count]
            self.wait_line(lambda line, found=found: pred(line) and line not in found,
                           max(0.01, deadline - time.monotonic()), stream)

    def wait_exit(self, timeout: float) -> int:
        try:
            code = self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"process still running after {timeout}s\n{self.describe()}") from None
        for t in self._threads:
            t.join(2)
        return code

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(5)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)
        for t in self._threads:
            t.join(2)


@pytest.fixture(scope="module")
def procs() -> Iterator[list[Proc]]:
    """Every process a module-scoped fixture starts; killed at the end whatever happens."""
    started: list[Proc] = []
    try:
        yield started
    finally:
        for p in reversed(started):
            p.stop()


@pytest.fixture
def spawn(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[..., Proc]]:
    """Start processes for one test; all are killed when the test ends."""
    started: list[Proc] = []
    env0 = base_env(tmp_path)

    def start(*args: str, env: dict[str, str] | None = None) -> Proc:
        p = Proc([*TUNNELD, *args], {**env0, **(env or {})})
        started.append(p)
        return p

    try:
        yield start
    finally:
        for p in reversed(started):
            p.stop()


def run_cli(*args: str, env: dict[str, str], timeout: float = 15) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*TUNNELD, *args], capture_output=True, text=True, env=env, timeout=timeout,
                          stdin=subprocess.DEVNULL)


# ---- upstreams (threads in the test process) -------------------------------------------------


class _Hello(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        body = f"hello from upstream {self.path}".encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass


class _Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        while data := self.request.recv(65536):
            self.request.sendall(data)
        self.request.shutdown(socket.SHUT_WR)


class _ThreadingTCP(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


def _serve_in_thread(server: socketserver.BaseServer) -> Iterator[int]:
    """Run a socketserver in a thread for the module; yields its port."""
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield int(server.server_address[1])  # type: ignore[attr-defined]
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def http_upstream() -> Iterator[int]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Hello)
    server.daemon_threads = True
    yield from _serve_in_thread(server)


@pytest.fixture(scope="module")
def echo_upstream() -> Iterator[int]:
    yield from _serve_in_thread(_ThreadingTCP(("127.0.0.1", 0), _Echo))


# ---- the module's edge -----------------------------------------------------------------------


class EdgeProc:
    def __init__(self, proc: Proc, data_dir: Path, http: int, https: int, agent: int,
                 tcp: tuple[int, int], env: dict[str, str]) -> None:
        self.proc = proc
        self.data_dir = data_dir
        self.http = http
        self.https = https
        self.agent = agent
        self.tcp = tcp
        self.env = env

    @property
    def ca(self) -> Path:
        return self.data_dir / "ca.pem"

    @property
    def token(self) -> str:
        return (self.data_dir / "dev-authtoken").read_text().strip()

    def agent_flags(self) -> list[str]:
        return ["--authtoken", self.token, "--server-addr", f"127.0.0.1:{self.agent}",
                "--root-cas", str(self.ca)]


def start_edge(start: Callable[[list[str]], Proc], data_dir: Path, *extra: str,
               tcp_host: str = "127.0.0.1:") -> EdgeProc:
    for attempt in range(3):
        # A port checked free may be taken by someone else before the edge binds it: retry.
        listen = [f"127.0.0.1:{free_port()}" for _ in range(3)]
        low, high = free_range(20)
        proc = start(["edge", "--dev", "--data-dir", str(data_dir), "--domain", DOMAIN,
                      "--http-addr", listen[0], "--https-addr", listen[1], "--agent-addr", listen[2],
                      "--tcp-ports", f"{tcp_host}{low}-{high}", *extra])
        try:
            proc.wait_line(lambda line: "tunneld http" in line and "--server-addr" in line, timeout=15)
        except AssertionError:
            if attempt < 2 and proc.popen.poll() is not None and "cannot listen" in proc.err:
                continue
            raise
        http, https, agent = (int(a.rsplit(":", 1)[1]) for a in listen)
        return EdgeProc(proc, data_dir, http, https, agent, (low, high), {})
    raise AssertionError("unreachable")


@pytest.fixture(scope="module")
def edge(procs: list[Proc], tmp_path_factory: pytest.TempPathFactory) -> EdgeProc:
    home = tmp_path_factory.mktemp("edge-home")
    env = base_env(home)

    def start(args: list[str]) -> Proc:
        p = Proc([*TUNNELD, *args], env)
        procs.append(p)
        return p

    e = start_edge(start, home / "edge-data", "--grace-period", "1")
    e.env = env
    return e


def agent_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    return {**base_env(tmp_path), **extra}


def logfmt(line: str) -> dict[str, str]:
    """Parse one logfmt line (values may be JSON-quoted)."""
    out = {}
    for m in re.finditer(r'(\w+)=("(?:[^"\\]|\\.)*"|\S*)', line):
        value = m.group(2)
        out[m.group(1)] = json.loads(value) if value.startswith('"') else value
    return out


def started_urls(agent: Proc, count: int, timeout: float = 15.0) -> dict[str, str]:
    """name -> url of the first ``count`` 'started tunnel' log lines."""
    lines = agent.wait_lines(lambda line: STARTED_TUNNEL in line and "url=" in line, count, timeout)
    return {logfmt(line)["name"]: logfmt(line)["url"] for line in lines}


def curl(url: str, *extra: str) -> str:
    host, port = re.match(r"https?://([^/:]+):(\d+)", url).groups()  # type: ignore[union-attr]
    res = subprocess.run(["curl", "-sS", "--max-time", "10", "--resolve", f"{host}:{port}:127.0.0.1", *extra,
                          url], capture_output=True, text=True, timeout=15)
    assert res.returncode == 0, f"curl {url}: {res.returncode} {res.stderr}"
    return res.stdout


def get_json(url: str) -> object:
    with urllib.request.urlopen(url, timeout=5) as resp:  # noqa: S310 - loopback only
        assert resp.status == 200
        return json.loads(resp.read())


def tcp_roundtrip(port: int, payload: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        got = b""
        while data := s.recv(65536):
            got += data
    return got


# ---- the edge's contract -----------------------------------------------------------------------


def test_edge_dev_contract(edge: EdgeProc, http_upstream: int) -> None:
    out = edge.proc.lines["out"]
    d = edge.data_dir
    for line in (f"tunneld edge: agent listener on 127.0.0.1:{edge.agent}",
                 f"tunneld edge: http listener on 127.0.0.1:{edge.http}",
                 f"tunneld edge: https listener on 127.0.0.1:{edge.https}",
                 f"tunneld edge: tcp tunnels on 127.0.0.1:{edge.tcp[0]}-{edge.tcp[1]}"):
        assert line in out, edge.proc.describe()
    # Once the lines are out, the listeners accept.
    for port in (edge.agent, edge.http, edge.https):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()

    ca, token_file = d / "ca.pem", d / "dev-authtoken"
    assert ca.is_file() and token_file.is_file()
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    assert any(str(ca) in line for line in out) and any(str(token_file) in line for line in out)
    assert re.fullmatch(r"tkd_[0-9a-f]{12}_[A-Za-z0-9_-]{40}", edge.token)

    leaf = x509.load_pem_x509_certificates((d / "edge-cert.pem").read_bytes())[0]
    assert leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert ipaddress.ip_address("127.0.0.1") in san.get_values_for_type(x509.IPAddress)
    assert f"*.{DOMAIN}" in san.get_values_for_type(x509.DNSName)

    # The printed agent command line works as printed (pointed at our upstream).
    command = next(line for line in out if "tunneld http" in line).strip()
    assert command.startswith("tunneld http 8080 ")
    assert f"--server-addr 127.0.0.1:{edge.agent}" in command and f"--root-cas {ca}" in command
    command = command.replace("tunneld http 8080", f"{shlex.join(TUNNELD)} http {http_upstream}", 1)
    p = Proc(["bash", "-c", f"exec {command} --web-addr false --log stdout --log-format logfmt"],
             base_env(d.parent / "printed"))
    try:
        urls = started_urls(p, 2)
        assert curl(urls["command_line (http)"] + "/printed") == "hello from upstream /printed"
    finally:
        p.stop()


# ---- agents ------------------------------------------------------------------------------------


def test_http_agent_logs_api_and_traffic(edge: EdgeProc, http_upstream: int,
                                         spawn: Callable[..., Proc]) -> None:
    web = free_port()
    agent = spawn("http", str(http_upstream), *edge.agent_flags(), "--web-addr", f"127.0.0.1:{web}",
                  "--log", "stdout", "--log-format", "logfmt")
    urls = started_urls(agent, 2)
    line = agent.wait_line(lambda line: STARTED_TUNNEL in line)
    assert line.startswith("t=") and " lvl=info " in line and "url=" in line
    http_url, https_url = urls["command_line (http)"], urls["command_line"]
    assert re.fullmatch(rf"http://[a-z0-9-]+\.{re.escape(DOMAIN)}:{edge.http}", http_url)
    assert https_url == http_url.replace("http://", "https://").replace(f":{edge.http}", f":{edge.https}")

    assert curl(http_url + "/a") == "hello from upstream /a"
    assert curl(https_url + "/b", "--cacert", str(edge.ca)) == "hello from upstream /b"

    api = get_json(f"http://127.0.0.1:{web}/api/tunnels")
    assert isinstance(api, dict) and api["uri"] == "/api/tunnels"
    tunnels = {t["name"]: t for t in api["tunnels"]}
    assert set(tunnels) == {"command_line", "command_line (http)"}
    for name, t in tunnels.items():
        assert {"name", "uri", "public_url", "proto", "config", "metrics"} <= set(t)
        assert t["uri"] == "/api/tunnels/" + urllib.request.quote(name)
        assert t["public_url"] == urls[name]
        assert t["config"] == {"addr": f"http://localhost:{http_upstream}", "inspect": True}
        assert {"conns", "http"} <= set(t["metrics"])
        stats = {"count", "rate1", "rate5", "rate15", "p50", "p90", "p95", "p99"}
        assert stats | {"gauge"} <= set(t["metrics"]["conns"])
        assert stats <= set(t["metrics"]["http"])
    assert tunnels["command_line"]["proto"] == "https"
    assert tunnels["command_line (http)"]["proto"] == "http"
    assert tunnels["command_line (http)"]["metrics"]["conns"]["count"] >= 1

    one = get_json(f"http://127.0.0.1:{web}/api/tunnels/command_line")
    assert isinstance(one, dict) and one["name"] == "command_line" and one["public_url"] == https_url


def test_agent_env_vars(edge: EdgeProc, http_upstream: int, spawn: Callable[..., Proc],
                        tmp_path: Path) -> None:
    # The environment wins over the config file.
    cfg = tmp_path / "agent.yml"
    cfg.write_text("authtoken: tkd_000000000000_" + "A" * 40 + "\nserver_addr: 127.0.0.1:1\n"
                   f"root_cas: {tmp_path / 'missing.pem'}\n")
    agent = spawn("http", str(http_upstream), "--config", str(cfg), "--web-addr", "false",
                  "--log", "stdout", "--log-format", "logfmt",
                  env={"TUNNELD_AUTHTOKEN": edge.token, "TUNNELD_SERVER_ADDR": f"127.0.0.1:{edge.agent}",
                       "TUNNELD_ROOT_CAS": str(edge.ca)})
    urls = started_urls(agent, 2)
    assert curl(urls["command_line (http)"] + "/env") == "hello from upstream /env"


def test_config_file(edge: EdgeProc, echo_upstream: int, spawn: Callable[..., Proc], tmp_path: Path) -> None:
    cfg = tmp_path / "agent.yml"
    env = base_env(tmp_path)
    first = "tkd_0123456789ab_" + "T" * 40
    res = run_cli("config", "add-authtoken", first, "--config", str(cfg), env=env)
    assert res.returncode == 0, res.stderr
    assert str(cfg) in res.stdout
    assert re.search(rf"^authtoken: {first}$", cfg.read_text(), re.M)

    # Overwrite the token, keep the file's other keys, and run an agent from the file alone.
    cfg.write_text(cfg.read_text() + f"server_addr: 127.0.0.1:{edge.agent}\nroot_cas: {edge.ca}\n")
    res = run_cli("config", "add-authtoken", edge.token, "--config", str(cfg), env=env)
    assert res.returncode == 0, res.stderr
    data = yaml.safe_load(cfg.read_text())
    assert data["authtoken"] == edge.token and data["server_addr"] == f"127.0.0.1:{edge.agent}"
    res = run_cli("config", "check", "--config", str(cfg), env=env)
    assert res.returncode == 0 and "Valid" in res.stdout, res.stderr

    # Logging settings come from the file too (log, log_format, log_level) ...
    cfg.write_text(cfg.read_text() + "log: stdout\nlog_format: json\nlog_level: debug\n")
    agent = spawn("tcp", str(echo_upstream), "--config", str(cfg), "--web-addr", "false")
    line = agent.wait_line(lambda line: '"started tunnel"' in line)
    record = json.loads(line)
    assert record["msg"] == "started tunnel" and record["lvl"] == "info"
    assert tcp_roundtrip(int(record["url"].rsplit(":", 1)[1]), b"from config") == b"from config"
    agent.wait_line(lambda line: line.startswith("{") and json.loads(line)["lvl"] == "dbug")
    agent.stop()

    # ... and flags win over the file.
    agent = spawn("tcp", str(echo_upstream), "--config", str(cfg), "--web-addr", "false",
                  "--log-format", "logfmt", "--log-level", "info")
    url = started_urls(agent, 1)["command_line"]
    assert tcp_roundtrip(int(url.rsplit(":", 1)[1]), b"flags") == b"flags"
    agent.stop()
    assert agent.lines["out"]
    assert all(line.startswith("t=") and "lvl=dbug" not in line for line in agent.lines["out"])


def test_tcp_agent(edge: EdgeProc, echo_upstream: int, spawn: Callable[..., Proc]) -> None:
    web = free_port()
    agent = spawn("tcp", str(echo_upstream), *edge.agent_flags(), "--web-addr", f"127.0.0.1:{web}",
                  "--log", "stdout", "--log-format", "logfmt")
    url = started_urls(agent, 1)["command_line"]
    m = re.fullmatch(rf"tcp://{re.escape(DOMAIN)}:(\d+)", url)
    assert m, url
    port = int(m.group(1))
    assert edge.tcp[0] <= port <= edge.tcp[1]
    payload = os.urandom(300_000)
    assert tcp_roundtrip(port, payload) == payload
    api = get_json(f"http://127.0.0.1:{web}/api/tunnels")
    assert isinstance(api, dict)
    [t] = api["tunnels"]
    assert t["proto"] == "tcp" and t["public_url"] == url
    assert t["config"] == {"addr": f"localhost:{echo_upstream}", "inspect": False}


class _Firehose(socketserver.BaseRequestHandler):
    """Sends 64 MiB as fast as the client takes it."""

    def handle(self) -> None:
        chunk = b"x" * 65536
        try:
            for _ in range(1024):
                self.request.sendall(chunk)
        except OSError:
            pass


def test_clients_resetting_mid_response_do_not_kill_the_edge(edge: EdgeProc, spawn: Callable[..., Proc],
                                                              http_upstream: int) -> None:
    """Public clients that reset while the edge writes to them (EPIPE): the edge carries on.

    The CLI once restored SIGPIPE's default action, and the first such client killed the edge.
    """
    server = _ThreadingTCP(("127.0.0.1", 0), _Firehose)
    for port in _serve_in_thread(server):
        tcp = spawn("tcp", str(port), *edge.agent_flags(), "--log", "stdout", "--log-format", "logfmt")
        web = spawn("http", str(http_upstream), "--scheme", "http", *edge.agent_flags(), "--log", "stdout",
                    "--log-format", "logfmt", "--web-addr", "false")
        public = int(started_urls(tcp, 1)["command_line"].rsplit(":", 1)[1])
        web_url = started_urls(web, 1)["command_line"]
        for _ in range(20):
            with socket.create_connection(("127.0.0.1", public), timeout=5) as s:
                assert s.recv(65536)
                # RST instead of FIN, with the edge mid-write.
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        time.sleep(0.5)
        assert edge.proc.popen.poll() is None, edge.proc.describe()
        assert "hello from upstream" in curl(web_url + "/still-here")
        # Whether a reset client makes a write fail with EPIPE is a race; that the signal is
        # ignored in every long-running process is not.
        for proc in (edge.proc, tcp, web):
            status = Path(f"/proc/{proc.popen.pid}/status").read_text()
            ignored = int(re.search(r"^SigIgn:\s*([0-9a-f]+)$", status, re.M).group(1), 16)  # type: ignore[union-attr]
            assert ignored & (1 << (signal.SIGPIPE - 1)), f"SIGPIPE not ignored by {proc.args}"


def test_tcp_agent_remote_addr(edge: EdgeProc, echo_upstream: int, spawn: Callable[..., Proc]) -> None:
    wanted = edge.tcp[1]
    with Store.open(edge.data_dir) as store:
        store.create_reserved_addr(DEFAULT_ACCOUNT, f"{DOMAIN}:{wanted}")
    agent = spawn("tcp", str(echo_upstream), *edge.agent_flags(), "--remote-addr", f"{DOMAIN}:{wanted}",
                  "--web-addr", "false", "--log", "stdout", "--log-format", "logfmt")
    assert started_urls(agent, 1)["command_line"] == f"tcp://{DOMAIN}:{wanted}"
    outside = spawn("tcp", str(echo_upstream), *edge.agent_flags(),
                    "--remote-addr", f"{DOMAIN}:{edge.tcp[1] + 1}", "--web-addr", "false")
    assert outside.wait_exit(10) != 0
    assert "ERR_TUNNELD_338" in outside.err


def test_tls_agent_crt_key_and_proxy_proto(edge: EdgeProc, echo_upstream: int, spawn: Callable[..., Proc],
                                           tmp_path: Path) -> None:
    """``tunneld tls --crt --key --proxy-proto 1``: the agent terminates TLS, and the echo upstream
    sends back the PROXY line it got ahead of the plaintext."""
    import ssl

    import trustme

    ca = trustme.CA()
    leaf = ca.issue_cert(f"*.{DOMAIN}")
    crt, key = tmp_path / "site.crt", tmp_path / "site.key"
    leaf.cert_chain_pems[0].write_to_path(str(crt))
    leaf.private_key_pem.write_to_path(str(key))
    web = free_port()
    agent = spawn("tls", str(echo_upstream), "--subdomain", "clitls", "--crt", str(crt), "--key", str(key),
                  "--proxy-proto", "1", *edge.agent_flags(), "--web-addr", f"127.0.0.1:{web}",
                  "--log", "stdout", "--log-format", "logfmt")
    url = started_urls(agent, 1)["command_line"]
    assert url == f"tls://clitls.{DOMAIN}:{edge.https}"
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    with socket.create_connection(("127.0.0.1", edge.https), timeout=10) as raw, \
            ctx.wrap_socket(raw, server_hostname=f"clitls.{DOMAIN}") as tls:
        me = tls.getsockname()  # wrap_socket detaches raw
        tls.sendall(b"over tls\n")
        want = f"PROXY TCP4 127.0.0.1 127.0.0.1 {me[1]} {edge.https}\r\nover tls\n".encode()
        got = b""
        while len(got) < len(want):
            chunk = tls.recv(4096)
            assert chunk, got
            got += chunk
    assert got == want
    api = get_json(f"http://127.0.0.1:{web}/api/tunnels")
    assert isinstance(api, dict)
    [t] = api["tunnels"]
    assert t["proto"] == "tls" and t["public_url"] == url
    assert [c["client_addr"] for c in t["connections"]] == [f"127.0.0.1:{me[1]}"]
    # ngrok's log line for it: msg="join connections" ... l=UPSTREAM r=CLIENT
    line = agent.wait_line(lambda line: "join connections" in line, timeout=5)
    assert logfmt(line)["r"] == f"127.0.0.1:{me[1]}" and logfmt(line)["l"] == f"localhost:{echo_upstream}"


# ---- authtokens --------------------------------------------------------------------------------


def test_token_create_list_revoke_and_bad_tokens(edge: EdgeProc, echo_upstream: int,
                                                spawn: Callable[..., Proc]) -> None:
    env, data = edge.env, str(edge.data_dir)
    res = run_cli("edge", "token", "create", "--data-dir", data, "--description", "x", env=env)
    assert res.returncode == 0, res.stderr
    secret = res.stdout.strip()
    assert re.fullmatch(r"tkd_[0-9a-f]{12}_[A-Za-z0-9_-]{40}", secret), res.stdout
    token_id = secret.split("_")[1]
    assert token_id in res.stderr

    listing = run_cli("edge", "token", "list", "--data-dir", data, env=env)
    assert listing.returncode == 0, listing.stderr
    row = next(line for line in listing.stdout.splitlines() if line.startswith(token_id))
    assert row.split()[-1] == "x" and "active" in row
    assert secret not in listing.stdout and secret.split("_", 2)[2] not in listing.stdout
    assert edge.token not in listing.stdout

    # The new token works while the edge runs ...
    agent = spawn("tcp", str(echo_upstream), "--authtoken", secret, "--server-addr",
                  f"127.0.0.1:{edge.agent}", "--root-cas", str(edge.ca), "--web-addr", "false",
                  "--log", "stdout", "--log-format", "logfmt")
    started_urls(agent, 1)
    agent.stop()

    # ... and not once revoked.
    res = run_cli("edge", "token", "revoke", token_id, "--data-dir", data, env=env)
    assert res.returncode == 0 and token_id in res.stdout, res.stderr
    listing = run_cli("edge", "token", "list", "--data-dir", data, env=env)
    assert "revoked" in next(line for line in listing.stdout.splitlines() if line.startswith(token_id))
    again = run_cli("edge", "token", "revoke", token_id, "--data-dir", data, env=env)
    assert again.returncode != 0 and token_id in again.stderr

    for token, code in ((secret, "ERR_TUNNELD_107"), ("not-a-token", "ERR_TUNNELD_105")):
        began = time.monotonic()
        res = run_cli("tcp", str(echo_upstream), "--authtoken", token, "--server-addr",
                      f"127.0.0.1:{edge.agent}", "--root-cas", str(edge.ca), "--web-addr", "false",
                      env=env, timeout=15)
        assert res.returncode != 0
        assert time.monotonic() - began < 8
        assert code in res.stderr, res.stderr
        assert token not in res.stderr + res.stdout

    # The edge keeps serving.
    assert edge.proc.popen.poll() is None
    agent = spawn("tcp", str(echo_upstream), *edge.agent_flags(), "--web-addr", "false",
                  "--log", "stdout", "--log-format", "logfmt")
    url = started_urls(agent, 1)["command_line"]
    assert tcp_roundtrip(int(url.rsplit(":", 1)[1]), b"still here") == b"still here"


# ---- bad input ---------------------------------------------------------------------------------


def test_http_addr_in_use(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        low, high = free_range(5)
        res = run_cli("edge", "--dev", "--data-dir", str(tmp_path / "d"), "--domain", DOMAIN,
                      "--http-addr", f"127.0.0.1:{port}", "--https-addr", f"127.0.0.1:{free_port()}",
                      "--agent-addr", f"127.0.0.1:{free_port()}", "--tcp-ports", f"127.0.0.1:{low}-{high}",
                      env=base_env(tmp_path))
    assert res.returncode != 0
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, res.stderr
    assert "--http-addr" in lines[0] and str(port) in lines[0]


def test_bad_tcp_ports(tmp_path: Path) -> None:
    res = run_cli("edge", "--dev", "--data-dir", str(tmp_path / "d"), "--tcp-ports", "5-2",
                  env=base_env(tmp_path))
    assert res.returncode != 0
    assert "--tcp-ports" in res.stderr and "5-2" in res.stderr
    assert not (tmp_path / "d").exists()


def test_tls_cert_required_without_dev(tmp_path: Path) -> None:
    res = run_cli("edge", "--domain", DOMAIN, "--data-dir", str(tmp_path / "d"), env=base_env(tmp_path))
    assert res.returncode != 0
    assert "--tls-cert" in res.stderr


@pytest.mark.parametrize(("text", "where"), [
    ("authtoken: x\ntunnels:\n  web:\n    proto: http\n    adr: 80\n", ("line 5", "tunnels.web.adr")),
    # (v2 files only warn about unknown top-level keys, as ngrok did; version 3 refuses them)
    ("version: 3\nagent:\n  authtoken: x\n  server_adr: 127.0.0.1:1\n", ("line 4", "agent.server_adr")),
    ("authtoken: x\nserver_addr: a: b\n", ("line 2", "not valid YAML")),
    ("tunnels:\n  web:\n    proto: http\n    addr: 80\n    inspect: maybe\n",
     ("line 5", "tunnels.web.inspect")),
])
def test_malformed_config(tmp_path: Path, text: str, where: tuple[str, str]) -> None:
    cfg = tmp_path / "bad.yml"
    cfg.write_text(text)
    res = run_cli("config", "check", "--config", str(cfg), env=base_env(tmp_path))
    assert res.returncode != 0
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, res.stderr
    assert "bad.yml" in lines[0] and where[0] in lines[0] and where[1] in lines[0]
    # The agent commands report the same error before connecting anywhere.
    res = run_cli("tcp", "22", "--config", str(cfg), env=base_env(tmp_path))
    assert res.returncode != 0 and where[0] in res.stderr


# ---- shutdown ----------------------------------------------------------------------------------


def test_sigterm_exits_cleanly(tmp_path: Path, echo_upstream: int, spawn: Callable[..., Proc]) -> None:
    # --tcp-ports without a host: --dev keeps the TCP tunnels on loopback too.
    e = start_edge(lambda args: spawn(*args), tmp_path / "d", "--grace-period", "2", tcp_host="")
    assert f"tunneld edge: tcp tunnels on 127.0.0.1:{e.tcp[0]}-{e.tcp[1]}" in e.proc.lines["out"]
    agent = spawn("tcp", str(echo_upstream), *e.agent_flags(), "--web-addr", "false",
                  "--log", "stdout", "--log-format", "logfmt")
    url = started_urls(agent, 1)["command_line"]
    port = int(url.rsplit(":", 1)[1])
    # An idle in-flight connection: the edge must not wait for it past the grace period.
    conn = socket.create_connection(("127.0.0.1", port), timeout=5)
    try:
        began = time.monotonic()
        e.proc.popen.send_signal(signal.SIGTERM)
        assert e.proc.wait_exit(6) == 0
        assert time.monotonic() - began < 2 + 2
        assert "SIGTERM" in e.proc.out
    finally:
        conn.close()
