"""The cluster controller (DESIGN.md §4): every Cluster gets a skylet, and a lost one loses its
replicas to other clusters.

* A new Cluster is validated (its driver must accept the spec) and, for managers whose machines
  may not answer (ssh), probed through the driver's capacity(); a failure marks it ERROR with the
  reason and is retried with backoff. The `local` cluster is created at start if absent.
* Its skylet (`python -m skylet --cluster NAME --server API --home HOME`) is started detached,
  its pid recorded in $SKYSHIFT_HOME/skylets/NAME.pid, and restarted with backoff whenever it
  exits. After a manager restart a skylet that still runs with the same arguments is adopted,
  not started twice; one that runs with other arguments (e.g. an old API address) is replaced.
  All `sim` clusters share one skylet (`--manager sim`, pid file `@sim.pid`).
* The skylet marks the cluster READY through its heartbeats. Without a heartbeat for
  `skylet.not_ready_grace` seconds the cluster becomes NOT_READY (condition Ready=Unknown);
  after `skylet.eviction_grace` seconds NOT_READY its unfinished replicas are marked EVICTED,
  so the job controller replaces them elsewhere. Replicas whose node stopped answering (phase
  UNKNOWN) are evicted after the same grace.
* Deleting a Cluster (finalizer `skyshift.dev/cluster`): DELETING, its replicas are deleted
  (their skylet stops them and releases them), then its skylet is stopped and the finalizer
  removed. When no skylet can act (cluster NOT_READY) the skylet finalizer of its deleted
  replicas is removed here; a skylet that comes back later stops what it finds orphaned.
"""
from __future__ import annotations

import asyncio
import dataclasses
import os
import pathlib
import subprocess
import sys
import time
from typing import Dict, List, Optional, Tuple

import structlog

from skyshift import config, processes, tokens
from skyshift.api.errors import AlreadyExistsError, NotFoundError, SkyShiftError
from skyshift.client import AsyncClient
from skyshift.drivers import get_driver
from skyshift.runtime import Controller, EventRecorder, InformerFactory, clone, key_of
from skyshift.api.conditions import FALSE, UNKNOWN, get_condition, now, set_condition
from skyshift.api.wellknown import SKYLET_FINALIZER
from skyshift.v1 import objects_pb2 as pb

log = structlog.get_logger(__name__)

FINALIZER = "skyshift.dev/cluster"
#: The finalizer skylets put on the replicas they run (skylet/agent.py).
LOCAL_CLUSTER = "local"
READY_CONDITION = "Ready"
SKYLET_CONDITION = "SkyletRunning"
#: Managers whose clusters are probed (connectivity and resources) before a skylet starts.
PROBED_MANAGERS = frozenset({"ssh"})
#: Managers whose clusters share one skylet process.
SHARED_MANAGERS = frozenset({"sim"})
TERMINAL_PHASES = frozenset({"SUCCEEDED", "FAILED", "EVICTED"})
#: Lines of a skylet's log quoted in the cluster's status when it keeps failing.
LOG_TAIL_LINES = 3


def seconds(stamp) -> float:
    return stamp.ToNanoseconds() / 1e9


def skylet_key(cluster: pb.Cluster) -> str:
    """Which skylet serves the cluster: its own, or its manager's shared one ("@sim" is no valid
    cluster name, so the two never collide)."""
    manager = cluster.spec.manager
    return f"@{manager}" if manager in SHARED_MANAGERS else cluster.metadata.name


@dataclasses.dataclass
class SkyletProcess:
    """One supervised skylet: how to start it and what became of the last start."""

    key: str
    serves: List[str]                            # ["--cluster", NAME] or ["--manager", MANAGER]
    server: str
    home: str
    pid_file: pathlib.Path
    log_file: pathlib.Path
    process: Optional[subprocess.Popen] = None   # started by this manager
    pid: Optional[int] = None                    # ours, or adopted from the pid file
    started_at: float = 0.0                      # monotonic; 0 while not running
    restarts: int = 0
    not_before: float = 0.0                      # monotonic time before which it is not restarted
    exit_code: Optional[int] = None

    @property
    def command(self) -> List[str]:
        return [sys.executable, *self.identity]

    @property
    def identity(self) -> List[str]:
        """The arguments that identify this skylet's process (see processes.matches)."""
        return ["-m", "skylet", *self.serves, "--server", self.server, "--home", self.home]

    @property
    def identity_any_server(self) -> List[str]:
        """The same skylet, whichever API address it was given."""
        return ["-m", "skylet", *self.serves, "--home", self.home]

    def alive(self) -> bool:
        if self.process is not None:
            if self.process.poll() is None:
                return True
            self.exit_code = self.process.returncode
            self.process = None
            self.pid = None
            return False
        if self.pid is not None and processes.is_alive(self.pid):
            return True
        self.pid = None
        return False

    def log_tail(self) -> str:
        try:
            lines = self.log_file.read_text(errors="replace").splitlines()
        except FileNotFoundError:
            return ""
        return " | ".join(line.strip() for line in lines[-LOG_TAIL_LINES:])


class ClusterController(Controller):
    name = "cluster"

    def __init__(self, client: AsyncClient, informers: Optional[InformerFactory] = None,
                 settings: Optional[config.Settings] = None, label_selector: str = ""):
        """`label_selector` limits the clusters this controller manages (default: all; the
        `local` cluster, which has no labels, is created only then)."""
        super().__init__(client, informers, settings)
        self.label_selector = label_selector
        self.clusters = self.informer("clusters", label_selector=label_selector)
        self.enqueue_on_change(self.clusters)
        self.replicas = self.informer("replicas")
        try:
            self.replicas.add_index("cluster", lambda r: [r.spec.cluster] if r.spec.cluster else [])
        except ValueError:
            pass  # made by another controller sharing the informer (the job controller's means the same)
        self.replicas.add_handler(self._replica_changed)
        self.events = EventRecorder(client, "cluster-controller", self.settings.controllers)
        self.skylets: Dict[str, SkyletProcess] = {}
        #: Cluster -> wall time this controller first saw it: a heartbeat missed while no
        #: manager watched counts from then, so a manager restart makes no cluster flap.
        self._watching_since: Dict[str, float] = {}
        #: Cluster -> generation whose probe succeeded; and failed probes, for their backoff.
        self._probed: Dict[str, int] = {}
        self._probe_failures: Dict[str, int] = {}
        #: Replica uid -> wall time it was first seen UNKNOWN (its node stopped answering).
        self._unknown_since: Dict[str, float] = {}

    # ------------------------------------------------------------------ events

    def _replica_changed(self, event_type: str, replica: pb.Replica, old: Optional[pb.Replica]) -> None:
        """Replicas matter to a cluster only while it is unhealthy or going away, or when their
        node stopped answering."""
        if event_type == "DELETED" or replica.status.phase != "UNKNOWN":
            self._unknown_since.pop(replica.metadata.uid, None)
        cluster = self.clusters.get(replica.spec.cluster) if replica.spec.cluster else None
        if cluster is None:
            return  # unbound, or not a cluster this controller manages
        if (event_type == "DELETED" or replica.status.phase == "UNKNOWN"
                or (old is not None and old.status.phase == "UNKNOWN")
                or cluster.metadata.HasField("deletion_timestamp") or cluster.status.phase == "NOT_READY"):
            self.queue.add(cluster.metadata.name)

    # ------------------------------------------------------------------ running

    async def run(self) -> None:
        await self._ensure_local_cluster()
        supervisor = asyncio.get_running_loop().create_task(self._supervise(), name="skylet-supervisor")
        try:
            await super().run()
        finally:
            supervisor.cancel()
            await asyncio.gather(supervisor, return_exceptions=True)
            await self.events.close()
            # Skylets keep running: the next manager adopts them through their pid files.

    async def _ensure_local_cluster(self) -> None:
        if self.label_selector:
            return
        cluster = pb.Cluster()
        cluster.metadata.name = LOCAL_CLUSTER
        cluster.spec.manager = "local"
        try:
            await self.client.create(cluster)
            log.info("local_cluster_created", cluster=LOCAL_CLUSTER)
        except AlreadyExistsError:
            pass

    async def _supervise(self) -> None:
        """Notice skylets that exited, so their clusters are reconciled (and they restarted)."""
        while True:
            await asyncio.sleep(self.settings.skylet.status_poll_interval)
            for skylet in list(self.skylets.values()):
                if skylet.started_at and not skylet.alive():
                    self._skylet_exited(skylet)

    def _skylet_exited(self, skylet: SkyletProcess) -> None:
        settings = self.settings.skylet
        ran_for = time.monotonic() - skylet.started_at
        skylet.started_at = 0.0
        if ran_for >= settings.restart_reset:
            skylet.restarts = 0
        delay = min(settings.restart_backoff_max, settings.restart_backoff_initial * 2 ** min(skylet.restarts, 62))
        skylet.restarts += 1
        skylet.not_before = time.monotonic() + delay
        log.warning("skylet_exited", skylet=skylet.key, exit_code=skylet.exit_code, ran_for=round(ran_for, 3),
                    restart_in=delay, log_file=str(skylet.log_file))
        for cluster in self._clusters_of(skylet.key):
            self.events.record(cluster, "Warning", "SkyletExited",
                               f"the skylet exited (code {skylet.exit_code}); restarting it in {delay:g}s")
            self.queue.add(cluster.metadata.name)  # whose reconcile restarts it once the delay is over

    def _clusters_of(self, skylet: str) -> List[pb.Cluster]:
        return [cluster for cluster in self.clusters.list() if skylet_key(cluster) == skylet]

    # ------------------------------------------------------------------ reconcile

    async def reconcile(self, key: str) -> Optional[float]:
        cluster = self.clusters.get(key)
        if cluster is None:
            for memory in (self._probed, self._probe_failures, self._watching_since):
                memory.pop(key, None)
            await self._stop_unneeded_skylets()
            return None
        if cluster.metadata.HasField("deletion_timestamp"):
            return await self._finalize(cluster)
        if FINALIZER not in cluster.metadata.finalizers:
            updated = clone(cluster)
            updated.metadata.finalizers.append(FINALIZER)
            cluster = await self.client.update(updated)
        problem = await self._check(cluster)
        if problem is not None:
            reason, message = problem
            await self._set_error(cluster, reason, message)
            if cluster.spec.manager not in SHARED_MANAGERS:
                await self._stop_skylet(skylet_key(cluster))
            if reason == "InvalidSpec":
                return None  # waits for a spec change
            failures = self._probe_failures[key] = self._probe_failures.get(key, 0) + 1
            settings = self.settings.skylet
            return min(settings.restart_backoff_max, settings.restart_backoff_initial * 2 ** min(failures, 62))
        self._probe_failures.pop(key, None)
        wait = await self._ensure_skylet(cluster)
        next_check = await self._check_liveness(cluster)
        return min((delay for delay in (wait, next_check) if delay is not None), default=None)

    async def _check(self, cluster: pb.Cluster) -> Optional[Tuple[str, str]]:
        """(reason, message) why the cluster cannot be used, or None. The driver validates the
        spec; clusters of PROBED_MANAGERS must also answer with some capacity."""
        name, generation = cluster.metadata.name, cluster.metadata.generation
        if self._probed.get(name) == generation:
            return None
        try:
            driver = get_driver(cluster.spec.manager, cluster, self.settings)
        except SkyShiftError as error:
            return "InvalidSpec", error.message
        if cluster.spec.manager in PROBED_MANAGERS:
            try:
                capacity = await asyncio.wait_for(driver.capacity(), self.settings.skylet.probe_timeout)
            except (SkyShiftError, OSError, asyncio.TimeoutError) as error:
                return "ProbeFailed", getattr(error, "message", None) or str(error) or type(error).__name__
            finally:
                await driver.close()
            if not capacity:
                return "ProbeFailed", "no node of the cluster answers"
            log.info("cluster_probed", cluster=name, nodes=sorted(capacity))
        else:
            await driver.close()
        self._probed[name] = generation
        return None

    async def _set_error(self, cluster: pb.Cluster, reason: str, message: str) -> None:
        updated = clone(cluster)
        updated.status.phase = "ERROR"
        updated.status.message = message
        set_condition(updated.status.conditions, READY_CONDITION, FALSE, reason, message,
                      cluster.metadata.generation)
        if updated.status != cluster.status:
            await self.client.update_status(updated)
            log.warning("cluster_error", cluster=cluster.metadata.name, reason=reason, message=message)
            self.events.record(cluster, "Warning", reason, message)

    # ------------------------------------------------------------------ skylets

    async def _skylet_for(self, cluster: pb.Cluster) -> SkyletProcess:
        key = skylet_key(cluster)
        skylet = self.skylets.get(key)
        if skylet is None:
            serves = ["--manager", cluster.spec.manager] if key.startswith("@") else ["--cluster", key]
            skylet = SkyletProcess(key, serves, self.client.endpoint, str(self.settings.home_path),
                                   self.settings.skylets_dir / f"{key}.pid", self.settings.log_dir / f"skylet-{key}.log")
            self.skylets[key] = skylet
            await self._adopt_or_replace(skylet)
        return skylet

    async def _adopt_or_replace(self, skylet: SkyletProcess) -> None:
        """Find a skylet a previous manager started: adopt it if it runs with our arguments."""
        pid = processes.read_pid(skylet.pid_file)
        if pid is None or not processes.is_alive(pid):
            return
        if processes.matches(pid, skylet.identity):
            skylet.pid = pid
            skylet.started_at = time.monotonic()
            log.info("skylet_adopted", skylet=skylet.key, pid=pid)
        elif processes.matches(pid, skylet.identity_any_server):
            # The same skylet, talking to another API address (the server moved): replace it.
            log.info("skylet_replaced", skylet=skylet.key, pid=pid)
            await asyncio.to_thread(processes.terminate, pid, self.settings.skylet.stop_timeout)

    async def _ensure_skylet(self, cluster: pb.Cluster) -> Optional[float]:
        """Start the cluster's skylet unless it runs; seconds until a restart is allowed, if not yet."""
        skylet = await self._skylet_for(cluster)
        if skylet.alive():
            return None
        if skylet.started_at:  # died since the supervisor last looked
            self._skylet_exited(skylet)
        wait = skylet.not_before - time.monotonic()
        if wait > 0:
            if skylet.restarts >= 3 and cluster.status.phase in ("", "INIT", "ERROR"):
                await self._set_error(cluster, "SkyletFailing",
                                      f"the skylet exited {skylet.restarts} times (last code {skylet.exit_code}); "
                                      f"{skylet.log_tail()}")
            return wait
        skylet.process = processes.spawn(skylet.command, skylet.log_file, env=await self._skylet_environment(skylet))
        skylet.pid = skylet.process.pid
        skylet.started_at = time.monotonic()
        processes.write_pid(skylet.pid_file, skylet.pid)
        log.info("skylet_started", skylet=skylet.key, pid=skylet.pid, restarts=skylet.restarts)
        return None

    async def _skylet_environment(self, skylet: SkyletProcess) -> Optional[Dict[str, str]]:
        """With authentication on (this manager has a token), a cluster's own skylet gets a token
        of its skylet User (skyshift/tokens.py) in SKYSHIFT_TOKEN, so it acts with a skylet's rights
        only; a shared skylet (sim) serves many clusters and acts with the manager's token."""
        if not self.settings.client.token or skylet.key.startswith("@"):
            return None
        auth = self.settings.auth
        secret = await tokens.issue_token(self.client, tokens.skylet_user(skylet.key), auth.skylet_token_ttl,
                                          auth.system_tokens_kept)
        return dict(os.environ, SKYSHIFT_TOKEN=secret)

    async def _stop_skylet(self, key: str) -> None:
        skylet = self.skylets.pop(key, None)
        pid = skylet.pid if skylet is not None and skylet.alive() else None
        if pid is None:
            pid = processes.running(self.settings.skylets_dir / f"{key}.pid", ["-m", "skylet"])
        if pid is not None:
            log.info("skylet_stopping", skylet=key, pid=pid)
            await asyncio.to_thread(processes.terminate, pid, self.settings.skylet.stop_timeout)
        (self.settings.skylets_dir / f"{key}.pid").unlink(missing_ok=True)

    async def _stop_unneeded_skylets(self) -> None:
        """Stop shared skylets whose last cluster is gone."""
        wanted = {skylet_key(cluster) for cluster in self.clusters.list()}
        for key in [key for key in self.skylets if key not in wanted]:
            await self._stop_skylet(key)

    # ------------------------------------------------------------------ liveness and eviction

    async def _check_liveness(self, cluster: pb.Cluster) -> Optional[float]:
        """NOT_READY after a missing heartbeat, evictions after the grace; returns seconds until
        the next deadline worth a look."""
        settings = self.settings.skylet
        wall_now = time.time()
        deadlines = [await self._evict_unknown_replicas(cluster, wall_now)]
        status = cluster.status
        watching_since = self._watching_since.setdefault(cluster.metadata.name, wall_now)
        if status.phase == "READY" and status.HasField("heartbeat_time"):
            silent = wall_now - max(seconds(status.heartbeat_time), watching_since)
            if silent <= settings.not_ready_grace:
                deadlines.append(settings.not_ready_grace - silent + 0.01)
            else:
                updated = clone(cluster)
                updated.status.phase = "NOT_READY"
                updated.status.message = f"no heartbeat from the skylet for {silent:.0f}s"
                set_condition(updated.status.conditions, READY_CONDITION, UNKNOWN, "HeartbeatMissing",
                              updated.status.message, cluster.metadata.generation)
                cluster = await self.client.update_status(updated)
                log.warning("cluster_not_ready", cluster=cluster.metadata.name, silent_for=round(silent, 1))
                self.events.record(cluster, "Warning", "NotReady", updated.status.message)
        if cluster.status.phase == "NOT_READY":
            await self._release_deleted_replicas(cluster)
            condition = get_condition(cluster.status.conditions, READY_CONDITION)
            since = seconds(condition.last_transition_time) if condition is not None else wall_now
            remaining = since + settings.eviction_grace - wall_now
            if remaining > 0:
                deadlines.append(remaining + 0.01)
            else:
                await self._evict(cluster, [r for r in self.replicas.by_index("cluster", cluster.metadata.name)],
                                  f"cluster {cluster.metadata.name} not ready for over {settings.eviction_grace:g}s")
        return min((d for d in deadlines if d is not None), default=None)

    async def _evict_unknown_replicas(self, cluster: pb.Cluster, wall_now: float) -> Optional[float]:
        """Evict the replicas whose node has not answered for the grace; seconds until the next is due."""
        grace = self.settings.skylet.eviction_grace
        due, next_due = [], None
        for replica in self.replicas.by_index("cluster", cluster.metadata.name):
            if replica.status.phase != "UNKNOWN":
                continue
            since = self._unknown_since.setdefault(replica.metadata.uid, wall_now)
            remaining = since + grace - wall_now
            if remaining <= 0:
                due.append(replica)
            else:
                next_due = remaining if next_due is None else min(next_due, remaining)
        if due:
            await self._evict(cluster, due, f"its node stopped answering for over {grace:g}s")
        return next_due + 0.01 if next_due is not None else None

    async def _evict(self, cluster: pb.Cluster, replicas: List[pb.Replica], reason: str) -> None:
        evicted = []
        for replica in replicas:
            if replica.status.phase in TERMINAL_PHASES or replica.metadata.HasField("deletion_timestamp"):
                continue
            updated = clone(replica)
            updated.status.phase = "EVICTED"
            updated.status.message = f"evicted: {reason}"
            updated.status.finish_time.CopyFrom(now())
            try:
                await self.client.update_status(updated)
            except NotFoundError:
                continue
            self._unknown_since.pop(replica.metadata.uid, None)
            evicted.append(replica.metadata.name)
            self.events.record(replica, "Warning", "Evicted", updated.status.message)
        if evicted:
            log.warning("replicas_evicted", cluster=cluster.metadata.name, replicas=evicted, reason=reason)

    async def _release_deleted_replicas(self, cluster: pb.Cluster) -> None:
        """Remove the skylet finalizer of deleted replicas whose skylet cannot act."""
        for replica in self.replicas.by_index("cluster", cluster.metadata.name):
            if replica.metadata.HasField("deletion_timestamp") and SKYLET_FINALIZER in replica.metadata.finalizers:
                updated = clone(replica)
                updated.metadata.finalizers.remove(SKYLET_FINALIZER)
                try:
                    await self.client.update(updated)
                except NotFoundError:
                    continue
                log.info("replica_released", cluster=cluster.metadata.name,
                         replica=key_of(replica.metadata.namespace, replica.metadata.name))

    # ------------------------------------------------------------------ deletion

    async def _finalize(self, cluster: pb.Cluster) -> Optional[float]:
        name = cluster.metadata.name
        if cluster.status.phase != "DELETING":
            updated = clone(cluster)
            updated.status.phase = "DELETING"
            updated.status.message = "stopping its replicas"
            set_condition(updated.status.conditions, READY_CONDITION, FALSE, "Deleting", "the cluster is being deleted",
                          cluster.metadata.generation)
            cluster = await self.client.update_status(updated)
        bound = self.replicas.by_index("cluster", name)
        for replica in bound:
            if not replica.metadata.HasField("deletion_timestamp"):
                try:
                    await self.client.delete("replicas", replica.metadata.name, replica.metadata.namespace,
                                             uid=replica.metadata.uid)
                except NotFoundError:
                    pass
        if bound and not self._skylet_can_act(cluster):
            await self._release_deleted_replicas(cluster)
        if bound:
            return self.settings.skylet.status_poll_interval  # replica events usually come sooner
        if cluster.spec.manager not in SHARED_MANAGERS or not any(
                other.spec.manager == cluster.spec.manager and other.metadata.name != name
                for other in self.clusters.list()):
            await self._stop_skylet(skylet_key(cluster))
        if FINALIZER in cluster.metadata.finalizers:
            released = clone(cluster)
            released.metadata.finalizers.remove(FINALIZER)
            await self.client.update(released)
        self._probed.pop(name, None)
        log.info("cluster_finalized", cluster=name)
        return None

    def _skylet_can_act(self, cluster: pb.Cluster) -> bool:
        """Whether the cluster's skylet runs and heartbeats recently enough to stop replicas."""
        skylet = self.skylets.get(skylet_key(cluster))
        if skylet is None or not skylet.alive() or not cluster.status.HasField("heartbeat_time"):
            return False
        return time.time() - seconds(cluster.status.heartbeat_time) <= self.settings.skylet.not_ready_grace
