"""Errors of the image pipeline.

Every error names the image it concerns and the cause in words an admin can act on;
the gateway stores ``str(error)`` as the record's ``status_message`` and the CLI prints it.
"""

from __future__ import annotations


class ImageError(Exception):
    """Base of every pipeline failure; ``image`` is the reference as the user wrote it."""

    def __init__(self, image: str, cause: str) -> None:
        super().__init__(f"{image}: {cause}")
        self.image = image
        self.cause = cause


class InvalidReference(ImageError):
    """The image reference cannot be parsed."""


class RegistryError(ImageError):
    """The registry could not give us the image."""


class RegistryUnreachable(RegistryError):
    """No answer from the registry (refused, DNS, timeout, repeated 5xx)."""


class RegistryAuthError(RegistryError):
    """The registry refused our (missing or wrong) credentials."""


class ImageNotFound(RegistryError):
    """The repository, tag or digest does not exist."""


class DigestMismatch(RegistryError):
    """Bytes received do not match the digest (or size) the manifest promised."""


class ManifestError(RegistryError):
    """The manifest or image config is malformed."""


class UnsupportedMediaType(RegistryError):
    """A manifest, config or layer media type we do not handle."""


class LayerError(ImageError):
    """A layer is malformed or unsafe to apply."""


class ConversionError(ImageError):
    """Building the squashfs (or placing it) failed."""


class NoSpaceError(ImageError):
    """A filesystem ran out of space while expanding or converting."""
