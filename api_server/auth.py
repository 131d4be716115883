"""Authentication: who is calling. Bearer tokens (gRPC metadata `authorization: Bearer T`) are
looked up by their SHA-256 in an index of every User's tokens, built from the server's in-memory
cache of Users (api_server/object_cache.py) and rebuilt whenever a User changes. An unknown
token makes the cache re-list once (coalesced) before the call is refused, so a token issued a
moment ago works at once; a revoked or expired token is refused as soon as the change reaches
the cache (one watch event, milliseconds).

Identity kinds come from User labels; the scheme is described in skyshift/tokens.py.

Bootstrap (first start with authentication on): the admin User with a token written to
$SKYSHIFT_HOME/config.yaml (client.token, mode 0600) and bound to the built-in admin Role, and
the manager User with a token in $SKYSHIFT_HOME/manager/token (0600). Tokens are never logged.
"""
from __future__ import annotations

import dataclasses
import os
import pathlib
import time
from typing import Dict, Optional, Tuple

import structlog

from skyshift import config, tokens
from skyshift.api import kinds
from skyshift.api.errors import AlreadyExistsError, NotFoundError, UnauthenticatedError
from skyshift.v1 import objects_pb2 as pb

from api_server.object_cache import ObjectCache

log = structlog.get_logger(__name__)

USER, SKYLET, MANAGER = "user", tokens.SKYLET, tokens.MANAGER
BEARER = "bearer "


@dataclasses.dataclass(frozen=True)
class Identity:
    user: str           # the User's name
    kind: str           # user, skylet or manager
    cluster: str = ""   # for skylets: the cluster they serve

    @property
    def system(self) -> bool:
        return self.kind != USER

    def __str__(self) -> str:
        return f"skylet:{self.cluster}" if self.kind == SKYLET else self.kind if self.kind == MANAGER else self.user


def identity_of(user: pb.User) -> Optional[Identity]:
    """The identity a User's labels give it; None for a malformed system label (no rights)."""
    labels = user.metadata.labels
    kind = labels.get(tokens.IDENTITY_LABEL, "")
    name = user.metadata.name
    if not kind:
        return Identity(name, USER)
    if kind == MANAGER:
        return Identity(name, MANAGER)
    if kind == SKYLET and labels.get(tokens.CLUSTER_LABEL):
        return Identity(name, SKYLET, labels[tokens.CLUSTER_LABEL])
    return None


def bearer_token(metadata) -> str:
    for key, value in metadata or ():
        if key == "authorization":
            if value[:len(BEARER)].lower() == BEARER:
                return value[len(BEARER):].strip()
            return ""
    return ""


class Authenticator:
    def __init__(self, users: ObjectCache):
        self.users = users
        #: token hash -> (identity, token record); rebuilt when users.version moves.
        self._index: Dict[str, Tuple[Identity, pb.Token]] = {}
        self._indexed_version = -1

    def _lookup(self, digest: str) -> Optional[Tuple[Identity, pb.Token]]:
        if self._indexed_version != self.users.version:
            index = {}
            for user in self.users.values():
                identity = identity_of(user)
                if identity is None:
                    continue
                for token in user.status.tokens:
                    index[token.hash] = (identity, token)
            self._index, self._indexed_version = index, self.users.version
        return self._index.get(digest)

    async def authenticate(self, metadata) -> Identity:
        secret = bearer_token(metadata)
        if not secret:
            raise UnauthenticatedError("no credentials: send `authorization: Bearer <token>` (skyctl login)")
        digest = tokens.hash_token(secret)
        found = self._lookup(digest)
        if found is None:
            await self.users.refresh()  # issued a moment ago?
            found = self._lookup(digest)
        if found is None:
            raise UnauthenticatedError("unknown token")
        identity, token = found
        if token.revoked:
            raise UnauthenticatedError(f"token {token.id} of user {identity.user} is revoked")
        if not tokens.is_valid(token, time.time()):
            raise UnauthenticatedError(f"token {token.id} of user {identity.user} has expired")
        return identity


# ---------------------------------------------------------------------------- bootstrap


def _write_secret(path: pathlib.Path, secret: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(secret)


def _read_secret(path: pathlib.Path) -> str:
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        return ""


async def _get_or_create(registry, obj) -> Tuple[object, bool]:
    kind = kinds.kind_of(obj)
    try:
        return await registry.get(kind.plural, "", obj.metadata.name), False
    except NotFoundError:
        pass
    try:
        return await registry.create(kinds.wrap(obj), ""), True
    except AlreadyExistsError:  # another server replica made it
        return await registry.get(kind.plural, "", obj.metadata.name), False


async def _issue(registry, user: pb.User, keep: int) -> str:
    secret, _ = tokens.add_token(user, keep=keep)
    await registry.update(kinds.wrap(user), "", status=True)
    return secret


async def bootstrap_identities(registry, settings: config.Settings) -> None:
    """The admin and manager Users and their tokens (see the module doc). Idempotent: a token
    that still works is kept. An admin left without any valid token gets a new one in the local
    config (whoever holds this home holds the instance's data anyway)."""
    auth = settings.auth
    admin, created = await _get_or_create(registry, tokens.new_user(auth.admin_user, display_name="administrator"))
    binding = pb.RoleBinding()
    binding.metadata.name = auth.admin_user
    binding.spec.role = "admin"
    binding.spec.users.append(auth.admin_user)
    await _get_or_create(registry, binding)
    if created or not any(tokens.is_valid(t) for t in admin.status.tokens):
        config.save_client_config(settings, token=await _issue(registry, admin, keep=0))
        log.info("admin_user_created", user=auth.admin_user, config=str(settings.config_file))
    elif not tokens.has_token(admin, config.load(settings.home_path, env={}).client.token):
        log.info("admin_user_exists", user=auth.admin_user,
                 hint="this home holds no valid admin token; use `skyctl login` with a token from an admin")
    manager, _ = await _get_or_create(registry, tokens.new_user(auth.manager_user, {tokens.IDENTITY_LABEL: MANAGER},
                                                                "controller manager"))
    if not tokens.has_token(manager, _read_secret(settings.manager_token_file)):
        _write_secret(settings.manager_token_file, await _issue(registry, manager, keep=auth.system_tokens_kept))
        log.info("manager_token_issued", user=auth.manager_user, file=str(settings.manager_token_file))
