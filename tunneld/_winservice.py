"""The agent as a Windows service, through pywin32 (``pip install pywin32``).

Written to pywin32's documented API but not tested here (the test machines run Linux): see the
README.  The service is pywin32's ``pythonservice.exe`` hosting :class:`TunneldService`, which
runs the recorded ``tunneld start --all --config FILE`` as a child process, starts it again
10 s after it dies with an error, and reports to the Windows event log.  The child's own log
goes to ``%ProgramData%\\tunneld\\tunneld.log``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from ._service_names import SERVICE_NAME, ServiceError

DISPLAY_NAME = "tunneld agent"
#: Seconds between a child's failure and its restart.
RESTART_DELAY = 10
_OPTION = "argv"


def _pywin32() -> Any:
    try:
        import win32service
        import win32serviceutil
    except ImportError:
        raise ServiceError("Windows services need pywin32: python -m pip install pywin32") from None
    return win32serviceutil, win32service


def log_path() -> Path:
    return Path(os.environ.get("ProgramData", r"C:\ProgramData")) / "tunneld" / "tunneld.log"


def install_windows_service(argv: list[str], *, force: bool) -> None:
    """Register the service (automatic start) and the command it runs."""
    util, svc = _pywin32()
    argv = [a for a in argv]
    if "--log" in argv:  # a service has no stderr: log to a file instead
        argv[argv.index("--log") + 1] = str(log_path())
    log_path().parent.mkdir(parents=True, exist_ok=True)
    try:
        util.QueryServiceStatus(SERVICE_NAME)
        exists = True
    except Exception:  # noqa: BLE001 - pywintypes.error: not installed
        exists = False
    if exists and not force:
        raise ServiceError("the tunneld service is already installed: `tunneld service uninstall` first, "
                           "or --force")
    if exists:
        uninstall_windows_service()
    util.InstallService(f"{__name__}.TunneldService", SERVICE_NAME, DISPLAY_NAME,
                        startType=svc.SERVICE_AUTO_START,
                        description="tunneld start --all (self-hosted tunnels agent)")
    try:
        util.SetServiceCustomOption(SERVICE_NAME, _OPTION, json.dumps(argv))
        # The service manager restarts the host too, should it die (reset the count after 5 min).
        subprocess.run(["sc.exe", "failure", SERVICE_NAME, "reset=", "300",
                        "actions=", f"restart/{RESTART_DELAY * 1000}"], check=True, capture_output=True)
    except BaseException:
        util.RemoveService(SERVICE_NAME)
        raise


def control_windows_service(action: str) -> int:
    util, svc = _pywin32()
    if action == "start":
        util.StartService(SERVICE_NAME)
    elif action == "stop":
        util.StopService(SERVICE_NAME)
    elif action == "restart":
        util.RestartService(SERVICE_NAME)
    else:
        state = util.QueryServiceStatus(SERVICE_NAME)[1]
        names = {svc.SERVICE_RUNNING: "running", svc.SERVICE_STOPPED: "stopped",
                 svc.SERVICE_START_PENDING: "starting", svc.SERVICE_STOP_PENDING: "stopping"}
        print(f"tunneld service: {names.get(state, state)}")
        return 0 if state == svc.SERVICE_RUNNING else 3
    return 0


def uninstall_windows_service() -> None:
    util, _svc = _pywin32()
    try:
        util.StopService(SERVICE_NAME)
    except Exception:  # noqa: BLE001, S110 - not running
        pass
    util.RemoveService(SERVICE_NAME)


if sys.platform == "win32":  # pragma: no cover - Windows only
    import servicemanager
    import win32event
    import win32serviceutil

    class TunneldService(win32serviceutil.ServiceFramework):  # type: ignore[misc]
        _svc_name_ = SERVICE_NAME
        _svc_display_name_ = DISPLAY_NAME

        def __init__(self, args: Any) -> None:
            super().__init__(args)
            self.stop_event = win32event.CreateEvent(None, 0, 0, None)
            self.child: subprocess.Popen[bytes] | None = None

        def SvcStop(self) -> None:  # noqa: N802 - pywin32's names
            self.ReportServiceStatus(win32serviceutil.win32service.SERVICE_STOP_PENDING)
            win32event.SetEvent(self.stop_event)
            if self.child is not None and self.child.poll() is None:
                self.child.terminate()

        def SvcDoRun(self) -> None:  # noqa: N802
            argv = json.loads(win32serviceutil.GetServiceCustomOption(SERVICE_NAME, _OPTION))
            servicemanager.LogInfoMsg(f"tunneld: running {subprocess.list2cmdline(argv)}")
            while True:
                self.child = subprocess.Popen(argv, stdin=subprocess.DEVNULL)
                while self.child.poll() is None:
                    if win32event.WaitForSingleObject(self.stop_event, 1000) == win32event.WAIT_OBJECT_0:
                        self.child.wait(15)
                        return
                code = self.child.returncode
                if code == 0:  # a remote Stop: the service stops too
                    servicemanager.LogInfoMsg("tunneld: the agent exited (remote stop)")
                    return
                servicemanager.LogErrorMsg(f"tunneld: the agent exited with status {code}; "
                                           f"restarting in {RESTART_DELAY}s (log: {log_path()})")
                if win32event.WaitForSingleObject(self.stop_event, RESTART_DELAY * 1000) == \
                        win32event.WAIT_OBJECT_0:
                    return
