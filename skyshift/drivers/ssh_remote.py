"""What the ssh driver runs on a host: small bash programs, and the parsers of their output.

Every program runs as ``bash -c PROGRAM skyshift-ssh ARG...``: the program text and each
argument are shell-quoted once by `command()`, so names, paths and values arrive as literal
arguments and are only ever expanded inside double quotes. The remote account's login shell
must be POSIX (sh, bash, dash...), which parses that one line.

A replica's files on a host mirror the local driver's layout (skyshift/drivers/local.py)::

    <base>/<namespace>/<name>/             its working directory
    <base>/<namespace>/<name>/.skyshift/   state.json, setup.sh, run.sh, env.sh, output.log,
                                           lock, pid, exit_code, stopped

with ``<base> = ~/<ssh.remote_dir>/<cluster>/<node>`` in the home of the account the replica
runs as. The replica runs under the local driver's wrapper (`local.wrapper_script`), which
holds an exclusive flock on ``lock`` for as long as it lives: liveness never depends on pids,
and a second start of the same replica sees the lock taken.
"""
from __future__ import annotations

import dataclasses
import io
import shlex
import tarfile
import time
from typing import Dict, List, Optional

from skyshift.drivers.base import Resources
from skyshift.drivers.local import (
    EXIT_CODE_FILE, LOCK_FILE, LOG_FILE, PID_FILE, RUN_FILE, SETUP_FILE, STOPPED_FILE, gpu_resources,
    parse_meminfo_mib,
)
from skyshift.drivers.records import META_DIR, RECORD_FILE

ENV_FILE = "env.sh"
#: The wrapper inherits the start program's lock on this descriptor.
LOCK_FD = 9
#: Exit code of a program asked about a replica that has no state on the host.
NOT_FOUND_EXIT = 44
MIB = 1024 * 1024

# Shared by the programs: `base` made absolute (relative paths are under the account's home).
_PRELUDE = """set -u
base=$1; shift
case "$base" in /*) ;; *) base=$HOME/$base ;; esac
"""

#: args: base key wrapper; stdin: a tar of the replica's files (see `start_payload`).
#: Prints STARTED, or BUSY / EXISTS followed by the state.json found.
START = _PRELUDE + f"""key=$1; wrapper=$2
dir=$base/$key; meta=$dir/{META_DIR}
# Private to the account: other users on the host see nothing of its replicas.
(umask 077 && mkdir -p "$meta") && chmod 700 "$base" || exit 1
exec {LOCK_FD}>>"$meta/{LOCK_FILE}"
if ! flock -n {LOCK_FD}; then
  printf 'BUSY\\n'; cat "$meta/{RECORD_FILE}" 2>/dev/null; exit 0
fi
if [ -f "$meta/{RECORD_FILE}" ]; then
  printf 'EXISTS\\n'; cat "$meta/{RECORD_FILE}"; exit 0
fi
rm -f "$meta/{PID_FILE}" "$meta/{EXIT_CODE_FILE}" "$meta/{STOPPED_FILE}"
tar -x -f - -C "$meta" || exit 1
mv -f "$meta/{RECORD_FILE}.new" "$meta/{RECORD_FILE}" || exit 1
cd "$dir" || exit 1
( . "./{META_DIR}/{ENV_FILE}" && exec setsid bash -c "$wrapper" skyshift-replica ) \\
  < /dev/null >> "./{META_DIR}/{LOG_FILE}" 2>&1 &
printf 'STARTED\\n'
"""

#: args: base [key...] (none: every replica under base). One line per replica:
#: R <key> <exit code|-> <finish time|-> <alive 0|1> <stopped 0|1> <state.json>, or M <key>
#: for a key without state.
STATUS = _PRELUDE + f"""report() {{
  meta=$base/$1/{META_DIR}
  if [ ! -f "$meta/{RECORD_FILE}" ]; then printf 'M\\t%s\\n' "$1"; return; fi
  alive=0
  code=$(cat "$meta/{EXIT_CODE_FILE}" 2>/dev/null)
  if [ -z "$code" ]; then
    if flock -n -s "$meta/{LOCK_FILE}" true; then
      code=$(cat "$meta/{EXIT_CODE_FILE}" 2>/dev/null)  # it may have ended between the two looks
    else
      alive=1
    fi
  fi
  finish=-
  if [ -n "$code" ]; then finish=$(stat -c %.9Y "$meta/{EXIT_CODE_FILE}"); fi
  stopped=0
  if [ -e "$meta/{STOPPED_FILE}" ]; then stopped=1; fi
  printf 'R\\t%s\\t%s\\t%s\\t%s\\t%s\\t' "$1" "${{code:--}}" "$finish" "$alive" "$stopped"
  tr -d '\\n' < "$meta/{RECORD_FILE}"; printf '\\n'
}}
if [ $# -gt 0 ]; then
  for key in "$@"; do report "$key"; done
else
  for record in "$base"/*/*/{META_DIR}/{RECORD_FILE}; do
    [ -f "$record" ] || continue
    key=${{record#"$base"/}}
    report "${{key%/{META_DIR}/{RECORD_FILE}}}"
  done
fi
"""

#: args: base key pid_polls grace kill_timeout interval. Prints GONE, FINISHED, STOPPED (after
#: TERM) or KILLED (after KILL); exits 3 if no pid appeared, 4 if the group survived KILL.
#: Waiting for the end is waiting for the wrapper's lock (flock -w), so it takes no polling.
STOP = _PRELUDE + f"""key=$1; pid_polls=$2; grace=$3; kill_timeout=$4; interval=$5
meta=$base/$key/{META_DIR}
[ -f "$meta/{RECORD_FILE}" ] || {{ printf 'GONE\\n'; exit 0; }}
[ -f "$meta/{EXIT_CODE_FILE}" ] && {{ printf 'FINISHED\\n'; exit 0; }}
held() {{ ! flock -n -s "$meta/{LOCK_FILE}" true; }}
wait_ended() {{ flock -w "$1" -s "$meta/{LOCK_FILE}" true; }}
: > "$meta/{STOPPED_FILE}"
pid=
n=$pid_polls
while held; do
  pid=$(cat "$meta/{PID_FILE}" 2>/dev/null)
  [ -n "$pid" ] && break
  [ "$n" -le 0 ] && exit 3
  n=$((n - 1)); sleep "$interval"
done
[ -n "$pid" ] || {{ printf 'STOPPED\\n'; exit 0; }}  # the wrapper ended by itself meanwhile
result=STOPPED; code=143
kill -TERM -- "-$pid" 2>/dev/null
if ! wait_ended "$grace"; then
  result=KILLED; code=137
  kill -KILL -- "-$pid" 2>/dev/null
  wait_ended "$kill_timeout" || exit 4
fi
if [ ! -f "$meta/{EXIT_CODE_FILE}" ]; then
  # The wrapper died before it could record one (killed, or TERM came too early).
  printf '%s\\n' "$code" > "$meta/{EXIT_CODE_FILE}.tmp" && mv -f "$meta/{EXIT_CODE_FILE}.tmp" "$meta/{EXIT_CODE_FILE}"
fi
printf '%s\\n' "$result"
"""

#: args: base key. Deletes the replica's directory (and its namespace directory once empty).
REMOVE = _PRELUDE + """key=$1
rm -rf -- "$base/$key"
rmdir -- "$base/${key%/*}" 2>/dev/null
exit 0
"""

#: args: base key follow(0|1) interval. The replica's output; with follow, until the replica has
#: ended. The end is the wrapper's lock coming free (a helper waits for it), not the wrapper's pid:
#: a dead wrapper stays a zombie until init reaps it, which some inits do late.
LOGS = _PRELUDE + f"""key=$1; follow=$2; interval=$3
meta=$base/$key/{META_DIR}
[ -f "$meta/{RECORD_FILE}" ] || exit {NOT_FOUND_EXIT}
log=$meta/{LOG_FILE}
: >> "$log"
[ "$follow" = 1 ] || exec cat -- "$log"
flock -s "$meta/{LOCK_FILE}" true &
ended=$!
tail -c +1 -s "$interval" -f --pid="$ended" -- "$log" &
tailing=$!
wait "$ended"  # reaped here at once, so tail sees it gone, reads what remains and exits
wait "$tailing"
"""

#: args: base key timeout command... Runs the command (argv, no shell) in the replica's working
#: directory with its variables; killed after `timeout` seconds.
EXEC = _PRELUDE + f"""key=$1; timeout=$2; shift 2
dir=$base/$key
[ -f "$dir/{META_DIR}/{RECORD_FILE}" ] || exit {NOT_FOUND_EXIT}
cd "$dir" && . "./{META_DIR}/{ENV_FILE}" || exit 1
exec timeout -s KILL "$timeout" "$@" < /dev/null
"""

#: args: gpu_timeout. Lines "cpus N", "disk_kib N", the MemTotal line, "gpu NAME" per GPU.
CAPACITY = """set -u
printf 'cpus\\t%s\\n' "$(nproc)"
printf 'disk_kib\\t%s\\n' "$(df -Pk "$HOME" | awk 'NR == 2 {print $2}')"
grep '^MemTotal:' /proc/meminfo
if command -v nvidia-smi > /dev/null 2>&1; then
  timeout "$1" nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | sed 's/^/gpu\\t/'
fi
exit 0
"""


def command(program: str, *args: object) -> str:
    """The command line that runs `program` with `args`, each quoted for the remote shell."""
    return " ".join(["bash", "-c", shlex.quote(program), "skyshift-ssh"] + [shlex.quote(str(arg)) for arg in args])


def polls(seconds: float, interval: float) -> int:
    """How many waits of `interval` cover `seconds`."""
    return max(1, int(-(-seconds // interval)))


def env_script(variables: Dict[str, str]) -> str:
    """A file bash sources to export `variables` (names already validated by replica_env)."""
    return "".join(f"export {name}={shlex.quote(value)}\n" for name, value in sorted(variables.items()))


def start_payload(setup: str, run: str, variables: Dict[str, str], record_json: bytes) -> bytes:
    """The tar that START unpacks into a replica's meta directory."""
    files = {SETUP_FILE: setup.encode(), RUN_FILE: run.encode(), ENV_FILE: env_script(variables).encode(),
             f"{RECORD_FILE}.new": record_json}
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.GNU_FORMAT) as archive:
        now = time.time()
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o600
            info.mtime = int(now)
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


@dataclasses.dataclass(frozen=True)
class RemoteStatus:
    """One replica as STATUS reported it."""

    key: str
    exit_code: Optional[int]
    finish_time: Optional[float]
    alive: bool
    stopped: bool
    record_json: str


def parse_status(output: str) -> List[RemoteStatus]:
    """STATUS output, without the keys it reported missing (see `missing_keys`)."""
    found = []
    for line in output.splitlines():
        fields = line.split("\t", 6)
        if fields[0] != "R" or len(fields) != 7:
            continue
        _, key, code, finish, alive, stopped, record_json = fields
        exit_code: Optional[int]
        try:
            exit_code = None if code == "-" else int(code.strip())
        except ValueError:
            exit_code = None  # unreadable: treated like none, as the local driver does
        found.append(RemoteStatus(key=key, exit_code=exit_code,
                                  finish_time=None if finish == "-" or exit_code is None else float(finish),
                                  alive=alive == "1", stopped=stopped == "1", record_json=record_json))
    return found


def missing_keys(output: str) -> List[str]:
    return [line.split("\t", 1)[1] for line in output.splitlines() if line.startswith("M\t")]


def parse_capacity(output: str) -> Resources:
    """CAPACITY output as resources: cpus, memory (MiB), disk (MiB), GPUs by model."""
    resources: Resources = {}
    gpus: List[str] = []
    for line in output.splitlines():
        name, _, value = line.partition("\t")
        if name == "cpus":
            resources["cpus"] = float(int(value))
        elif name == "disk_kib" and value.strip():
            resources["disk"] = float(int(value) // 1024)
        elif name == "gpu":
            gpus.append(value)
    resources["memory"] = parse_meminfo_mib(output)
    resources.update(gpu_resources("\n".join(gpus)))
    if "cpus" not in resources:
        raise ValueError("the host reported no cpu count")
    return resources
