"""Layering rules (STYLE §2.1): the sans-IO core and the package root never import trio."""

from __future__ import annotations

import subprocess
import sys

import pytest


def run_python(code: str) -> subprocess.CompletedProcess[str]:
    # A fresh interpreter: this test process has long since imported trio.
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize(
    "module",
    ["tunneld.core.proto", "tunneld", "tunneld.hookspecs", "tunneld.plugin", "tunneld.core._errors"],
)
def test_module_does_not_import_trio(module: str) -> None:
    result = run_python(
        f"import {module}, sys\n"
        "bad = sorted(m for m in sys.modules if m == 'trio' or m.startswith('trio.'))\n"
        "assert not bad, bad\n"
    )
    assert result.returncode == 0, result.stderr


def test_proto_does_not_import_the_io_layer() -> None:
    result = run_python(
        "import tunneld.core.proto, sys\n"
        "io = sorted(m for m in sys.modules if m.startswith('tunneld.') and m.split('.')[-1] in "
        "('_mux', '_edge', '_agent', '_forward', '_tls', '_tunnel', '_plugins'))\n"
        "plugins = sorted(m for m in sys.modules if m.startswith('tunneld.plugins'))\n"
        "assert not io and not plugins, (io, plugins)\n"
    )
    assert result.returncode == 0, result.stderr


def test_the_check_itself_can_fail() -> None:
    """Guard against a vacuous check: importing the IO layer does pull in trio."""
    result = run_python("import tunneld.core._mux, sys; assert 'trio' not in sys.modules")
    assert result.returncode != 0
    assert "AssertionError" in result.stderr
