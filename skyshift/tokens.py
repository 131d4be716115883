"""Bearer tokens and identities, shared by the API server, skyctl and the controllers.

A token is `secrets.token_urlsafe(32)` (256 random bits). It is shown once, when issued; the
User object keeps only its SHA-256 (`status.tokens[].hash`), with an id, an optional expiry and
a `revoked` flag. The API server finds the caller by the hash of the token it presents.

What a User may do depends on its *identity kind*, read from its labels (IDENTITY_LABEL):

* no label: an ordinary user; its rights are the Roles bound to it by RoleBindings.
* ``skyshift.dev/identity: skylet`` with ``skyshift.dev/cluster: NAME``: the skylet of cluster
  NAME (identity ``skylet:NAME``). RoleBindings do not apply; it may read its own Cluster and
  the Replicas bound to it, and update those (api_server/rbac.py, SYSTEM POLICIES).
* ``skyshift.dev/identity: manager``: the controller manager. RoleBindings do not apply; it may
  do anything to every kind except Users, Roles and RoleBindings, and may create and update
  skylet Users only (to issue skylet tokens).

Only callers allowed to write Users (admins) can set these labels.
"""
from __future__ import annotations

import hashlib
import re
import secrets
import time
from typing import Dict, Optional, Tuple

from skyshift.api.errors import AlreadyExistsError, ConflictError, NotFoundError
from skyshift.v1 import objects_pb2 as pb

IDENTITY_LABEL = "skyshift.dev/identity"
CLUSTER_LABEL = "skyshift.dev/cluster"
SKYLET = "skylet"
MANAGER = "manager"
#: Random bytes in a token (>= 256 bits).
TOKEN_BYTES = 32
_NOT_NAME = re.compile(r"[^a-z0-9-]")


def new_secret() -> str:
    return secrets.token_urlsafe(TOKEN_BYTES)


def hash_token(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def is_valid(token: pb.Token, now: Optional[float] = None) -> bool:
    """Neither revoked nor expired."""
    if token.revoked:
        return False
    if token.HasField("expires_at"):
        return token.expires_at.ToNanoseconds() > (time.time() if now is None else now) * 1e9
    return True


def add_token(user: pb.User, ttl: float = 0.0, keep: int = 0) -> Tuple[str, pb.Token]:
    """Add a new token to `user.status` (in place); returns (the secret, its record). `ttl`
    seconds until it expires (0: never). With `keep`, invalid tokens are dropped and at most
    `keep` tokens remain (the newest), so tokens issued at every restart do not pile up."""
    secret = new_secret()
    record = pb.Token(id=secrets.token_hex(4), hash=hash_token(secret))
    if ttl > 0:
        record.expires_at.FromNanoseconds(int((time.time() + ttl) * 1e9))
    if keep:
        kept = [t for t in user.status.tokens if is_valid(t)][-(keep - 1):] if keep > 1 else []
        del user.status.tokens[:]
        user.status.tokens.extend(kept)
    user.status.tokens.append(record)
    return secret, record


def has_token(user: pb.User, secret: str) -> bool:
    """True when `secret` is one of the user's valid tokens."""
    digest = hash_token(secret)
    return any(t.hash == digest and is_valid(t) for t in user.status.tokens)


def new_user(name: str, labels: Optional[Dict[str, str]] = None, display_name: str = "") -> pb.User:
    user = pb.User()
    user.metadata.name = name
    user.metadata.labels.update(labels or {})
    user.spec.display_name = display_name or name
    return user


def skylet_user(cluster: str) -> pb.User:
    """The User a cluster's skylet acts as. Its name stays a valid object name for any cluster
    name (the label holds the real one)."""
    name = f"skylet-{cluster}"
    if len(name) > 63:
        name = f"skylet-{hashlib.sha256(cluster.encode()).hexdigest()[:16]}"
    return new_user(_NOT_NAME.sub("-", name), {IDENTITY_LABEL: SKYLET, CLUSTER_LABEL: cluster},
                    f"skylet of cluster {cluster}")


async def issue_token(client, template: pb.User, ttl: float = 0.0, keep: int = 0) -> str:
    """Create the User `template` unless it exists, add a token to it and return the secret.
    `client` is an AsyncClient; conflicts are retried."""
    name = template.metadata.name
    for _ in range(5):
        try:
            user = await client.get("users", name)
        except NotFoundError:
            try:
                user = await client.create(template)
            except AlreadyExistsError:
                continue
        secret, _ = add_token(user, ttl, keep)
        try:
            await client.update_status(user)
            return secret
        except ConflictError:
            continue
    raise ConflictError(f'user "{name}" kept changing while a token was added')
