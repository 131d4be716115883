"""The Python SDK: typed create/get/list/update/delete/watch over the API server.

    from skyshift.client import Client, AsyncClient
    client = Client()                     # endpoint and token from $SKYSHIFT_HOME/config.yaml
    job = client.get("jobs", "train", namespace="default")

Errors are the exceptions of `skyshift.api.errors` (NotFoundError, ConflictError...).
"""
from skyshift.client.base import BatchItem, ExecResult, ListResult, LogChunk, WatchEvent, resolve_endpoint
from skyshift.client.sync import Client
from skyshift.client.aio import AsyncClient

__all__ = ["Client", "AsyncClient", "ListResult", "WatchEvent", "BatchItem", "LogChunk", "ExecResult",
           "resolve_endpoint"]
