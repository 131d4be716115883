"""`skyctl apply`: read manifests from files, directories or stdin, then create each object or
update the one that exists.

Every manifest is parsed and validated before the first write, so a bad document anywhere
applies nothing.
"""
from __future__ import annotations

import pathlib
from typing import IO, Iterable, List, Optional, Tuple

from google.protobuf.message import Message

from skyshift.api import convert, kinds, validation
from skyshift.api.errors import AlreadyExistsError, ConflictError, InvalidError, NotFoundError

#: Files a directory contributes (not recursive), in name order.
MANIFEST_SUFFIXES = (".yaml", ".yml", ".json")


def read_sources(paths: Iterable[str], stdin: IO[str]) -> List[Tuple[str, str]]:
    """(source name, text) for every file: '-' is stdin, a directory gives its manifest files."""
    sources = []
    for path in paths:
        if path == "-":
            sources.append(("<stdin>", stdin.read()))
            continue
        location = pathlib.Path(path)
        files = sorted(p for p in location.iterdir() if p.is_file() and p.suffix in MANIFEST_SUFFIXES) \
            if location.is_dir() else [location]
        sources.extend((str(file), file.read_text()) for file in files)
    return sources


def _ordered(objects: List[Message]) -> List[Message]:
    """Namespaces first, so a file can create a namespace and what goes in it; otherwise as given."""
    return sorted(objects, key=lambda obj: kinds.kind_of(obj).name != "Namespace")


def load_objects(sources: Iterable[Tuple[str, str]], namespace: Optional[str] = None) -> List[Message]:
    """Typed, validated objects from manifest texts; errors name the source, document and field."""
    objects = []
    for source, text in sources:
        documents = convert.load_manifests(text, source)
        for index, document in enumerate(documents):
            where = source if len(documents) == 1 else f"{source} (document {index + 1})"
            try:
                obj = convert.from_manifest(document, namespace or kinds.DEFAULT_NAMESPACE)
                kind = kinds.kind_of(obj)
                if namespace and kind.namespaced and obj.metadata.namespace != namespace:
                    raise InvalidError("metadata.namespace", f"{obj.metadata.namespace!r} differs from "
                                                             f"--namespace {namespace!r}")
                validation.validate_metadata(kind, obj)
                validation.validate_spec(kind, obj)  # also fills defaults, for the 'unchanged' check
            except InvalidError as error:
                raise InvalidError("", f"{where}: {error.message}") from None
            objects.append(obj)
    return _ordered(objects)


def _desired(current: Message, manifest: Message) -> Message:
    """The stored object with the manifest's spec and labels, and its annotations added.
    Finalizers, owners and status stay as they are: they belong to controllers."""
    desired = type(current)()
    desired.CopyFrom(current)
    desired.spec.CopyFrom(manifest.spec)
    desired.metadata.ClearField("labels")
    desired.metadata.labels.update(manifest.metadata.labels)
    desired.metadata.annotations.update(manifest.metadata.annotations)
    return desired


def apply_object(client, manifest: Message, attempts: int) -> str:
    """Create or update one object: 'created', 'configured' or 'unchanged'. A concurrent change
    (conflict) or create (already exists) is retried up to `attempts` times."""
    kind = kinds.kind_of(manifest)
    meta = manifest.metadata
    for _ in range(attempts):
        try:
            current = client.get(kind.plural, meta.name, meta.namespace)
        except NotFoundError:
            try:
                client.create(manifest)
                return "created"
            except AlreadyExistsError:
                continue  # someone created it meanwhile: update theirs
        desired = _desired(current, manifest)
        if desired == current:
            return "unchanged"
        try:
            updated = client.update(desired)
        except ConflictError:
            continue
        return "unchanged" if updated.metadata.resource_version == current.metadata.resource_version else "configured"
    raise ConflictError(f"{kind.name.lower()}/{meta.name} kept changing while being applied "
                        f"({attempts} attempts): try again")
