"""Credentials, docker config.json auths, WWW-Authenticate challenges, endpoints."""

from __future__ import annotations

import base64
import json
from pathlib import Path

from criv.config import RegistriesConfig
from criv.image.auth import Credentials, load_auth_file, normalize_host, parse_challenges
from criv.image.registry import RegistryClient


def test_user_password_forms() -> None:
    assert Credentials(username="u", password="p").user_password() == ("u", "p")
    enc = base64.b64encode(b"alice:pa:ss").decode()
    assert Credentials(auth=enc).user_password() == ("alice", "pa:ss")
    assert Credentials(auth="!!notbase64").user_password() is None
    assert Credentials(identity_token="t").user_password() is None
    assert Credentials().is_empty() and not Credentials(registry_token="x").is_empty()
    assert "secret" not in repr(Credentials(username="u", password="secret"))


def test_normalize_host() -> None:
    assert normalize_host("https://index.docker.io/v1/") == "docker.io"
    assert normalize_host("registry-1.docker.io") == "docker.io"
    assert normalize_host("http://127.0.0.1:5000/v2/") == "127.0.0.1:5000"
    assert normalize_host("Quay.IO") == "quay.io"


def test_auth_file(tmp_path: Path) -> None:
    p = tmp_path / "config.json"
    enc = base64.b64encode(b"u:p").decode()
    p.write_text(
        json.dumps(
            {
                "auths": {
                    "https://index.docker.io/v1/": {"auth": enc},
                    "quay.io": {"username": "q", "password": "w"},
                    "ghcr.io": {"identitytoken": "idt"},
                    "bad": "not an object",
                }
            }
        )
    )
    auths = load_auth_file(str(p))
    assert auths["docker.io"].user_password() == ("u", "p")
    assert auths["quay.io"].user_password() == ("q", "w")
    assert auths["ghcr.io"].identity_token == "idt"
    assert "bad" not in auths
    assert load_auth_file(str(tmp_path / "missing.json")) == {}
    assert load_auth_file("") == {}


def test_challenges() -> None:
    [c] = parse_challenges(
        'Bearer realm="https://auth.docker.io/token",service="registry.docker.io",'
        'scope="repository:library/busybox:pull,push"'
    )
    assert c.scheme == "bearer"
    assert c.params == {
        "realm": "https://auth.docker.io/token",
        "service": "registry.docker.io",
        "scope": "repository:library/busybox:pull,push",
    }
    both = parse_challenges('Basic realm="r", Bearer realm="https://t/x",service=s')
    assert [x.scheme for x in both] == ["basic", "bearer"]
    assert both[1].params == {"realm": "https://t/x", "service": "s"}
    assert parse_challenges("Basic")[0].scheme == "basic"
    assert parse_challenges("") == []


def test_endpoints_mirrors_then_host() -> None:
    cfg = RegistriesConfig(
        mirrors={"docker.io": ["http://127.0.0.1:5000", "https://mirror.example/v2"]},
        insecure=["myreg:5000"],
    )
    client = RegistryClient(cfg)
    eps = client.endpoints("docker.io")
    assert [e.base for e in eps] == [
        "http://127.0.0.1:5000",
        "https://mirror.example/v2",
        "https://registry-1.docker.io",
    ]
    assert eps[1].url("library/busybox/manifests/latest") == (
        "https://mirror.example/v2/library/busybox/manifests/latest"
    )
    assert eps[2].verify_tls and not eps[2].mirror and eps[0].mirror
    insecure = client.endpoints("myreg:5000")
    assert [(e.base, e.verify_tls) for e in insecure] == [
        ("https://myreg:5000", False),
        ("http://myreg:5000", False),
    ]
    assert [e.base for e in client.endpoints("localhost:5000")][-1] == "http://localhost:5000"
    assert [e.base for e in client.endpoints("quay.io")] == ["https://quay.io"]
