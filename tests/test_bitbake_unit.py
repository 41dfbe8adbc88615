"""The BitBake layer without a daemon: names, arch map, levels, checksum rules, mirrors, unpack.

Driven through the real ``bb.fetch2`` (Fetch.download / unpack) with a fake daemon
client that records every call, so each rule is seen from BitBake's side.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
from pathlib import Path
from typing import Any

import pytest
from test_bitbake_helpers import (
    LAYER_LIB,
    bb,
    fetch,
    fetchd_bitbake,
    make_datastore,
    register,
    unregister,
)

from fetchd.platform import DEBIAN_ARCHES

naming = fetchd_bitbake.naming
Fetchd = fetchd_bitbake.Fetchd

HEX_A = "a" * 64
HEX_B = "b" * 64
DIGEST_A = "sha256:" + HEX_A
DIGEST_B = "sha256:" + HEX_B


class FakeClient:
    """Stands in for fetchd_client.Client: tags resolve from a dict, fetch writes a small file."""

    def __init__(self, tags: dict[str, str] | None = None) -> None:
        self.tags = dict(tags or {})
        self.calls: list[tuple[str, Any, dict[str, Any]]] = []
        self.socket_path = "/fake/fetchd.sock"
        self.offline_store: set[str] = set()  # references the fake "has" for offline fetches
        self.fail: Exception | None = None

    def resolve(self, reference: str, *, offline: bool = False, max_age: float | None = None) -> dict[str, Any]:
        self.calls.append(("resolve", reference, {"offline": offline, "max_age": max_age}))
        if self.fail:
            raise self.fail
        return {"digest": self.tags[reference], "media_type": "index", "cached": False}

    def fetch(self, reference: str, **kw: Any) -> dict[str, Any]:
        self.calls.append(("fetch", reference, kw))
        if self.fail:
            raise self.fail
        from fetchd_client import FetchdClientError

        if kw["offline"] and reference not in self.offline_store:
            raise FetchdClientError("network-disabled", f"{reference} is not in the store")
        digest = reference.split("@", 1)[1]
        content = f"{reference} {kw['platform']} {kw['level']} {kw['repo_tag']}".encode()
        tmp = kw["dest"] + ".tmp"
        Path(tmp).write_bytes(content)
        os.replace(tmp, kw["dest"])
        return {"path": kw["dest"], "delivery": "hardlink", "index_digest": digest,
                "manifest_digest": "sha256:" + "c" * 64,
                "archive_digest": "sha256:" + hashlib.sha256(content).hexdigest(),
                "level": kw["level"], "repo_tag": kw["repo_tag"], "platform": kw["platform"]}

    def deliver(self, archive_digest: str, dest: str) -> dict[str, Any]:
        self.calls.append(("deliver", archive_digest, {"dest": dest}))
        Path(dest).write_bytes(b"delivered " + archive_digest.encode())
        return {"path": dest, "delivery": "hardlink"}

    def ops(self) -> list[str]:
        return [c[0] for c in self.calls]


@pytest.fixture
def fake() -> Any:
    client = FakeClient()
    method = register()
    method.client_factory = lambda path: client
    yield client
    method.client_factory = None
    unregister()


# --- names -------------------------------------------------------------------------------


def test_arch_table_matches_the_daemons() -> None:
    assert naming.DEBIAN_ARCHES == DEBIAN_ARCHES


@pytest.mark.parametrize("arch,directory,platform", [
    ("amd64", "amd64", "linux/amd64"),
    ("arm64", "arm64", "linux/arm64/v8"),
    ("armhf", "arm/v7", "linux/arm/v7"),
    ("armel", "arm/v6", "linux/arm/v6"),
    ("i386", "i386", "linux/386"),  # Isar's directory, the right platform
    ("mipsel", "mipsel", "linux/mipsle"),
    ("mips64el", "mips64el", "linux/mips64le"),
    ("ppc64el", "ppc64el", "linux/ppc64le"),
    ("riscv64", "riscv64", "linux/riscv64"),
    ("s390x", "s390x", "linux/s390x"),
    ("loong64", "loong64", "linux/loong64"),
    ("sparc64", "sparc64", "linux/sparc64"),  # unknown: passed through as Isar does
])
def test_arch_directory_and_platform(arch: str, directory: str, platform: str) -> None:
    spec = naming.arch_spec(arch)
    assert (spec.directory, spec.platform) == (directory, platform)


def test_no_two_debian_arches_share_a_directory() -> None:
    dirs = [naming.arch_spec(a).directory for a in DEBIAN_ARCHES]
    assert len(set(dirs)) == len(dirs)


@pytest.mark.parametrize("url,arch,localfile,workdir", [
    ("docker://debian;tag=bookworm", "amd64",
     "container-images/amd64/debian_bookworm.zst", "debian:bookworm.zst"),
    ("docker://debian", "arm64", "container-images/arm64/debian_latest.zst", "debian:latest.zst"),
    (f"docker://quay.io/org/img;digest={DIGEST_A};tag=1.0", "armhf",
     f"container-images/arm/v7/quay.io.org.img_sha256-{HEX_A}.zst", "quay.io.org.img:1.0.zst"),
    ("docker://127.0.0.1:5000/foo/bar;tag=2", "armel",
     "container-images/arm/v6/127.0.0.1:5000.foo.bar_2.zst", "127.0.0.1:5000.foo.bar:2.zst"),
    (f"docker://localhost:5000/x;digest={DIGEST_B}", "i386",
     f"container-images/i386/localhost:5000.x_sha256-{HEX_B}.zst", "localhost:5000.x:latest.zst"),
])
def test_names_are_isars(fake: FakeClient, tmp_path: Path, url: str, arch: str, localfile: str,
                         workdir: str) -> None:
    d = make_datastore(tmp_path, arch)
    ud = bb.fetch2.FetchData(url, d)
    assert isinstance(ud.method, Fetchd)
    assert ud.localfile == localfile
    assert ud.localpath == os.path.join(d.getVar("DL_DIR"), localfile)
    assert ud.workdir_name == workdir


@pytest.mark.parametrize("defaults,level_var,level", [
    (None, None, 3),
    ("--threads=4 -3", "-3", 3),
    ("--threads=4 -9", "-3", 9),       # ZSTD_DEFAULTS as expanded wins
    ("-T2", "-19", 19),                # no level in ZSTD_DEFAULTS: ZSTD_COMPRESSION_LEVEL
    ("-T 2 --ultra -19", None, 19),
    (None, "7", 7),
])
def test_zstd_level(defaults: str | None, level_var: str | None, level: int) -> None:
    assert naming.zstd_level(defaults, level_var)[0] == level


@pytest.mark.parametrize("defaults,level_var,level", [
    ("-T 2 --ultra -22", None, 22),
    ("--fast=3", None, -3),
    (None, "-20", 20),
])
def test_zstd_levels_fetchd_does_not_make_fail_at_parse_time(
        defaults: str | None, level_var: str | None, level: int) -> None:
    with pytest.raises(ValueError, match=f"zstd level {level} is out of fetchd's range"):
        naming.zstd_level(defaults, level_var)


def test_a_forced_level_fetchd_does_not_make_fails_at_parse_time(fake: FakeClient,
                                                                 tmp_path: Path) -> None:
    d = make_datastore(tmp_path, "amd64", FETCHD_ZSTD_LEVEL="22")
    with pytest.raises(bb.fetch2.ParameterError, match="FETCHD_ZSTD_LEVEL"):
        bb.fetch2.FetchData("docker://debian;tag=12", d)


def test_level_range_matches_the_daemons() -> None:
    from fetchd import compress_budget

    assert (naming.MIN_LEVEL, naming.MAX_LEVEL) == (compress_budget.MIN_LEVEL, compress_budget.MAX_LEVEL)


def test_zstd_level_reports_options_it_cannot_honour() -> None:
    assert naming.zstd_level("--threads=2 --long=27 -3", None) == (3, ["--long=27"])


def test_non_default_level_gets_its_own_dl_dir_file(fake: FakeClient, tmp_path: Path) -> None:
    d = make_datastore(tmp_path, "amd64", ZSTD_DEFAULTS="--threads=2 -9")
    ud = bb.fetch2.FetchData("docker://debian;tag=12", d)
    assert ud.localfile == "container-images/amd64/debian_12.level9.zst"
    assert ud.workdir_name == "debian:12.zst"


def test_bad_parameters_are_refused(fake: FakeClient, tmp_path: Path) -> None:
    d = make_datastore(tmp_path)
    with pytest.raises(bb.fetch2.ParameterError, match="digest"):
        bb.fetch2.FetchData("docker://debian;digest=sha256:abc", d)



def test_unknown_parameters_are_ignored_with_a_warning_as_isar_ignores_them(
        fake: FakeClient, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        ud = bb.fetch2.FetchData("docker://debian;branch=main;subdir=x", make_datastore(tmp_path))
    assert ud.localfile == "container-images/amd64/debian_latest.zst"
    assert "branch ignored" in caplog.text


# --- registration ---------------------------------------------------------------------


def test_register_puts_one_method_in_front_and_wins_over_isars(tmp_path: Path) -> None:
    class Container(bb.fetch2.FetchMethod):  # Isar's, appended by dpkg-base.bbclass
        def supports(self, ud: Any, d: Any) -> bool:
            return ud.type == "docker"

    isar = Container()
    bb.fetch2.methods.append(isar)
    try:
        first = register()
        again = register()
        assert again is first
        assert bb.fetch2.methods[0] is first
        assert sum(isinstance(m, Fetchd) for m in bb.fetch2.methods) == 1
        bb.fetch2.methods.append(Container())  # Isar appends on every parse
        ud = bb.fetch2.FetchData("docker://debian", make_datastore(tmp_path))
        assert ud.method is first
    finally:
        bb.fetch2.methods[:] = [m for m in bb.fetch2.methods if not isinstance(m, Container)]
        unregister()


# --- checksums ------------------------------------------------------------------------


def test_matching_digest_and_tag_fetch_by_digest(fake: FakeClient, tmp_path: Path) -> None:
    fake.tags["debian:12"] = DIGEST_A
    d = make_datastore(tmp_path, "armhf")
    ud = fetch(f"docker://debian;digest={DIGEST_A};tag=12", d, tmp_path / "work")
    assert fake.ops() == ["resolve", "fetch"]
    _, ref, kw = fake.calls[1]
    assert ref == f"debian@{DIGEST_A}"
    assert kw["platform"] == "linux/arm/v7" and kw["repo_tag"] == "debian:12" and kw["level"] == 3
    assert kw["dest"] == ud.localpath and kw["offline"] is False
    assert os.path.exists(ud.localpath + ".done")


def test_tag_and_digest_disagreeing_is_a_checksum_error(fake: FakeClient, tmp_path: Path,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    fake.tags["debian:12"] = DIGEST_B
    d = make_datastore(tmp_path)
    url = f"docker://debian;digest={DIGEST_A};tag=12"
    ud = bb.fetch2.FetchData(url, d)
    with pytest.raises(bb.fetch2.ChecksumError) as e:
        ud.method.download(ud, d)
    line = f'SRC_URI = "docker://debian;digest={DIGEST_B};tag=12"'
    assert line in str(e.value)
    # Through Fetch: BitBake logs the mismatch and fails the URL; nothing was fetched.
    with caplog.at_level(logging.WARNING), pytest.raises(bb.fetch2.FetchError):
        fetch(url, d)
    assert line in caplog.text
    assert "fetch" not in fake.ops()
    assert not os.path.exists(ud.localpath)


def test_offline_a_stale_tag_cache_does_not_fail_a_pinned_digest(
        fake: FakeClient, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    fake.tags["debian:12"] = DIGEST_B  # what the daemon's tag cache last saw
    fake.offline_store.add(f"debian@{DIGEST_A}")
    d = make_datastore(tmp_path, BB_NO_NETWORK="1")
    with caplog.at_level(logging.WARNING):
        ud = fetch(f"docker://debian;digest={DIGEST_A};tag=12", d)
    assert os.path.exists(ud.localpath + ".done")
    assert fake.calls[0][2]["offline"] is True
    assert "not checked again offline" in caplog.text


def test_missing_digest_strict_is_an_error_before_any_download(fake: FakeClient, tmp_path: Path,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    fake.tags["debian:12"] = DIGEST_A
    d = make_datastore(tmp_path, BB_STRICT_CHECKSUM="1")
    with caplog.at_level(logging.ERROR), pytest.raises(bb.fetch2.BBFetchException, match="missing checksums"):
        fetch("docker://debian;tag=12", d)
    assert f'SRC_URI = "docker://debian;digest={DIGEST_A};tag=12"' in caplog.text
    assert fake.ops() == ["resolve"]


@pytest.mark.parametrize("strict,warned", [("0", True), ("ignore", False), ("", True)])
def test_missing_digest_fires_the_event_and_warns(fake: FakeClient, tmp_path: Path,
                                                  caplog: pytest.LogCaptureFixture,
                                                  strict: str, warned: bool) -> None:
    fake.tags["debian:latest"] = DIGEST_A
    d = make_datastore(tmp_path, BB_STRICT_CHECKSUM=strict)
    seen: list[Any] = []

    def handler(event: Any, data: Any) -> None:
        seen.append(event)

    bb.event.register("fetchd_test_missing", handler, ["bb.fetch2.MissingChecksumEvent"], data=d)
    try:
        with caplog.at_level(logging.WARNING):
            ud = fetch("docker://debian", d)
    finally:
        bb.event.remove("fetchd_test_missing", None, data=d)
    assert [(e.url, e.checksums) for e in seen] == [("docker://debian", {"sha256sum": HEX_A})]
    line = f'SRC_URI = "docker://debian;digest={DIGEST_A}"'
    assert (line in caplog.text) is warned
    assert fake.calls[-1][1] == f"debian@{DIGEST_A}"  # fetched what the tag resolved to
    assert os.path.exists(ud.localpath)


def test_strict_refuses_a_cached_unpinned_download(fake: FakeClient, tmp_path: Path) -> None:
    fake.tags["debian:latest"] = DIGEST_A
    fetch("docker://debian", make_datastore(tmp_path, BB_STRICT_CHECKSUM="ignore"))
    with pytest.raises(bb.fetch2.BBFetchException, match="missing checksums"):
        fetch("docker://debian", make_datastore(tmp_path, BB_STRICT_CHECKSUM="1"))


def test_a_result_for_another_digest_is_refused(fake: FakeClient, tmp_path: Path) -> None:
    d = make_datastore(tmp_path)
    ud = bb.fetch2.FetchData(f"docker://debian;digest={DIGEST_A}", d)
    real_fetch = fake.fetch

    def wrong(reference: str, **kw: Any) -> dict[str, Any]:
        return dict(real_fetch(reference, **kw), index_digest=DIGEST_B)

    fake.fetch = wrong  # type: ignore[method-assign]
    with pytest.raises(bb.fetch2.ChecksumError, match=DIGEST_A):
        ud.method.download(ud, d)


# --- freshness ------------------------------------------------------------------------


def test_pinned_digest_is_never_resolved_again(fake: FakeClient, tmp_path: Path) -> None:
    d = make_datastore(tmp_path)
    url = f"docker://debian;digest={DIGEST_A}"
    fetch(url, d)
    fetch(url, d)
    fetch(url, d)
    assert fake.ops() == ["fetch"]


def test_moved_tag_is_fetched_again(fake: FakeClient, tmp_path: Path) -> None:
    fake.tags["debian:12"] = DIGEST_A
    d = make_datastore(tmp_path, BB_STRICT_CHECKSUM="ignore")
    ud = fetch("docker://debian;tag=12", d)
    fetch("docker://debian;tag=12", d)
    assert fake.ops() == ["resolve", "fetch", "resolve"]
    assert all(c[2]["max_age"] == 0 for c in fake.calls if c[0] == "resolve")
    fake.tags["debian:12"] = DIGEST_B
    fetch("docker://debian;tag=12", d)
    assert fake.ops()[3:] == ["resolve", "fetch"]  # one resolve, reused by download()
    assert Path(ud.localpath).read_bytes().startswith(f"debian@{DIGEST_B}".encode())


def test_same_digest_other_tag_gets_its_own_repotags(fake: FakeClient, tmp_path: Path) -> None:
    fake.tags.update({"debian:12": DIGEST_A, "debian:stable": DIGEST_A})
    d = make_datastore(tmp_path)
    ud = fetch(f"docker://debian;digest={DIGEST_A};tag=12", d)
    fetch(f"docker://debian;digest={DIGEST_A};tag=stable", d)
    assert Path(ud.localpath).read_bytes().endswith(b"debian:stable")


def test_level_change_is_a_new_file_and_the_old_stays(fake: FakeClient, tmp_path: Path) -> None:
    url = f"docker://debian;digest={DIGEST_A}"
    ud3 = fetch(url, make_datastore(tmp_path, ZSTD_COMPRESSION_LEVEL="-3"))
    ud9 = fetch(url, make_datastore(tmp_path, ZSTD_COMPRESSION_LEVEL="-9"))
    assert ud3.localpath != ud9.localpath
    assert [c[2]["level"] for c in fake.calls] == [3, 9]
    fetch(url, make_datastore(tmp_path, ZSTD_COMPRESSION_LEVEL="-3"))
    assert len(fake.calls) == 2  # back to 3: the file is still there


# --- network and daemon ---------------------------------------------------------------


def test_no_network_uses_the_cache(fake: FakeClient, tmp_path: Path) -> None:
    fake.tags["debian:12"] = DIGEST_A
    fetch("docker://debian;tag=12", make_datastore(tmp_path))
    n = len(fake.calls)
    fetch("docker://debian;tag=12", make_datastore(tmp_path, BB_NO_NETWORK="1"))
    assert len(fake.calls) == n  # not even a resolve


def test_no_network_asks_the_daemon_offline_and_fails_with_network_access(
        fake: FakeClient, tmp_path: Path) -> None:
    from fetchd_client import FetchdClientError

    d = make_datastore(tmp_path, BB_NO_NETWORK="1")
    url = f"docker://debian;digest={DIGEST_A}"
    with pytest.raises(bb.fetch2.NetworkAccess):
        fetch(url, d)
    assert fake.calls[-1][2]["offline"] is True
    fake.offline_store.add(f"debian@{DIGEST_A}")  # the daemon has it: offline works
    fetch(url, d)
    fake.fail = FetchdClientError("network-disabled", "not in the tag cache")
    with pytest.raises(bb.fetch2.NetworkAccess):
        fetch("docker://debian;tag=x", d)


def test_network_refused_by_allowed_networks(fake: FakeClient, tmp_path: Path) -> None:
    d = make_datastore(tmp_path, BB_ALLOWED_NETWORKS="example.org")
    with pytest.raises(bb.fetch2.BBFetchException):
        fetch(f"docker://debian;digest={DIGEST_A}", d)
    assert fake.calls == []


def test_moved_tag_check_respects_allowed_networks(fake: FakeClient, tmp_path: Path) -> None:
    fake.tags["debian:12"] = DIGEST_A
    fetch("docker://debian;tag=12", make_datastore(tmp_path))
    n = len(fake.calls)
    # Not allowed to reach the registry any more: keep the cached file, ask nothing.
    fetch("docker://debian;tag=12", make_datastore(tmp_path, BB_ALLOWED_NETWORKS="example.org"))
    assert len(fake.calls) == n


def test_unreachable_daemon_names_the_socket_and_how_to_start_it(tmp_path: Path) -> None:
    register()
    try:
        sock = str(tmp_path / "nowhere.sock")
        d = make_datastore(tmp_path, FETCHD_SOCKET=sock)
        ud = bb.fetch2.FetchData(f"docker://debian;digest={DIGEST_A}", d)
        with pytest.raises(bb.fetch2.FetchError) as e:
            ud.method.download(ud, d)
    finally:
        unregister()
    assert sock in str(e.value)
    assert "'systemctl start fetchd.socket'" in str(e.value) and "'fetchd serve'" in str(e.value)
    assert str(e.value).count(sock) == 1


# --- unpack ---------------------------------------------------------------------------


def test_unpack_is_a_hard_link_with_isars_name(fake: FakeClient, tmp_path: Path) -> None:
    fake.tags["127.0.0.1:5000/foo:1"] = DIGEST_A
    d = make_datastore(tmp_path)
    work = tmp_path / "work"
    work.mkdir()
    (work / "127.0.0.1:5000.foo:1.zst").write_bytes(b"stale")
    ud = fetch("docker://127.0.0.1:5000/foo;tag=1", d, work)
    out = work / "127.0.0.1:5000.foo:1.zst"
    assert not out.is_symlink()
    assert out.stat().st_ino == os.stat(ud.localpath).st_ino
    assert sorted(p.name for p in work.iterdir()) == ["127.0.0.1:5000.foo:1.zst"]


def test_unpack_asks_the_daemon_when_linking_is_refused(fake: FakeClient, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    d = make_datastore(tmp_path)
    f = bb.fetch2.Fetch([f"docker://debian;digest={DIGEST_A}"], d, cache=False)
    f.download()

    def refuse(src: str, dst: str) -> None:
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", refuse)
    f.unpack(str(tmp_path / "work"))
    out = tmp_path / "work" / "debian:latest.zst"
    assert fake.calls[-1][0] == "deliver"
    assert out.read_bytes().startswith(b"delivered sha256:")


def test_unpack_copies_as_last_resort(fake: FakeClient, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from fetchd_client import FetchdClientError

    d = make_datastore(tmp_path)
    f = bb.fetch2.Fetch([f"docker://debian;digest={DIGEST_A}"], d, cache=False)
    f.download()
    ud = f.ud[f.urls[0]]

    def refuse(src: str, dst: str) -> None:
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", refuse)
    fake.fail = FetchdClientError("archive-unknown", "gone")
    monkeypatch.setattr(fake, "deliver", lambda *a: (_ for _ in ()).throw(fake.fail))
    f.unpack(str(tmp_path / "work"))
    out = tmp_path / "work" / "debian:latest.zst"
    assert not out.is_symlink()
    assert out.read_bytes() == Path(ud.localpath).read_bytes()


# --- mirrors --------------------------------------------------------------------------


def test_file_premirror_keeps_the_arch_directory(fake: FakeClient, tmp_path: Path) -> None:
    mirror = tmp_path / "mirror"
    for arch_dir in ("arm/v7", "arm/v6", "i386"):
        p = mirror / "container-images" / arch_dir / f"debian_sha256-{HEX_A}.zst"
        p.parent.mkdir(parents=True)
        p.write_bytes(arch_dir.encode())
    url = f"docker://debian;digest={DIGEST_A}"
    got = {}
    for arch in ("armhf", "armel", "i386"):
        d = make_datastore(tmp_path / arch, arch, PREMIRRORS=f"docker://.*/.* file://{mirror}/")
        ud = fetch(url, d, tmp_path / arch / "work")
        got[arch] = (tmp_path / arch / "work" / "debian:latest.zst").read_bytes()
        assert not (tmp_path / arch / "work" / "debian:latest.zst").is_symlink()
        assert os.path.exists(ud.localpath + ".done")
    assert got == {"armhf": b"arm/v7", "armel": b"arm/v6", "i386": b"i386"}
    assert fake.calls == []


def test_file_mirror_missing_falls_back_to_the_daemon(fake: FakeClient, tmp_path: Path) -> None:
    d = make_datastore(tmp_path, "armhf", PREMIRRORS=f"docker://.*/.* file://{tmp_path}/empty/")
    fetch(f"docker://debian;digest={DIGEST_A}", d)
    assert fake.ops() == ["fetch"]


def test_docker_mirror_keeps_the_recipes_repotags(fake: FakeClient, tmp_path: Path) -> None:
    fake.tags["mirror.local:5000/m/img:1"] = DIGEST_A
    d = make_datastore(tmp_path, PREMIRRORS="docker://.*/.* docker://mirror.local:5000/m/BASENAME")
    ud = fetch(f"docker://quay.io/org/img;digest={DIGEST_A};tag=1", d)
    kinds = [(c[0], c[1]) for c in fake.calls]
    assert ("fetch", f"mirror.local:5000/m/img@{DIGEST_A}") in kinds
    assert Path(ud.localpath).read_bytes().endswith(b" quay.io/org/img:1")


# --- runs where BitBake runs ------------------------------------------------------------


def _python39() -> str | None:
    """A working Python 3.9 (the oldest BitBake 2.x supports), if this machine has one."""
    import glob
    import shutil
    import subprocess

    candidates = sorted(glob.glob("/root/.pyenv/versions/3.9.*/bin/python")) + [shutil.which("python3.9")]
    for candidate in candidates:
        if candidate and subprocess.run([candidate, "-c", "pass"], capture_output=True).returncode == 0:
            return candidate
    return None


@pytest.mark.skipif(_python39() is None, reason="no Python 3.9 interpreter on this machine")
def test_layer_imports_on_python_39_with_only_stdlib_and_bb(tmp_path: Path) -> None:
    import subprocess

    import bb as bb_package

    bb_parent = str(Path(bb_package.__file__).parent.parent)
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); sys.path.append(sys.argv[2]);"
        "import bb.fetch2, fetchd_bitbake, fetchd_client;"
        "m = fetchd_bitbake.register(bb.fetch2.methods);"
        "assert bb.fetch2.methods[0] is m; print('ok')"
    )
    # -S -I: no site-packages of 3.9, no user paths: only the stdlib, bb and the layer.
    out = subprocess.run([_python39(), "-S", "-I", "-c", code, str(LAYER_LIB), bb_parent],
                         capture_output=True, text=True, cwd=tmp_path)
    assert out.stdout.strip() == "ok", out.stderr
