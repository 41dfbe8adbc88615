"""Challenges, credentials from the files users already have, credential helpers, tokens."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import stat
from pathlib import Path

import pytest

from fetchd.auth import (
    Challenge,
    Credentials,
    TokenCache,
    auth_files,
    basic_authorization,
    fetch_token,
    is_loopback,
    parse_challenges,
)
from fetchd.config import BasicCredentials
from fetchd.errors import InsecureRegistry, Unauthorized

CHALLENGES = [
    ('Bearer realm="https://auth.docker.io/token",service="registry.docker.io",'
     'scope="repository:library/debian:pull"',
     [("bearer", {"realm": "https://auth.docker.io/token", "service": "registry.docker.io",
                  "scope": "repository:library/debian:pull"})]),
    # a comma inside quotes belongs to the value
    ('Bearer realm="https://r/token",scope="repository:a:pull,push"',
     [("bearer", {"realm": "https://r/token", "scope": "repository:a:pull,push"})]),
    # several challenges in one header
    ('Basic realm="Registry Realm", Bearer realm="https://t/x",service="s"',
     [("basic", {"realm": "Registry Realm"}), ("bearer", {"realm": "https://t/x", "service": "s"})]),
    # spaces around '=' and ',' and mixed-case names; escaped quote
    ('BEARER  Realm = "https://t" ,  Error="invalid_token" , error_description="say \\"hi\\""',
     [("bearer", {"realm": "https://t", "error": "invalid_token", "error_description": 'say "hi"'})]),
    # unquoted token values
    ("Bearer realm=https://t/token,service=reg",
     [("bearer", {"realm": "https://t/token", "service": "reg"})]),
    ("Basic", [("basic", {})]),
    ('Negotiate, Basic realm="x"', [("negotiate", {}), ("basic", {"realm": "x"})]),
    ("", []),
]


@pytest.mark.parametrize("header,want", CHALLENGES, ids=[str(i) for i in range(len(CHALLENGES))])
def test_parse_challenges(header: str, want: list[tuple[str, dict[str, str]]]) -> None:
    got = parse_challenges(header)
    assert [(c.scheme, dict(c.params)) for c in got] == want


def test_several_header_values_are_all_read() -> None:
    got = parse_challenges(['Basic realm="a"', 'Bearer realm="https://b",error="insufficient_scope"'])
    assert [c.scheme for c in got] == ["basic", "bearer"]
    assert got[1].error == "insufficient_scope" and got[1].realm == "https://b"


@pytest.mark.parametrize("host,loopback", [
    ("127.0.0.1:5000", True), ("127.8.9.10", True), ("localhost:80", True), ("[::1]:5000", True),
    ("::1", True), ("quay.io", False), ("10.0.0.1:5000", False), ("128.0.0.1", False),
    ("localhost.example.com", False),
])
def test_is_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def test_token_cache_refreshes_before_expiry() -> None:
    now = [100.0]
    cache = TokenCache(clock=lambda: now[0])
    cache.put("h", "s", "tok", 300)
    assert cache.get("h", "s") is not None and cache.get("h", "other") is None
    now[0] += 269  # 300 s token: refreshed in its last 30 s
    assert cache.get("h", "s") is not None
    now[0] += 2
    assert cache.get("h", "s") is None
    assert "tok" not in repr(cache.put("h", "s", "tok", 60))


async def test_plain_http_token_realm_is_refused_unless_allowed() -> None:
    challenge = Challenge("bearer", (("realm", "http://auth.example.com/token"),))
    with pytest.raises(InsecureRegistry, match="insecure = true"):
        # refused before any connection is made: no session is needed
        await fetch_token(None, challenge, "repository:a:pull", None,  # type: ignore[arg-type]
                          registry="quay.io", allow_http=False, timeout=1)


async def test_malformed_token_realm_is_a_clear_error() -> None:
    challenge = Challenge("bearer", (("realm", "https://[::1/token"),))
    with pytest.raises(Unauthorized, match="not a valid URL"):
        await fetch_token(None, challenge, "repository:a:pull", None,  # type: ignore[arg-type]
                          registry="quay.io", allow_http=False, timeout=1)


def test_basic_authorization_header() -> None:
    value = basic_authorization(BasicCredentials("usér", "p:w"))
    assert base64.b64decode(value.removeprefix("Basic ")).decode() == "usér:p:w"
    assert "p:w" not in repr(BasicCredentials("u", "p:w"))


# ---------------------------------------------------------------------- credential files


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def write(path: Path, obj: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))
    return path


def test_auth_file_order(tmp_path: Path) -> None:
    env = {"REGISTRY_AUTH_FILE": "/a.json", "XDG_RUNTIME_DIR": "/run/user/1",
           "XDG_CONFIG_HOME": "/cfg", "DOCKER_CONFIG": "/dock", "HOME": "/home/u"}
    assert auth_files(env) == [Path("/a.json"), Path("/run/user/1/containers/auth.json"),
                               Path("/cfg/containers/auth.json"), Path("/dock/config.json")]
    assert auth_files({"HOME": "/home/u"}) == [Path("/home/u/.config/containers/auth.json"),
                                               Path("/home/u/.docker/config.json")]


async def test_first_file_with_an_entry_wins(tmp_path: Path) -> None:
    write(tmp_path / "run/containers/auth.json", {"auths": {"quay.io": {"auth": b64("runtime:1")}}})
    write(tmp_path / "home/.docker/config.json", {"auths": {
        "quay.io": {"auth": b64("docker:2")}, "ghcr.io": {"auth": b64("docker:3")}}})
    creds = Credentials(env={"XDG_RUNTIME_DIR": str(tmp_path / "run"), "HOME": str(tmp_path / "home")})
    assert await creds.lookup("quay.io", "org/app") == BasicCredentials("runtime", "1")
    assert await creds.lookup("ghcr.io", "o/r") == BasicCredentials("docker", "3")
    assert await creds.lookup("example.com", "x") is None


async def test_repository_scoped_entries_and_docker_hub_keys(tmp_path: Path) -> None:
    auth = write(tmp_path / "auth.json", {"auths": {
        "quay.io": {"auth": b64("host:h")},
        "quay.io/org": {"auth": b64("org:o")},
        "https://index.docker.io/v1/": {"auth": b64("hub:x")},
    }})
    creds = Credentials(env={"REGISTRY_AUTH_FILE": str(auth), "HOME": str(tmp_path)})
    assert (await creds.lookup("quay.io", "org/app")).username == "org"  # type: ignore[union-attr]
    assert (await creds.lookup("quay.io", "other/app")).username == "host"  # type: ignore[union-attr]
    assert (await creds.lookup("docker.io", "library/debian")).username == "hub"  # type: ignore[union-attr]


async def test_username_password_and_identity_token_entries(tmp_path: Path) -> None:
    auth = write(tmp_path / "auth.json", {"auths": {
        "a.io": {"username": "u", "password": "p"},
        "b.io": {"identitytoken": "refresh"},
        "c.io": {"auth": "!!not base64"},
    }})
    creds = Credentials(env={"REGISTRY_AUTH_FILE": str(auth), "HOME": str(tmp_path)})
    assert await creds.lookup("a.io") == BasicCredentials("u", "p")
    assert await creds.lookup("b.io") == BasicCredentials("<token>", "refresh")
    assert await creds.lookup("c.io") is None


async def test_configured_auth_file_replaces_the_defaults(tmp_path: Path) -> None:
    write(tmp_path / "home/.docker/config.json", {"auths": {"a.io": {"auth": b64("default:1")}}})
    own = write(tmp_path / "own.json", {"auths": {"a.io": {"auth": b64("own:2")}}})
    creds = Credentials(env={"HOME": str(tmp_path / "home")})
    assert (await creds.lookup("a.io", "", str(own))).username == "own"  # type: ignore[union-attr]
    assert (await creds.lookup("a.io")).username == "default"  # type: ignore[union-attr]


def helper(bin_dir: Path, name: str, script: str) -> None:
    bin_dir.mkdir(exist_ok=True)
    path = bin_dir / f"docker-credential-{name}"
    path.write_text("#!/bin/sh\n" + script)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


async def test_cred_helpers_and_creds_store_are_executed(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    # The helper protocol: `get` with the server URL on stdin, JSON on stdout.
    helper(bin_dir, "fake", 'read url; printf \'{"ServerURL":"%s","Username":"u-%s","Secret":"s"}\' '
                            '"$url" "$url"\n')
    helper(bin_dir, "missing", 'echo "credentials not found in native keychain"; exit 1\n')
    write(tmp_path / "home/.docker/config.json", {
        "credHelpers": {"quay.io": "fake", "ghcr.io": "missing"},
        "credsStore": "fake",
        "auths": {"ghcr.io": {}},
    })
    env = {"HOME": str(tmp_path / "home"), "PATH": f"{bin_dir}:{os.environ.get('PATH', '')}"}
    creds = Credentials(env=env)
    assert await creds.lookup("quay.io", "o/a") == BasicCredentials("u-quay.io", "s")
    assert await creds.lookup("docker.io", "library/x") == BasicCredentials(
        "u-https://index.docker.io/v1/", "s")
    assert await creds.lookup("ghcr.io", "o/r") is None  # the helper knows nothing: anonymous


async def test_missing_helper_means_anonymous(tmp_path: Path) -> None:
    write(tmp_path / "home/.docker/config.json", {"credsStore": "does-not-exist"})
    creds = Credentials(env={"HOME": str(tmp_path / "home"), "PATH": str(tmp_path)})
    assert await creds.lookup("quay.io") is None


async def test_unreadable_auth_file_is_skipped(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    good = write(tmp_path / "home/.docker/config.json", {"auths": {"a.io": {"auth": b64("u:p")}}})
    assert good.exists()
    creds = Credentials(env={"REGISTRY_AUTH_FILE": str(bad), "HOME": str(tmp_path / "home")})
    assert await creds.lookup("a.io") == BasicCredentials("u", "p")


async def test_cancelled_lookup_leaves_no_helper_running(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    pid_file = tmp_path / "helper.pid"
    helper(bin_dir, "slow", f'echo $$ > {pid_file}; exec sleep 60\n')
    write(tmp_path / "home/.docker/config.json", {"credsStore": "slow"})
    env = {"HOME": str(tmp_path / "home"), "PATH": f"{bin_dir}:{os.environ.get('PATH', '')}"}
    task = asyncio.create_task(Credentials(env=env).lookup("quay.io"))
    while not pid_file.exists() or not pid_file.read_text().strip():  # noqa: ASYNC110
        await asyncio.sleep(0.01)
    pid = int(pid_file.read_text())
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    with pytest.raises(ProcessLookupError):  # killed and reaped, not left to run for a minute
        os.kill(pid, 0)
