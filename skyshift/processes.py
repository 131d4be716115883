"""Background processes SkyShift starts and finds again through pid files: the local API server
and controller manager (skyshift/localmode.py), and skylets (controllers/cluster.py).

A pid file alone is not proof: after a reboot or a crash the pid may belong to another program.
`running()` therefore also checks the process's command line for the arguments it was started
with, so a recycled pid is never mistaken for ours (and never signalled).
"""
from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import time
from typing import Dict, List, Optional, Sequence


def is_alive(pid: int) -> bool:
    """True while `pid` runs; a zombie counts as gone (and is reaped if it is our child)."""
    try:
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False
    except ChildProcessError:
        pass  # not our child
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        state = pathlib.Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        return True
    return state != "Z"


def command_line(pid: int) -> List[str]:
    """The argv of `pid`; empty when it cannot be read (gone, or no /proc)."""
    try:
        raw = pathlib.Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def matches(pid: int, expected: Sequence[str]) -> bool:
    """Whether `pid`'s argv contains every argument of `expected`, in order (as a subsequence)."""
    arguments = iter(command_line(pid))
    return all(any(argument == wanted for argument in arguments) for wanted in expected)


def read_pid(path: pathlib.Path) -> Optional[int]:
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        return None
    return int(text) if text.isdigit() else None


def write_pid(path: pathlib.Path, pid: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(str(pid))
    os.replace(temporary, path)


def running(pid_file: pathlib.Path, expected: Sequence[str]) -> Optional[int]:
    """The pid recorded in `pid_file` if that process is alive and was started with the
    arguments `expected` (see `matches`); else None."""
    pid = read_pid(pid_file)
    if pid is None or not is_alive(pid) or not matches(pid, expected):
        return None
    return pid


def spawn(command: Sequence[str], log_file: pathlib.Path, env: Optional[Dict[str, str]] = None,
          cwd: Optional[pathlib.Path] = None) -> subprocess.Popen:
    """Start `command` detached: its own session (a Ctrl+C or the death of its parent does not
    reach it), stdin from /dev/null, stdout and stderr appended to `log_file`."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, "ab") as log:
        return subprocess.Popen(list(command), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True, env=env, cwd=cwd)


def wait_exit(pid: int, timeout: float, poll_interval: float = 0.05) -> bool:
    """Wait up to `timeout` seconds for `pid` to end; True if it did."""
    deadline = time.monotonic() + timeout
    while is_alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(poll_interval)
    return True


def terminate(pid: int, timeout: float, poll_interval: float = 0.05) -> bool:
    """SIGTERM, then SIGKILL if `pid` has not ended after `timeout` seconds. True once it is gone."""
    for signum in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            return True
        if wait_exit(pid, timeout, poll_interval):
            return True
    return False
