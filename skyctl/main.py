"""skyctl: the SkyShift command line.

Only click is imported at start-up; the SDK (grpc, protobuf), YAML and the printers are imported
inside the commands that need them, so `skyctl --help` and `skyctl get jobs` start fast.
"""
from __future__ import annotations

import functools
import os
from typing import Dict, List, Optional, Sequence, Tuple

import click

from skyctl import jobs_cmds  # logs, exec, create job --wait (click only at import time)
from skyctl import auth_cmds  # login, create user, auth can-i (click only at import time)

OUTPUT_FORMATS = ("table", "wide", "yaml", "json", "name")
UNREACHABLE = "cannot reach the API server at {endpoint} (start it with skyctl api start)"


class CommandFailed(click.ClickException):
    """An expected failure: one `error: ...` line on stderr and exit code 1."""

    def show(self, file=None) -> None:
        click.echo(f"error: {self.message}", err=True)


class Session:
    """Settings and the API client of one skyctl run, created on first use."""

    def __init__(self, home: Optional[str], server: Optional[str]):
        self.home = home
        self.server = server

    @functools.cached_property
    def settings(self):
        import pathlib

        from skyshift import config

        overrides = {"client": {"endpoint": self.server}} if self.server else None
        try:
            return config.load(pathlib.Path(os.path.expanduser(self.home)) if self.home else None,
                               overrides=overrides)
        except ValueError as error:  # a malformed config.yaml
            raise CommandFailed(str(error)) from None

    @functools.cached_property
    def client(self):
        from skyshift import localmode
        from skyshift.client import Client

        if localmode.is_local_default(self.settings):
            # Local mode: start the local control plane in the background if nothing answers.
            endpoint = localmode.ensure_running(self.settings, notify=lambda message: click.echo(message, err=True))
            return Client(endpoint=endpoint, settings=self.settings)
        return Client(settings=self.settings)

    def unreachable(self) -> bool:
        """True when no API server answers at the endpoint (as opposed to a server that
        answered UNAVAILABLE itself, e.g. because etcd is down)."""
        client = self.__dict__.get("client")
        return client is not None and not client.ping(timeout=0.5)

    def close(self) -> None:
        client = self.__dict__.get("client")
        if client is not None:
            client.close()


def _error_message(session: Optional[Session], error: Exception) -> Optional[str]:
    """The one-line message for an expected error, or None for a bug (shown with its traceback)."""
    from skyshift.api.errors import SkyShiftError, UnavailableError

    from skyctl.local import LocalServerError

    if isinstance(error, UnavailableError) and session is not None and session.unreachable():
        return UNREACHABLE.format(endpoint=session.client.endpoint)
    if isinstance(error, SkyShiftError):
        return error.message
    if isinstance(error, LocalServerError):
        return str(error)
    if isinstance(error, OSError) and error.filename:
        return f"{error.filename}: {error.strerror}"
    return None


class SkyctlGroup(click.Group):
    """The top-level group: turns SkyShift errors into one line and exit code 1."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except Exception as error:  # classified below: expected errors become one line
            message = _error_message(ctx.obj, error)
            if message is None:
                raise
            raise CommandFailed(message) from None
        finally:
            if isinstance(ctx.obj, Session):
                ctx.obj.close()


class AliasedGroup(click.Group):
    """A group whose commands also answer to other names ('jobs', 'svc', 'fp'...)."""

    def __init__(self, *args, aliases: Optional[Dict[str, str]] = None, command_class=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.aliases = aliases or {}
        if command_class is not None:
            self.command_class = command_class  # what @group.command() creates

    def get_command(self, ctx: click.Context, cmd_name: str):
        name = cmd_name.lower()
        return super().get_command(ctx, self.aliases.get(name, name))


class LegacyFlagsCommand(click.Command):
    """Accepts the original SkyShift CLI's snake_case flags (--restart_policy) as their
    kebab-case names (--restart-policy), without listing both in the help."""

    def parse_args(self, ctx: click.Context, args: List[str]) -> List[str]:
        normalized = []
        for index, arg in enumerate(args):
            if arg == "--":
                normalized.extend(args[index:])
                break
            if arg.startswith("--") and "_" in arg.partition("=")[0]:
                name, separator, value = arg.partition("=")
                arg = name.replace("_", "-") + separator + value
            normalized.append(arg)
        return super().parse_args(ctx, normalized)


pass_session = click.make_pass_decorator(Session)


def namespace_option(function):
    return click.option("-n", "--namespace", default=None, metavar="NS",
                        help="Namespace of namespaced kinds (default: default).")(function)


@click.group(cls=SkyctlGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--home", envvar="SKYSHIFT_HOME", type=click.Path(file_okay=False), metavar="DIR",
              help="The SkyShift instance directory (default: $SKYSHIFT_HOME, else ~/.skyshift): config.yaml, "
                   "the local server's endpoint, logs.")
@click.option("--server", metavar="HOST:PORT",
              help="API server address; overrides $SKYSHIFT_API_SERVER, config.yaml and the local server's "
                   "endpoint.")
@click.version_option(package_name="skyshift", prog_name="skyctl", message="%(prog)s %(version)s")
@click.pass_context
def cli(ctx: click.Context, home: Optional[str], server: Optional[str]) -> None:
    """skyctl: run jobs and services over many clusters with SkyShift.

    \b
    Start a local control plane, then declare what should run:
      skyctl api start
      skyctl create job hello --run 'echo hello' --cpus 1
      skyctl get jobs
      skyctl apply -f manifests/
    """
    ctx.obj = Session(home, server)


# ---------------------------------------------------------------------------- helpers

def resolve_kind(name: str):
    from skyshift.api import kinds
    from skyshift.api.errors import InvalidError

    try:
        return kinds.resolve(name)
    except InvalidError as error:
        raise click.BadParameter(error.message.partition(": ")[2], param_hint="KIND") from None


def parse_targets(arguments: Sequence[str]) -> List[Tuple[str, List[str]]]:
    """'KIND NAME...' or 'KIND/NAME...' -> [(kind, [names])], kinds in first-seen order."""
    if not arguments:
        raise click.UsageError("name a kind, e.g. `jobs`, `job NAME` or `job/NAME`")
    if "/" not in arguments[0]:
        if any("/" in argument for argument in arguments[1:]):
            raise click.UsageError("use either KIND NAME... or KIND/NAME..., not both")
        return [(arguments[0], list(arguments[1:]))]
    groups: Dict[str, List[str]] = {}
    for argument in arguments:
        kind, separator, name = argument.partition("/")
        if not separator or not kind or not name:
            raise click.UsageError(f"expected KIND/NAME, got {argument!r}")
        groups.setdefault(kind, []).append(name)
    return list(groups.items())


def resolve_targets(arguments: Sequence[str]):
    """[(Kind, [names])], merging aliases of one kind (job/a jobs/b)."""
    merged: Dict[str, Tuple[object, List[str]]] = {}
    for alias, names in parse_targets(arguments):
        kind = resolve_kind(alias)
        merged.setdefault(kind.name, (kind, []))[1].extend(names)
    return list(merged.values())


def list_namespace(kind, namespace: Optional[str], all_namespaces: bool) -> str:
    """The namespace a listing reads: '' (all) with -A or for cluster-scoped kinds."""
    from skyshift.api import kinds

    if not kind.namespaced or all_namespaces:
        return ""
    return namespace or kinds.DEFAULT_NAMESPACE


def report_failures(failures: List[str]) -> None:
    for message in failures:
        click.echo(f"error: {message}", err=True)
    if failures:
        raise click.exceptions.Exit(1)


def echo_text(text: str) -> None:
    click.echo(text, nl=not text.endswith("\n"))


def skyshift_failure(error: Exception) -> Optional[str]:
    """The message of an error that concerns one object only (the command goes on with the
    others), or None for errors that stop the command (e.g. an unreachable server)."""
    from skyshift.api.errors import SkyShiftError, UnavailableError

    if isinstance(error, SkyShiftError) and not isinstance(error, UnavailableError):
        return error.message
    return None


def get_objects(session: Session, kind, names: Sequence[str], namespace: Optional[str], failures: List[str]):
    """The named objects that exist; a failure line for each that does not."""
    objects = []
    for name in names:
        try:
            objects.append(session.client.get(kind.plural, name, namespace))
        except Exception as error:
            message = skyshift_failure(error)
            if message is None:
                raise
            failures.append(message)
    return objects


def no_objects_message(kind, namespace: str) -> str:
    where = f" in namespace {namespace}" if namespace else ""
    return f"No {kind.plural} found{where}."


# ---------------------------------------------------------------------------- apply

@cli.command()
@click.option("-f", "--filename", "files", multiple=True, required=True, metavar="FILE|DIR|-",
              type=click.Path(exists=True, allow_dash=True),
              help="A YAML or JSON manifest file (several documents allowed), a directory of them (*.yaml, "
                   "*.yml, *.json) or - for stdin. Repeatable.")
@click.option("-n", "--namespace", default=None, metavar="NS",
              help="Namespace for manifests that name none (default: default); a manifest naming another "
                   "namespace is an error.")
@pass_session
def apply(session: Session, files: Tuple[str, ...], namespace: Optional[str]) -> None:
    """Create or update the objects of manifest files.

    Manifests have `kind`, `metadata` and `spec`, with the field names of the original SkyShift
    (snake_case; camelCase is accepted). Every manifest is checked before the first change, so
    an invalid one applies nothing. An existing object gets the manifest's spec and labels (and
    its annotations added); its status, finalizers and owners are kept. Prints
    `KIND/NAME created|configured|unchanged` per object.

    \b
    Examples:
      skyctl apply -f job.yaml
      skyctl apply -f manifests/ -f extra.json
      cat job.yaml | skyctl apply -f -
    """
    from skyshift.api import kinds

    from skyctl import apply as applying
    from skyctl.printers import reference

    objects = applying.load_objects(applying.read_sources(files, click.get_text_stream("stdin")), namespace)
    if not objects:
        raise CommandFailed(f"no objects in {', '.join(files)}")
    attempts = session.settings.skyctl.apply_conflict_retries
    failures = []
    for obj in objects:
        name = reference(kinds.kind_of(obj), obj.metadata.name)
        try:
            click.echo(f"{name} {applying.apply_object(session.client, obj, attempts)}")
        except Exception as error:
            message = skyshift_failure(error)
            if message is None:
                raise
            failures.append(f"{name}: {message}")
    report_failures(failures)


# ---------------------------------------------------------------------------- create

@cli.group(cls=AliasedGroup, command_class=LegacyFlagsCommand, aliases={
    "jobs": "job", "clusters": "cluster", "services": "service", "svc": "service", "namespaces": "namespace",
    "ns": "namespace", "links": "link", "filterpolicies": "filterpolicy", "fp": "filterpolicy",
})
def create() -> None:
    """Create one object from command-line flags.

    For manifests (YAML or JSON files) see `skyctl apply`.
    """


def create_object(session: Session, ctx: click.Context, builder, **flags):
    """Build the object from flags, create it, say so and return it as stored."""
    from skyshift.api import kinds

    from skyctl.builders import FlagError
    from skyctl.printers import reference

    try:
        obj = builder(**flags)
    except FlagError as error:
        raise click.BadParameter(error.problem, ctx=ctx, param_hint=f"'{error.flag}'") from None
    created = session.client.create(obj)
    click.echo(f"{reference(kinds.kind_of(created), created.metadata.name)} created")
    return created


def _builder(name: str):
    """A builder function, imported only when the command runs."""
    def build(**flags):
        from skyctl import builders

        return getattr(builders, name)(**flags)
    return build


def create_labels_option(function):
    return click.option("--labels", "-l", "labels", type=(str, str), multiple=True, metavar="KEY VALUE",
                        help="A label to set on the object (repeatable).")(function)


@create.command("job")
@click.argument("name")
@namespace_option
@create_labels_option
@click.option("--image", default="", help="Container image to run in; without one the commands run directly "
                                          "on the node (local and ssh clusters).")
@click.option("--image-pull-policy", "image_pull_policy", default="",
              metavar="Always|IfNotPresent|Never", help="When to pull the image.")
@click.option("--resources", type=(str, str), multiple=True, metavar="NAME AMOUNT",
              help="A resource per replica, e.g. --resources cpus 2 --resources memory 4Gi (repeatable).")
@click.option("--cpus", type=float, default=None, help="CPUs per replica.")
@click.option("--memory", default=None, metavar="SIZE",
              help="Memory per replica, in MiB or with a unit (512Mi, 4Gi, 2G).")
@click.option("--gpus", type=float, default=None, help="GPUs of any type per replica.")
@click.option("--disk", default=None, metavar="SIZE", help="Disk per replica, in MiB or with a unit (10Gi).")
@click.option("--accelerators", "-a", multiple=True, metavar="NAME[:COUNT]",
              help="Accelerators per replica, e.g. V100:2 (repeatable).")
@click.option("--env", "--envs", "-e", "envs", type=(str, str), multiple=True, metavar="NAME VALUE",
              help="An environment variable for the job (repeatable).")
@click.option("--ports", "-p", type=int, multiple=True, metavar="PORT", help="A port the job listens on (repeatable).")
@click.option("--replicas", type=int, default=None, help="Number of replicas to run  [default: 1].")
@click.option("--run", default="", help="Command (shell) each replica runs.")
@click.option("--setup", default="", help="Command (shell) run before --run in each replica.")
@click.option("--restart-policy", "restart_policy", default="",
              metavar="Always|OnFailure|Never", help="When replicas are restarted  [default: Always].")
@click.option("--backoff-limit", "backoff_limit", type=int, default=None,
              help="With OnFailure: how many times failed replicas are replaced  [default: 6].")
@click.option("--gang", is_flag=True, help="Place all replicas at once or none.")
@click.option("--filter", "filters", multiple=True, metavar="KEY=VALUE",
              help="Run only on clusters with this label (repeatable; all must match).")
@jobs_cmds.wait_option
@pass_session
@click.pass_context
def create_job(ctx: click.Context, session: Session, wait: bool, **flags) -> None:
    """Create a Job: what to run, how many replicas, with which resources.

    \b
    Examples:
      skyctl create job hello --run 'echo hello'
      skyctl create job train --image pytorch/pytorch --gpus 1 --accelerators V100:1 \\
          --run 'python train.py' --replicas 4 -e EPOCHS 10 --restart-policy OnFailure
      skyctl create job web --run 'python -m http.server 8080' --ports 8080 --labels app web
      skyctl create job hello --run 'echo hello' --wait
    """
    if wait:
        jobs_cmds.wait_defaults(flags)
    created = create_object(session, ctx, _builder("job"), **flags)
    if wait:
        jobs_cmds.wait_for_job(session, created)


@create.command("cluster")
@click.argument("name")
@create_labels_option
@click.option("--manager", default=None, metavar="local|ssh|kubernetes|cloud|sim",
              help="Who runs the cluster's replicas (k8 is accepted for kubernetes).")
@click.option("--cloud", default="", help="Cloud to provision in (with --provision).")
@click.option("--region", default="", help="Cloud region (with --provision).")
@click.option("--cpus", default="", help="vCPUs per node to provision, e.g. 4 or 4+.")
@click.option("--memory", default="", help="Memory per node to provision, e.g. 16GB or 16+.")
@click.option("--disk-size", "disk_size", type=int, default=None, help="OS disk size per node, GB.")
@click.option("--accelerators", default="", metavar="NAME:COUNT", help="Accelerators per node, e.g. V100:2.")
@click.option("--ports", multiple=True, metavar="PORT", help="A port to open on the nodes (repeatable).")
@click.option("--num-nodes", "num_nodes", type=int, default=None, help="Nodes to provision.")
@click.option("--provision", is_flag=True, help="Provision the nodes in the cloud.")
@click.option("--config-path", "--config", "-c", "config_path", default="",
              help="Access configuration file, e.g. a kubeconfig.")
@click.option("--host", "--hostname", "-H", "hosts", multiple=True, metavar="[USER@]HOST[:PORT]",
              help="A machine of an ssh cluster (repeatable).")
@click.option("--username", "-u", default="", help="SSH user for hosts that name none.")
@click.option("--ssh-key-path", "-k", "ssh_key_path", default="", help="SSH private key file.")
@click.option("--sim-nodes", type=int, default=None, help="Simulated nodes (implies --manager sim).")
@click.option("--sim-resources", type=(str, str), multiple=True, metavar="NAME AMOUNT",
              help="Resources of each simulated node, e.g. --sim-resources cpus 8 --sim-resources memory 32Gi.")
@pass_session
@click.pass_context
def create_cluster(ctx: click.Context, session: Session, **flags) -> None:
    """Attach a Cluster: a place where replicas run.

    \b
    Examples:
      skyctl create cluster laptop --manager local
      skyctl create cluster lab --manager ssh --host alice@10.0.0.5 --host 10.0.0.6:2222 -k ~/.ssh/id_ed25519
      skyctl create cluster big --sim-nodes 100 --sim-resources cpus 32 --sim-resources memory 128Gi
    """
    create_object(session, ctx, _builder("cluster"), **flags)


@create.command("service")
@click.argument("name")
@namespace_option
@create_labels_option
@click.option("--selector", "-s", type=(str, str), multiple=True, metavar="KEY VALUE",
              help="Replicas with this label are behind the service (repeatable; all must match).")
@click.option("--ports", "-p", type=(int, int), multiple=True, metavar="PORT TARGET",
              help="Service port and the replicas' port it forwards to (repeatable).")
@click.option("--type", "--service-type", "-t", "service_type", default="",
              metavar="ClusterIP|NodePort|LoadBalancer", help="How the service is reachable  [default: ClusterIP].")
@click.option("--primary-cluster", "--cluster", "-c", "primary_cluster", default="",
              metavar="CLUSTER", help="Cluster that exposes the service, or auto.")
@click.option("--balancing", default="", metavar="round_robin|least_connections",
              help="How connections are spread over replicas  [default: round_robin].")
@pass_session
@click.pass_context
def create_service(ctx: click.Context, session: Session, **flags) -> None:
    """Create a Service: a stable address for the replicas selected by labels.

    \b
    Example:
      skyctl create service web --selector app web --ports 80 8080 --type LoadBalancer
    """
    create_object(session, ctx, _builder("service"), **flags)


@create.command("namespace")
@click.argument("name")
@create_labels_option
@pass_session
@click.pass_context
def create_namespace(ctx: click.Context, session: Session, **flags) -> None:
    """Create a Namespace, which isolates the objects in it.

    \b
    Example:
      skyctl create namespace team-a
    """
    create_object(session, ctx, _builder("namespace"), **flags)


@create.command("link")
@click.argument("name")
@create_labels_option
@click.option("--source", "-s", required=True, metavar="CLUSTER", help="Source cluster.")
@click.option("--target", "-t", required=True, metavar="CLUSTER", help="Target cluster.")
@pass_session
@click.pass_context
def create_link(ctx: click.Context, session: Session, **flags) -> None:
    """Create a Link: a network link between two clusters.

    \b
    Example:
      skyctl create link a-to-b --source cluster-a --target cluster-b
    """
    create_object(session, ctx, _builder("link"), **flags)


@create.command("filterpolicy")
@click.argument("name")
@namespace_option
@click.option("--labels", "labels", type=(str, str), multiple=True, metavar="KEY VALUE",
              help="A label to set on the policy itself (repeatable).")
@click.option("--include", "--includeCluster", "-i", "include", multiple=True, metavar="CLUSTER",
              help="A cluster the selected jobs may use (repeatable).")
@click.option("--exclude", "--excludeCluster", "-e", "exclude", multiple=True, metavar="CLUSTER",
              help="A cluster the selected jobs must not use (repeatable).")
@click.option("--selector", "--labelSelector", "-l", "selector", type=(str, str), multiple=True,
              metavar="KEY VALUE", help="The policy applies to jobs with this label (repeatable; all must match).")
@pass_session
@click.pass_context
def create_filterpolicy(ctx: click.Context, session: Session, **flags) -> None:
    """Create a FilterPolicy: which clusters the jobs matching a label selector may use.

    \b
    Example:
      skyctl create filterpolicy prod-only -l env prod -i cluster-a -e cluster-b
    """
    create_object(session, ctx, _builder("filter_policy"), **flags)


# ---------------------------------------------------------------------------- get

def watch_changes(session: Session, kind, namespace: str, name: str, selector: str, field_selector: str,
                  revision: int, known: Dict):
    """Changes after `revision`: from the watch, or, when that revision is compacted, the
    differences a re-list shows (then the watch goes on from the re-list)."""
    from skyshift.api.errors import GoneError
    from skyshift.client import base

    client = session.client
    if name:
        field_selector = ",".join(filter(None, [field_selector, f"metadata.name={name}"]))
    while True:
        try:
            for event in client.watch(kind.plural, namespace, "", selector, field_selector, revision):
                if event.type == "BOOKMARK":
                    continue
                base.track(known, event)
                revision = max(revision, event.resource_version)
                yield event
            return
        except GoneError:
            listed = client.list_all(kind.plural, namespace, selector, field_selector)
            yield from base.relist_events(known, listed.items, listed.resource_version)
            revision = listed.resource_version


class Output:
    """Prints objects in one -o format; a table keeps its column widths across calls (watch)."""

    def __init__(self, fmt: str, all_namespaces: bool):
        self.fmt = fmt
        self.all_namespaces = all_namespaces
        self.tables: Dict[str, object] = {}

    def table(self, kind):
        from skyctl import printers

        if kind.name not in self.tables:
            self.tables[kind.name] = printers.Table(kind, wide=self.fmt == "wide", all_namespaces=self.all_namespaces)
        return self.tables[kind.name]

    def objects(self, kind, objects, now: float) -> None:
        from skyctl import printers

        if self.fmt in ("table", "wide"):
            for line in self.table(kind).lines(objects, now):
                click.echo(line)
        elif self.fmt == "name":
            for obj in objects:
                click.echo(printers.reference(kind, obj.metadata.name))
        else:
            for obj in objects:
                if self.fmt == "yaml":
                    click.echo("---")
                echo_text(printers.dump(printers.manifests([obj], as_list=False), self.fmt))

    def document(self, objects, as_list: bool) -> None:
        from skyctl import printers

        echo_text(printers.dump(printers.manifests(objects, as_list), self.fmt))


@cli.command()
@click.argument("targets", nargs=-1, metavar="KIND [NAME...] | KIND/NAME...")
@namespace_option
@click.option("-A", "--all-namespaces", is_flag=True, help="List namespaced kinds in every namespace.")
@click.option("-l", "--selector", default="", metavar="SELECTOR",
              help="Label selector, e.g. 'app=web,tier!=db,env in (a,b),gpu,!spot'.")
@click.option("--field-selector", default="", metavar="SELECTOR",
              help="Field selector, e.g. 'spec.cluster=c1,status.phase!=RUNNING'.")
@click.option("-o", "--output", type=click.Choice(OUTPUT_FORMATS), default="table", show_default=True,
              help="table and wide (more columns) for people; yaml and json (manifests, `kind: List` for "
                   "lists) or name (KIND/NAME) for scripts.")
@click.option("-w", "--watch", is_flag=True, help="After the list, print every change until Ctrl+C.")
@pass_session
def get(session: Session, targets: Tuple[str, ...], namespace: Optional[str], all_namespaces: bool,
        selector: str, field_selector: str, output: str, watch: bool) -> None:
    """List objects of a kind, or show the named ones.

    KIND is any name of a kind: job, jobs, cluster, replicas, svc, fp, ns... Objects may also be
    named KIND/NAME (several, of different kinds).

    \b
    Examples:
      skyctl get jobs
      skyctl get jobs -A -l app=web -o wide
      skyctl get job train -o yaml
      skyctl get replicas --field-selector spec.cluster=c1 -w
    """
    from skyctl import printers

    groups = resolve_targets(targets)
    named = any(names for _, names in groups)
    if named and (selector or field_selector or all_namespaces):
        raise click.UsageError("names cannot be combined with -l, --field-selector or -A")
    if watch and (len(groups) != 1 or len(groups[0][1]) > 1):
        raise click.UsageError("--watch takes one kind, or one object")
    now = printers.now_seconds()
    printer = Output(output, all_namespaces)
    failures: List[str] = []
    found = []   # (kind, namespace, objects, revision)
    for kind, names in groups:
        if names:
            objects = get_objects(session, kind, names, namespace, failures)
            revision = max((o.metadata.resource_version for o in objects), default=0)
            found.append((kind, list_namespace(kind, namespace, all_namespaces=False), objects, revision))
        else:
            listed_namespace = list_namespace(kind, namespace, all_namespaces)
            listed = session.client.list_all(kind.plural, listed_namespace, selector, field_selector)
            found.append((kind, listed_namespace, listed.items, listed.resource_version))
    if output in ("yaml", "json"):
        everything = [obj for _, _, objects, _ in found for obj in objects]
        if everything or not named:
            printer.document(everything, as_list=not (named and len(everything) == 1))
    else:
        tables_printed = 0
        for kind, listed_namespace, objects, _ in found:
            if not objects and not named:
                click.echo(no_objects_message(kind, listed_namespace), err=True)
            elif objects:
                if tables_printed and output != "name":
                    click.echo()  # a blank line between the tables of different kinds
                printer.objects(kind, objects, now)
                tables_printed += 1
    report_failures(failures)
    if watch:
        kind, listed_namespace, objects, revision = found[0]
        names = groups[0][1]
        from skyshift.client import base

        known = {base.object_key(obj): obj for obj in objects}
        try:
            for event in watch_changes(session, kind, listed_namespace, names[0] if names else "",
                                       selector, field_selector, revision, known):
                printer.objects(kind, [event.object], printers.now_seconds())
        except KeyboardInterrupt:
            return  # Ctrl+C is how a watch ends


# ---------------------------------------------------------------------------- describe

@cli.command()
@click.argument("targets", nargs=-1, required=True, metavar="KIND NAME... | KIND/NAME...")
@namespace_option
@pass_session
def describe(session: Session, targets: Tuple[str, ...], namespace: Optional[str]) -> None:
    """Show objects in detail, with their related objects and events.

    Every field set, the conditions, related objects (a Job's replicas) and the Events about
    the object, newest last.

    \b
    Examples:
      skyctl describe job train
      skyctl describe cluster/c1 job/train
    """
    from skyctl import describe as related
    from skyctl import printers

    pages = []
    failures: List[str] = []
    for kind, names in resolve_targets(targets):
        if not names:
            raise click.UsageError(f"name the {kind.name.lower()} to describe")
        for obj in get_objects(session, kind, names, namespace, failures):
            now = printers.now_seconds()
            pages.append(printers.describe(obj, related.sections(session.client, obj, now), now))
    echo_text("\n".join(pages))
    report_failures(failures)


# ---------------------------------------------------------------------------- delete

@cli.command()
@click.argument("targets", nargs=-1, metavar="KIND [NAME...] | KIND/NAME...")
@namespace_option
@click.option("-l", "--selector", default="", metavar="SELECTOR", help="Delete the objects with matching labels.")
@click.option("--all", "delete_all", is_flag=True, help="Delete every object of the kind (in the namespace).")
@click.option("-A", "--all-namespaces", is_flag=True, help="With -l or --all: in every namespace.")
@pass_session
def delete(session: Session, targets: Tuple[str, ...], namespace: Optional[str], selector: str, delete_all: bool,
           all_namespaces: bool) -> None:
    """Delete objects by name, by label selector, or all of a kind.

    Objects with finalizers are marked and go away once their controllers let them. A name that
    does not exist is reported and makes the exit code 1; the others are still deleted.

    \b
    Examples:
      skyctl delete job a b c
      skyctl delete jobs -l app=web
      skyctl delete jobs --all -n team-a
    """
    from skyshift.api.errors import NotFoundError

    from skyctl.printers import reference

    groups = resolve_targets(targets)
    named = any(names for _, names in groups)
    if named and (selector or delete_all or all_namespaces):
        raise click.UsageError("names cannot be combined with -l, --all or -A")
    if not named and not selector and not delete_all:
        raise click.UsageError("name the objects to delete, or select them with -l SELECTOR or --all")
    failures: List[str] = []
    for kind, names in groups:
        if names:
            addresses = [(namespace, name) for name in names]
        else:
            listed_namespace = list_namespace(kind, namespace, all_namespaces)
            listed = session.client.list_all(kind.plural, listed_namespace, selector)
            addresses = [(obj.metadata.namespace, obj.metadata.name) for obj in listed.items]
            if not addresses:
                click.echo(no_objects_message(kind, listed_namespace), err=True)
        for object_namespace, name in addresses:
            try:
                deleted = session.client.delete(kind.plural, name, object_namespace)
            except NotFoundError as error:
                if names:
                    failures.append(error.message)
                continue  # selected by a listing and deleted by someone else meanwhile: done
            except Exception as error:
                message = skyshift_failure(error)
                if message is None:
                    raise
                failures.append(message)
                continue
            pending = deleted.metadata.finalizers
            suffix = f" (waiting for finalizers: {', '.join(pending)})" if pending else ""
            click.echo(f"{reference(kind, name)} deleted{suffix}")
    report_failures(failures)


# ---------------------------------------------------------------------------- history

@cli.command()
@click.argument("targets", nargs=-1, required=True, metavar="KIND/NAME | KIND NAME")
@namespace_option
@click.option("-o", "--output", type=click.Choice(("table", "yaml", "json")), default="table", show_default=True,
              help="table: one line per revision with the fields it changed; yaml/json: every revision.")
@click.option("--limit", type=click.IntRange(min=0), default=0,
              help="Most revisions to show; 0: the server's default (api.history_default_limit).")
@pass_session
def history(session: Session, targets: Tuple[str, ...], namespace: Optional[str], output: str, limit: int) -> None:
    """Show the past revisions of one object.

    Oldest first, as far back as etcd keeps them. REVISION is the etcd revision of the change
    (Get at that revision shows it), GENERATION counts spec changes, CHANGES names the fields
    that differ from the revision before. Objects carry no modification time, so none is shown.

    \b
    Examples:
      skyctl history job/train
      skyctl history job train -o yaml
    """
    from skyctl import printers

    groups = resolve_targets(targets)
    if len(groups) != 1 or len(groups[0][1]) != 1:
        raise click.UsageError("name exactly one object: KIND/NAME or KIND NAME")
    kind, (name,) = groups[0]
    revisions = session.client.history(kind.plural, name, namespace, limit)
    if output == "table":
        for line in printers.history_lines(revisions):
            click.echo(line)
    else:
        echo_text(printers.dump(printers.manifests(list(reversed(revisions)), as_list=True), output))


# ---------------------------------------------------------------------------- api

@cli.group()
def api() -> None:
    """Start, stop and inspect the local API server.

    The server (with its embedded etcd) runs in the background, its files under $SKYSHIFT_HOME.
    """


def local_server(session: Session):
    from skyctl.local import LocalServer

    return LocalServer(session.settings)


@api.command("start")
@click.option("--etcd", default=None, metavar="HOST:PORT[,HOST:PORT...]",
              help="Use this etcd instead of starting the embedded one under $SKYSHIFT_HOME/etcd.")
@click.option("--listen", default=None, metavar="HOST:PORT",
              help="Address to serve on (default: the api.listen setting; port 0 picks a free one).")
@pass_session
def api_start(session: Session, etcd: Optional[str], listen: Optional[str]) -> None:
    """Start the API server in the background and wait until it answers.

    Its log is $SKYSHIFT_HOME/logs/api_server.log; its address goes to
    $SKYSHIFT_HOME/api/endpoint, where skyctl finds it.
    """
    server = local_server(session)
    started = server.start(etcd, listen)
    if started.already_running:
        click.echo(f"API server already running at {started.endpoint} (pid {started.pid})")
    else:
        click.echo(f"API server running at {started.endpoint} (pid {started.pid}, log {server.log_file})")


@api.command("stop")
@pass_session
def api_stop(session: Session) -> None:
    """Stop the local control plane of $SKYSHIFT_HOME: the controller manager and the skylets it
    started, then the API server (SIGTERM; SIGKILL after skyctl.server_stop_timeout). Replicas
    keep running; their skylet re-adopts them on the next start."""
    from skyshift import localmode, processes

    server = local_server(session)
    settings = session.settings.skyctl
    for pid in localmode.recorded_pids(session.settings):
        if pid == server.pid():
            continue
        role = " ".join(processes.command_line(pid)[1:3])  # "-m launch_manager", "-m skylet"
        if processes.terminate(pid, settings.server_stop_timeout, settings.server_poll_interval):
            click.echo(f"stopped {role} (pid {pid})")
    pid = server.stop()
    click.echo(f"API server stopped (pid {pid})" if pid else "API server is not running")


@api.command("status")
@pass_session
def api_status(session: Session) -> None:
    """Say whether the API server runs (exit code 0) or not (exit code 1)."""
    server = local_server(session)
    pid, endpoint = server.pid(), server.endpoint()
    if pid is None:
        click.echo("stopped")
        raise click.exceptions.Exit(1)
    if endpoint and answers(endpoint, session.settings):
        click.echo(f"running at {endpoint} (pid {pid})")
        return
    click.echo(f"running (pid {pid}) but not answering{' at ' + endpoint if endpoint else ' yet'}")
    raise click.exceptions.Exit(1)


def answers(endpoint: str, settings) -> bool:
    from skyshift.client import Client

    with Client(endpoint=endpoint, settings=settings) as client:
        return client.ping(timeout=1.0)


@api.command("info")
@pass_session
def api_info(session: Session) -> None:
    """Show where skyctl connects and where the instance keeps its files."""
    import importlib.metadata

    settings = session.settings
    server = local_server(session)
    if session.server:
        endpoint, source = session.server, "--server"
    elif os.environ.get("SKYSHIFT_API_SERVER"):
        endpoint, source = settings.client.endpoint, "$SKYSHIFT_API_SERVER"
    elif settings.client.endpoint:
        endpoint, source = settings.client.endpoint, str(settings.config_file)
    else:
        endpoint, source = server.endpoint(), str(server.endpoint_file)
    reachable = bool(endpoint) and answers(endpoint, settings)
    pid = server.pid()
    etcd = settings.etcd.endpoints or server.etcd_endpoint()
    rows = [
        ("endpoint", f"{endpoint} (from {source})" if endpoint else f"none (no local server recorded in {source})"),
        ("reachable", "yes" if reachable else "no"),
        ("home", settings.home),
        ("config file", f"{settings.config_file}{'' if settings.config_file.exists() else ' (not present)'}"),
        ("etcd endpoint", etcd or "none recorded"),
        ("local server", f"running (pid {pid}), log {server.log_file}" if pid else "stopped"),
        ("client version", importlib.metadata.version("skyshift")),
        ("server version", "not reported by the API"),
    ]
    width = max(len(label) for label, _ in rows) + 2
    for label, value in rows:
        click.echo(f"{(label + ':').ljust(width)}{value}")


# ---------------------------------------------------------------------------- logs, exec (skyctl/jobs_cmds.py)

cli.add_command(jobs_cmds.logs)
cli.add_command(jobs_cmds.exec_command)

# ---------------------------------------------------------------------------- users and access (skyctl/auth_cmds.py)

auth_cmds.register(cli, create)


def main() -> None:
    cli.main(prog_name="skyctl")


if __name__ == "__main__":
    main()
