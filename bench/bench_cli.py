"""`skyctl get jobs` wall time, a fresh process each time.

    python -m bench.bench_cli [--repeat 10] [--jobs 20]

Runs `skyctl get jobs` (the console script installed next to this interpreter, else
`python -m skyctl.main`) with SKYSHIFT_API_SERVER pointing at the server and an empty
SKYSHIFT_HOME, against the bare interpreter (`python -c pass`) and an interpreter that only
imports grpc, measured in the same run, interleaved. Medians of `--repeat` runs each, after
one warm-up run of each (so the figure is a new process, not a cold disk cache).
Target: <= 300 ms.
"""
from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import tempfile
import time
from typing import Dict, List

from bench import common
from skyshift.client import AsyncClient


def skyctl_command() -> List[str]:
    # The console script next to this interpreter, not a PATH lookup (a pyenv shim on PATH
    # would add its own start-up time to the figure).
    installed = pathlib.Path(sys.executable).parent / "skyctl"
    if installed.exists():
        return [str(installed)]
    if not (common.REPO / "skyctl" / "main.py").exists():
        raise FileNotFoundError("skyctl is not installed and skyctl/main.py does not exist")
    return [sys.executable, "-m", "skyctl.main"]


def wall_time(command: List[str], env: Dict[str, str], expect: str = "") -> float:
    """Milliseconds for the command to run to completion; it must succeed (and print `expect`)."""
    started = time.perf_counter()
    completed = subprocess.run(command, env=env, cwd=common.REPO, capture_output=True, text=True,
                               stdin=subprocess.DEVNULL, timeout=60)
    elapsed = (time.perf_counter() - started) * 1000
    if completed.returncode != 0 or expect not in completed.stdout:
        raise RuntimeError(f"{' '.join(command)} failed (code {completed.returncode}):\n{completed.stdout}"
                           f"{completed.stderr}")
    return elapsed


async def run(args) -> List[common.Result]:
    skyctl = skyctl_command()
    with common.ControlPlane(args.etcd_no_fsync) as plane, tempfile.TemporaryDirectory() as home:
        common.say(plane.describe())
        async with AsyncClient(endpoint=plane.endpoint, settings=plane.settings) as client:
            await common.batch_create_all(client, [common.make_job(f"job-{i}", "default") for i in range(args.jobs)])
        env = {**os.environ, "SKYSHIFT_HOME": home, "SKYSHIFT_API_SERVER": plane.endpoint}
        commands = {
            "skyctl": (skyctl + ["get", "jobs"], "job-0"),
            "pass": ([sys.executable, "-c", "pass"], ""),
            "grpc": ([sys.executable, "-c", "import grpc"], ""),
        }
        times: Dict[str, List[float]] = {name: [] for name in commands}
        for name, (command, expect) in commands.items():
            wall_time(command, env, expect)  # warm-up
        for _ in range(args.repeat):
            for name, (command, expect) in commands.items():
                times[name].append(wall_time(command, env, expect))
        for name, values in times.items():
            common.say(f"{name}: " + ", ".join(f"{v:.0f}" for v in values) + " ms")
    skyctl_ms, pass_ms, grpc_ms = (common.median(times[name]) for name in ("skyctl", "pass", "grpc"))
    label = f"`{' '.join(os.path.basename(part) for part in skyctl)} get jobs` ({args.jobs} jobs), cold process"
    return [
        common.Result("cli", label, skyctl_ms, "ms", "`python -c pass`", pass_ms, "≤ 300 ms", skyctl_ms <= 300,
                      f"medians of {args.repeat} runs; {plane.etcd_mode}"),
        common.Result("cli", label, skyctl_ms, "ms", "`python -c \"import grpc\"`", grpc_ms, "", None),
    ]


def main() -> int:
    parser = common.parser(__doc__.splitlines()[0])
    parser.set_defaults(repeat=10)
    parser.add_argument("--jobs", type=int, default=20, help="jobs in the default namespace that skyctl lists")
    return common.main(run, parser.parse_args())


if __name__ == "__main__":
    raise SystemExit(main())
