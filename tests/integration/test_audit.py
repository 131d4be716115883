"""The audit log records every write and every refused request, and only those."""
from __future__ import annotations

import json
import re
import stat
from typing import Dict, List

import pytest

from skyshift.api.errors import AlreadyExistsError, PermissionDeniedError, UnauthenticatedError

from tests.conftest import wait_for
from tests.integration.auth_helpers import (admin_token, auth_server, client_for, new_job, new_namespace, new_user,
                                            unique)


def read_log(path) -> List[Dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


def lines_for(path, **fields) -> List[Dict]:
    return [line for line in read_log(path) if all(line.get(k) == v for k, v in fields.items())]


def request_id(error) -> str:
    return re.search(r"request id ([0-9a-f]+)", error.message).group(1)


@pytest.fixture(scope="module")
def server(etcd, tmp_path_factory):
    path = tmp_path_factory.mktemp("audit-elsewhere") / "audit.jsonl"
    with auth_server(etcd, tmp_path_factory.mktemp("audit-home"),
                     audit={"path": str(path), "flush_interval": 0.05}) as running:
        yield running


def test_writes_are_recorded_with_who_what_and_the_result(server):
    path = server.settings.audit_log_file
    with client_for(server, admin_token(server)) as admin:
        namespace = new_namespace(admin)
        name = unique("user")
        with client_for(server, new_user(admin, "editor", [namespace], name=name)) as editor:
            job = editor.create(new_job("audited", namespace))
            job.metadata.labels["x"] = "y"
            editor.update(job)
            with pytest.raises(AlreadyExistsError):
                editor.create(new_job("audited", namespace))
            editor.batch_create([new_job("batch-a", namespace), new_job("audited", namespace)])
            editor.get("jobs", "audited", namespace)
            editor.list("jobs", namespace)
            editor.delete("jobs", "audited", namespace)

            def recorded():
                return len(lines_for(path, user=name)) >= 6 and lines_for(path, user=name, verb="delete")
            wait_for(recorded, timeout=5, message="the audit lines of the writes")
    lines = lines_for(path, user=name)
    summary = [(line["method"], line["verb"], line["kind"], line["namespace"], line["name"], line["code"])
               for line in lines]
    assert summary == [
        ("Create", "create", "jobs", namespace, "audited", "OK"),
        ("Update", "update", "jobs", namespace, "audited", "OK"),
        ("Create", "create", "jobs", namespace, "audited", "ALREADY_EXISTS"),
        ("BatchCreate", "create", "jobs", namespace, "batch-a", "OK"),
        ("BatchCreate", "create", "jobs", namespace, "audited", "ALREADY_EXISTS"),
        ("Delete", "delete", "jobs", namespace, "audited", "OK"),
    ]  # the successful Get and List are not recorded
    for line in lines:
        assert line["identity"] == name and line["time"].endswith("+00:00") and len(line["request_id"]) == 16
    assert lines[3]["request_id"] == lines[4]["request_id"]  # one batch request
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_denials_are_recorded_with_their_request_id(server):
    path = server.settings.audit_log_file
    with client_for(server, admin_token(server)) as admin:
        namespace, other = new_namespace(admin), new_namespace(admin)
        name = unique("user")
        token = new_user(admin, "viewer", [namespace], name=name)
    with client_for(server, token) as viewer:
        with pytest.raises(PermissionDeniedError) as read_denied:
            viewer.list("jobs", other)
        with pytest.raises(PermissionDeniedError) as write_denied:
            viewer.create(new_job("nope", namespace))
    with client_for(server, "wrong-token") as stranger:
        with pytest.raises(UnauthenticatedError):
            stranger.get("jobs", "secret", namespace)
    wait_for(lambda: lines_for(path, code="UNAUTHENTICATED", namespace=namespace), timeout=5,
             message="the refused requests in the audit log")
    (listed,) = lines_for(path, request_id=request_id(read_denied.value))
    assert (listed["user"], listed["verb"], listed["kind"], listed["namespace"], listed["code"]) == (
        name, "list", "jobs", other, "PERMISSION_DENIED")
    (created,) = lines_for(path, request_id=request_id(write_denied.value))
    assert (created["verb"], created["name"], created["code"]) == ("create", "nope", "PERMISSION_DENIED")
    (unknown,) = lines_for(path, code="UNAUTHENTICATED", namespace=namespace)
    assert (unknown["user"], unknown["verb"], unknown["name"]) == ("", "get", "secret")


def test_stopping_the_server_writes_what_is_buffered(etcd, tmp_path):
    with auth_server(etcd, tmp_path, audit={"flush_interval": 3600.0}) as running:
        path = running.settings.audit_log_file
        with client_for(running, admin_token(running)) as admin:
            namespace = new_namespace(admin)
        assert not lines_for(path, name=namespace)  # still buffered
    assert [line["code"] for line in lines_for(path, name=namespace)] == ["OK"]
    assert path == tmp_path / "audit" / "audit.log"
