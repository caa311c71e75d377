"""Folders that hold secrets are private whatever the umask or their prior mode (issue 11, item 13)."""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from tunneld.core._certs import ensure_dev_certs, ensure_private_dir
from tunneld.core._config import save_authtoken


@pytest.fixture
def open_umask() -> Iterator[None]:
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_new_data_dir_is_private(tmp_path: Path, open_umask: None) -> None:
    data = tmp_path / "a" / "data"
    ensure_private_dir(data)
    assert _mode(data) == 0o700


def test_world_writable_data_dir_is_tightened_with_a_warning(tmp_path: Path,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    data = tmp_path / "data"
    data.mkdir()
    os.chmod(data, 0o777)
    with caplog.at_level(logging.WARNING, logger="tunneld.edge"):
        ensure_dev_certs(data, "tunneld.localhost", ["127.0.0.1"])
    assert _mode(data) == 0o755
    assert any("writable by others" in r.getMessage() and "0777" in r.getMessage() for r in caplog.records)
    # A directory that is already safe is left as its owner set it, silently.
    caplog.clear()
    os.chmod(data, 0o750)
    ensure_private_dir(data)
    assert _mode(data) == 0o750 and not caplog.records


def test_config_dir_for_the_authtoken_is_private_under_umask_000(tmp_path: Path, open_umask: None) -> None:
    path = tmp_path / "home" / ".config" / "tunneld" / "tunneld.yml"
    save_authtoken(path, "tkd_000000000000_" + "A" * 40)
    assert _mode(path.parent) == 0o700
    assert _mode(path) == 0o600


def test_edge_without_dev_tightens_its_data_dir(tmp_path: Path) -> None:
    """The production path (certificate files, no dev CA) secures the data dir too."""
    import subprocess
    import sys

    import trustme

    ca = trustme.CA()
    leaf = ca.issue_cert("tunnels.example.test", "*.tunnels.example.test")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    leaf.private_key_and_cert_chain_pem.write_to_path(str(cert))
    leaf.private_key_pem.write_to_path(str(key))
    data = tmp_path / "data"
    data.mkdir()
    os.chmod(data, 0o777)
    proc = subprocess.Popen(
        [sys.executable, "-m", "tunneld", "edge", "--data-dir", str(data), "--domain", "tunnels.example.test",
         "--tls-cert", str(cert), "--tls-key", str(key), "--http-addr", "false", "--https-addr", "false",
         "--agent-addr", "127.0.0.1:0", "--tcp-ports", "127.0.0.1:1-1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if "agent listener on" in line:
                break
        else:
            raise AssertionError(proc.stderr.read() if proc.stderr else "edge exited")
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=20)
    assert _mode(data) == 0o755
    assert "writable by others" in err
