"""Malformed requests get the right status code and a message naming the field, and none of
them writes anything (the store's revision and the listings are unchanged)."""
import base64
import dataclasses
import json
from typing import Callable

import grpc
import pytest

from skyshift.api import convert, kinds
from skyshift.api.errors import InvalidError, LimitError, NotFoundError
from skyshift.v1 import api_pb2, api_pb2_grpc
from skyshift.v1 import objects_pb2 as pb
from tests.integration.api_helpers import new_job, store_revision

INVALID, NOT_FOUND, ABORTED, EXHAUSTED = (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
                                          grpc.StatusCode.ABORTED, grpc.StatusCode.RESOURCE_EXHAUSTED)
METHODS = {name: api_pb2.DESCRIPTOR.services_by_name["ObjectService"].methods_by_name[name]
           for name in ("Create", "Get", "List", "Update", "UpdateStatus", "Delete", "Watch", "History",
                        "BatchCreate", "BatchUpdate", "Logs", "Exec")}


@dataclasses.dataclass
class Context:
    namespace: str
    current: pb.Job     # a job as stored now
    stale: pb.Job       # the same job as read before its last update
    max_bytes: int


@pytest.fixture
def stub(api_server):
    channel = grpc.insecure_channel(api_server.endpoint)
    yield api_pb2_grpc.ObjectServiceStub(channel)
    channel.close()


@pytest.fixture
def context(client, namespace, api_server):
    stale = client.create(new_job("existing", namespace, labels={"app": "x"}))
    newer = pb.Job()
    newer.CopyFrom(stale)
    newer.spec.run = "second version"
    return Context(namespace, client.update(newer), stale, api_server.settings.api.max_object_bytes)


def job(ctx: Context, name="new", namespace=None, **spec) -> pb.Job:
    return convert.from_manifest({"kind": "Job", "metadata": {"name": name, "namespace": ctx.namespace
                                                              if namespace is None else namespace},
                                  "spec": {"run": "true", **spec}})


def create(obj, namespace="") -> api_pb2.CreateRequest:
    return api_pb2.CreateRequest(namespace=namespace, object=pb.Object(**{_field(obj): obj}))


def update(obj, namespace="") -> api_pb2.UpdateRequest:
    return api_pb2.UpdateRequest(namespace=namespace, object=pb.Object(**{_field(obj): obj}))


def _field(obj) -> str:
    return kinds.kind_of(obj).field


def changed(obj, mutate: Callable) -> pb.Job:
    copy = type(obj)()
    copy.CopyFrom(obj)
    mutate(copy)
    return copy


def cluster(namespace="") -> pb.Cluster:
    obj = pb.Cluster()
    obj.metadata.name, obj.metadata.namespace = "c-bad", namespace
    obj.spec.manager = "local"
    return obj


def with_unknown_field(obj: pb.Job) -> pb.Job:
    """The job with a field number this server does not know inside spec (a newer client's)."""
    obj.spec.MergeFromString(b"\xf8\x06\x01")  # field 111, varint 1
    return obj


def with_wrong_wire_type(obj: pb.Job) -> pb.Job:
    """metadata.name (field 1, a string) sent as a varint: a type error on the wire."""
    obj.metadata.ClearField("name")
    obj.metadata.MergeFromString(b"\x08\x05")
    return obj


def token(namespace: str, revision: int) -> str:
    prefix = base64.b64encode(f"/skyshift/registry/jobs/{namespace}/".encode()).decode()
    payload = {"rev": revision, "start": prefix, "prefix": prefix}
    return base64.urlsafe_b64encode(json.dumps(payload).encode()).decode()


FUTURE = 10 ** 12

# (id, method, request for a Context, expected code, text the message must contain)
CASES = [
    # ---- Create: missing fields, invalid names, wrong types
    ("create-no-object", "Create", lambda c: api_pb2.CreateRequest(namespace=c.namespace), INVALID, "object"),
    ("create-no-name", "Create", lambda c: create(job(c, name="")), INVALID, "metadata.name: required"),
    ("create-invalid-name", "Create", lambda c: create(job(c, name="Bad_Name")), INVALID, "metadata.name"),
    ("create-long-name", "Create", lambda c: create(job(c, name="a" * 64)), INVALID, "metadata.name"),
    ("create-name-newline", "Create", lambda c: create(job(c, name="web\n")), INVALID, "metadata.name"),
    ("create-invalid-namespace", "Create", lambda c: create(job(c, namespace="Team_A")), INVALID,
     "metadata.namespace"),
    ("create-invalid-label", "Create",
     lambda c: create(changed(job(c), lambda o: o.metadata.labels.update({"app": "-x"}))), INVALID,
     "metadata.labels.app"),
    ("create-unknown-field", "Create", lambda c: create(with_unknown_field(job(c))), INVALID, "spec"),
    ("create-wrong-wire-type", "Create", lambda c: create(with_wrong_wire_type(job(c))), INVALID, "metadata"),
    ("create-zero-replicas", "Create", lambda c: create(job(c, replicas=0)), INVALID, "spec.replicas"),
    ("create-negative-cpus", "Create", lambda c: create(job(c, resources={"cpus": -1})), INVALID,
     "spec.resources.cpus"),
    ("create-bad-restart-policy", "Create", lambda c: create(job(c, restart_policy="Sometimes")), INVALID,
     "spec.restart_policy"),
    ("create-bad-port", "Create", lambda c: create(job(c, ports=[70000])), INVALID, "spec.ports[0]"),
    ("create-service-without-selector", "Create",
     lambda c: create(convert.from_manifest({"kind": "Service", "metadata": {"name": "s", "namespace": c.namespace},
                                             "spec": {"ports": [{"port": 80}]}})), INVALID, "spec.selector"),
    ("create-cluster-without-manager", "Create", lambda c: create(changed(cluster(), lambda o: o.spec.Clear())),
     INVALID, "spec.manager"),
    ("create-timestamp-out-of-range", "Create",
     lambda c: create(pb.Lease(metadata=pb.ObjectMeta(name="l", namespace=c.namespace),
                               spec=pb.LeaseSpec(renew_time={"seconds": 10 ** 15}))), INVALID, "spec.renew_time"),
    # ---- Create: namespaces
    ("create-missing-namespace", "Create", lambda c: create(job(c, namespace="no-such-ns")), NOT_FOUND,
     'namespace "no-such-ns"'),
    ("create-namespace-mismatch", "Create", lambda c: create(job(c), namespace="default"), INVALID,
     "metadata.namespace"),
    ("create-cluster-scoped-with-request-namespace", "Create", lambda c: create(cluster(), c.namespace), INVALID,
     "namespace"),
    ("create-cluster-scoped-with-body-namespace", "Create", lambda c: create(cluster(c.namespace)), INVALID,
     "metadata.namespace"),
    # ---- Create: size
    ("create-oversized", "Create", lambda c: create(job(c, run="x" * (c.max_bytes + 1))), EXHAUSTED, "limit"),
    ("create-oversized-labels", "Create",
     lambda c: create(changed(job(c), lambda o: o.metadata.annotations.update(
         {f"k{i}": "v" * 1000 for i in range(c.max_bytes // 1000 + 1)}))), EXHAUSTED, "limit"),
    # ---- Get
    ("get-unknown-kind", "Get", lambda c: api_pb2.GetRequest(kind="widgets", namespace=c.namespace, name="x"),
     INVALID, "kind"),
    ("get-no-kind", "Get", lambda c: api_pb2.GetRequest(namespace=c.namespace, name="x"), INVALID, "kind"),
    ("get-no-name", "Get", lambda c: api_pb2.GetRequest(kind="jobs", namespace=c.namespace), INVALID,
     "name: required"),
    ("get-invalid-name", "Get", lambda c: api_pb2.GetRequest(kind="jobs", namespace=c.namespace, name="A"),
     INVALID, "name"),
    ("get-no-namespace", "Get", lambda c: api_pb2.GetRequest(kind="jobs", name="existing"), INVALID,
     "namespace: required"),
    ("get-cluster-scoped-with-namespace", "Get",
     lambda c: api_pb2.GetRequest(kind="clusters", namespace=c.namespace, name="c"), INVALID, "namespace"),
    ("get-negative-revision", "Get",
     lambda c: api_pb2.GetRequest(kind="jobs", namespace=c.namespace, name="existing", at_revision=-1), INVALID,
     "at_revision"),
    ("get-future-revision", "Get",
     lambda c: api_pb2.GetRequest(kind="jobs", namespace=c.namespace, name="existing", at_revision=FUTURE),
     INVALID, "at_revision"),
    ("get-missing", "Get", lambda c: api_pb2.GetRequest(kind="jobs", namespace=c.namespace, name="ghost"),
     NOT_FOUND, '"ghost"'),
    # ---- List
    ("list-bad-label-selector", "List",
     lambda c: api_pb2.ListRequest(kind="jobs", namespace=c.namespace, label_selector="app in (x"), INVALID,
     "label_selector"),
    ("list-bad-field-selector", "List",
     lambda c: api_pb2.ListRequest(kind="jobs", namespace=c.namespace, field_selector="spec.replicas>1"),
     INVALID, "field_selector"),
    ("list-unknown-selector-field", "List",
     lambda c: api_pb2.ListRequest(kind="jobs", namespace=c.namespace, field_selector="spec.colour=red"),
     INVALID, "field_selector"),
    ("list-garbage-continue", "List",
     lambda c: api_pb2.ListRequest(kind="jobs", namespace=c.namespace, limit=1, continue_token="not a token"),
     INVALID, "continue_token"),
    ("list-other-listings-continue", "List",
     lambda c: api_pb2.ListRequest(kind="jobs", namespace=c.namespace, limit=1, continue_token=token("default", 5)),
     INVALID, "continue_token"),
    ("list-future-continue", "List",
     lambda c: api_pb2.ListRequest(kind="jobs", namespace=c.namespace, limit=1,
                                   continue_token=token(c.namespace, FUTURE)), INVALID, "continue_token"),
    ("list-negative-limit", "List", lambda c: api_pb2.ListRequest(kind="jobs", namespace=c.namespace, limit=-1),
     INVALID, "limit"),
    ("list-invalid-namespace", "List", lambda c: api_pb2.ListRequest(kind="jobs", namespace="Bad_NS"), INVALID,
     "namespace"),
    ("list-cluster-scoped-with-namespace", "List",
     lambda c: api_pb2.ListRequest(kind="clusters", namespace=c.namespace), INVALID, "namespace"),
    ("list-unknown-kind", "List", lambda c: api_pb2.ListRequest(kind="pods"), INVALID, "kind"),
    # ---- Update / UpdateStatus
    ("update-stale", "Update", lambda c: update(changed(c.stale, lambda o: setattr(o.spec, "run", "lost"))),
     ABORTED, "resource_version"),
    ("update-status-stale", "UpdateStatus",
     lambda c: update(changed(c.stale, lambda o: setattr(o.status, "phase", "RUNNING"))), ABORTED,
     "resource_version"),
    ("update-without-resource-version", "Update",
     lambda c: update(changed(c.current, lambda o: o.metadata.ClearField("resource_version"))), INVALID,
     "metadata.resource_version"),
    ("update-missing", "Update",
     lambda c: update(changed(c.current, lambda o: setattr(o.metadata, "name", "ghost"))), NOT_FOUND, '"ghost"'),
    ("update-namespace-mismatch", "Update", lambda c: update(c.current, namespace="default"), INVALID,
     "metadata.namespace"),
    ("update-zero-replicas", "Update", lambda c: update(changed(c.current, lambda o: setattr(o.spec, "replicas", 0))),
     INVALID, "spec.replicas"),
    ("update-unknown-field", "Update", lambda c: update(with_unknown_field(changed(c.current, lambda o: None))),
     INVALID, "spec"),
    ("update-oversized", "Update",
     lambda c: update(changed(c.current, lambda o: setattr(o.spec, "run", "x" * (c.max_bytes + 1)))), EXHAUSTED,
     "limit"),
    ("update-status-bad-phase", "UpdateStatus",
     lambda c: update(changed(c.current, lambda o: setattr(o.status, "phase", "DANCING"))), INVALID,
     "status.phase"),
    ("update-status-timestamp-out-of-range", "UpdateStatus",
     lambda c: update(changed(c.current, lambda o: setattr(o.status.start_time, "nanos", -1))), INVALID,
     "status.start_time"),
    ("update-no-object", "Update", lambda c: api_pb2.UpdateRequest(namespace=c.namespace), INVALID, "object"),
    # ---- Delete
    ("delete-missing", "Delete", lambda c: api_pb2.DeleteRequest(kind="jobs", namespace=c.namespace, name="ghost"),
     NOT_FOUND, '"ghost"'),
    ("delete-stale", "Delete",
     lambda c: api_pb2.DeleteRequest(kind="jobs", namespace=c.namespace, name="existing",
                                     resource_version=c.stale.metadata.resource_version), ABORTED, "resource_version"),
    ("delete-wrong-uid", "Delete",
     lambda c: api_pb2.DeleteRequest(kind="jobs", namespace=c.namespace, name="existing", uid="not-the-uid"),
     ABORTED, "uid"),
    ("delete-invalid-name", "Delete",
     lambda c: api_pb2.DeleteRequest(kind="jobs", namespace=c.namespace, name="Existing"), INVALID, "name"),
    ("delete-cluster-scoped-with-namespace", "Delete",
     lambda c: api_pb2.DeleteRequest(kind="clusters", namespace=c.namespace, name="c"), INVALID, "namespace"),
    ("delete-builtin-namespace", "Delete", lambda c: api_pb2.DeleteRequest(kind="namespaces", name="default"),
     grpc.StatusCode.FAILED_PRECONDITION, '"default"'),
    # ---- Watch
    ("watch-bad-label-selector", "Watch",
     lambda c: api_pb2.WatchRequest(kind="jobs", namespace=c.namespace, label_selector="=x"), INVALID,
     "label_selector"),
    ("watch-bad-field-selector", "Watch",
     lambda c: api_pb2.WatchRequest(kind="jobs", namespace=c.namespace, field_selector="spec.nope=1"), INVALID,
     "field_selector"),
    ("watch-unknown-kind", "Watch", lambda c: api_pb2.WatchRequest(kind="gadgets"), INVALID, "kind"),
    ("watch-negative-revision", "Watch",
     lambda c: api_pb2.WatchRequest(kind="jobs", namespace=c.namespace, resource_version=-5), INVALID,
     "resource_version"),
    ("watch-cluster-scoped-with-namespace", "Watch",
     lambda c: api_pb2.WatchRequest(kind="clusters", namespace=c.namespace), INVALID, "namespace"),
    ("watch-invalid-namespace", "Watch", lambda c: api_pb2.WatchRequest(kind="jobs", namespace="Not_A_NS"),
     INVALID, "namespace"),
    ("watch-invalid-name", "Watch", lambda c: api_pb2.WatchRequest(kind="jobs", namespace=c.namespace, name="X_"),
     INVALID, "name"),
    # ---- History
    ("history-unknown-kind", "History", lambda c: api_pb2.HistoryRequest(kind="nope", name="x"), INVALID, "kind"),
    ("history-negative-limit", "History",
     lambda c: api_pb2.HistoryRequest(kind="jobs", namespace=c.namespace, name="existing", limit=-1), INVALID,
     "limit"),
    ("history-missing", "History",
     lambda c: api_pb2.HistoryRequest(kind="jobs", namespace=c.namespace, name="ghost"), NOT_FOUND, '"ghost"'),
    # ---- Batches
    ("batch-too-many", "BatchCreate",
     lambda c: api_pb2.BatchRequest(items=[update(job(c, name=f"b{i}")) for i in range(1001)]), EXHAUSTED, "limit"),
]


def call(stub, method: str, request):
    """(status code, message) of one call; a Watch is answered by its first message or error."""
    try:
        if method == "Watch":
            stream = stub.Watch(request, timeout=10)
            try:
                next(stream)
            finally:
                stream.cancel()
        else:
            getattr(stub, method)(request, timeout=10)
    except grpc.RpcError as error:
        return error.code(), error.details()
    return grpc.StatusCode.OK, ""


def snapshot(client, namespace):
    """What a user can see of the store, to compare before and after a bad request."""
    return (store_revision(client),
            [(o.metadata.name, o.metadata.resource_version) for o in client.list("jobs", namespace).items],
            [(o.metadata.name, o.metadata.resource_version) for o in client.list("clusters").items],
            [(o.metadata.name, o.metadata.resource_version) for o in client.list("namespaces").items])


@pytest.mark.parametrize("case", CASES, ids=[case[0] for case in CASES])
def test_bad_request_gets_the_right_code_names_the_field_and_writes_nothing(stub, client, context, case):
    _, method, build, expected_code, expected_text = case
    request = build(context)
    before = snapshot(client, context.namespace)
    code, message = call(stub, method, request)
    assert code == expected_code, message
    assert expected_text in message
    if expected_code == INVALID:
        _, _, problem = message.partition(": ")
        assert problem, f"{message!r} does not start with the field path"
    assert snapshot(client, context.namespace) == before
    assert client.get("jobs", "existing", context.namespace) == context.current


UNDECODABLE = {"corrupt": b"\xff\xff\xff", "bad-utf8-or-bad-message": b"\x0a\x03\xff\xfe\xfd",
               "short-field": b"\x0a\x10abc", "huge-length": b"\x12\xff\xff\xff\xff\x0f"}


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("data", UNDECODABLE.values(), ids=UNDECODABLE.keys())
def test_undecodable_requests_are_invalid_argument(api_server, client, namespace, method, data):
    before = snapshot(client, namespace)
    channel = grpc.insecure_channel(api_server.endpoint)
    try:
        path = f"/skyshift.v1.ObjectService/{method}"
        if METHODS[method].server_streaming:
            stream = channel.unary_stream(path, request_serializer=None, response_deserializer=None)(data, timeout=10)
            with pytest.raises(grpc.RpcError) as caught:
                next(stream)
        else:
            with pytest.raises(grpc.RpcError) as caught:
                channel.unary_unary(path, request_serializer=None, response_deserializer=None)(data, timeout=10)
    finally:
        channel.close()
    assert caught.value.code() == INVALID, caught.value.details()
    assert caught.value.details().startswith("request: ")
    assert snapshot(client, namespace) == before


def test_batch_items_fail_on_their_own_and_name_the_field(client, namespace):
    good = new_job("batch-good", namespace)
    bad = new_job("Batch_Bad", namespace)
    elsewhere = new_job("batch-elsewhere", "no-such-ns")
    results = client.batch_create([good, bad, elsewhere])
    assert results[0].error is None and results[0].object.metadata.name == "batch-good"
    assert isinstance(results[1].error, InvalidError) and results[1].error.field == "metadata.name"
    assert isinstance(results[2].error, NotFoundError) and '"no-such-ns"' in results[2].error.message
    assert [j.metadata.name for j in client.list("jobs", namespace).items] == ["batch-good"]


def test_sdk_raises_typed_errors_naming_the_field(client, namespace):
    with pytest.raises(InvalidError) as caught:
        client.create(new_job("Not_Valid", namespace))
    assert caught.value.field == "metadata.name"
    with pytest.raises(LimitError):
        client.create(new_job("huge", namespace, run="x" * (2 * 1024 * 1024)))
    with pytest.raises(NotFoundError) as caught:
        client.create(new_job("orphan", "no-such-namespace"))
    assert 'namespace "no-such-namespace"' in caught.value.message
    with pytest.raises(InvalidError) as caught:
        client.list("jobs", namespace, label_selector="a in (b")
    assert caught.value.field == "label_selector"
    with pytest.raises(InvalidError) as caught:
        next(iter(client.watch("jobs", namespace, field_selector="status.colour=red")))
    assert caught.value.field == "field_selector"
    assert client.list("jobs", namespace).items == []
