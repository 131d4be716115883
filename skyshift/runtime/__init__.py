"""The controller runtime (DESIGN.md §4), shared by every controller and the scheduler.

* `informer`: Informer / InformerFactory — list + watch into a read-only local cache with
  secondary indexes and change handlers; re-lists and emits differences after compaction.
* `workqueue`: WorkQueue — de-duplicated keys, one worker per key at a time, per-key
  exponential backoff, a global token bucket, delayed adds.
* `controller`: Controller — the reconciler base: informers, a queue, N workers calling
  `reconcile(key)` once the caches have synced.
* `indexes`: the secondary indexes several controllers share (replicas by job, by cluster).
* conditions: re-exported from skyshift.api.conditions (pure status helpers the API server shares).
* `events`: EventRecorder — best-effort Event objects, repeats counted on one object.
* `leader`: LeaderElector — leader election on a Lease object through the API.

Settings: `skyshift.config.ControllerSettings` (`settings.controllers`).
"""
from skyshift.api.conditions import get_condition, is_true, observe_generation, set_condition
from skyshift.runtime.controller import Controller
from skyshift.runtime.events import EventRecorder
from skyshift.runtime.informer import Informer, InformerFactory, clone, key_of, object_key, split_key
from skyshift.runtime.leader import LeaderElector, default_identity
from skyshift.runtime.workqueue import WorkQueue

__all__ = [
    "Controller", "EventRecorder", "Informer", "InformerFactory", "LeaderElector", "WorkQueue",
    "clone", "default_identity", "get_condition", "is_true", "key_of", "object_key", "observe_generation",
    "set_condition", "split_key",
]
