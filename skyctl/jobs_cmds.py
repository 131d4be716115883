"""skyctl commands that follow jobs while they run: `logs`, `exec`, and `create job --wait`.

    skyctl logs JOB [--replica N] [-f] [-n NS]
    skyctl exec JOB [--replica N] [-n NS] -- CMD...
    skyctl create job NAME --run CMD --wait

Output comes from the skylets that run the replicas, relayed by the API server. When a job has
several replicas, every line of `logs` starts with `[replica-name] `.

Only click is imported at start-up (see skyctl/main.py); the commands import the SDK.
"""
from __future__ import annotations

import itertools
import queue
import sys
import threading
from typing import Dict, Iterable, List, Optional

import click

from skyshift.api.wellknown import JOB_LABEL

#: Label the job controller puts on every Replica of a Job.
#: Replica phases in which a replica has (had) processes, so it has output.
STARTED_PHASES = ("RUNNING", "SUCCEEDED", "FAILED", "UNKNOWN")
FINISHED_JOB_PHASES = ("COMPLETED", "FAILED")
SPINNER = "⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏"
#: Seconds between spinner frames.
SPINNER_INTERVAL = 0.1
#: Exit code of a command interrupted by Ctrl+C (128 + SIGINT), as shells report it.
INTERRUPTED = 130

replica_option = click.option(
    "--replica", "-r", "replica", default=None, metavar="N|NAME",
    help="Only this replica: its rank (0, 1...) or its name (default: every replica).")
namespace_option = click.option("-n", "--namespace", default=None, metavar="NS",
                                help="Namespace of the job (default: default).")


# ---------------------------------------------------------------------------- choosing replicas

def current_replicas(client, job: str, namespace: Optional[str]) -> List:
    """The job's replicas that are not being replaced, by rank (the latest attempt of each)."""
    listed = client.list_all("replicas", namespace or "default", label_selector=f"{JOB_LABEL}={job}").items
    by_rank: Dict[int, object] = {}
    for replica in sorted(listed, key=lambda r: (r.metadata.creation_timestamp.ToNanoseconds(), r.metadata.name)):
        if not replica.metadata.HasField("deletion_timestamp") or replica.spec.rank not in by_rank:
            by_rank[replica.spec.rank] = replica
    return [by_rank[rank] for rank in sorted(by_rank)]


def resolve_replica(client, job: str, namespace: Optional[str], which: str) -> str:
    """The name of the replica `which` names: a rank of the job, or a replica name."""
    from skyshift.api.errors import NotFoundError

    if not which.isdigit():
        return which
    client.get("jobs", job, namespace)  # a clear NOT_FOUND for a job that does not exist
    for replica in current_replicas(client, job, namespace):
        if replica.spec.rank == int(which):
            return replica.metadata.name
    raise NotFoundError(f'job "{job}" has no replica of rank {which} (yet)')


# ---------------------------------------------------------------------------- printing logs

class LogPrinter:
    """Writes log chunks to stdout: raw bytes for one replica, or whole lines each prefixed with
    `[replica-name] ` when several replicas' output interleaves."""

    def __init__(self, prefixed: bool, out=None):
        self.prefixed = prefixed
        self.out = out or sys.stdout.buffer
        self._partial: Dict[str, bytes] = {}

    def write(self, replica: str, data: bytes) -> None:
        if not self.prefixed:
            self.out.write(data)
        else:
            lines = (self._partial.pop(replica, b"") + data).split(b"\n")
            if lines[-1]:
                self._partial[replica] = lines[-1]
            prefix = f"[{replica}] ".encode()
            self.out.write(b"".join(prefix + line + b"\n" for line in lines[:-1]))
        self.out.flush()

    def finish(self) -> None:
        """Print what is left of unterminated last lines."""
        for replica, rest in self._partial.items():
            self.out.write(f"[{replica}] ".encode() + rest + b"\n")
        self._partial.clear()
        self.out.flush()


def stream_logs(client, job: str, namespace: Optional[str], replica: str, follow: bool, prefixed: bool) -> List[str]:
    """Print the output of the job's replicas (or one); returns the replicas that had output."""
    printer = LogPrinter(prefixed)
    seen: Dict[str, None] = {}
    try:
        for chunk in client.logs(job=job, namespace=namespace, replica=replica, follow=follow):
            seen.setdefault(chunk.replica)
            printer.write(chunk.replica, chunk.data)
    finally:
        printer.finish()
    return list(seen)


@click.command("logs")
@click.argument("job")
@replica_option
@click.option("--follow", "-f", is_flag=True, help="Keep printing new output until the replicas finish.")
@namespace_option
@click.pass_obj
def logs(session, job: str, replica: Optional[str], follow: bool, namespace: Optional[str]) -> None:
    """Print the output of a job's replicas (also after they finished).

    With several replicas, each line starts with [replica-name].

    \b
    Examples:
      skyctl logs train              # every replica
      skyctl logs train --replica 0  # the replica of rank 0
      skyctl logs train -f           # until the replicas finish
    """
    client = session.client
    name = resolve_replica(client, job, namespace, replica) if replica else ""
    prefixed = not name and len(current_replicas(client, job, namespace)) > 1
    try:
        stream_logs(client, job, namespace, name, follow, prefixed)
    except KeyboardInterrupt:
        raise click.exceptions.Exit(INTERRUPTED) from None


# ---------------------------------------------------------------------------- exec

@click.command("exec", context_settings={"ignore_unknown_options": True})
@click.argument("job")
@replica_option
@namespace_option
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
@click.pass_obj
def exec_command(session, job: str, replica: Optional[str], namespace: Optional[str], command) -> None:
    """Run a command beside a running replica of a job, where its cluster can; prints its output
    and exits with its exit code.

    \b
    Examples:
      skyctl exec train -- nvidia-smi
      skyctl exec train --replica 1 -- cat /etc/hostname
    """
    args = list(command)
    if not args:
        raise click.UsageError("give the command after --, e.g. skyctl exec JOB -- ls")
    client = session.client
    name = resolve_replica(client, job, namespace, replica or "0")
    result = client.exec(name, args, namespace=namespace)
    sys.stdout.buffer.write(result.output)
    sys.stdout.buffer.flush()
    raise click.exceptions.Exit(result.exit_code)


# ---------------------------------------------------------------------------- create job --wait

wait_option = click.option(
    "--wait", "-w", is_flag=True,
    help="Show progress, then the output, and exit with the job's exit status (without "
         "--restart-policy the job then runs once: Never). Ctrl+C leaves the job running.")


def wait_defaults(flags: Dict) -> None:
    """A job waited for must end: its restart policy defaults to Never, and Always is refused."""
    policy = (flags.get("restart_policy") or "").lower()
    if not policy:
        flags["restart_policy"] = "Never"
    elif policy == "always":
        raise click.BadParameter("a job with restart policy Always never ends, so --wait cannot wait for it",
                                 param_hint="'--restart-policy'")


class JobTracker:
    """The latest state of one job and its replicas, kept current by two watch streams read in
    background threads; the caller waits for changes with `wait()`."""

    def __init__(self, client, job):
        self.client = client
        self.job = job
        self.name, self.namespace = job.metadata.name, job.metadata.namespace
        self.replicas: Dict[str, object] = {}
        self.deleted = False
        self._changes: "queue.Queue[Optional[BaseException]]" = queue.Queue()
        for target in (self._follow_job, self._follow_replicas):
            threading.Thread(target=self._guarded, args=(target,), daemon=True).start()

    def _guarded(self, follow) -> None:
        try:
            follow()
        except Exception as error:  # handed to the waiting thread
            self._changes.put(error)

    def _follow_job(self) -> None:
        for event in self.client.watch("jobs", self.namespace, name=self.name,
                                       resource_version=self.job.metadata.resource_version):
            if event.object is None:
                continue
            self.job, self.deleted = event.object, event.type == "DELETED"
            self._changes.put(None)

    def _follow_replicas(self) -> None:
        for event in self.client.list_watch("replicas", self.namespace, label_selector=f"{JOB_LABEL}={self.name}"):
            if event.object is None:
                continue
            if event.type == "DELETED":
                self.replicas.pop(event.object.metadata.name, None)
            else:
                self.replicas[event.object.metadata.name] = event.object
            self._changes.put(None)

    def wait(self, timeout: float) -> None:
        """Return after a change or `timeout` seconds; raises what a watch thread failed with."""
        try:
            error = self._changes.get(timeout=timeout)
        except queue.Empty:
            return
        if error is not None:
            raise error

    # -- what the state means

    @property
    def finished(self) -> bool:
        return self.deleted or self.job.status.phase in FINISHED_JOB_PHASES

    def current(self) -> List:
        live = [r for r in self.replicas.values() if not r.metadata.HasField("deletion_timestamp")]
        return sorted(live, key=lambda r: (r.spec.rank, r.metadata.name))

    def all_started(self) -> bool:
        wanted = self.job.spec.replicas or 1
        started = [r for r in self.current() if r.status.phase in STARTED_PHASES]
        return len({r.spec.rank for r in started}) >= wanted

    @property
    def phase(self) -> str:
        return "DELETED" if self.deleted else (self.job.status.phase or "PENDING")

    def summary(self) -> str:
        wanted = self.job.spec.replicas or 1
        counts: Dict[str, int] = {}
        for replica in self.current():
            phase = replica.status.phase or "PENDING"
            counts[phase] = counts.get(phase, 0) + 1
        detail = ", ".join(f"{count} {phase.lower()}" for phase, count in sorted(counts.items()))
        return f"job {self.name}: {self.phase} ({wanted} replica{'s' if wanted != 1 else ''}{': ' + detail if detail else ''})"

    def exit_code(self) -> int:
        """0 for a completed job; else the exit code of the replica that failed first (the one
        that failed the job), or 1 when no replica has one (e.g. they were evicted)."""
        if self.job.status.phase == "COMPLETED":
            return 0
        failed = sorted((r for r in self.replicas.values() if r.status.phase == "FAILED" and r.status.exit_code),
                        key=lambda r: (r.status.finish_time.ToNanoseconds(), r.spec.rank))
        return failed[0].status.exit_code if failed else 1


class Progress:
    """On stderr: a spinner with the job's state when it is a terminal, otherwise one line
    whenever the job's phase changes."""

    def __init__(self) -> None:
        self.tty = sys.stderr.isatty()
        self._frames = itertools.cycle(SPINNER)
        self._phase = ""
        self._shown = False

    def show(self, phase: str, text: str) -> None:
        if self.tty:
            click.echo(f"\r\033[K{next(self._frames)} {text}", nl=False, err=True)
            self._shown = True
        elif phase != self._phase:
            click.echo(text, err=True)
        self._phase = phase

    def clear(self) -> None:
        if self.tty and self._shown:
            click.echo("\r\033[K", nl=False, err=True)
            self._shown = False


def _until(tracker: JobTracker, progress: Progress, done) -> None:
    while not done():
        progress.show(tracker.phase, tracker.summary())
        tracker.wait(SPINNER_INTERVAL)
    progress.clear()


def wait_for_job(session, job) -> None:
    """Follow a job just created: progress until its replicas run, their output, then exit with
    the job's exit status. Ctrl+C leaves the job running and says how to follow or cancel it."""
    client = session.client
    tracker = JobTracker(client, job)
    progress = Progress()
    streamed: Dict[str, None] = {}
    try:
        # Output is followed once every replica runs, so theirs interleaves as it is written.
        _until(tracker, progress, lambda: tracker.finished or tracker.all_started())
        while True:
            if tracker.deleted:
                raise click.ClickException(f"job {tracker.name} was deleted")
            fresh = _unstreamed(tracker, streamed)
            if fresh:
                _print_output(client, tracker, fresh, streamed)
            elif tracker.finished:
                break
            # Until the job ends, or restarts replicas whose output is still to show.
            _until(tracker, progress, lambda: tracker.finished or _unstreamed(tracker, streamed))
        click.echo(tracker.summary(), err=True)
    except KeyboardInterrupt:
        progress.clear()
        namespace = "" if job.metadata.namespace in ("", "default") else f" -n {job.metadata.namespace}"
        click.echo(f"\njob {job.metadata.name} keeps running.\n"
                   f"  follow it:  skyctl logs {job.metadata.name} -f{namespace}\n"
                   f"  cancel it:  skyctl delete job {job.metadata.name}{namespace}", err=True)
        raise click.exceptions.Exit(INTERRUPTED) from None
    raise click.exceptions.Exit(tracker.exit_code())


def _unstreamed(tracker: JobTracker, streamed: Dict[str, None]) -> List[str]:
    return [r.metadata.name for r in tracker.current()
            if r.status.phase in STARTED_PHASES and r.metadata.name not in streamed]


def _print_output(client, tracker: JobTracker, names: Iterable[str], streamed: Dict[str, None]) -> None:
    """Follow the output of the started replicas `names` (all of the job's at once the first
    time, so it interleaves as it is written) until they end."""
    names = list(names)
    prefixed = (tracker.job.spec.replicas or 1) > 1 or bool(streamed)
    whole_job = not streamed and len(names) >= (tracker.job.spec.replicas or 1)
    for name in names:
        streamed.setdefault(name)
    targets = [""] if whole_job else names
    for replica in targets:
        stream_logs(client, tracker.name, tracker.namespace, replica, follow=True, prefixed=prefixed)
