"""Which image to run: ``--image``, the environment, and the ``type:tag`` descriptor.

Rules (docs/behaviour.md, 'Runtime: image selection'; the tag characters of 'Scenarios the
tests cover'):

* Precedence: ``--image``; else the pair ``SHIFTER_IMAGETYPE``/``SHIFTER_IMAGE`` (each
  falling back to its ``SLURM_SPANK_`` twin), used only when both are set; else the
  documented ``SHIFTER=type:tag`` (unlike Shifter; below ``--image``; ``SLURM_SPANK_SHIFTER`` as
  its twin). A variable set to the empty string counts as unset.
* Descriptor: if the text before the first ``:`` is ``docker``, ``custom``, ``id`` or
  ``local`` it is the type, else the whole text is the tag and ``defaultImageType``
  applies (which must itself be one of those four).
* Tag characters ``[A-Za-z0-9_:.+@-]``, plus ``/`` for ``docker`` and ``local``. Shifter
  silently deleted other characters; we refuse them, so a launch never runs an image
  other than the one named.
* ``id``: exactly 64 lowercase hex digits (it becomes a file name under imagePath).
* An image id found through a tag (the gateway's index or ``shifterimg lookup``) must
  pass :func:`valid_image_id`, the helper's rule (``meta_valid_image_id`` in
  helpers/meta.c; tests/test_helper_rules.py runs both on one table).
* ``local``: only with ``allowLocalChroot=1`` (unlike Shifter), an absolute path without ``..``.
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Mapping

IMAGE_TYPES = ("docker", "custom", "id", "local")
NO_IMAGE = "No image specified, or specified incorrectly!"
NO_TYPE = (
    "FAILED to determine image type. Either specify image type or set defaultImageType "
    "in udiRoot.conf"
)
TAG_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_:.+@-")
_ID_CHARS = frozenset("0123456789abcdef")
MAX_IMAGE_ID = 128
_IMAGE_ID_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.+-")


def valid_image_id(text: str) -> bool:
    """An id the helper accepts: it names files under ``imagePath``, so 1 to 128 of
    ``[A-Za-z0-9_.+-]``, no ``..`` anywhere, and not starting with ``.``, ``+`` or ``-``
    (a hidden file, or a name a tool could read as an option)."""
    return (
        0 < len(text) <= MAX_IMAGE_ID
        and all(c in _IMAGE_ID_CHARS for c in text)
        and text[0] not in ".+-"
        and ".." not in text
    )


class DescriptorError(ValueError):
    """The image request is missing or malformed; the message is the one to print."""


class ImageRequest:
    """A validated ``type`` and ``tag``; ``str()`` gives the ``type:tag`` form."""

    __slots__ = ("type", "tag")

    def __init__(self, type_: str, tag: str) -> None:
        self.type = type_
        self.tag = tag

    def __str__(self) -> str:
        return f"{self.type}:{self.tag}"

    def __repr__(self) -> str:
        return f"ImageRequest({self.type!r}, {self.tag!r})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ImageRequest):
            return NotImplemented
        return self.type == other.type and self.tag == other.tag

    def __hash__(self) -> int:
        return hash((self.type, self.tag))


def select_image(
    option: str | None,
    environ: Mapping[str, str],
    default_type: str | None = None,
    allow_local: bool = False,
) -> ImageRequest:
    """The image to run from the ``--image`` value (``None`` when not given) and the
    caller's environment. Raises :class:`DescriptorError`."""
    if option is not None:
        return parse_descriptor(option, default_type, allow_local)
    type_ = _env(environ, "SHIFTER_IMAGETYPE", "SLURM_SPANK_SHIFTER_IMAGETYPE")
    tag = _env(environ, "SHIFTER_IMAGE", "SLURM_SPANK_SHIFTER_IMAGE")
    # Both or neither: half a pair is ignored, as in Shifter.
    if type_ is not None and tag is not None:
        return make_request(type_, tag, allow_local)
    request = _env(environ, "SHIFTER", "SLURM_SPANK_SHIFTER")
    if request is not None:
        return parse_descriptor(request, default_type, allow_local)
    raise DescriptorError(NO_IMAGE)


def _env(environ: Mapping[str, str], name: str, fallback: str) -> str | None:
    return environ.get(name) or environ.get(fallback) or None


def parse_descriptor(
    text: str, default_type: str | None = None, allow_local: bool = False
) -> ImageRequest:
    """``type:tag`` or a bare tag (``defaultImageType`` then applies)."""
    if text == "":
        raise DescriptorError(NO_IMAGE)
    colon = text.find(":")
    if colon > 0 and text[:colon] in IMAGE_TYPES:
        return make_request(text[:colon], text[colon + 1 :], allow_local)
    if not default_type:
        raise DescriptorError(NO_TYPE)
    if default_type not in IMAGE_TYPES:
        raise DescriptorError(
            f"defaultImageType '{default_type}' in udiRoot.conf is not one of "
            + ", ".join(IMAGE_TYPES)
        )
    return make_request(default_type, text, allow_local)


def make_request(type_: str, tag: str, allow_local: bool = False) -> ImageRequest:
    if type_ not in IMAGE_TYPES:
        raise DescriptorError(f"Unknown image type '{type_}': use one of " + ", ".join(IMAGE_TYPES))
    check_tag(type_, tag, allow_local)
    return ImageRequest(type_, tag)


def check_tag(type_: str, tag: str, allow_local: bool = False) -> None:
    if tag == "":
        raise DescriptorError(f"Empty image tag for type {type_}. {NO_IMAGE}")
    slash_ok = type_ in ("docker", "local")
    for c in tag:
        if c not in TAG_CHARS and not (c == "/" and slash_ok):
            allowed = "letters, digits and _:.+@-" + (" and /" if slash_ok else "")
            raise DescriptorError(
                f"Invalid character {_show(c)} in {type_} image tag: only {allowed} are allowed"
            )
    if type_ == "id":
        if len(tag) != 64 or any(c not in _ID_CHARS for c in tag):
            raise DescriptorError("An image id is 64 lowercase hexadecimal digits")
    elif type_ == "local":
        if not allow_local:
            raise DescriptorError("local images are not allowed here (allowLocalChroot is not 1)")
        if not tag.startswith("/") or ".." in tag.split("/"):
            raise DescriptorError("A local image is an absolute host path without '..'")


def _show(c: str) -> str:
    """A character for a message: itself when printable ASCII, else its code."""
    return f"'{c}'" if " " < c < "\x7f" else f"U+{ord(c):04X}"
