from skyshift.v1 import objects_pb2 as pb


def test_create_get_list_watch(client, namespace):
    job = pb.Job()
    job.metadata.name = "hello"
    job.metadata.namespace = namespace
    job.spec.run = "echo hi"
    created = client.create(job)
    assert created.metadata.resource_version > 0
    assert created.spec.replicas == 1
    got = client.get("jobs", "hello", namespace)
    assert got == created
    listed = client.list("jobs", namespace)
    assert [j.metadata.name for j in listed.items] == ["hello"]
    events = client.watch("jobs", namespace, resource_version=listed.resource_version - 1)
    first = next(events)
    assert first.type == "ADDED" and first.object.metadata.name == "hello"
