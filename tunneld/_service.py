"""The agent as an operating-system service (ngrok's ``ngrok service``).

``install`` writes one service definition for the init system in charge: a systemd unit, an
upstart job, a launchd plist, or (with pywin32) a Windows service.  Each runs
``tunneld start --all --config FILE`` with the absolute paths of the program and the config
recorded at install time, is restarted when it crashes, and logs to the journal (systemd), the
upstart log, a launchd log file or the Windows event log.  ``start|stop|restart|status|uninstall``
drive that system's own tool (systemctl, initctl, launchctl, the service manager).

``root`` (``--root DIR`` / ``TUNNELD_SERVICE_ROOT``) writes under another root directory instead
of ``/``: for images, packaging and tests.  Only the real root needs privileges; ``systemctl
--root`` still enables the unit there (a symlink), but nothing can be started in it.

Files are written atomically (a temp file renamed into place) and an install whose activation
fails (``systemctl enable``, ...) removes what it wrote, so no half-installed service remains.
"""

from __future__ import annotations

import os
import plistlib
import shlex
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs

# Re-exported: the CLI and the tests import them from here.
from ._service_names import SERVICE_NAME as SERVICE_NAME
from ._service_names import ServiceError as ServiceError
from .core._errors import ConfigError

LAUNCHD_LABEL = "com.tunneld.agent"
#: Environment variable giving ``--root``.
ENV_ROOT = "TUNNELD_SERVICE_ROOT"
INIT_SYSTEMS = ("systemd", "upstart", "launchd", "windows")
#: The real system root; tests point it elsewhere to exercise the privilege check safely.
SYSTEM_ROOT = Path("/")
#: Where the launchd job's output goes (``/Library/Logs`` exists on every Mac).
LAUNCHD_LOG = "/Library/Logs/tunneld.log"
#: Logging flags of the service: stderr, which systemd hands to the journal.
LOG_FLAGS = ("--log", "stderr", "--log-format", "logfmt")


# ---- what to run ------------------------------------------------------------------------------


def program_argv() -> list[str]:
    """The absolute command line of this tunneld: its console script, else ``python -m tunneld``.

    Service managers search no ``PATH`` and expand no ``~``; the console script beside the
    running interpreter belongs to the same installation (venv, pipx, system).
    """
    exe = Path(sys.executable).absolute()
    # Windows: python.exe sits in Scripts\ in a venv, beside Scripts\ in a system install.
    candidates = [exe.parent / "tunneld.exe", exe.parent / "Scripts" / "tunneld.exe"] if os.name == "nt" \
        else [exe.parent / "tunneld"]
    for script in candidates:
        if script.is_file() and os.access(script, os.X_OK):
            return [str(script)]
    return [str(exe), "-m", "tunneld"]


def service_argv(program: Sequence[str], config: Path | Sequence[Path]) -> list[str]:
    """What the service runs: ``start --all`` with the recorded config file(s), in order."""
    configs = [config] if isinstance(config, (str, Path)) else list(config)
    return [*program, "start", "--all", *(a for c in configs for a in ("--config", str(c))), *LOG_FLAGS]


def _check_arg(arg: str) -> str:
    if not arg or any(ord(c) < 32 or ord(c) == 127 for c in arg):
        raise ServiceError(f"cannot put {arg!r} in a service definition (empty or control characters)")
    return arg


# ---- the definitions --------------------------------------------------------------------------


def _systemd_word(arg: str) -> str:
    """One ExecStart word: systemd expands %specifiers and $VARS, and splits like a shell."""
    text = arg.replace("\\", "\\\\").replace('"', '\\"').replace("%", "%%").replace("$", "$$")
    if text != arg or any(c.isspace() or c in "';" for c in arg):
        return f'"{text}"'
    return text


def render_systemd(argv: Sequence[str], *, user: str | None = None) -> str:
    """The systemd unit (``contrib/systemd/tunneld.service`` is this with the default paths)."""
    exec_start = " ".join(_systemd_word(_check_arg(a)) for a in argv)
    user_lines = f"User={user}\n" if user else ""
    return f"""\
# tunneld agent as a system service: `tunneld start --all` with one config file.
# Written by `tunneld service install --config FILE`, which checked the config and recorded
# the absolute paths below: do not move the program or the file (install again instead).
# Manage it with `tunneld service start|stop|restart|status|uninstall` (or systemctl);
# logs: journalctl -u tunneld.

[Unit]
Description=tunneld agent (tunneld start --all)
After=network-online.target
Wants=network-online.target
# A bad authtoken or config makes the agent exit 1: retry, but not in a tight loop forever.
StartLimitIntervalSec=300
StartLimitBurst=10

[Service]
Type=exec
{user_lines}ExecStart={exec_start}
# The agent reconnects by itself after network failures; this covers crashes and fatal errors.
# A remote Stop exits 0 and stays stopped; a remote Restart re-executes in place.
Restart=on-failure
RestartSec=5s
KillSignal=SIGTERM
TimeoutStopSec=15s
SyslogIdentifier=tunneld
Environment=PYTHONUNBUFFERED=1
UMask=0077
# Light hardening only: `tunneld update` (and a remote Update) installs into the program's
# environment, so the file system stays writable.
NoNewPrivileges=yes
PrivateTmp=yes
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectControlGroups=yes
RestrictRealtime=yes
LockPersonality=yes

[Install]
WantedBy=multi-user.target
"""


def render_upstart(argv: Sequence[str], *, user: str | None = None) -> str:
    """The upstart job (``/etc/init/tunneld.conf``), for Linux systems without systemd."""
    command = " ".join(shlex.quote(_check_arg(a)) for a in argv)
    user_lines = f"setuid {user}\n" if user else ""
    return f"""\
# tunneld agent as a system service: `tunneld start --all` with one config file.
# Written by `tunneld service install --config FILE` (absolute paths recorded: do not move them).
# Manage it with `tunneld service start|stop|restart|status|uninstall` (or initctl);
# logs: /var/log/upstart/tunneld.log.
description "tunneld agent (tunneld start --all)"

start on (local-filesystems and net-device-up IFACE!=lo)
stop on runlevel [!2345]

# Restarted after a crash or fatal error, at most 10 times in 5 minutes; a remote Stop exits 0.
respawn
respawn limit 10 300
normal exit 0
kill timeout 15
console log
env PYTHONUNBUFFERED=1
umask 077
{user_lines}exec {command}
"""


def launchd_plist(argv: Sequence[str], *, user: str | None = None) -> dict[str, Any]:
    """The launchd job as a dict (``contrib/launchd/com.tunneld.agent.plist`` parses to this)."""
    job: dict[str, Any] = {
        "Label": LAUNCHD_LABEL,
        "ProgramArguments": [_check_arg(a) for a in argv],
        "RunAtLoad": True,
        # Restart after a crash or fatal error (exit status != 0), not after a clean stop.
        "KeepAlive": {"SuccessfulExit": False},
        "ThrottleInterval": 10,
        "ExitTimeOut": 15,
        "ProcessType": "Background",
        "Umask": 0o077,
        "StandardOutPath": LAUNCHD_LOG,
        "StandardErrorPath": LAUNCHD_LOG,
        "EnvironmentVariables": {"PYTHONUNBUFFERED": "1"},
    }
    if user:
        job["UserName"] = user
    return job


def render_launchd(argv: Sequence[str], *, user: str | None = None) -> str:
    return plistlib.dumps(launchd_plist(argv, user=user), sort_keys=False).decode()


_RENDER = {"systemd": render_systemd, "upstart": render_upstart, "launchd": render_launchd}
_DEFINITION = {
    "systemd": Path("etc/systemd/system") / f"{SERVICE_NAME}.service",
    "upstart": Path("etc/init") / f"{SERVICE_NAME}.conf",
    "launchd": Path("Library/LaunchDaemons") / f"{LAUNCHD_LABEL}.plist",
}


# ---- where ------------------------------------------------------------------------------------


@attrs.frozen
class Target:
    """An init system and the root directory its definitions live under."""

    init: str
    root: Path

    @property
    def is_system(self) -> bool:
        """True for the running system (privileges needed, services can run)."""
        return self.root == SYSTEM_ROOT

    @property
    def definition(self) -> Path:
        """The service definition file (systemd unit, upstart job, plist)."""
        if self.init == "windows":
            raise ServiceError("a Windows service has no definition file (it lives in the registry)")
        return self.root / _DEFINITION[self.init]


def _systemd_running() -> bool:
    # sd_booted(3): systemd is PID 1 exactly when this directory exists.
    return Path("/run/systemd/system").is_dir()


def _upstart_running() -> bool:
    initctl = shutil.which("initctl")
    if initctl is None:
        return False
    try:
        out = subprocess.run([initctl, "version"], capture_output=True, text=True, timeout=5).stdout
    except (OSError, subprocess.TimeoutExpired):
        return False
    return "upstart" in out


def resolve_target(root: Path | str | None = None, init: str | None = None) -> Target:
    """The init system to use (``init``, else the running one) and the root (default ``/``)."""
    if root is None or str(root) == "":
        root = os.environ.get(ENV_ROOT) or None
    base = Path(os.path.abspath(root)) if root else SYSTEM_ROOT
    if init is not None:
        if init not in INIT_SYSTEMS:
            raise ServiceError(f"unknown init system {init!r} (one of {', '.join(INIT_SYSTEMS)})")
        if init == "windows" and base != SYSTEM_ROOT:
            raise ServiceError("--root is not supported for Windows services (they live in the registry)")
        return Target(init, base)
    if sys.platform == "win32":
        return resolve_target(root, "windows")
    if sys.platform == "darwin":
        return Target("launchd", base)
    if _systemd_running():
        return Target("systemd", base)
    if _upstart_running():
        return Target("upstart", base)
    if base != SYSTEM_ROOT and shutil.which("systemctl"):
        return Target("systemd", base)  # generating for another system: systemd is the norm
    raise ServiceError("neither systemd nor upstart runs this system: run `tunneld start --all --config "
                       "FILE` under your own supervisor (or pass --init with --root to generate a "
                       "definition)")


def _privileged() -> bool:
    if os.name == "nt":
        try:
            import ctypes

            return bool(ctypes.windll.shell32.IsUserAnAdmin())  # type: ignore[attr-defined]
        except (AttributeError, OSError):
            return False
    return os.geteuid() == 0


def _require_privileges(target: Target, what: str) -> None:
    if target.is_system and not _privileged():
        how = "from an administrator prompt" if os.name == "nt" else "with sudo"
        raise ServiceError(f"{what} needs root privileges: run it {how} (nothing was changed)")


# ---- running the init system's tool -----------------------------------------------------------


def _run(argv: list[str], *, check: bool = True, capture: bool = True) -> subprocess.CompletedProcess[str]:
    try:
        res = subprocess.run(argv, capture_output=capture, text=True, timeout=60, stdin=subprocess.DEVNULL)
    except FileNotFoundError:
        raise ServiceError(f"{argv[0]} not found: is this system run by the init system it belongs to?") \
            from None
    except subprocess.TimeoutExpired:
        raise ServiceError(f"`{shlex.join(argv)}` did not finish within 60 s") from None
    if check and res.returncode != 0:
        detail = ((res.stderr or "") + (res.stdout or "")).strip().splitlines()
        raise ServiceError(f"`{shlex.join(argv)}` failed (exit {res.returncode})"
                           + (f": {detail[-1]}" if detail else ""))
    return res


# ---- install ----------------------------------------------------------------------------------


@attrs.frozen
class Installed:
    """What :func:`install` did, for the user."""

    target: Target
    path: Path | None
    argv: list[str]
    notes: list[str]


def validate_config(config: Path | Sequence[Path]) -> list[Path]:
    """The config files' absolute paths, once they parse (merged) as ``start --all`` reads them."""
    from .core._config import load_agent_config, split_config_paths
    from .core._plugins import build_registry, get_plugin_manager

    # As `start` reads them: repeated, or comma-separated.
    configs = split_config_paths([config] if isinstance(config, (str, Path)) else list(config))
    if not configs:
        raise ServiceError("name the config file the service runs: --config FILE")
    paths = [Path(os.path.abspath(os.path.expanduser(c))) for c in configs]
    try:
        load_agent_config(paths, required=True, registry=build_registry(get_plugin_manager()))
    except ConfigError as exc:
        raise ServiceError(f"invalid config, nothing installed: {exc}") from None
    return paths


def _atomic_write(path: Path, data: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8", newline="\n") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)  # read by the init system; holds paths, no secrets
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def install(config: Path | Sequence[Path], *, root: Path | str | None = None, init: str | None = None,
            user: str | None = None, force: bool = False,
            program: Sequence[str] | None = None) -> Installed:
    """Validate ``config`` (one file, or several merged in order) and install the service for it.

    Raises :class:`ServiceError`; then nothing is left installed (a definition replaced with
    ``force`` is put back).
    """
    config_paths = validate_config(config)
    target = resolve_target(root, init)
    _require_privileges(target, "service install")
    if user is not None:
        _check_arg(user)
    argv = service_argv(list(program or program_argv()), config_paths)
    if target.init == "windows":
        from ._winservice import install_windows_service

        install_windows_service(argv, force=force)
        return Installed(target, None, argv, ["Windows service 'tunneld' installed (start type: automatic)"])
    path = target.definition
    previous = path.read_bytes() if path.exists() else None
    if previous is not None and not force:
        raise ServiceError(f"already installed at {path}: `tunneld service uninstall` first, or --force")
    text = _RENDER[target.init](argv, user=user)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _atomic_write(path, text)
    except OSError as exc:
        raise ServiceError(f"cannot write {path}: {exc.strerror or exc} (nothing installed)") from None
    try:
        notes = _activate(target)
    except ServiceError as exc:
        if previous is None:
            path.unlink(missing_ok=True)
        else:
            _atomic_write(path, previous.decode())
        if target.init == "systemd" and target.is_system:
            _run(["systemctl", "daemon-reload"], check=False)
        raise ServiceError(f"{exc}; {path} removed again, nothing installed") from None
    return Installed(target, path, argv, notes)


def _activate(target: Target) -> list[str]:
    """Make the init system pick up a new definition and start it at boot."""
    unit = f"{SERVICE_NAME}.service"
    if target.init == "systemd":
        if target.is_system:
            _run(["systemctl", "daemon-reload"])
            _run(["systemctl", "enable", unit])
            return [f"enabled {unit}: start it with `tunneld service start`"]
        if shutil.which("systemctl") is None:
            return [f"systemctl not found: enable {unit} in the target system yourself"]
        _run(["systemctl", f"--root={target.root}", "enable", unit])
        return [f"enabled {unit} under {target.root} (it starts when that system boots)"]
    if target.init == "upstart" and target.is_system:
        _run(["initctl", "reload-configuration"])
    return ["start it with `tunneld service start`" if target.is_system
            else f"written under {target.root} (it starts when that system boots)"]


# ---- start, stop, restart, status, uninstall --------------------------------------------------


ACTIONS = ("start", "stop", "restart", "status")


def _commands(init: str, action: str, definition: Path | None) -> list[tuple[list[str], bool]]:
    """The init system's commands for ``action``: (argv, must succeed)."""
    unit = f"{SERVICE_NAME}.service"
    job = f"system/{LAUNCHD_LABEL}"
    table: dict[str, dict[str, list[tuple[list[str], bool]]]] = {
        "systemd": {
            "start": [(["systemctl", "start", unit], True)],
            "stop": [(["systemctl", "stop", unit], True)],
            "restart": [(["systemctl", "restart", unit], True)],
            "status": [(["systemctl", "status", "--no-pager", unit], True)],
            "uninstall": [(["systemctl", "stop", unit], False), (["systemctl", "disable", unit], False)],
            "after-uninstall": [(["systemctl", "daemon-reload"], False),
                                (["systemctl", "reset-failed", unit], False)],
        },
        "upstart": {
            "start": [(["initctl", "start", SERVICE_NAME], True)],
            "stop": [(["initctl", "stop", SERVICE_NAME], True)],
            # `initctl restart` refuses a stopped job; stop-then-start works either way.
            "restart": [(["initctl", "stop", SERVICE_NAME], False),
                        (["initctl", "start", SERVICE_NAME], True)],
            "status": [(["initctl", "status", SERVICE_NAME], True)],
            "uninstall": [(["initctl", "stop", SERVICE_NAME], False)],
            "after-uninstall": [(["initctl", "reload-configuration"], False)],
        },
        "launchd": {
            # bootstrap loads the plist (fails harmlessly when loaded); kickstart runs it.
            "start": [(["launchctl", "bootstrap", "system", str(definition)], False),
                      (["launchctl", "kickstart", job], True)],
            "stop": [(["launchctl", "bootout", job], True)],
            "restart": [(["launchctl", "bootstrap", "system", str(definition)], False),
                        (["launchctl", "kickstart", "-k", job], True)],
            "status": [(["launchctl", "print", job], True)],
            "uninstall": [(["launchctl", "bootout", job], False)],
            "after-uninstall": [],
        },
    }
    return table[init][action]


def control(action: str, *, root: Path | str | None = None, init: str | None = None) -> int:
    """Run ``start``, ``stop``, ``restart`` or ``status``; the tool's exit status is returned.

    The tool's output goes straight to the terminal (``status`` is the tool's own report).
    """
    if action not in ACTIONS:
        raise ServiceError(f"unknown action {action!r}")
    target = resolve_target(root, init)
    if target.init == "windows":
        from ._winservice import control_windows_service

        return control_windows_service(action)
    if not target.definition.exists():
        raise ServiceError(f"the tunneld service is not installed ({target.definition} does not exist): "
                           "tunneld service install --config FILE")
    if not target.is_system:
        if action != "status":
            raise ServiceError(f"cannot {action} a service under --root {target.root}: only the running "
                               "system's services can run")
        print(f"installed: {target.definition}")
        if target.init == "systemd" and shutil.which("systemctl"):
            res = _run(["systemctl", f"--root={target.root}", "is-enabled", f"{SERVICE_NAME}.service"],
                       check=False)
            print(f"enabled: {(res.stdout or res.stderr).strip()}")
        return 0
    if action != "status":
        _require_privileges(target, f"service {action}")
    code = 0
    for argv, required in _commands(target.init, action, target.definition):
        res = _run(argv, check=required and action != "status", capture=action == "status")
        if action == "status":
            sys.stdout.write(res.stdout or "")
            sys.stderr.write(res.stderr or "")
        code = res.returncode
    return code


def uninstall(*, root: Path | str | None = None, init: str | None = None) -> Path | None:
    """Stop and disable the service, and remove its definition; returns the path removed."""
    target = resolve_target(root, init)
    _require_privileges(target, "service uninstall")
    if target.init == "windows":
        from ._winservice import uninstall_windows_service

        uninstall_windows_service()
        return None
    path = target.definition
    if not path.exists():
        raise ServiceError(f"the tunneld service is not installed ({path} does not exist)")
    if target.is_system:
        for argv, _required in _commands(target.init, "uninstall", path):
            _run(argv, check=False)
    elif target.init == "systemd" and shutil.which("systemctl"):
        _run(["systemctl", f"--root={target.root}", "disable", f"{SERVICE_NAME}.service"], check=False)
    try:
        path.unlink()
    except OSError as exc:
        raise ServiceError(f"cannot remove {path}: {exc.strerror or exc}") from None
    if target.is_system:
        for argv, _required in _commands(target.init, "after-uninstall", path):
            _run(argv, check=False)
    return path
