"""Run the control-plane benchmarks in sequence and print a markdown table for BENCHMARKS.md.

    python -m bench.run_all [--only create,watch,list,cli] [--jobs-large 100000] [--etcd-no-fsync]

Each benchmark runs in its own process (its own etcd and API server) and its output is shown
as it runs; the table at the end lists every figure with its same-run baseline, the ratio, the
target and whether it was met, followed by the command that produced it.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
from typing import List

from bench import common

BENCHMARKS = ("create", "watch", "list", "cli")
VERDICT = {True: "PASS", False: "**FAIL**", None: "—"}


def run_benchmark(name: str, extra: List[str], results: str) -> List[dict]:
    """The benchmark's result rows (none if it did not finish)."""
    command = [sys.executable, "-m", f"bench.bench_{name}", "--results", results, *extra]
    common.say(f"\n=== {name}: {' '.join(command[1:])}")
    subprocess.run(command, cwd=common.REPO)
    if not os.path.exists(results):
        return []
    with open(results) as handle:
        return [json.loads(line) for line in handle]


def number(value: float, unit: str) -> str:
    text = f"{value:,.0f}" if abs(value) >= 100 else f"{value:,.1f}"
    return f"{text} {unit}".strip()


def table(rows: List[dict], failed: List[str]) -> str:
    lines = ["| Benchmark | Figure | Value | Baseline (same run) | Ratio | Target | Result |",
             "|---|---|---|---|---|---|---|"]
    for row in rows:
        result = common.Result(**row)
        lines.append(f"| {result.benchmark} | {result.figure} | {number(result.value, result.unit)} | "
                     f"{result.baseline}: {number(result.baseline_value, result.unit)} | {result.ratio:.2f}× | "
                     f"{result.target or '—'} | {VERDICT[result.passed]} |")
    for name in failed:
        lines.append(f"| {name} | benchmark did not finish (see its output) | | | | | **ERROR** |")
    details = [f"* {row['benchmark']}, {row['figure']}: {row['note']}" for row in rows if row["note"]]
    return "\n".join(lines + ["", "Details (per-repetition values, CPU per operation by process):", *details])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=",".join(BENCHMARKS),
                        help="comma-separated subset of " + ",".join(BENCHMARKS))
    parser.add_argument("--jobs-large", type=int, help="bench_list: jobs listed in pages (default 100000)")
    parser.add_argument("--etcd-no-fsync", action="store_true", help="run etcd with --unsafe-no-fsync")
    args = parser.parse_args()
    chosen = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = set(chosen) - set(BENCHMARKS)
    if unknown:
        parser.error(f"unknown benchmarks: {', '.join(sorted(unknown))}")
    common_args = ["--etcd-no-fsync"] if args.etcd_no_fsync else []
    extra = {name: list(common_args) for name in chosen}
    if args.jobs_large and "list" in extra:
        extra["list"] += ["--jobs-large", str(args.jobs_large)]

    started = datetime.datetime.now().astimezone()
    load = os.getloadavg()
    rows, failed = [], []
    with tempfile.TemporaryDirectory() as directory:
        for name in chosen:
            produced = run_benchmark(name, extra[name], os.path.join(directory, f"{name}.jsonl"))
            rows += produced
            if not produced:
                failed.append(name)
    command = "python -m bench.run_all" + "".join(f" {shlex.quote(a)}" for a in sys.argv[1:])
    print(f"\n### Control plane benchmarks, {started:%Y-%m-%d %H:%M %Z}\n")
    print(table(rows, failed))
    print(f"\nCommand: `{command}` (from the repository root). Machine: {os.cpu_count()} CPUs, "
          f"{platform.python_implementation()} {platform.python_version()}, load average at start "
          f"{load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}. etcd: one local member, "
          f"{'--unsafe-no-fsync' if args.etcd_no_fsync else 'default fsync (durable)'}; the API server and etcd "
          "run as separate processes from the benchmark clients.")
    return 1 if failed or any(row["passed"] is False for row in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
