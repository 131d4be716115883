"""Secondary indexes several controllers need, defined once.

Controllers of one process share informers, so an index name is shared too: use these rather
than a private lambda under the same name.

    replicas = self.informer("replicas")
    replicas.add_index(REPLICAS_BY_CLUSTER, replica_cluster)
    replicas.by_index(REPLICAS_BY_CLUSTER, "c1")
"""
from __future__ import annotations

from typing import List

from skyshift.runtime.informer import key_of
from skyshift.v1 import objects_pb2 as pb

#: Replicas by the cache key ("namespace/name") of their Job.
REPLICAS_BY_JOB = "job"
#: Replicas by the cluster they are bound to (unbound ones are not indexed).
REPLICAS_BY_CLUSTER = "cluster"


def replica_job(replica: pb.Replica) -> List[str]:
    return [key_of(replica.metadata.namespace, replica.spec.job_name)]


def replica_cluster(replica: pb.Replica) -> List[str]:
    return [replica.spec.cluster] if replica.spec.cluster else []
