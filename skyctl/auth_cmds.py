"""skyctl commands for users and access (when the API server runs with authentication):

    skyctl login --server HOST:PORT --token T [--ca-file CA.pem]   # writes config.yaml (0600)
    skyctl create user NAME [--role editor -n NS ...] [--ttl SECONDS]   # prints a new token, once
    skyctl auth can-i VERB KIND [NAME] [-n NS]        # yes / no (exit code 0 / 1)
    skyctl auth whoami
    skyctl auth revoke USER (--token-id ID | --all)

A token is shown only when it is made; the server keeps its SHA-256 only. Only click is imported
at start-up (see skyctl/main.py); the commands import the SDK.
"""
from __future__ import annotations

import pathlib
from typing import Optional, Tuple

import click

VERBS = ("get", "list", "watch", "create", "update", "delete")


@click.command("login")
@click.option("--server", "endpoint", required=True, metavar="HOST:PORT", help="The API server's address.")
@click.option("--token", required=True, help="Your bearer token (from `skyctl create user` by an admin).")
@click.option("--ca-file", "ca_file", default=None, type=click.Path(exists=True, dir_okay=False),
              help="The CA certificate (PEM) of a server that serves TLS.")
@click.pass_obj
def login(session, endpoint: str, token: str, ca_file: Optional[str]) -> None:
    """Check the token against the server, then save server, token and CA in config.yaml."""
    from skyshift import config
    from skyshift.client import Client

    settings = session.settings
    settings.client.endpoint = endpoint
    settings.client.token = token
    if ca_file is not None:
        ca_file = str(pathlib.Path(ca_file).resolve())
        settings.client.ca_file = ca_file
    with Client(endpoint=endpoint, settings=settings) as client:
        answer = client.can_i("get", "namespaces")
    config.save_client_config(settings, endpoint=endpoint, token=token, ca_file=ca_file)
    who = answer.identity if answer.auth_enabled else "anyone (the server does not check access)"
    click.echo(f"logged in to {endpoint} as {who}; saved in {settings.config_file}")


@click.command("user")
@click.argument("name")
@click.option("--role", default=None, help="Bind this Role to the user (admin, editor, viewer or your own).")
@click.option("-n", "--namespace", "namespaces", multiple=True, metavar="NS",
              help="Limit the role to this namespace (repeatable; default: everywhere).")
@click.option("--ttl", type=float, default=0.0, metavar="SECONDS", help="The token expires after this long.")
@click.pass_obj
def create_user(session, name: str, role: Optional[str], namespaces: Tuple[str, ...], ttl: float) -> None:
    """Create a user and print its token (shown this once; only its hash is kept)."""
    from skyshift import tokens
    from skyshift.v1 import objects_pb2 as pb

    client = session.client
    user = client.create(tokens.new_user(name))
    secret, record = tokens.add_token(user, ttl)
    client.update_status(user)
    if role:
        binding = pb.RoleBinding()
        binding.metadata.name = f"{role}-{name}"[:63].rstrip("-")
        binding.spec.role = role
        binding.spec.users.append(name)
        binding.spec.namespaces.extend(namespaces)
        client.create(binding)
    scope = f" in {', '.join(namespaces)}" if namespaces else ""
    bound = f", role {role}{scope}" if role else " (no role yet: bind one with a RoleBinding)"
    click.echo(f"user {name} created{bound}; token {record.id} (store it now, it is not shown again):", err=True)
    click.echo(secret)


@click.group("auth")
def auth() -> None:
    """Who you are and what you may do."""


@auth.command("can-i")
@click.argument("verb", type=click.Choice(VERBS, case_sensitive=False))
@click.argument("kind")
@click.argument("name", required=False, default="")
@click.option("-n", "--namespace", default=None, metavar="NS",
              help="Namespace (default: default; for list and watch: every namespace).")
@click.pass_obj
def can_i(session, verb: str, kind: str, name: str, namespace: Optional[str]) -> None:
    """Print yes or no (exit code 0 or 1): may you VERB KIND [NAME] in the namespace?"""
    answer = session.client.can_i(verb.lower(), kind, namespace, name)
    if not answer.allowed:
        click.echo("no")
        if answer.reason:
            click.echo(answer.reason, err=True)
        raise click.exceptions.Exit(1)
    click.echo("yes, only some of them" if answer.filtered else "yes")


@auth.command("whoami")
@click.pass_obj
def whoami(session) -> None:
    """Print who the server takes you for."""
    answer = session.client.can_i("get", "namespaces")
    click.echo(answer.identity if answer.auth_enabled else "anyone (the server does not check access)")


@auth.command("revoke")
@click.argument("user")
@click.option("--token-id", "token_id", default=None, help="The token to revoke (see the user's status.tokens).")
@click.option("--all", "revoke_all", is_flag=True, help="Revoke every token of the user.")
@click.pass_obj
def revoke(session, user: str, token_id: Optional[str], revoke_all: bool) -> None:
    """Revoke a user's token(s); calls with them fail at once (UNAUTHENTICATED)."""
    if bool(token_id) == revoke_all:
        raise click.UsageError("give --token-id ID or --all")
    client = session.client
    stored = client.get("users", user)
    revoked = [t for t in stored.status.tokens if (revoke_all or t.id == token_id) and not t.revoked]
    if token_id and not any(t.id == token_id for t in stored.status.tokens):
        raise click.ClickException(f"user {user} has no token {token_id}")
    for token in revoked:
        token.revoked = True
    if revoked:
        client.update_status(stored)
    click.echo(f"revoked {len(revoked)} token(s) of user {user}")


def register(cli: click.Group, create: click.Group) -> None:
    """Add these commands to skyctl's top-level group and its `create` group."""
    cli.add_command(login)
    cli.add_command(auth)
    create.add_command(create_user)

