"""The one settings tree: every timeout, limit, backoff and path SkyShift uses.

Each field is documented where it is defined. Values come from the defaults below, overridden
by `$SKYSHIFT_HOME/config.yaml` (same nesting, e.g. ``api: {max_object_bytes: 65536}``) and
then by the environment variables named in ``ENV_OVERRIDES``.
"""
from __future__ import annotations

import dataclasses
import os
import pathlib
from typing import Any, Dict, Optional

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


@dataclasses.dataclass
class Settings:
    home: str = ""
    etcd: EtcdSettings = dataclasses.field(default_factory=EtcdSettings)
    api: ApiSettings = dataclasses.field(default_factory=ApiSettings)
    watch: WatchSettings = dataclasses.field(default_factory=WatchSettings)
    client: ClientSettings = dataclasses.field(default_factory=ClientSettings)

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
    def api_endpoint_file(self) -> pathlib.Path:
        return self.api_dir / "endpoint"

    @property
    def config_file(self) -> pathlib.Path:
        return self.home_path / CONFIG_FILE


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


def save_client_config(settings: Settings, endpoint: Optional[str] = None, token: Optional[str] = None) -> None:
    """Write the client part of config.yaml (mode 0600, since it may hold a token)."""
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
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        yaml.safe_dump(data, handle, sort_keys=False)
