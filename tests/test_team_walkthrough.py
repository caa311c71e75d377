"""README "Running an edge for a team", command by command, with real processes.

From ``tunneld edge api-key create`` to a second person's agent holding a credential restricted to
``*.alice.DOMAIN``: the names it may bind work, the others are refused with ngrok's codes, and
the agent exits non-zero with that code.
"""

from __future__ import annotations

import json
import re
import urllib.request
from collections.abc import Callable
from pathlib import Path

from .test_cli import (  # noqa: F401 - spawn and http_upstream are fixtures, used by name
    DOMAIN,
    Proc,
    base_env,
    curl,
    free_port,
    http_upstream,
    run_cli,
    spawn,
    start_edge,
    started_urls,
)


def fetch(port: int, host: str) -> str:
    req = urllib.request.Request(f"http://127.0.0.1:{port}/", headers={"Host": host})
    with urllib.request.urlopen(req, timeout=10) as resp:  # noqa: S310 - loopback only
        return str(resp.read().decode())


def test_team_walkthrough(spawn: Callable[..., Proc], tmp_path: Path, http_upstream: int) -> None:
    data = tmp_path / "edge-data"
    api_port = free_port()
    edge = start_edge(lambda args: spawn(*args), data, "--api-addr", f"127.0.0.1:{api_port}")
    env = base_env(tmp_path)
    # 1. the operator's API key (default account), shown once on stdout
    made = run_cli("edge", "api-key", "create", "--data-dir", str(data), "--description", "admin", env=env)
    assert made.returncode == 0, made.stderr
    key = made.stdout.strip()
    assert re.fullmatch(r"tka_\S+", key), key
    api = {**env, "TUNNELD_API_URL": f"http://127.0.0.1:{api_port}", "TUNNELD_API_KEY": key}

    def call(*args: str) -> dict[str, object]:
        res = run_cli("api", *args, env=api)
        assert res.returncode == 0, res.stderr
        return dict(json.loads(res.stdout)) if res.stdout.strip() else {}

    # 2. Alice's names and her credential
    rd = call("reserved-domains", "create", f"*.alice.{DOMAIN}", "--description", "alice")
    assert rd["domain"] == f"*.alice.{DOMAIN}" and rd["cname_target"]
    cred = call("credentials", "create", "--acl", f"bind:*.alice.{DOMAIN}", "--description", "alice laptop")
    token = str(cred["token"])
    assert call("credentials", "get", str(cred["id"]))["token"] is None  # shown once
    flags = ["--authtoken", token, "--server-addr", f"127.0.0.1:{edge.agent}", "--root-cas", str(edge.ca),
             "--web-addr", "false", "--log", "stdout", "--log-format", "logfmt"]
    # 3. Alice's agent: her hostname, and a random name below her wildcard
    app = spawn("http", str(http_upstream), "--hostname", f"app.alice.{DOMAIN}", *flags)
    urls = started_urls(app, 2)
    assert any(u == f"https://app.alice.{DOMAIN}:{edge.https}" for u in urls.values()), urls
    assert fetch(edge.http, f"app.alice.{DOMAIN}").startswith("hello from upstream")
    # HTTPS too: a nested name gets a certificate of its own (the dev CA's here).
    name = f"app.alice.{DOMAIN}"
    assert curl(f"https://{name}:{edge.https}/", "--resolve", f"{name}:{edge.https}:127.0.0.1",
                "--cacert", str(edge.ca)).startswith("hello from upstream")
    rand = spawn("http", str(http_upstream), *flags)
    host = next(iter(started_urls(rand, 2).values())).split("://")[1].rsplit(":", 1)[0]
    assert host.endswith(f".alice.{DOMAIN}"), host
    # 4. What her credential may not bind: the agent exits non-zero with ngrok's code.
    refused = spawn("http", str(http_upstream), "--subdomain", "bob", *flags)
    assert refused.wait_exit(15) != 0
    assert "ERR_TUNNELD_316" in refused.err
    tcp = spawn("tcp", "22", *flags)
    assert tcp.wait_exit(15) != 0
    assert "ERR_TUNNELD_356" in tcp.err
    # 5. Her session is listed; the refused binds are counted on /metrics.
    sessions = call("tunnel-sessions", "list")["tunnel_sessions"]
    assert isinstance(sessions, list) and sum(
        1 for s in sessions if s["credential"]["id"] == cred["id"]) == 2
    req = urllib.request.Request(f"http://127.0.0.1:{api_port}/metrics",
                                 headers={"Authorization": f"Bearer {key}"})
    with urllib.request.urlopen(req, timeout=10) as resp:  # noqa: S310 - loopback only
        text = resp.read().decode()
    assert 'tunneld_refused_binds_total{code="ERR_TUNNELD_316"} 1.0' in text
    assert 'tunneld_refused_binds_total{code="ERR_TUNNELD_356"} 1.0' in text
    # 6. Deleting the credential disconnects her agents within 5 s.
    call("credentials", "delete", str(cred["id"]))
    assert app.wait_exit(10) != 0 and rand.wait_exit(10) != 0
