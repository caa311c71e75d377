"""The startup paths that used POSIX-only calls work without them (as on Windows).

Windows lacks ``os.fchmod`` before Python 3.13; the dev edge's certificate generation used it.
These tests take the call away (in-process, and in a real ``tunneld edge --dev`` process) and
check that the edge still makes its CA and certificate and serves agents.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509

from tests.test_cli import DOMAIN, Proc, base_env, free_port, free_range
from tunneld.core import _certs
from tunneld.core._certs import ensure_dev_certs, load_cert_key_pair


def test_dev_certs_without_fchmod(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(os, "fchmod")
    certs = ensure_dev_certs(tmp_path / "data", DOMAIN, ["127.0.0.1", "localhost"])
    load_cert_key_pair(certs.cert, certs.key)
    leaf = x509.load_pem_x509_certificates(certs.cert.read_bytes())[0]
    leaf.verify_directly_issued_by(x509.load_pem_x509_certificate(certs.ca_cert.read_bytes()))
    # On POSIX the private key is still private: created 0600 by os.open, whatever the umask.
    assert os.stat(certs.key).st_mode & 0o077 == 0
    # Reused on the next start, not regenerated.
    assert ensure_dev_certs(tmp_path / "data", DOMAIN, ["127.0.0.1", "localhost"]) == certs
    assert certs.cert.read_bytes() == certs.cert.read_bytes()


def test_windows_mode_handling(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With ``os.name == "nt"`` no mode call is made: permission bits mean nothing there."""
    monkeypatch.delattr(os, "fchmod")
    calls: list[object] = []
    monkeypatch.setattr(os, "chmod", lambda *a, **k: calls.append(a))
    data = tmp_path / "data"
    data.mkdir(mode=0o777)
    monkeypatch.setattr(os, "name", "nt")
    try:
        _certs.ensure_private_dir(data)  # Windows reports 0o777 for folders: no warning, no chmod
        _certs._atomic_write(data / "file.pem", b"data\n", 0o600)
    finally:
        monkeypatch.setattr(os, "name", "posix")
    assert calls == []
    assert (data / "file.pem").read_bytes() == b"data\n"
    assert [p.name for p in data.iterdir()] == ["file.pem"]  # no temp file left


def test_dev_edge_process_without_fchmod(tmp_path: Path) -> None:
    listen = [f"127.0.0.1:{free_port()}" for _ in range(3)]
    low, high = free_range(5)
    code = "import os, sys; del os.fchmod; from tunneld.cli import main; sys.argv[0] = 'tunneld'; main()"
    proc = Proc([sys.executable, "-c", code, "edge", "--dev", "--data-dir", str(tmp_path / "data"),
                 "--domain", DOMAIN, "--http-addr", listen[0], "--https-addr", listen[1],
                 "--agent-addr", listen[2], "--tcp-ports", f"127.0.0.1:{low}-{high}"], base_env(tmp_path))
    try:
        proc.wait_line(lambda line: "tunneld http" in line and "--server-addr" in line, timeout=20)
        # The edge it made serves a real agent handshake with the certificate it wrote.
        res = subprocess.run([sys.executable, "-m", "tunneld", "diagnose", "--server-addr", listen[2],
                              "--root-cas", str(tmp_path / "data" / "ca.pem"), "--authtoken",
                              (tmp_path / "data" / "dev-authtoken").read_text().strip()],
                             capture_output=True, text=True, timeout=30, env=base_env(tmp_path))
        assert res.returncode == 0, res.stdout + res.stderr
    finally:
        proc.stop()
