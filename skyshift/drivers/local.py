"""The local driver: replicas are process groups on this machine (the default `local` cluster).

A replica runs as a small bash *wrapper* in a new session (so its own process group), in its
working directory ``$SKYSHIFT_HOME/clusters/<cluster>/replicas/<namespace>/<name>/``. The
wrapper runs the job's `setup`, then (if setup succeeded) its `run`, each as a script file in a
child bash, with stdout and stderr appended to ``.skyshift/output.log``. When they end it
records the exit code in ``.skyshift/exit_code`` (atomically) and kills what is left of its
process group, as a container's processes end with the container.

Liveness does not depend on pids: the driver takes an exclusive flock on ``.skyshift/lock``
*before* it starts the wrapper and hands the locked descriptor to it (the user's commands do
not inherit it). So the lock is held exactly while the wrapper lives, across skylet restarts,
and a second start of the same replica (from this or another driver instance) sees it is taken.
The wrapper's exit is watched with a pidfd, so watch_status() learns about it at once.

The user's commands and variables never pass through a shell's parser: scripts are files,
variables go through the process environment, and paths are built from validated names.
"""
from __future__ import annotations

import asyncio
import dataclasses
import fcntl
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from typing import AsyncIterator, Dict, List, Optional, Sequence, Set, Tuple

import structlog

from skyshift.api.errors import ConflictError, DeadlineError, InvalidError, PreconditionError, UnavailableError
from skyshift.config import Settings
from skyshift.drivers.base import (
    EXEC, LOGS, Endpoint, NodeResources, Phase, ReplicaState, Resources, phase_for_exit, replica_env,
    replica_resources,
)
from skyshift.drivers.records import RecordedDriver, ReplicaRecord, write_atomic
from skyshift.v1 import objects_pb2 as pb

log = structlog.get_logger(__name__)

MIB = 1024 * 1024
# Files in a replica's meta directory (.skyshift/).
SETUP_FILE = "setup.sh"
RUN_FILE = "run.sh"
LOG_FILE = "output.log"
LOCK_FILE = "lock"
PID_FILE = "pid"
EXIT_CODE_FILE = "exit_code"
STOPPED_FILE = "stopped"
LOST_MESSAGE = ("the replica's processes ended without recording an exit code "
                "(killed from outside SkyShift, or the machine restarted)")
STOPPED_MESSAGE = "stopped by SkyShift"
#: Vendor words dropped from GPU model names ("NVIDIA GeForce RTX 4090" -> "RTX4090").
GPU_VENDOR_WORDS = {"nvidia", "tesla", "geforce", "quadro"}
GPU_SERIES_WORDS = {"rtx", "gtx", "titan"}


# ---------------------------------------------------------------- pure helpers


def wrapper_script(lock_fd: int) -> str:
    """The bash program a replica runs as. `lock_fd` is the inherited descriptor of the held
    lock: the wrapper keeps it, the user's commands get it closed (``N>&-``).

    TERM is trapped so that the wrapper outlives a stop long enough to record the exit code of
    the command it was waiting for (bash runs the trap once that command has ended); the trap
    is reset in children, so the user's commands get TERM as usual."""
    close_lock = f"{int(lock_fd)}>&-"
    return f"""stopping=
trap 'stopping=1' TERM
printf '%s\\n' "$$" > .skyshift/{PID_FILE}
code=0
if [ -s .skyshift/{SETUP_FILE} ]; then
  bash .skyshift/{SETUP_FILE} {close_lock} < /dev/null || code=$?
fi
if [ "$code" -eq 0 ]; then
  if [ -n "$stopping" ]; then
    code=143
  else
    bash .skyshift/{RUN_FILE} {close_lock} < /dev/null || code=$?
  fi
fi
printf '%s\\n' "$code" > .skyshift/{EXIT_CODE_FILE}.tmp
mv -f .skyshift/{EXIT_CODE_FILE}.tmp .skyshift/{EXIT_CODE_FILE}
kill -KILL 0
"""


def parse_meminfo_mib(text: str) -> float:
    """MemTotal of /proc/meminfo, in MiB."""
    match = re.search(r"^MemTotal:\s+(\d+)\s*kB", text, re.MULTILINE)
    if not match:
        raise ValueError("no MemTotal line in /proc/meminfo")
    return float(int(match.group(1)) // 1024)


def accelerator_name(gpu_name: str) -> str:
    """A short resource name for a GPU model: "Tesla V100-SXM2-16GB" -> "V100"."""
    words = [word for word in gpu_name.split() if word.lower() not in GPU_VENDOR_WORDS]
    if not words:
        return "GPU"
    model = words[0].split("-")[0]
    if model.lower() in GPU_SERIES_WORDS and len(words) > 1:
        model += words[1].split("-")[0]
    return re.sub(r"[^A-Za-z0-9_.-]", "", model) or "GPU"


def gpu_resources(nvidia_smi_output: str) -> Resources:
    """Resources of `nvidia-smi --query-gpu=name --format=csv,noheader` output: the number of
    GPUs, and per model name how many."""
    names = [line.strip() for line in nvidia_smi_output.splitlines() if line.strip()]
    resources: Resources = {}
    if names:
        resources["gpus"] = float(len(names))
    for name in names:
        model = accelerator_name(name)
        resources[model] = resources.get(model, 0.0) + 1.0
    return resources


def process_env(replica_vars: Dict[str, str]) -> Dict[str, str]:
    """The environment of a replica's processes: this process's environment without SkyShift's
    own settings (which may hold a token), plus the replica's variables."""
    env = {name: value for name, value in os.environ.items() if not name.startswith("SKYSHIFT_")}
    env.update(replica_vars)
    return env


def signal_exit_code(signum: int) -> int:
    """The exit code a shell reports for a process killed by `signum`."""
    return 128 + signum


# ---------------------------------------------------------------- the driver


@dataclasses.dataclass
class LocalRecord(ReplicaRecord):
    #: The replica's own variables (job envs and SkyShift's), for exec after a restart.
    env: Dict[str, str] = dataclasses.field(default_factory=dict)


class LocalDriver(RecordedDriver):
    """Replicas as process groups on this machine. See the module docstring."""

    manager = "local"
    capabilities = frozenset({LOGS, EXEC})
    record_type = LocalRecord

    def __init__(self, cluster: pb.Cluster, settings: Settings):
        super().__init__(cluster, settings)
        self.node = socket.gethostname() or "local"
        self._capacity: Optional[NodeResources] = None
        #: Final states, which never change again (cached to skip file reads and lock probes).
        self._final: Dict[str, ReplicaState] = {}
        #: Wrappers this instance started (it must reap them).
        self._children: Dict[str, subprocess.Popen] = {}
        #: pidfd of each watched wrapper, and the polls of those that cannot be watched so.
        self._pidfds: Dict[str, int] = {}
        self._polls: Dict[str, asyncio.TimerHandle] = {}
        #: Replicas being stopped: stop() reports their end, with the exit code it decides.
        self._stopping: Set[str] = set()

    # -- resources

    async def capacity(self) -> NodeResources:
        if self._capacity is None:
            self.state_path.mkdir(parents=True, exist_ok=True)
            with open("/proc/meminfo") as meminfo:
                memory = parse_meminfo_mib(meminfo.read())
            resources: Resources = {
                "cpus": float(os.cpu_count() or 1),
                "memory": memory,
                "disk": float(shutil.disk_usage(self.state_path).total // MIB),
            }
            resources.update(await self._probe_gpus())
            self._capacity = {self.node: resources}
        return {node: dict(resources) for node, resources in self._capacity.items()}

    async def _probe_gpus(self) -> Resources:
        binary = shutil.which("nvidia-smi")
        if binary is None:
            return {}
        try:
            process = await asyncio.create_subprocess_exec(
                binary, "--query-gpu=name", "--format=csv,noheader",
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
            try:
                output, _ = await asyncio.wait_for(process.communicate(), self.settings.drivers.gpu_probe_timeout)
            except asyncio.TimeoutError:
                process.kill()
                await process.wait()
                raise
        except (OSError, asyncio.TimeoutError) as error:
            log.warning("gpu_probe_failed", cluster=self.cluster_name, error=repr(error))
            return {}
        if process.returncode != 0:
            log.warning("gpu_probe_failed", cluster=self.cluster_name, exit_code=process.returncode)
            return {}
        return gpu_resources(output.decode(errors="replace"))

    # -- starting

    def _launch(self, key: str, replica: pb.Replica, replica_ips: Optional[Sequence[str]]) -> None:
        variables = replica_env(replica, replica_ips)
        meta = self.files.create(key)
        lock_fd = os.open(meta / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            try:
                fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise ConflictError(f"replica {key} is being started by another driver instance") from None
            # Under the lock the record is authoritative: another instance may have started and
            # even finished this replica since start() read it.
            current = self.files.read(key, LocalRecord)
            if current is not None:
                if current.uid != replica.metadata.uid:
                    raise ConflictError(f"replica {key} was just started by another driver instance")
                self._records[key] = current
                self._track(key)
                return
            for leftover in (PID_FILE, EXIT_CODE_FILE, STOPPED_FILE):
                (meta / leftover).unlink(missing_ok=True)
            template = replica.spec.template
            write_atomic(meta / SETUP_FILE, template.setup.encode())
            write_atomic(meta / RUN_FILE, template.run.encode())
            record = LocalRecord(key=key, uid=replica.metadata.uid, node=self.node,
                                 resources=replica_resources(replica), ports=list(template.ports),
                                 start_time=time.time(), env=variables)
            self.files.write(record)
            self._children[key] = self._spawn(key, lock_fd, variables)
        finally:
            os.close(lock_fd)  # the wrapper holds its own copy of the lock now
        self._records[key] = record
        self._final.pop(key, None)
        log.info("replica_started", cluster=self.cluster_name, replica=key, pid=self._children[key].pid)
        self._publish(key, self._state(record))
        self._track(key)

    def _spawn(self, key: str, lock_fd: int, variables: Dict[str, str]) -> subprocess.Popen:
        log_fd = os.open(self.files.file(key, LOG_FILE), os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC,
                         0o600)
        try:
            return subprocess.Popen(
                ["bash", "-c", wrapper_script(lock_fd), "skyshift-replica"],
                cwd=self.files.replica_dir(key), env=process_env(variables), stdin=subprocess.DEVNULL,
                stdout=log_fd, stderr=subprocess.STDOUT, start_new_session=True, pass_fds=(lock_fd,))
        except OSError:
            self.files.remove(key)
            raise
        finally:
            os.close(log_fd)

    # -- observing

    def _state(self, record: ReplicaRecord) -> ReplicaState:
        final = self._final.get(record.key)
        if final is not None:
            return final
        finished = self._read_exit_code(record.key)
        if finished is None and self._lock_held(record.key):
            endpoints = tuple(Endpoint("127.0.0.1", port, record.node) for port in record.ports)
            return ReplicaState(Phase.RUNNING, start_time=record.start_time, node=record.node, endpoints=endpoints)
        if finished is None:
            finished = self._read_exit_code(record.key)  # it may have ended between the two looks
        if finished is None:
            return ReplicaState(Phase.FAILED, start_time=record.start_time, node=record.node, message=LOST_MESSAGE)
        exit_code, finish_time = finished
        stopped = self.files.file(record.key, STOPPED_FILE).exists()
        state = ReplicaState(phase_for_exit(exit_code), exit_code=exit_code, start_time=record.start_time,
                             finish_time=finish_time, node=record.node, message=STOPPED_MESSAGE if stopped else "")
        self._final[record.key] = state
        return state

    def _read_exit_code(self, key: str) -> Optional[Tuple[int, float]]:
        """(exit code, time it was recorded), or None while there is none."""
        path = self.files.file(key, EXIT_CODE_FILE)
        try:
            text = path.read_text()
            recorded = path.stat().st_mtime
        except FileNotFoundError:
            return None
        try:
            return int(text.strip()), recorded
        except ValueError:
            log.warning("replica_exit_code_unreadable", cluster=self.cluster_name, replica=key, content=text[:40])
            return None

    def _lock_held(self, key: str) -> bool:
        """Whether the replica's wrapper is alive (it holds the lock for as long as it lives)."""
        try:
            fd = os.open(self.files.file(key, LOCK_FILE), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return False
        try:
            # A shared probe: concurrent probes never make each other see "held".
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)
        return False

    def _wrapper_pid(self, key: str) -> Optional[int]:
        child = self._children.get(key)
        if child is not None:
            return child.pid
        try:
            return int(self.files.file(key, PID_FILE).read_text().strip())
        except (FileNotFoundError, ValueError):
            return None  # not written yet (the wrapper writes it first thing)

    def _track(self, key: str) -> None:
        if key in self._pidfds or key in self._polls or key not in self._records:
            return
        state = self._state(self._records[key])
        if state.finished:
            self._reap(key)
            if key not in self._stopping:
                self._publish(key, state)
            return
        loop = asyncio.get_running_loop()
        pid = self._wrapper_pid(key)
        pidfd = None
        if pid is not None:
            try:
                pidfd = os.pidfd_open(pid)
            except OSError:
                pidfd = None  # it just ended (checked again below), or pidfds are not available
        if pidfd is not None and not self._lock_held(key):
            # The wrapper ended before the pidfd was opened, so it may refer to another process.
            os.close(pidfd)
            loop.call_soon(self._track, key)
            return
        if pidfd is None:
            self._polls[key] = loop.call_later(self.settings.drivers.poll_interval, self._poll, key)
            return
        self._pidfds[key] = pidfd
        loop.add_reader(pidfd, self._on_wrapper_exit, key)

    def _poll(self, key: str) -> None:
        self._polls.pop(key, None)
        self._track(key)

    def _on_wrapper_exit(self, key: str) -> None:
        self._close_pidfd(key)
        self._track(key)

    def _reap(self, key: str) -> None:
        child = self._children.pop(key, None)
        if child is not None:
            child.poll()

    def _close_pidfd(self, key: str) -> None:
        pidfd = self._pidfds.pop(key, None)
        if pidfd is not None:
            asyncio.get_running_loop().remove_reader(pidfd)
            os.close(pidfd)

    def _untrack(self, key: str) -> None:
        self._close_pidfd(key)
        poll = self._polls.pop(key, None)
        if poll is not None:
            poll.cancel()
        self._final.pop(key, None)

    # -- stopping

    async def _stop_locked(self, key: str) -> None:
        if self._state(self._records[key]).finished:
            return
        settings = self.settings.drivers
        self._stopping.add(key)
        try:
            write_atomic(self.files.file(key, STOPPED_FILE), b"")
            pid = await self._await_pid(key)
            if pid is not None:
                signum = signal.SIGTERM
                _signal_group(pid, signum)
                if not await self._wait_ended(key, settings.stop_grace_period):
                    log.info("replica_kill", cluster=self.cluster_name, replica=key,
                             grace_period=settings.stop_grace_period)
                    signum = signal.SIGKILL
                    _signal_group(pid, signum)
                    if not await self._wait_ended(key, settings.kill_timeout):
                        raise UnavailableError(f"replica {key}: its processes survived SIGKILL for "
                                               f"{settings.kill_timeout}s")
                if self._read_exit_code(key) is None:
                    # The wrapper died before it could record one (killed, or TERM came too early).
                    write_atomic(self.files.file(key, EXIT_CODE_FILE), f"{signal_exit_code(signum)}\n".encode())
        finally:
            self._stopping.discard(key)
        self._reap(key)
        state = self._state(self._records[key])
        log.info("replica_stopped", cluster=self.cluster_name, replica=key, exit_code=state.exit_code)
        self._publish(key, state)

    async def _await_pid(self, key: str) -> Optional[int]:
        """The wrapper's pid (its process group id), or None once it has ended."""
        deadline = time.monotonic() + self.settings.drivers.pid_file_timeout
        while self._lock_held(key):
            pid = self._wrapper_pid(key)
            if pid is not None:
                return pid
            if time.monotonic() > deadline:
                raise UnavailableError(f"replica {key}: its wrapper recorded no pid within "
                                       f"{self.settings.drivers.pid_file_timeout}s")
            await asyncio.sleep(self.settings.drivers.stop_poll_interval)
        return None

    async def _wait_ended(self, key: str, timeout: float) -> bool:
        """Wait until the wrapper has ended (it kills the rest of its group before it exits)."""
        deadline = time.monotonic() + timeout
        while self._lock_held(key):
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(self.settings.drivers.stop_poll_interval)
        return True

    # -- looking inside

    async def logs(self, handle: str, follow: bool = False) -> AsyncIterator[bytes]:
        record = self._record(handle)
        settings = self.settings.drivers
        try:
            output = open(self.files.file(record.key, LOG_FILE), "rb")
        except FileNotFoundError:
            return  # removed meanwhile
        with output:
            while True:
                chunk = output.read(settings.log_chunk_bytes)
                if chunk:
                    yield chunk
                    continue
                if not follow:
                    return
                if not self._lock_held(record.key):
                    # Its writers are gone: what remains to read is all there will be.
                    while chunk := output.read(settings.log_chunk_bytes):
                        yield chunk
                    return
                await asyncio.sleep(settings.log_follow_interval)

    async def exec(self, handle: str, command: List[str]) -> Tuple[int, bytes]:
        record = self._record(handle)
        if not command or not all(isinstance(arg, str) and "\0" not in arg for arg in command):
            raise InvalidError("command", "must be a non-empty list of strings without NUL characters")
        if self._state(record).phase != Phase.RUNNING:
            raise PreconditionError(f"replica {handle} is not running")
        settings = self.settings.drivers
        try:
            process = await asyncio.create_subprocess_exec(
                *command, cwd=self.files.replica_dir(record.key), env=process_env(record.env),
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
        except FileNotFoundError:
            return 127, f"{command[0]}: command not found\n".encode()
        except PermissionError:
            return 126, f"{command[0]}: permission denied\n".encode()
        try:
            output = await asyncio.wait_for(_read_limited(process.stdout, settings.exec_max_output_bytes),
                                            settings.exec_timeout)
            exit_code = await asyncio.wait_for(process.wait(), settings.exec_timeout)
        except asyncio.TimeoutError:
            raise DeadlineError(f"exec in replica {handle} did not finish within {settings.exec_timeout}s") from None
        finally:
            if process.returncode is None:
                _signal_group(process.pid, signal.SIGKILL)
                await process.wait()
        if exit_code < 0:
            exit_code = signal_exit_code(-exit_code)
        return exit_code, output

    async def close(self) -> None:
        await super().close()
        self._children.clear()  # still running ones are reaped by subprocess's own clean-up


async def _read_limited(stream: asyncio.StreamReader, limit: int) -> bytes:
    """Everything from `stream`, keeping the first `limit` bytes."""
    kept = bytearray()
    dropped = 0
    while chunk := await stream.read(64 * 1024):
        room = limit - len(kept)
        kept += chunk[:room]
        dropped += max(0, len(chunk) - room)
    if dropped:
        kept += f"\n[output truncated: {dropped} more bytes]\n".encode()
    return bytes(kept)


def _signal_group(pgid: int, signum: int) -> None:
    try:
        os.killpg(pgid, signum)
    except ProcessLookupError:
        pass  # the whole group has ended already
