"""``tunneld update``: install the newest release of a channel with pip; the agent's update check.

tunneld is a Python package, so an update is ``python -m pip install tunneld==X`` into the very
interpreter that runs tunneld, from the index pip is configured for (``pip.conf``,
``PIP_INDEX_URL``...) or from a directory of wheels (``--find-links DIR``, then no index).

Channels select versions by their pre-release tag (PEP 440):

========  ===========================================================
stable    final releases only (``1.4.0``, ``1.4.1.post1``)
beta      finals and betas / release candidates (``1.5.0b2``, ``1.5.0rc1``)
unstable  everything, alphas and development builds too (``1.6.0.dev3``)
========  ===========================================================

The versions on offer are listed with ``pip index versions`` and chosen here (pip's ``--pre``
alone cannot tell a beta from a dev build); the chosen one is then installed pinned.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import attrs
import click
from packaging.version import InvalidVersion, Version

from . import __version__

log = logging.getLogger("tunneld.update")

PACKAGE = "tunneld"
CHANNELS = ("stable", "beta", "unstable")
#: Seconds ``pip index versions`` may take (the agent's start-up check must stay bounded).
LIST_TIMEOUT = 60.0
#: Seconds ``pip install`` may take.
INSTALL_TIMEOUT = 600.0
#: How every tunneld release's summary begins.  Public PyPI has an unrelated project named
#: "tunneld" (an SSH tunnel manager): a candidate whose summary differs is refused, never installed.
SUMMARY_PREFIX = "Self-hosted secure tunnels"


class UpdateError(Exception):
    """The update could not be done; the message says why (pip's own last lines included)."""


def in_channel(version: Version, channel: str) -> bool:
    """Whether ``version`` is offered on ``channel`` (see the module docstring)."""
    if channel not in CHANNELS:
        raise ValueError(f"unknown update channel {channel!r} (expected one of: {', '.join(CHANNELS)})")
    if channel == "unstable":
        return True
    if version.is_devrelease:
        return False
    if channel == "stable":
        return version.pre is None
    return version.pre is None or version.pre[0] in ("b", "rc")


def _pip(*args: str, find_links: Path | None) -> list[str]:
    cmd = [sys.executable, "-m", "pip", *args, "--disable-pip-version-check"]
    if find_links is not None:
        cmd += ["--no-index", "--find-links", str(find_links)]
    return cmd


def _tail(text: str, lines: int = 5) -> str:
    kept = [line for line in text.strip().splitlines()
            if line.strip() and not line.startswith("WARNING: pip index is currently an experimental")]
    return " / ".join(kept[-lines:])


def _list_command(find_links: Path | None) -> list[str]:
    if find_links is not None and not find_links.is_dir():
        raise UpdateError(f"--find-links {find_links}: not a directory")
    return _pip("index", "versions", PACKAGE, "--pre", find_links=find_links)


def _parse_versions(returncode: int, stdout: str, stderr: str) -> list[Version]:
    if returncode != 0:
        if "No matching distribution" in stderr:
            return []
        raise UpdateError(f"pip could not list the versions of {PACKAGE}: {_tail(stderr)}")
    match = re.search(r"^Available versions:\s*(.*)$", stdout, re.MULTILINE)
    if match is None:
        raise UpdateError(f"unexpected output from 'pip index versions': {_tail(stdout)}")
    versions = []
    for text in match.group(1).split(","):
        try:
            versions.append(Version(text.strip()))
        except InvalidVersion:
            continue
    return sorted(versions, reverse=True)


def _install_command(version: Version, find_links: Path | None) -> list[str]:
    return _pip("install", "--upgrade", f"{PACKAGE}=={version}", find_links=find_links)


def _check_install(version: Version, returncode: int, stdout: str, stderr: str) -> None:
    if returncode != 0:
        raise UpdateError(f"pip could not install {PACKAGE} {version}: {_tail(stderr or stdout)}")


def _identity_command(version: Version, find_links: Path | None) -> list[str]:
    return _pip("install", "--dry-run", "--no-deps", "--ignore-installed", "--quiet", "--report", "-",
                f"{PACKAGE}=={version}", find_links=find_links)


def _check_identity(version: Version, returncode: int, stdout: str, stderr: str) -> None:
    """UpdateError unless pip's report on ``tunneld==version`` shows this project's summary."""
    if returncode != 0:
        raise UpdateError(f"pip could not resolve {PACKAGE} {version}: {_tail(stderr or stdout)}")
    try:
        report = json.loads(stdout)
        summary = str(report["install"][0]["metadata"].get("summary", ""))
    except (ValueError, KeyError, IndexError, TypeError, AttributeError):
        raise UpdateError(f"pip gave no readable report on {PACKAGE} {version}") from None
    if not summary.startswith(SUMMARY_PREFIX):
        raise UpdateError(f"{PACKAGE} {version} on the package index is another project ({summary[:80]!r}): "
                          "point pip at the index that serves tunneld's releases (PIP_INDEX_URL) or use "
                          "--find-links DIR")


def _run(cmd: list[str], timeout: float, what: str) -> tuple[int, str, str]:
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
                             env=dict(os.environ, PIP_NO_INPUT="1"))
    except subprocess.TimeoutExpired:
        raise UpdateError(f"pip did not {what} within {timeout:g}s") from None
    except OSError as exc:
        raise UpdateError(f"cannot run pip: {exc}") from None
    return res.returncode, res.stdout, res.stderr


async def _run_async(cmd: list[str], timeout: float, what: str) -> tuple[int, str, str]:
    """As :func:`_run`, in Trio: cancelling it kills pip (no orphan left behind)."""
    import trio

    try:
        with trio.fail_after(timeout):
            res = await trio.run_process(cmd, capture_stdout=True, capture_stderr=True, check=False,
                                         stdin=b"", env=dict(os.environ, PIP_NO_INPUT="1"))
    except trio.TooSlowError:
        raise UpdateError(f"pip did not {what} within {timeout:g}s") from None
    except OSError as exc:
        raise UpdateError(f"cannot run pip: {exc}") from None
    return res.returncode, res.stdout.decode(errors="replace"), res.stderr.decode(errors="replace")


def available_versions(find_links: Path | None = None, *, timeout: float = LIST_TIMEOUT) -> list[Version]:
    """Every version of tunneld pip can install from its index (or ``find_links``), newest first.

    Raises:
        UpdateError: pip failed (no index reachable, ...) or gave nothing readable.
    """
    return _parse_versions(*_run(_list_command(find_links), timeout, f"list the versions of {PACKAGE}"))


async def available_versions_async(find_links: Path | None = None, *,
                                   timeout: float = LIST_TIMEOUT) -> list[Version]:
    """:func:`available_versions` for Trio code (the agent)."""
    return _parse_versions(*await _run_async(_list_command(find_links), timeout,
                                             f"list the versions of {PACKAGE}"))


@attrs.frozen
class UpdatePlan:
    """What :func:`plan` found: install ``target`` over ``current`` (None: nothing newer)."""

    current: Version
    target: Version | None
    #: Where it comes from, for messages ("the package index" or the directory).
    source: str = "the package index"


def choose(versions: list[Version], channel: str = "stable", *, version: str = "",
           permit_major_version: bool = True, source: str = "the package index") -> UpdatePlan:
    """Choose from ``versions``: ``version`` if given (it must be there), else the channel's newest.

    Raises:
        UpdateError: no such version, or a new major version that is not permitted.
        ValueError: unknown channel or malformed ``version``.
    """
    current = Version(__version__)
    in_channel(current, channel)  # validates the channel name
    if version:
        try:
            wanted = Version(version)
        except InvalidVersion:
            raise ValueError(f"{version!r} is not a version number") from None
        if wanted not in versions:
            raise UpdateError(f"{PACKAGE} {wanted} is not available from {source}")
        target: Version | None = None if wanted == current else wanted
    else:
        best = next((v for v in sorted(versions, reverse=True) if in_channel(v, channel)), None)
        target = best if best is not None and best > current else None
    if target is not None and target.major > current.major and not permit_major_version:
        raise UpdateError(f"{PACKAGE} {target} is a new major version (this is {current}); "
                          "it is installed only when permitted")
    return UpdatePlan(current, target, source)


def _source(find_links: Path | None) -> str:
    return str(find_links) if find_links is not None else "the package index"


def plan(channel: str = "stable", find_links: Path | None = None, *, version: str = "",
         permit_major_version: bool = True, timeout: float = LIST_TIMEOUT) -> UpdatePlan:
    """:func:`choose` among the versions pip can install."""
    in_channel(Version(__version__), channel)
    return choose(available_versions(find_links, timeout=timeout), channel, version=version,
                  permit_major_version=permit_major_version, source=_source(find_links))


async def plan_async(channel: str = "stable", find_links: Path | None = None, *, version: str = "",
                     permit_major_version: bool = True, timeout: float = LIST_TIMEOUT) -> UpdatePlan:
    """:func:`plan` for Trio code."""
    in_channel(Version(__version__), channel)
    return choose(await available_versions_async(find_links, timeout=timeout), channel, version=version,
                  permit_major_version=permit_major_version, source=_source(find_links))


def verify(version: Version, find_links: Path | None = None, *, timeout: float = LIST_TIMEOUT) -> None:
    """Check that pip's ``tunneld==VERSION`` is this project (see :data:`SUMMARY_PREFIX`).

    Raises:
        UpdateError: it is another project, or pip cannot resolve it.
    """
    _check_identity(version, *_run(_identity_command(version, find_links), timeout, f"resolve {version}"))


async def verify_async(version: Version, find_links: Path | None = None, *,
                       timeout: float = LIST_TIMEOUT) -> None:
    """:func:`verify` for Trio code."""
    _check_identity(version, *await _run_async(_identity_command(version, find_links), timeout,
                                               f"resolve {version}"))


def install(version: Version, find_links: Path | None = None, *, timeout: float = INSTALL_TIMEOUT) -> None:
    """``pip install tunneld==VERSION`` into this interpreter's environment (after :func:`verify`).

    Raises:
        UpdateError: pip failed (its last lines are in the message), or it is another project.
    """
    verify(version, find_links)
    cmd = _install_command(version, find_links)
    log.info("updating: %s", " ".join(cmd))
    _check_install(version, *_run(cmd, timeout, f"install {PACKAGE} {version}"))


async def install_async(version: Version, find_links: Path | None = None, *,
                        timeout: float = INSTALL_TIMEOUT) -> None:
    """:func:`install` for Trio code."""
    await verify_async(version, find_links)
    cmd = _install_command(version, find_links)
    log.info("updating: %s", " ".join(cmd))
    _check_install(version, *await _run_async(cmd, timeout, f"install {PACKAGE} {version}"))


def find_links_from_env() -> Path | None:
    """``TUNNELD_UPDATE_FIND_LINKS``: the agent's wheel directory for remote updates and checks."""
    value = os.environ.get("TUNNELD_UPDATE_FIND_LINKS", "").strip()
    return Path(value).expanduser() if value else None


def update(channel: str = "stable", find_links: Path | None = None, *, version: str = "",
           permit_major_version: bool = True) -> UpdatePlan:
    """Plan and install; returns the plan (``target`` None: already up to date, nothing installed)."""
    chosen = plan(channel, find_links, version=version, permit_major_version=permit_major_version)
    if chosen.target is not None:
        install(chosen.target, find_links)
    return chosen


# ---- the command ---------------------------------------------------------------------------------


def _configured_channel(config_path: Path | None) -> str:
    """``update_channel`` of the agent config file, "stable" when unset or unreadable."""
    from .core import ConfigError
    from .core._config import load_agent_config

    try:
        cfg = load_agent_config(config_path)
    except ConfigError as exc:
        click.echo(f"tunneld: warning: {exc}; using the stable channel", err=True)
        return "stable"
    channel = str(getattr(cfg, "update_channel", "") or "stable")
    return channel if channel in CHANNELS else "stable"


@click.command("update")
@click.option("--channel", type=click.Choice(CHANNELS), default=None,
              help="stable: final releases; beta: also betas and release candidates; unstable: also "
              "alphas and dev builds [default: the config's update_channel, else stable].")
@click.option("--find-links", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Install from this directory of wheels only (no package index) "
              "[env TUNNELD_UPDATE_FIND_LINKS].")
@click.option("--version", "version", default="", metavar="X.Y.Z",
              help="Install this version (also older or of another channel) instead of the newest.")
@click.option("--check", is_flag=True, help="Only tell whether a newer release exists; install nothing.")
@click.option("--config", "config_path", type=click.Path(path_type=Path), default=None,
              help="Agent config file to read update_channel from.")
def update_command(channel: str | None, find_links: Path | None, version: str, check: bool,
                   config_path: Path | None) -> None:
    """Install the newest tunneld release of a channel with pip (into this Python).

    Uses the package index pip is configured for (pip.conf, PIP_INDEX_URL), or only the
    wheels in --find-links DIR.  Running agents keep the old version until restarted
    (`tunneld api tunnel-sessions restart ID`, or the service manager).

    \b
    Examples:
      tunneld update
      tunneld update --channel beta
      tunneld update --find-links ./wheels --check
    """
    channel = channel or _configured_channel(config_path)
    links = find_links or find_links_from_env()
    try:
        chosen = plan(channel, links, version=version)
        if chosen.target is None:
            click.echo(f"tunneld {chosen.current} is up to date (the {channel} channel of {chosen.source} "
                       "has nothing newer)")
            return
        if check:
            verify(chosen.target, links)
            flag = "" if channel == "stable" else f" --channel {channel}"
            click.echo(f"tunneld {chosen.target} is available on the {channel} channel (this is "
                       f"{chosen.current}): run 'tunneld update{flag}'")
            return
        click.echo(f"Installing tunneld {chosen.target} (was {chosen.current}) from {chosen.source} ...",
                   err=True)
        install(chosen.target, links)
    except (UpdateError, ValueError) as exc:
        click.echo(f"tunneld: error: {exc}", err=True)
        sys.exit(1)
    click.echo(f"Updated tunneld {chosen.current} -> {chosen.target}. Restart running agents to use it.")
