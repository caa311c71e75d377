"""``tunneld edge api-key`` and ``tunneld api``, as real processes against an in-process edge's API."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import trio

from tests.conftest import DOMAIN, EdgeEnv
from tunneld.core._admin import AdminApi


async def tunneld(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[bytes]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("TUNNELD_")}
    full_env.update(env or {})
    with trio.fail_after(30):
        return await trio.run_process([sys.executable, "-m", "tunneld", *args], capture_stdout=True,
                                      capture_stderr=True, check=False, env=full_env)


def ok(res: subprocess.CompletedProcess[bytes]) -> Any:
    assert res.returncode == 0, res.stderr.decode()
    return json.loads(res.stdout) if res.stdout.strip() else None


async def test_api_key_and_api_commands(edge_env: EdgeEnv, tmp_path: Path) -> None:
    data = str(edge_env.data_dir)
    res = await tunneld("edge", "api-key", "create", "--data-dir", data, "--description", "ci")
    assert res.returncode == 0, res.stderr
    lines = res.stdout.decode().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tka_")  # the key, and nothing else on stdout
    key = lines[0]
    assert b"ak_" in res.stderr
    listing = await tunneld("edge", "api-key", "list", "--data-dir", data)
    assert b"ci" in listing.stdout and key.encode() not in listing.stdout

    admin = AdminApi(edge_env.edge, ("127.0.0.1", 0))
    bound = await edge_env.nursery.start(admin.run)
    env = {"TUNNELD_API_URL": f"http://{bound}", "TUNNELD_API_KEY": key}

    cred = ok(await tunneld("api", "credentials", "create", "--acl", "bind:*.example.com", "--description",
                            "laptop", env=env))
    assert cred["acl"] == ["bind:*.example.com"] and cred["token"].startswith("tkd_")
    assert edge_env.store.verify_token(cred["token"]) is not None
    listed_creds = ok(await tunneld("api", "credentials", "list", env=env))["credentials"]
    assert cred["id"] in {c["id"] for c in listed_creds}
    got = ok(await tunneld("api", "credentials", "get", cred["id"], env=env))
    assert got["token"] is None and got["description"] == "laptop"
    updated = ok(await tunneld("api", "credentials", "update", cred["id"], "--acl", "bind:a.example.com",
                               "--acl", "bind:b.example.com", env=env))
    assert updated["acl"] == ["bind:a.example.com", "bind:b.example.com"]
    assert updated["description"] == "laptop"
    assert ok(await tunneld("api", "credentials", "delete", cred["id"], env=env)) is None

    edge = ok(await tunneld("api", "edges", "create", "--proto", "https", "--hostname", f"web.{DOMAIN}",
                            "--label", "app=web", "--label", "v=1", env=env))
    assert edge["id"].startswith("edghts_") and edge["backend"]["labels"] == {"app": "web", "v": "1"}
    ok(await tunneld("api", "reserved-addrs", "create", "1.2.3.4:5000", env=env))  # positional
    tcp = ok(await tunneld("api", "edges", "create", "--proto", "tcp", "--addr", "1.2.3.4:5000", env=env))
    listed = ok(await tunneld("api", "edges", "list", env=env))
    assert [e["id"] for e in listed["https_edges"]] == [edge["id"]]
    assert [e["id"] for e in listed["tcp_edges"]] == [tcp["id"]] and listed["tls_edges"] == []
    relabeled = ok(await tunneld("api", "edges", "update", edge["id"], "--label", "app=api", env=env))
    assert relabeled["backend"]["labels"] == {"app": "api"}
    assert ok(await tunneld("api", "edges", "get", tcp["id"], env=env))["addr"] == "1.2.3.4:5000"
    assert ok(await tunneld("api", "edges", "delete", tcp["id"], env=env)) is None

    key_file = tmp_path / "id.pub"
    key_file.write_text("ssh-ed25519 " + base64.b64encode(
        b"\x00\x00\x00\x0bssh-ed25519\x00\x00\x00\x20" + b"k" * 32).decode() + " me@host\n")
    ssh = ok(await tunneld("api", "ssh-credentials", "create", "--public-key", f"@{key_file}", "--acl",
                           "bind:ssh.example.com", env=env))
    assert ssh["id"].startswith("sshc_") and ssh["public_key"].startswith("ssh-ed25519 ")
    rd = ok(await tunneld("api", "reserved-domains", "create", "--domain", "app.example.com", env=env))
    assert rd["cname_target"] == edge_env.edge.config.cname
    ra = ok(await tunneld("api", "reserved-addrs", "create", "--addr", "1.2.3.4:6000", env=env))
    assert ra["addr"] == "1.2.3.4:6000"
    keys = ok(await tunneld("api", "api-keys", "list", "--limit", "5", env=env))["keys"]
    assert all(k["token"] is None for k in keys) and len(keys) == 1
    # The edge_env agent-less edge: no sessions, no tunnels; the shapes are there.
    assert ok(await tunneld("api", "tunnel-sessions", "list", env=env))["tunnel_sessions"] == []
    assert ok(await tunneld("api", "tunnels", "list", env=env))["tunnels"] == []

    # Errors: non-zero, message and code on stderr, nothing on stdout.
    missing = await tunneld("api", "credentials", "get", "cr_000000000000", env=env)
    assert missing.returncode != 0 and not missing.stdout and b"ERR_TUNNELD_4404" in missing.stderr
    bad_acl = await tunneld("api", "credentials", "create", "--acl", "bind:*.*.x.com", env=env)
    assert bad_acl.returncode != 0 and b"ERR_TUNNELD_600" in bad_acl.stderr
    wrong_key = await tunneld("api", "--api-key", "tka_000000000000_" + "A" * 40, "tunnels", "list", env=env)
    assert wrong_key.returncode != 0 and b"ERR_TUNNELD_4401" in wrong_key.stderr
    unset = await tunneld("api", "tunnels", "list")
    assert unset.returncode != 0 and b"TUNNELD_API_URL" in unset.stderr
    flags = await tunneld("api", "tunnels", "list", "--api-url", env["TUNNELD_API_URL"], "--api-key", key)
    assert ok(flags)["tunnels"] == []
    bad_edge = await tunneld("api", "edges", "create", "--proto", "tcp", "--hostname", "x.com", env=env)
    assert bad_edge.returncode != 0 and not bad_edge.stdout

    ak_id = next(line.split()[0] for line in listing.stdout.decode().splitlines() if line.startswith("ak_"))
    assert (await tunneld("edge", "api-key", "revoke", ak_id, "--data-dir", data)).returncode == 0
    revoked = await tunneld("api", "tunnels", "list", env=env)
    assert revoked.returncode != 0 and b"ERR_TUNNELD_4401" in revoked.stderr
    assert (await tunneld("edge", "api-key", "revoke", ak_id, "--data-dir", data)).returncode != 0
