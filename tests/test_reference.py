"""Image reference parsing: the forms users type and the ones that must be refused."""

import pytest

from imagegw.errors import InvalidReference
from imagegw.reference import parse_reference

LOCS = ["myreg", "registry.example.org"]


@pytest.mark.parametrize(
    ("text", "location", "repo", "tag", "digest"),
    [
        ("ubuntu", "index.docker.io", "library/ubuntu", "latest", None),
        ("ubuntu:22.04", "index.docker.io", "library/ubuntu", "22.04", None),
        ("nersc/app:1.0", "index.docker.io", "nersc/app", "1.0", None),
        ("127.0.0.1:5000/ns/name:tag", "127.0.0.1:5000", "ns/name", "tag", None),
        ("localhost/x", "localhost", "x", "latest", None),
        ("registry.example.org/team/app", "registry.example.org", "team/app", "latest", None),
        ("myreg/app:2", "myreg", "app", "2", None),
        (
            "ubuntu@sha256:" + "a" * 64,
            "index.docker.io",
            "library/ubuntu",
            None,
            "sha256:" + "a" * 64,
        ),
        (
            "ubuntu:22.04@sha256:" + "b" * 64,
            "index.docker.io",
            "library/ubuntu",
            "22.04",
            "sha256:" + "b" * 64,
        ),
        ("host.org:443/a/b/c:v1.2-rc_3", "host.org:443", "a/b/c", "v1.2-rc_3", None),
    ],
)
def test_reference_forms(text, location, repo, tag, digest):
    ref = parse_reference(text, "index.docker.io", LOCS)
    assert (ref.location, ref.repository, ref.tag, ref.digest) == (location, repo, tag, digest)


def test_default_location_is_used_for_unknown_first_component():
    ref = parse_reference("team/app:1", "myreg", LOCS)
    assert ref.location == "myreg" and ref.repository == "team/app"


def test_reference_is_digest_when_given():
    ref = parse_reference("app@sha256:" + "c" * 64, "myreg", LOCS)
    assert ref.reference == "sha256:" + "c" * 64


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("", "empty"),
        ("Ubuntu", "lowercase"),
        ("ubuntu:bad tag", "not a valid tag"),
        ("ubuntu@sha256:xyz", "not a valid digest"),
        ("a/../b", "not valid"),
        ("ubuntu:", "not a valid tag"),
        (" ubuntu", "spaces"),
    ],
)
def test_bad_references_name_the_problem(text, words):
    with pytest.raises(InvalidReference) as err:
        parse_reference(text, "index.docker.io", LOCS)
    assert words in str(err.value)
