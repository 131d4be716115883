"""The one settings tree: every timeout, limit, backoff and path SkyShift uses.

Each field is documented where it is defined. Values come from the defaults below, overridden
by `$SKYSHIFT_HOME/config.yaml` (same nesting, e.g. ``api: {max_object_bytes: 65536}``) and
then by the environment variables named in ``ENV_OVERRIDES``.
"""
from __future__ import annotations

import dataclasses
import os
import pathlib
from typing import Any, Dict, List, Optional

DEFAULT_HOME = "~/.skyshift"
CONFIG_FILE = "config.yaml"
#: Environment variables that override a setting: name -> (section, field).
ENV_OVERRIDES = {
    "SKYSHIFT_API_SERVER": ("client", "endpoint"),
    "SKYSHIFT_TOKEN": ("client", "token"),
}


@dataclasses.dataclass
class EtcdSettings:
    #: "host:port[,host:port...]" of an existing etcd; empty: start the embedded one.
    endpoints: str = ""
    #: Client port of the embedded etcd; 0 picks a free one and records it in etcd/endpoint.
    embedded_port: int = 0
    #: Seconds to wait for the embedded etcd to report healthy.
    embedded_start_timeout: float = 20.0
    #: Seconds one etcd request may take before it fails (and is retried if it is a read).
    request_timeout: float = 10.0
    #: Keys read per etcd range request when listing; keeps each response far below gRPC's limit.
    list_chunk: int = 2000
    #: Largest gRPC message accepted from etcd.
    max_receive_bytes: int = 256 * 1024 * 1024


@dataclasses.dataclass
class ApiSettings:
    #: "host:port" the API server listens on; port 0 picks a free one, recorded in api/endpoint.
    listen: str = "127.0.0.1:0"
    #: Largest serialized object accepted by Create/Update (etcd's own request limit is 1.5 MiB).
    max_object_bytes: int = 1024 * 1024
    #: Largest gRPC message the API server accepts or sends.
    max_message_bytes: int = 64 * 1024 * 1024
    #: Items in one List response when the request sets no limit; larger lists must paginate.
    max_list_items: int = 50_000
    #: Items in one BatchCreate/BatchUpdate request.
    max_batch_items: int = 1000
    #: Concurrent etcd writes one batch request issues.
    batch_concurrency: int = 64
    #: Revisions History returns when the request sets no limit.
    history_default_limit: int = 20
    #: Seconds the server waits for in-flight calls on shutdown.
    shutdown_grace: float = 5.0


@dataclasses.dataclass
class WatchSettings:
    #: Events each kind's watch cache keeps for watches that resume from a past revision.
    cache_events_per_kind: int = 20_000
    #: Events queued for one client stream; a client that falls further behind is cut off with
    #: UNAVAILABLE and resumes from its last revision (or re-lists if that is gone).
    client_queue_events: int = 2000
    #: Seconds between BOOKMARK events on watches that allow them.
    bookmark_interval: float = 5.0
    #: Seconds between etcd progress notifications requested by the watch cache.
    progress_interval: float = 1.0
    #: Backoff (seconds) between attempts to re-establish the cache's etcd watch.
    restart_backoff_initial: float = 0.1
    restart_backoff_max: float = 5.0


@dataclasses.dataclass
class ClientSettings:
    #: API server address; empty: read from $SKYSHIFT_HOME/api/endpoint (the local default).
    endpoint: str = ""
    #: Bearer token sent with every call.
    token: str = ""
    #: Seconds one unary call may take.
    call_timeout: float = 30.0
    #: Attempts for a call that failed with UNAVAILABLE (reads, and writes that are conditional).
    retry_attempts: int = 5
    #: Backoff between those attempts (seconds), doubled each time up to the max.
    retry_backoff_initial: float = 0.05
    retry_backoff_max: float = 2.0
    #: Page size the SDK uses when it lists everything.
    list_page_size: int = 5000
    #: Seconds to wait for a local control plane that skyctl started in the background.
    local_start_timeout: float = 30.0
    #: PEM file of the CA the API server's certificate is checked against; set: connect with TLS
    #: (a local server that made its own CA writes this; remote: `skyctl login --ca-file`).
    ca_file: str = ""
    #: Client certificate and key (PEM) for servers that require mutual TLS (tls.client_auth).
    cert_file: str = ""
    key_file: str = ""


@dataclasses.dataclass
class SkyctlSettings:
    #: Attempts `skyctl apply` makes when an object changes between its read and its update.
    apply_conflict_retries: int = 5
    #: Seconds `skyctl api stop` waits for the local API server to exit after SIGTERM; then SIGKILL.
    server_stop_timeout: float = 15.0
    #: Seconds between checks while `skyctl api start|stop` waits for the local API server.
    server_poll_interval: float = 0.05


@dataclasses.dataclass
class ControllerSettings:
    """The controller runtime (skyshift/runtime) and the controller manager (launch_manager.py)."""
    #: Seconds between informer resyncs, which hand every cached object to the controllers again
    #: so they re-check state that changes with time alone; 0 disables them.
    resync_period: float = 300.0
    #: Backoff (seconds) before an informer re-lists after an error, doubled up to the max.
    relist_backoff_initial: float = 0.1
    relist_backoff_max: float = 10.0
    #: Per-key backoff of a work queue after a failed reconcile: initial * 2**failures, capped.
    queue_backoff_initial: float = 0.005
    queue_backoff_max: float = 60.0
    #: Global token bucket of each work queue's rate-limited re-adds: keys per second and burst.
    queue_rate_limit: float = 50.0
    queue_rate_burst: int = 500
    #: Workers per controller, unless `workers` names the controller (e.g. {job: 8}).
    default_workers: int = 4
    workers: Dict[str, int] = dataclasses.field(default_factory=dict)
    #: Namespace and name of the Lease the controller managers elect their leader with.
    lease_namespace: str = "skyshift-system"
    lease_name: str = "skyshift-manager"
    #: Seconds a Lease is valid after its last renewal; a standby takes over once it passes.
    lease_duration: float = 4.0
    #: Seconds the leader keeps trying to renew before it stops acting. Must be below
    #: lease_duration, leaving time to stop the controllers before a standby may take over.
    renew_deadline: float = 3.0
    #: Seconds between renewals by the leader, and between attempts by a standby.
    retry_period: float = 0.5
    #: Seconds the manager waits for the API server at start-up (0: forever).
    api_wait_timeout: float = 60.0
    #: Seconds the manager gives its controllers to stop on shutdown.
    shutdown_grace: float = 5.0
    #: Events an EventRecorder buffers before it drops new ones (events are best effort).
    event_queue_size: int = 10_000
    #: Job controller: delay before replacing an exited replica, initial * 2**job restarts, capped.
    job_restart_backoff_initial: float = 1.0
    job_restart_backoff_max: float = 300.0
    #: Seconds between passes of the namespace controller over a namespace being deleted,
    #: while objects with finalizers in it are still finishing.
    namespace_cleanup_interval: float = 0.5
    #: Job controller: seconds before it looks again at a Replica bound to a cluster its cache
    #: does not show yet (is the cluster new, or gone?).
    job_cluster_recheck: float = 1.0

    def workers_for(self, controller: str) -> int:
        return self.workers.get(controller, self.default_workers)


@dataclasses.dataclass
class DriverSettings:
    """Drivers (skyshift/drivers): how they start, watch, stop and read replicas."""
    #: Seconds a stopped replica gets between SIGTERM and SIGKILL of its whole process group.
    stop_grace_period: float = 10.0
    #: Seconds to wait for a process group to die after SIGKILL before stop() gives up.
    kill_timeout: float = 5.0
    #: Seconds between checks while stop() waits for a replica's processes to end.
    stop_poll_interval: float = 0.02
    #: Seconds between status checks of a replica whose exit cannot be watched directly
    #: (no pidfd, or its pid not yet recorded).
    poll_interval: float = 1.0
    #: Seconds a replica's wrapper process may take to record its pid after it started.
    pid_file_timeout: float = 5.0
    #: Seconds between re-reads of a log file that `logs(follow=True)` has read to its end.
    log_follow_interval: float = 0.1
    #: Bytes of log read and sent per chunk.
    log_chunk_bytes: int = 64 * 1024
    #: Seconds an `exec` command may run before its process group is killed.
    exec_timeout: float = 300.0
    #: Bytes of an `exec` command's output kept; the rest is dropped and marked as truncated.
    exec_max_output_bytes: int = 16 * 1024 * 1024
    #: Seconds `nvidia-smi` may take to list the machine's GPUs.
    gpu_probe_timeout: float = 10.0


@dataclasses.dataclass
class SkyletSettings:
    """Skylets (skylet/), the cluster controller that supervises them (controllers/cluster.py),
    and the local control plane skyctl starts by itself (skyshift/localmode.py)."""
    #: "host:port" a skylet serves SkyletService (logs, exec) on for the API server; port 0 picks
    #: a free one, published in Cluster.status.agent_endpoint.
    listen: str = "127.0.0.1:0"
    #: Seconds between a skylet's heartbeats: Cluster status with phase, capacity and
    #: allocatable per node, heartbeat_time.
    heartbeat_interval: float = 2.0
    #: Seconds a skylet waits after a replica starts or finishes before an early heartbeat, so
    #: the allocatable it reports follows its replicas quickly; changes in this window share one.
    heartbeat_debounce: float = 0.2
    #: Seconds without a heartbeat after which the cluster controller marks a cluster NOT_READY.
    not_ready_grace: float = 10.0
    #: Seconds a cluster may stay NOT_READY before its unfinished replicas are EVICTED, so the
    #: job controller replaces them on other clusters.
    eviction_grace: float = 30.0
    #: Backoff (seconds) before the cluster controller restarts a skylet that exited:
    #: initial * 2**restarts, capped; reset once a skylet has run for restart_reset seconds.
    restart_backoff_initial: float = 0.5
    restart_backoff_max: float = 30.0
    restart_reset: float = 60.0
    #: Seconds between the cluster controller's checks that its skylets are alive and
    #: heartbeating, and between a skylet's full re-checks of its replicas through the driver
    #: (a safety net beside the driver's status stream).
    status_poll_interval: float = 1.0
    #: Seconds a probe of a new cluster (e.g. ssh connectivity and resources) may take.
    probe_timeout: float = 30.0
    #: Seconds a skylet goes on without reaching the API server before it exits, so skylets do
    #: not outlive their control plane. Its replicas keep running; the cluster controller starts
    #: a new skylet, which adopts them, once the API answers again.
    api_lost_timeout: float = 30.0
    #: Seconds the cluster controller waits for a skylet to exit after SIGTERM before SIGKILL; a
    #: stopping skylet gives its in-flight logs/exec calls half of it.
    stop_timeout: float = 10.0
    #: Seconds skyctl waits for the lock under which it starts the local control plane (another
    #: skyctl may be starting it at the same moment).
    local_lock_timeout: float = 60.0


@dataclasses.dataclass
class SchedulerSettings:
    """The scheduler (scheduler/): batching, score weights and retries of unschedulable replicas."""
    #: Pending replicas decided together and bound with one BatchUpdate (chunked by
    #: api.max_batch_items).
    batch_size: int = 500
    #: Batches in flight: one is decided while the previous ones are being written.
    parallel_batches: int = 2
    #: Weights of the scores (each 0-100): placement.preferences, spreading a job's replicas over
    #: clusters, and free capacity (LeastAllocated). 0 disables a score.
    weight_preferences: float = 3.0
    weight_spread: float = 2.0
    weight_least_allocated: float = 1.0
    #: Seconds after a change of clusters, policies or capacity before unschedulable replicas are
    #: tried again; changes within this window are handled by one retry.
    unschedulable_retry_delay: float = 0.2
    #: Seconds between retries of unschedulable replicas even when nothing seemed to change.
    unschedulable_retry_period: float = 60.0


@dataclasses.dataclass
class SSHSettings:
    """The ssh driver (skyshift/drivers/ssh.py): connections to a cluster's hosts."""
    #: Seconds to open a TCP connection to a host and to finish the SSH handshake and login.
    connect_timeout: float = 5.0
    #: Seconds one remote command (start, status, capacity...) may take; past it the host is
    #: treated as unreachable and every connection to it is closed. Stopping a replica adds the
    #: drivers' stop grace period and kill timeout to this.
    command_timeout: float = 15.0
    #: Seconds between SSH keepalive packets on idle pooled connections (0 disables them).
    keepalive_interval: float = 15.0
    #: Connections kept open per (host, user).
    pool_size: int = 4
    #: Channels (commands, log streams) one connection carries at once; OpenSSH allows 10 by
    #: default (MaxSessions).
    channels_per_connection: int = 8
    #: After a host failed, calls to it fail at once until this backoff (seconds) has passed;
    #: it doubles with each consecutive failure up to the max.
    retry_backoff_initial: float = 0.5
    retry_backoff_max: float = 30.0
    #: Threads per ssh driver running blocking SSH calls (log streams do not hold one).
    threads: int = 16
    #: Directory, relative to the remote user's home, holding the state of the replicas run
    #: there: <remote_dir>/<cluster>/<node>/<namespace>/<name>/.
    remote_dir: str = ".skyshift/replicas"


@dataclasses.dataclass
class GatewaySettings:
    """Service gateways (skyshift/gateway), run by skylets for their clusters, and the Link
    controller that probes them (controllers/link.py)."""
    #: Address of the gateway of the cluster named `local` (the default cluster). Every other
    #: cluster's gateway gets a stable address derived from its name in `address_network`, so the
    #: gateways of several clusters on one machine never share an address; the Cluster annotation
    #: gateway.skyshift.dev/address overrides both.
    local_address: str = "127.0.0.1"
    address_network: str = "127.128.0.0/9"
    #: Port of a gateway's mesh listener, which remote gateways reach over a Link; 0 picks a free
    #: one, published in the Cluster annotation gateway.skyshift.dev/mesh.
    mesh_port: int = 0
    #: Seconds to open a connection to an endpoint, or to a remote gateway including its handshake.
    connect_timeout: float = 2.0
    #: Endpoints a new connection tries (each failing one is taken out) before it is dropped.
    connect_attempts: int = 3
    #: Seconds between health probes of every endpoint (TCP connect, or HTTP GET of the Service's
    #: gateway.skyshift.dev/health-path annotation; remote ones through their own gateway).
    health_interval: float = 1.0
    #: Seconds one health probe may take.
    health_timeout: float = 1.0
    #: Consecutive failed health probes after which an endpoint is taken out of rotation (a failed
    #: connect takes it out at once); one successful probe puts it back.
    failure_threshold: int = 2
    #: Bytes read per call when copying a connection's data (and each stream's buffer limit).
    buffer_size: int = 256 * 1024
    #: Seconds a forwarded connection may carry no data in either direction before it is closed.
    idle_timeout: float = 900.0
    #: Seconds between attempts to bind a Service port that was in use.
    bind_retry_interval: float = 2.0
    #: Seconds between the Link controller's probes of the gateways a Link connects, and between
    #: its probes of a Link that failed (e.g. while the gateways learn about a new Link).
    link_probe_interval: float = 5.0
    link_retry_interval: float = 1.0


@dataclasses.dataclass
class AuthSettings:
    """Authentication and authorization in the API server (api_server/auth.py, rbac.py, gate.py).
    Off by default: every caller may do everything (local single-user mode). On
    (`launch_server.py --auth`): every call needs a bearer token of a User, and Roles bound by
    RoleBindings decide what it may do (default deny); audit, limits and quotas apply too."""
    enabled: bool = False
    #: The User created on first start, bound to the built-in admin Role; its token is written to
    #: this home's config.yaml (client.token, mode 0600).
    admin_user: str = "admin"
    #: The User the controller manager acts as; its token is written to $SKYSHIFT_HOME/manager/token.
    manager_user: str = "manager"
    #: Tokens kept per system User (manager, skylets): issuing one drops invalid and older ones.
    system_tokens_kept: int = 4
    #: Seconds a skylet token issued by the cluster controller stays valid (0: until revoked).
    skylet_token_ttl: float = 0.0
    #: Least seconds between two re-reads of Users (or Roles and RoleBindings) from etcd, made
    #: when a token is unknown (or a request denied) in case it was issued a moment ago.
    refresh_min_interval: float = 0.05


@dataclasses.dataclass
class TLSSettings:
    """TLS of the API server (api_server/tls.py)."""
    #: Serve TLS. With no cert_file, a CA and a server certificate are made under
    #: $SKYSHIFT_HOME/tls/ on first start and the CA is recorded as this home's client.ca_file.
    enabled: bool = False
    #: PEM certificate (chain) and key to serve instead of generated ones.
    cert_file: str = ""
    key_file: str = ""
    #: Require client certificates (mutual TLS) signed by client_ca_file (default: the generated CA).
    client_auth: bool = False
    client_ca_file: str = ""
    #: More host names or IP addresses for the generated server certificate (besides localhost,
    #: 127.0.0.1, ::1, this host's name and the listen address).
    hosts: List[str] = dataclasses.field(default_factory=list)
    #: Days the generated CA and server certificate are valid.
    ca_days: int = 3650
    cert_days: int = 365


@dataclasses.dataclass
class AuditSettings:
    """The audit log of writes and refused requests (api_server/audit.py), kept when auth is on."""
    enabled: bool = True
    #: The JSON-lines file; empty: $SKYSHIFT_HOME/audit/audit.log.
    path: str = ""
    #: Seconds between writes of buffered lines to the file, and lines that trigger one sooner.
    flush_interval: float = 0.2
    flush_lines: int = 1000
    #: Lines buffered at most while the disk lags; beyond, lines are dropped and their count logged
    #: (and written as an `audit_lines_dropped` record).
    max_pending_lines: int = 1_000_000


@dataclasses.dataclass
class LimitSettings:
    """Fairness between users (api_server/limits.py), enforced when auth is on."""
    enabled: bool = True
    #: Token bucket per user: requests per second, and the burst allowed above that rate (0: no
    #: limit). One Python API server serves a few thousand calls/s: a user's share stays well
    #: below that, so others keep theirs (bulk work uses BatchCreate/BatchUpdate: one call each).
    requests_per_second: float = 100.0
    request_burst: int = 200
    #: Unary requests one user may have in flight at once.
    max_in_flight: int = 64
    #: Seconds a request over the rate waits (its retry hint, capped here) before it is refused,
    #: counted in flight meanwhile: a client looping on refusals slows down instead of keeping
    #: the server busy refusing it.
    refusal_delay_max: float = 1.0
    #: Watch streams one user may have open at once.
    max_watches: int = 100
    #: Items one List may return for a user (its `limit` may not be larger; larger lists page).
    max_list_items: int = 10_000
    #: The manager and skylets are not limited (they act for every user).
    exempt_system: bool = True


@dataclasses.dataclass
class Settings:
    home: str = ""
    etcd: EtcdSettings = dataclasses.field(default_factory=EtcdSettings)
    api: ApiSettings = dataclasses.field(default_factory=ApiSettings)
    watch: WatchSettings = dataclasses.field(default_factory=WatchSettings)
    client: ClientSettings = dataclasses.field(default_factory=ClientSettings)
    controllers: ControllerSettings = dataclasses.field(default_factory=ControllerSettings)
    scheduler: SchedulerSettings = dataclasses.field(default_factory=SchedulerSettings)
    skyctl: SkyctlSettings = dataclasses.field(default_factory=SkyctlSettings)
    drivers: DriverSettings = dataclasses.field(default_factory=DriverSettings)
    ssh: SSHSettings = dataclasses.field(default_factory=SSHSettings)
    skylet: SkyletSettings = dataclasses.field(default_factory=SkyletSettings)
    gateway: GatewaySettings = dataclasses.field(default_factory=GatewaySettings)
    auth: AuthSettings = dataclasses.field(default_factory=AuthSettings)
    tls: TLSSettings = dataclasses.field(default_factory=TLSSettings)
    audit: AuditSettings = dataclasses.field(default_factory=AuditSettings)
    limits: LimitSettings = dataclasses.field(default_factory=LimitSettings)

    # Paths under $SKYSHIFT_HOME (DESIGN.md §6): nothing is written anywhere else.
    @property
    def home_path(self) -> pathlib.Path:
        return pathlib.Path(self.home)

    @property
    def etcd_dir(self) -> pathlib.Path:
        return self.home_path / "etcd"

    @property
    def api_dir(self) -> pathlib.Path:
        return self.home_path / "api"

    @property
    def log_dir(self) -> pathlib.Path:
        return self.home_path / "logs"

    @property
    def clusters_dir(self) -> pathlib.Path:
        """Per-cluster state of skylets and drivers: clusters/<cluster>/..."""
        return self.home_path / "clusters"

    @property
    def skylets_dir(self) -> pathlib.Path:
        """Pid files of the skylets the cluster controller supervises: skylets/<name>.pid."""
        return self.home_path / "skylets"

    @property
    def api_endpoint_file(self) -> pathlib.Path:
        return self.api_dir / "endpoint"

    @property
    def config_file(self) -> pathlib.Path:
        return self.home_path / CONFIG_FILE

    @property
    def tls_dir(self) -> pathlib.Path:
        """Generated CA and server certificate (api_server/tls.py)."""
        return self.home_path / "tls"

    @property
    def manager_token_file(self) -> pathlib.Path:
        """The controller manager's token, written by the API server when auth is on (0600)."""
        return self.home_path / "manager" / "token"

    @property
    def audit_log_file(self) -> pathlib.Path:
        return pathlib.Path(self.audit.path) if self.audit.path else self.home_path / "audit" / "audit.log"


def home_dir(env: Optional[Dict[str, str]] = None) -> pathlib.Path:
    env = os.environ if env is None else env
    return pathlib.Path(os.path.expanduser(env.get("SKYSHIFT_HOME") or DEFAULT_HOME))


def _apply(target: Any, values: Dict[str, Any], path: str) -> None:
    fields = {f.name: f for f in dataclasses.fields(target)}
    for key, value in values.items():
        if key not in fields:
            raise ValueError(f"{path}{key}: unknown setting")
        current = getattr(target, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ValueError(f"{path}{key}: expected a mapping")
            _apply(current, value, f"{path}{key}.")
        else:
            expected = type(current)
            if expected is float and isinstance(value, int):
                value = float(value)
            if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
                raise ValueError(f"{path}{key}: expected {expected.__name__}, got {value!r}")
            setattr(target, key, value)


def load(home: Optional[pathlib.Path] = None, env: Optional[Dict[str, str]] = None,
         overrides: Optional[Dict[str, Any]] = None) -> Settings:
    """Settings for the instance at `home` (default $SKYSHIFT_HOME): defaults, then the
    config file, then environment variables, then `overrides` (e.g. from command-line flags)."""
    env = os.environ if env is None else env
    home = pathlib.Path(home) if home is not None else home_dir(env)
    settings = Settings(home=str(home))
    config_file = settings.config_file
    if config_file.exists():
        import yaml  # only when a config file exists

        data = yaml.safe_load(config_file.read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{config_file}: expected a mapping at the top level")
        data.pop("home", None)
        _apply(settings, data, f"{config_file}: ")
    for variable, (section, field) in ENV_OVERRIDES.items():
        if env.get(variable):
            setattr(getattr(settings, section), field, env[variable])
    if overrides:
        _apply(settings, overrides, "")
    return settings


def save_client_config(settings: Settings, endpoint: Optional[str] = None, token: Optional[str] = None,
                       ca_file: Optional[str] = None) -> None:
    """Write the client part of config.yaml (mode 0600, since it may hold a token); None leaves
    a field as it is."""
    import yaml

    path = settings.config_file
    data: Dict[str, Any] = {}
    if path.exists():
        data = yaml.safe_load(path.read_text()) or {}
    client = data.setdefault("client", {})
    if endpoint is not None:
        client["endpoint"] = endpoint
    if token is not None:
        client["token"] = token
    if ca_file is not None:
        client["ca_file"] = ca_file
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)  # O_CREAT's mode applies only to a new file
    with os.fdopen(fd, "w") as handle:
        yaml.safe_dump(data, handle, sort_keys=False)
