"""Parsing image references.

Forms: ``name``, ``name:tag``, ``host[:port]/ns/name:tag``, ``name@sha256:…``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from .errors import InvalidReference

DOCKER_HUB_NAMES = frozenset({"index.docker.io", "docker.io", "registry-1.docker.io"})

# From the OCI distribution spec: path components and tags.
_COMPONENT = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*\Z")
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}\Z")
_DIGEST = re.compile(r"(sha256:[a-f0-9]{64}|sha512:[a-f0-9]{128})\Z")
_HOST = re.compile(r"[A-Za-z0-9.-]+(?::[0-9]+)?\Z|\[[0-9a-fA-F:]+\](?::[0-9]+)?\Z")


@dataclass(frozen=True)
class ImageRef:
    """A resolved reference: which location, which repository, which tag or digest."""

    location: str
    repository: str
    tag: str | None = None
    digest: str | None = None

    @property
    def reference(self) -> str:
        """What goes after ``/manifests/`` in the registry API."""
        return self.digest or self.tag or "latest"

    def __str__(self) -> str:
        text = f"{self.location}/{self.repository}"
        if self.tag:
            text += f":{self.tag}"
        if self.digest:
            text += f"@{self.digest}"
        return text


def _looks_like_host(component: str) -> bool:
    return ("." in component or ":" in component or component == "localhost") and bool(
        _HOST.match(component)
    )


def parse_reference(
    text: str, default_location: str = "index.docker.io", locations: Iterable[str] = ()
) -> ImageRef:
    """Split ``text`` into location, repository and tag/digest.

    The location is the first path component when it names a configured location or
    looks like a host; otherwise ``default_location``. A tag defaults to ``latest``.
    """
    original = text
    if not text or text != text.strip():
        raise InvalidReference(original or "''", "empty image reference or surrounding spaces")
    digest = None
    if "@" in text:
        text, digest = text.split("@", 1)
        if not _DIGEST.match(digest):
            raise InvalidReference(original, f"'{digest}' is not a valid digest (sha256:<64 hex>)")
    first, sep, rest = text.partition("/")
    if sep and (first in set(locations) or _looks_like_host(first)):
        location, path = first, rest
    else:
        location, path = default_location, text
    tag = None
    last = path.rsplit("/", 1)[-1]
    if ":" in last:
        path, tag = path.rsplit(":", 1)
        if not _TAG.match(tag):
            raise InvalidReference(original, f"'{tag}' is not a valid tag")
    if not path:
        raise InvalidReference(original, "no repository name")
    for component in path.split("/"):
        if not _COMPONENT.match(component):
            raise InvalidReference(
                original,
                f"repository component '{component}' is not valid "
                "(lowercase letters, digits and . _ - separators)",
            )
    if location in DOCKER_HUB_NAMES and "/" not in path:
        path = "library/" + path
    if tag is None and digest is None:
        tag = "latest"
    return ImageRef(location=location, repository=path, tag=tag, digest=digest)
