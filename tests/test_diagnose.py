"""``tunneld diagnose`` against a real dev edge on loopback: all OK, then one failure per step."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

from tests.test_cli import EdgeProc, base_env, edge, free_port, procs, run_cli  # noqa: F401 - fixtures
from tunneld.core._certs import ensure_dev_certs

STEPS = ["Name Resolution", "TCP", "TLS", "Tunnel Protocol"]


def statuses(out: str) -> dict[str, str]:
    """Step name -> OK/FAIL/SKIP of the edge section (after its header line)."""
    section = out.split("tunneld Connectivity", 1)[1]
    return {m.group(1): m.group(2) for m in re.finditer(r"^  (\S.*?)\s+\[ (OK|FAIL|SKIP) \]$", section, re.M)}


def diagnose(tmp_path: Path, edge: EdgeProc, **override: object) -> tuple[int, str]:
    cfg: dict[str, object] = {"authtoken": edge.token, "server_addr": f"127.0.0.1:{edge.agent}",
                              "root_cas": str(edge.ca)}
    cfg.update(override)
    path = tmp_path / "agent.yml"
    path.write_text(yaml.safe_dump(cfg))
    res = run_cli("diagnose", "--config", str(path), "--timeout", "5", env=base_env(tmp_path), timeout=30)
    return res.returncode, res.stdout + res.stderr


def test_all_ok_with_region_latency_and_report(edge: EdgeProc, tmp_path: Path) -> None:
    report = tmp_path / "report.json"
    path = tmp_path / "agent.yml"
    path.write_text(yaml.safe_dump({"authtoken": edge.token, "server_addr": f"localhost:{edge.agent}",
                                    "root_cas": str(edge.ca)}))
    res = run_cli("diagnose", "--config", str(path), "-w", str(report), env=base_env(tmp_path), timeout=30)
    out = res.stdout
    assert res.returncode == 0, out + res.stderr
    lines = out.splitlines()
    assert lines[0] == f"Testing tunneld connectivity to localhost:{edge.agent}..."
    assert "Localhost Connectivity" in lines
    assert f"tunneld Connectivity - Server: localhost:{edge.agent}" in lines
    assert statuses(out) == dict.fromkeys(STEPS, "OK")
    # ngrok's layout: the status cell starts in one column on every line.
    cells = {line.index("[ ") for line in lines if line.endswith(" ]")}
    assert cells == {44}
    m = re.search(r"^Successfully established tunneld connection! "
                  r"\(region: 'local', latency: (\d+\.\d+)ms\)$", out, re.M)
    assert m and float(m.group(1)) > 0, out
    data = json.loads(report.read_text())
    assert data["ok"] is True and data["region"] == "local" and data["latency_ms"] > 0
    assert [c["status"] for c in data["checks"]] == ["OK"] * 5


def test_websocket_carrier(edge: EdgeProc, tmp_path: Path) -> None:
    code, out = diagnose(tmp_path, edge, server_addr=f"wss://127.0.0.1:{edge.agent}/tunneld")
    assert code == 0, out
    assert statuses(out) == dict.fromkeys(STEPS, "OK")


def test_wrong_port(edge: EdgeProc, tmp_path: Path) -> None:
    port = free_port()
    code, out = diagnose(tmp_path, edge, server_addr=f"127.0.0.1:{port}")
    assert code == 1
    assert statuses(out) == {"Name Resolution": "OK", "TCP": "FAIL", "TLS": "SKIP", "Tunnel Protocol": "SKIP"}
    assert f"connection refused: is the edge running at 127.0.0.1:{port}?" in out
    assert "Error establishing tunneld connection:" in out


def test_untrusted_ca(edge: EdgeProc, tmp_path: Path) -> None:
    other = ensure_dev_certs(tmp_path / "other-ca", "elsewhere.test", ["127.0.0.1"]).ca_cert
    code, out = diagnose(tmp_path, edge, root_cas=str(other))
    assert code == 1
    assert statuses(out)["TLS"] == "FAIL" and statuses(out)["Tunnel Protocol"] == "SKIP"
    assert "certificate not trusted: set root_cas" in out


def test_missing_root_cas_file(edge: EdgeProc, tmp_path: Path) -> None:
    code, out = diagnose(tmp_path, edge, root_cas=str(tmp_path / "nope.pem"))
    assert code == 1 and statuses(out)["TLS"] == "FAIL"
    assert "is not a readable file" in out


def test_not_the_agent_port(edge: EdgeProc, tmp_path: Path) -> None:
    code, out = diagnose(tmp_path, edge, server_addr=f"127.0.0.1:{edge.http}")
    assert code == 1 and statuses(out)["TLS"] == "FAIL"
    assert "the edge's agent address" in out


def test_bad_token(edge: EdgeProc, tmp_path: Path) -> None:
    code, out = diagnose(tmp_path, edge, authtoken="tkd_not_a_real_token")
    assert code == 1
    assert statuses(out) == {"Name Resolution": "OK", "TCP": "OK", "TLS": "OK", "Tunnel Protocol": "FAIL"}
    assert "authtoken refused: set a valid authtoken" in out


def test_unresolvable_name(edge: EdgeProc, tmp_path: Path) -> None:
    # .invalid never resolves (RFC 6761): no query leaves this machine with an answer.
    code, out = diagnose(tmp_path, edge, server_addr="edge.invalid:4443")
    assert code == 1
    assert statuses(out) == {"Name Resolution": "FAIL", "TCP": "SKIP", "TLS": "SKIP",
                             "Tunnel Protocol": "SKIP"}
    assert "name does not resolve" in out


def test_flags_and_env_override_the_config(edge: EdgeProc, tmp_path: Path) -> None:
    path = tmp_path / "agent.yml"
    path.write_text(yaml.safe_dump({"authtoken": "wrong", "server_addr": "edge.invalid:1"}))
    env = {**base_env(tmp_path), "TUNNELD_AUTHTOKEN": edge.token}
    res = run_cli("diagnose", "--config", str(path), "--server-addr", f"127.0.0.1:{edge.agent}",
                  "--root-cas", str(edge.ca), env=env, timeout=30)
    assert res.returncode == 0, res.stdout + res.stderr
    res = run_cli("diagnose", "--config", str(path), "--server-addr", "not a host:port", env=env)
    assert res.returncode == 1 and "server_addr" in res.stderr
