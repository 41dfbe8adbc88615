"""Table tests for image references (Docker form and Isar's docker:// form)."""

from __future__ import annotations

import pytest

from fetchd.digest import Digest
from fetchd.errors import InvalidReference
from fetchd.reference import Reference

D = "sha256:" + "ab" * 32

PARSE = [
    # text, registry, repository, tag, digest, str()
    ("debian", "docker.io", "library/debian", None, None, "docker.io/library/debian"),
    ("debian:bookworm", "docker.io", "library/debian", "bookworm", None,
     "docker.io/library/debian:bookworm"),
    ("library/debian:12", "docker.io", "library/debian", "12", None, "docker.io/library/debian:12"),
    ("docker.io/library/debian:12", "docker.io", "library/debian", "12", None,
     "docker.io/library/debian:12"),
    ("user/app", "docker.io", "user/app", None, None, "docker.io/user/app"),
    ("quay.io/org/app:v1.2_3-rc", "quay.io", "org/app", "v1.2_3-rc", None, "quay.io/org/app:v1.2_3-rc"),
    ("ghcr.io/o/r/deep/path:x", "ghcr.io", "o/r/deep/path", "x", None, "ghcr.io/o/r/deep/path:x"),
    ("localhost/app", "localhost", "app", None, None, "localhost/app"),
    ("localhost:5000/app:1", "localhost:5000", "app", "1", None, "localhost:5000/app:1"),
    ("127.0.0.1:5000/a/b:t", "127.0.0.1:5000", "a/b", "t", None, "127.0.0.1:5000/a/b:t"),
    ("[::1]:5000/app:1", "[::1]:5000", "app", "1", None, "[::1]:5000/app:1"),
    ("registry.example.com:443/x", "registry.example.com:443", "x", None, None,
     "registry.example.com:443/x"),
    (f"ghcr.io/o/r@{D}", "ghcr.io", "o/r", None, D, f"ghcr.io/o/r@{D}"),
    (f"127.0.0.1:5000/a:t@{D}", "127.0.0.1:5000", "a", "t", D, f"127.0.0.1:5000/a:t@{D}"),
    (f"debian@{D}", "docker.io", "library/debian", None, D, f"docker.io/library/debian@{D}"),
    ("index.docker.io/debian:12", "docker.io", "library/debian", "12", None,
     "docker.io/library/debian:12"),
    ("registry-1.docker.io/user/app", "docker.io", "user/app", None, None, "docker.io/user/app"),
    ("my_app/with-dash__and.dot", "docker.io", "my_app/with-dash__and.dot", None, None,
     "docker.io/my_app/with-dash__and.dot"),
]


@pytest.mark.parametrize("text,registry,repository,tag,digest,shown", PARSE, ids=[p[0] for p in PARSE])
def test_parse(text: str, registry: str, repository: str, tag: str | None, digest: str | None,
               shown: str) -> None:
    ref = Reference.parse(text)
    assert (ref.registry, ref.repository, ref.tag) == (registry, repository, tag)
    assert ref.digest == (Digest.parse(digest) if digest else None)
    assert str(ref) == shown
    assert Reference.parse(str(ref)) == ref


ISAR = [
    ("docker://debian", "docker.io", "library/debian", "latest", None),
    ("docker://debian;tag=bookworm", "docker.io", "library/debian", "bookworm", None),
    (f"docker://quay.io/org/app;digest={D};tag=v1", "quay.io", "org/app", "v1", D),
    (f"docker://quay.io/org/app;tag=v1;digest={D}", "quay.io", "org/app", "v1", D),
    ("docker://localhost:5000/app", "localhost:5000", "app", "latest", None),
    ("docker://127.0.0.1:5000/ns/app;tag=1.0", "127.0.0.1:5000", "ns/app", "1.0", None),
    ("docker://busybox;tag=1.36;name=bb;protocol=https", "docker.io", "library/busybox", "1.36", None),
]


@pytest.mark.parametrize("url,registry,repository,tag,digest", ISAR, ids=[p[0] for p in ISAR])
def test_parse_isar(url: str, registry: str, repository: str, tag: str, digest: str | None) -> None:
    for ref in (Reference.parse_isar(url), Reference.parse(url)):
        assert (ref.registry, ref.repository, ref.tag) == (registry, repository, tag)
        assert ref.digest == (Digest.parse(digest) if digest else None)


def test_api_host_and_target() -> None:
    hub = Reference.parse("debian")
    assert hub.api_host == "registry-1.docker.io" and hub.target == "latest"
    local = Reference.parse(f"localhost:5000/a:t@{D}")
    assert local.api_host == "localhost:5000" and local.target == D


BAD = [
    "",
    "Debian",
    "debian:",
    "debian:-x",
    "debian:" + "x" * 129,
    "debian@sha256:abc",
    "debian@md5:" + "ab" * 16,
    "a b",
    "quay.io/",
    "quay.io/Org/app",
    "bad_host!.io:5000/app",
    "app//x",
    "x" * 300,
    "docker://debian;foo=bar",
    "docker://debian;tag",
    "docker://debian:bookworm",
    f"docker://debian@{D}",
    "docker://quay.io/org/app:v1",
    # issue 13: these reached the HTTP client and ended as 'internal' errors with tracebacks
    "localhost:99999/app",
    "localhost:0/app",
    "quay.io:65536/app",
    "[1:2:3]/app",
    "[1:2:3]:5000/app",
    "[::1:zz]/app",
]


HOSTS_OK = [
    ("localhost:65535/app", "localhost:65535"),
    ("localhost:1/app", "localhost:1"),
    ("[::1]:5000/app", "[::1]:5000"),
    ("[fe80::1]/app", "[fe80::1]"),
    ("127.0.0.1:5000/app", "127.0.0.1:5000"),
]


@pytest.mark.parametrize("text, registry", HOSTS_OK, ids=[h[0] for h in HOSTS_OK])
def test_hosts_at_the_edges_of_valid(text: str, registry: str) -> None:
    assert Reference.parse(text).registry == registry


@pytest.mark.parametrize("text", BAD)
def test_bad_references_are_refused_with_the_input_named(text: str) -> None:
    with pytest.raises(InvalidReference) as info:
        Reference.parse(text)
    assert isinstance(info.value, ValueError)
    assert text[:20] in info.value.message  # the message names what was given
    assert info.value.http_status == 400
