"""Reference parsing and normalisation, as containerd does it."""

from __future__ import annotations

import pytest

from criv.errors import InvalidArgument
from criv.image.reference import normalize, parse_reference

D = "sha256:" + "a" * 64


@pytest.mark.parametrize(
    ("ref", "want"),
    [
        ("busybox", "docker.io/library/busybox:latest"),
        ("busybox:1.36", "docker.io/library/busybox:1.36"),
        ("library/busybox", "docker.io/library/busybox:latest"),
        ("docker.io/busybox", "docker.io/library/busybox:latest"),
        ("index.docker.io/library/busybox:1", "docker.io/library/busybox:1"),
        ("user/app", "docker.io/user/app:latest"),
        ("quay.io/org/app:v1", "quay.io/org/app:v1"),
        ("localhost/app", "localhost/app:latest"),
        ("localhost:5000/app", "localhost:5000/app:latest"),
        ("127.0.0.1:5000/library/busybox:latest", "127.0.0.1:5000/library/busybox:latest"),
        ("registry.k8s.io/pause:3.9", "registry.k8s.io/pause:3.9"),
        ("a.b/c/d/e:tag-1.0_x", "a.b/c/d/e:tag-1.0_x"),
        (f"busybox@{D}", f"docker.io/library/busybox@{D}"),
        (f"busybox:1.36@{D}", f"docker.io/library/busybox:1.36@{D}"),
        (f"host:5000/x@{D}", f"host:5000/x@{D}"),
        ("[::1]:5000/app:v", "[::1]:5000/app:v"),
    ],
)
def test_normalize(ref: str, want: str) -> None:
    assert normalize(ref) == want


def test_parts() -> None:
    r = parse_reference(f"127.0.0.1:5000/library/busybox:1@{D}")
    assert r.domain == "127.0.0.1:5000"
    assert r.path == "library/busybox"
    assert r.tag == "1" and r.digest == D
    assert r.reference == D
    assert r.repository == "127.0.0.1:5000/library/busybox"
    assert parse_reference("busybox").reference == "latest"
    assert parse_reference("busybox", default_tag=False).tag == ""


@pytest.mark.parametrize(
    "ref",
    [
        "",
        " busybox",
        "Busybox",
        "docker.io/Library/busybox",
        "busybox:",
        "busybox:-bad",
        "busybox@sha256:abc",
        "busybox@md5:" + "a" * 32,
        "busybox@sha256:" + "g" * 64,
        "a" * 64,
        "bus ybox",
        "busybox::tag",
        "/busybox",
        "busybox/",
        "a//b",
        "host:port:5000/x",
        "-host.io/x",
        "x/" + "a" * 260,
        "busybox:" + "t" * 200,
    ],
)
def test_invalid(ref: str) -> None:
    with pytest.raises(InvalidArgument):
        parse_reference(ref)
